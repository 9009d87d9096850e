"""Guards for the CUDA paths, run on the CPU (tests/cuda_guards.py says how each works).

Every training path (ANML second and first order, lanes of several models and tasks, OML, ASB,
i.i.d. pretraining) and the meta-test run one step (1) on CPU tensors under CudaKernelGuard, which
refuses argument patterns whose CUDA kernel differs from the CPU one, and (2) on the meta device
standing in for CUDA, with capturable optimisers and CUDA graphs' capture off: a CPU tensor mixed
into a device operation raises, and a copy from the host inside a step that a CUDA graph records
is refused. Then the capturable branches of the optimisers, run on the CPU against the others."""
import copy
import importlib

import numpy as np
import pytest
import torch

import anml
from fastpath import cuda_graphs
import pretrain_omni
from fastpath.batched import ModelStack, StackedAdam, StackedMetaStep, shared_or_per_model_rate, seeded_stack, stacked_optimizer
from harness.config import EvalConfig
from conftest import INNER_LR, TINY
from cuda_guards import CudaDifference, CudaKernelGuard, guarded_steps, meta_as_cuda
from fastpath.frozen_features import LastLayers
from harness.checkpoints import load_optimizer_state
from fastpath.derivatives import norm_backward
from meta_test import meta_test
from model import IMAGE_SIZE, kaiming_std, reset_last_layer, seeded_network, seeded_oml

aten = torch.ops.aten


@pytest.fixture
def small_sampler(sampler):
    """The real sampler's first 12 background classes (the data is real, the draws quick)."""
    small = copy.copy(sampler)
    small.background = sampler.background[:12].clone()
    small.rng = np.random.default_rng(0)
    return small


@pytest.fixture
def device_steps(monkeypatch):
    """Run on the meta device as on CUDA: capturable Adam accepted, graph capture off, and every
    step a CUDA graph records (the meta-iteration, the meta-test's step) under the host-copy guard."""
    monkeypatch.setattr(cuda_graphs, "CAPTURE", False)
    with meta_as_cuda(), guarded_steps(cuda_graphs.GraphedMetaStep, "_step"), \
            guarded_steps(cuda_graphs.ReplayedSteps, "advance"):
        yield


def on(device, model):
    return model.to(device)


# ----------------------------------------------------------------------------- the training paths


def anml_graphed(sampler, device, first_order=False):
    """The graph backend's iterations (eager here), as train_omni.py builds them on CUDA."""
    model = on(device, seeded_network(*TINY.values(), 1))
    opt = anml.outer_optimizer(model, 1e-3, capturable=device != "cpu")
    step = anml.meta_stepper("graph", model, opt, sampler, device, INNER_LR, first_order)
    for _ in range(2):
        loss, _ = step()
    return loss


def anml_func(sampler, device, first_order=False):
    """The func backend's iteration: meta_step without reading the loss back."""
    model = on(device, seeded_network(*TINY.values(), 1))
    opt = anml.outer_optimizer(model, 1e-3)
    train_data, train_class, (valid_ims, valid_labels) = sampler.sample_train(device=device)
    anml.lobotomize(model.fc, train_class)
    train_ims, train_labels = (torch.cat(parts) for parts in zip(*train_data))
    loss, _ = anml.meta_loss(model, INNER_LR, train_ims, train_labels, valid_ims, valid_labels, "func", first_order)
    opt.step()
    return loss


def lanes(sampler, device, first_order=False, rates=(1e-3, 2e-3), graphed=True):
    """K = 2 models x B = 2 tasks as lanes, with a rate each (StackedAdam, per-lane inner rates)."""
    seeds = (3, 5)
    if device == "cpu":
        stack, generators = seeded_stack(**TINY, seeds=seeds)
    else:  # the meta device has no generators: the rows' draws come from CPU ones (they hold no values)
        stack = ModelStack([seeded_network(*TINY.values(), seed).to(device) for seed in seeds])
        generators = [torch.Generator() for _ in seeds]
    opt = stacked_optimizer(stack, list(rates), capturable=device != "cpu")
    samplers = [copy.copy(sampler) for _ in seeds]
    for s, seed in zip(samplers, seeds):
        s.rng = np.random.default_rng(seed)
    inner = shared_or_per_model_rate([INNER_LR, INNER_LR / 2], device)
    step = StackedMetaStep(stack, opt, samplers, generators, 2, inner, first_order, graphed=graphed and device != "cpu")
    for _ in range(2):
        loss, _ = step()
    return loss


def oml_graphed(sampler, device):
    """OML's iterations on the graph backend, on 84x84 images (synthetic here)."""
    sampler = copy.copy(sampler)
    sampler.background = torch.rand(6, 20, 1, IMAGE_SIZE, IMAGE_SIZE, generator=torch.Generator().manual_seed(0))
    model = on(device, seeded_oml(3, 1))
    opt = anml.outer_optimizer(model, 1e-4, capturable=device != "cpu")
    step = anml.meta_stepper("graph", model, opt, sampler, device, 0.03)
    return step()[0]


def asb(sampler, device, zap=True):
    model = on(device, seeded_network(*TINY.values(), 1))
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    return pretrain_omni.asb_episode(model, opt, sampler.sample_train(device=device), 0.1, zap)[0]


def iid(sampler, device, zap=True):
    model = on(device, seeded_network(*TINY.values(), 1))
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    images, labels = pretrain_omni.background_set(sampler)
    if zap:
        reset_last_layer(model)
    return pretrain_omni.train_step(model, opt, images[:32].to(device), labels[:32].to(device))[0]


PATHS = {
    "anml graph": anml_graphed,
    "anml graph first order": lambda s, d: anml_graphed(s, d, first_order=True),
    "anml func": anml_func,
    "anml func first order": lambda s, d: anml_func(s, d, first_order=True),
    "lanes": lanes,
    "lanes first order": lambda s, d: lanes(s, d, first_order=True),
    "lanes one rate": lambda s, d: lanes(s, d, rates=(1e-3, 1e-3)),
    "lanes shared meta-batch (eager)": lambda s, d: lanes(s, d, graphed=False),
    "oml": oml_graphed,
    "asb": asb,
    "asb without zapping": lambda s, d: asb(s, d, zap=False),
    "iid with zapping": iid,
}


@pytest.mark.parametrize("path", PATHS)
def test_training_paths_use_no_call_whose_cuda_kernel_differs(small_sampler, path):
    with CudaKernelGuard() as guard:
        loss = PATHS[path](small_sampler, "cpu")
    assert torch.isfinite(loss).all()
    if path.startswith(("anml", "lanes")):  # the functional norm's backward ran, and passed the guard
        assert guard.seen.get(aten.native_batch_norm_backward.default, 0) > 0


@pytest.mark.parametrize("path", PATHS)
def test_training_paths_run_on_a_device_without_host_tensors(small_sampler, device_steps, path):
    loss = PATHS[path](small_sampler, "meta")
    assert loss.device.type == "meta"


def test_meta_test_uses_no_call_whose_cuda_kernel_differs(small_checkpoint, sampler):
    for method in ("seq", "iid"):
        config = EvalConfig(model=str(small_checkpoint), classes=(3, 5), lrs=(1e-3, 5e-4), runs=2, seed=1,
                            method=method)
        with CudaKernelGuard():
            results = meta_test(config, copy.copy(sampler), progress=False)
        assert np.isfinite(results["test"]).all()
    config = EvalConfig(model=str(small_checkpoint), classes=(3,), lrs=(1e-3,), runs=1, original_loop=True)
    with CudaKernelGuard():
        meta_test(config, copy.copy(sampler), progress=False)


def test_meta_test_steps_run_on_a_device_without_host_tensors(device_steps, monkeypatch):
    """The meta-test's last layers (several runs and rates at once, a fused Adam) learn a sequence
    on the device, with no tensor of the host mixed in or copied in by a step."""
    monkeypatch.setattr(importlib.import_module("torch.optim.optimizer"), "_get_fused_kernels_supported_devices",
                        lambda: ["cuda", "cpu", "meta"])
    R, C, D, T = 2, 5, 8, 10  # runs, classes, features, images; two rates
    x, y = torch.rand(R, T, D, device="meta"), torch.zeros(R, T, dtype=torch.long, device="meta")
    layers = LastLayers(torch.rand(R, C, D, device="meta"), torch.zeros(C, device="meta"), [1e-3, 5e-4], x, y, 5)
    layers.train_until(T)
    assert layers.W.device.type == "meta" and layers.steps.done == T


# ----------------------------------------------------------------------------- the guards fail where they should


def test_guard_refuses_norm_backward_sums_without_a_weight():
    x = torch.rand(1, 6, 4, 4)
    xhat, mean, rstd = torch.native_batch_norm(x, None, None, None, None, True, 0.0, 1e-5)
    with CudaKernelGuard(), pytest.raises(CudaDifference, match="without a weight"):
        aten.native_batch_norm_backward(torch.rand_like(x), x, None, None, None, mean, rstd, True, 1e-5,
                                        [True, True, True])
    with CudaKernelGuard():  # the functional norm gives a weight
        norm_backward(torch.rand_like(x), (x, mean, rstd, 1e-5))


def test_guard_refuses_different_values_for_a_repeated_index():
    target = torch.zeros(4, 3)
    with CudaKernelGuard(), pytest.raises(CudaDifference, match="repeated index 1"):
        target.index_copy_(0, torch.tensor([1, 1]), torch.rand(2, 3))
    with CudaKernelGuard():
        target.index_copy_(0, torch.tensor([1, 1, 2]), torch.ones(3, 3))


def test_guard_refuses_a_copy_from_the_host_in_a_recorded_step():
    device_tensor = torch.zeros(3, device="meta")
    with CudaKernelGuard(capturing=True), pytest.raises(CudaDifference, match="copies from the host"):
        torch.ones(3).to("meta")
    with CudaKernelGuard(capturing=True), pytest.raises(CudaDifference, match="copies from the host"):
        device_tensor.copy_(torch.ones(3))
    with CudaKernelGuard(capturing=True):
        device_tensor.add_(1)


def test_stacked_adam_copies_nothing_from_the_host_in_its_step():
    """The per-model rates are on the device before the step a CUDA graph records."""
    params = [torch.nn.Parameter(torch.zeros(2, 3, device="meta"))]
    opt = StackedAdam(params, [1e-3, 2e-3], capturable=True)
    params[0].grad = torch.ones(2, 3, device="meta")
    with CudaKernelGuard(capturing=True):
        opt.step()
        opt.step()


def test_repeated_classes_of_one_model_get_one_row(small_sampler):
    """Two tasks of a model that draw the same class write the same row (the later task's, as the
    CPU's index_copy_ leaves it), whatever order the writes land in."""
    stack, generators = seeded_stack(**TINY, seeds=(3,))
    samplers = [copy.copy(small_sampler)]
    draws = iter([(4, np.arange(64)), (4, np.arange(64, 128)), (2, np.arange(64))])
    samplers[0].sample_train_indices = lambda: next(draws)
    step = StackedMetaStep(stack, stacked_optimizer(stack, [1e-3]), samplers, generators, 3, INNER_LR)
    expected = torch.Generator().set_state(generators[0].get_state())
    std = kaiming_std(step.rows)
    rows = torch.stack([torch.empty(step.rows.shape[1]).normal_(0, std, generator=expected) for _ in range(3)])
    step.draw()
    assert torch.equal(step.rows[0], rows[1]) and torch.equal(step.rows[1], rows[1])
    assert torch.equal(step.rows[2], rows[2])
    with CudaKernelGuard():
        step.lobotomize()
    assert torch.equal(stack.params()["fc.weight"][0, 4], rows[1])


# ----------------------------------------------------------------------------- capturable optimisers on the CPU


def adam_run(capturable, lrs=None, steps=5, dtype=torch.float64):
    torch.manual_seed(0)
    p = torch.nn.Parameter(torch.randn(2, 7, dtype=dtype))
    opt = torch.optim.Adam([p], lr=1e-3, capturable=capturable) if lrs is None else \
        StackedAdam([p], lrs, capturable=capturable)
    g = torch.Generator().manual_seed(1)
    for _ in range(steps):
        p.grad = torch.randn(p.shape, generator=g, dtype=dtype)
        opt.step()
    return p.detach(), opt


def test_capturable_adam_moves_the_weights_as_adam_on_the_cpu():
    """torch's capturable branch (step count a float32 tensor) against its ordinary one. Even in
    float64 the capturable bias corrections are float32 (beta ** step with a float32 step): 0.999
    rounds to 0.99900001, so 1 - 0.999 ** 1 is off by 1.3e-5 relative and each update by about
    6e-6 of itself. The two branches agree to that and no closer: a float64 comparison of a
    capturable run with an ordinary one needs a tolerance of ~1e-5 of the updates, not 1e-10."""
    with meta_as_cuda():
        capturable, opt = adam_run(True)
    assert opt.state[opt.param_groups[0]["params"][0]]["step"].dtype == torch.float32
    plain, _ = adam_run(False)
    assert not torch.equal(capturable, plain)
    torch.testing.assert_close(capturable, plain, rtol=0, atol=5 * 1e-3 * 2e-5)  # steps x lr x 2e-5


def test_stacked_adam_capturable_equals_torch_capturable_adam():
    """StackedAdam's capturable branch with one rate computes torch's capturable Adam; with two rates,
    each model's slice moves as a capturable Adam of its own rate."""
    with meta_as_cuda():
        torch_capturable, _ = adam_run(True)
    stacked, _ = adam_run(True, lrs=[1e-3, 1e-3])
    torch.testing.assert_close(stacked, torch_capturable, rtol=1e-6, atol=1e-12)
    two, _ = adam_run(True, lrs=[1e-3, 3e-3])
    torch.testing.assert_close(two[0], torch_capturable[0], rtol=1e-6, atol=1e-12)
    assert not torch.allclose(two[1], torch_capturable[1])


# ----------------------------------------------------------------------------- a run moved between devices


def adam_state(capturable, device="cpu", steps=2):
    """An Adam's state after `steps` steps on `device` (with capturable state: as a CUDA graph's run saves it)."""
    p = torch.nn.Parameter(torch.ones(3, device=device))
    opt = torch.optim.Adam([p], lr=1e-3, capturable=capturable)
    with meta_as_cuda():
        for _ in range(steps):
            p.grad = torch.ones_like(p)
            opt.step()
    return opt.state_dict()


def test_a_graphed_runs_optimizer_state_resumes_on_the_cpu():
    """A checkpoint of a capturable Adam (the graph backend's) loads into this run's ordinary Adam,
    which keeps its flag and steps: Adam would refuse the loaded capturable flag on CPU tensors."""
    saved = adam_state(capturable=True)
    assert saved["param_groups"][0]["capturable"]
    p = torch.nn.Parameter(torch.ones(3))
    opt = torch.optim.Adam([p], lr=1e-3)
    load_optimizer_state(opt, saved)
    assert opt.param_groups[0]["capturable"] is False
    p.grad = torch.ones_like(p)
    opt.step()
    assert opt.state[p]["step"].item() == 3 and opt.state[p]["step"].device.type == "cpu"


def test_a_cpu_runs_optimizer_state_resumes_capturable_on_the_device():
    """The other way: a CPU checkpoint into the graph backend's capturable Adam, whose step count must
    then live on the parameter's device (a CUDA graph reads it there)."""
    saved = adam_state(capturable=False)
    p = torch.nn.Parameter(torch.ones(3, device="meta"))
    opt = torch.optim.Adam([p], lr=1e-3, capturable=True)
    load_optimizer_state(opt, saved)
    assert opt.param_groups[0]["capturable"] is True
    assert opt.state[p]["step"].device.type == "meta" and opt.state[p]["step"].dtype == torch.float32
    with meta_as_cuda(), CudaKernelGuard(capturing=True):
        p.grad = torch.ones_like(p)
        opt.step()


# ----------------------------------------------------------------------------- precision and processes


def test_scripts_run_float32_in_full_on_cuda():
    """resolve_device turns TF32 off (on a GPU, cuDNN's convolutions would use it by default)."""
    import argparse
    from harness.runtime import resolve_device
    conv = torch.backends.cudnn.conv
    before = conv.fp32_precision, torch.backends.cuda.matmul.fp32_precision
    try:
        conv.fp32_precision = "tf32"
        assert resolve_device(argparse.ArgumentParser(), "cpu") == "cpu"
        assert conv.fp32_precision == "ieee" and torch.backends.cuda.matmul.fp32_precision == "ieee"
    finally:
        conv.fp32_precision, torch.backends.cuda.matmul.fp32_precision = before


def test_torchrun_with_more_processes_than_gpus_is_refused_in_one_line(monkeypatch):
    from harness.runtime import Ranks, TooFewGPUs, join_processes
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "set_device", lambda i: pytest.fail("set_device reached"))
    for rank in (0, 1):
        with pytest.raises(TooFewGPUs, match="started 2 processes on a node with 1 GPU: give --nproc_per_node at most 1"):
            join_processes(Ranks(rank=rank, world=2, local_rank=rank, local_world=2), "cuda", connect=False)


def test_scripts_leave_the_process_group_they_joined(monkeypatch):
    """train_omni.py and eval_omni.py close the process group at their end, even when they fail."""
    import torch.distributed as dist
    import train_omni
    closed = []
    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "destroy_process_group", lambda: closed.append(True))
    monkeypatch.setattr(train_omni, "join_processes", lambda *a, **k: None)
    monkeypatch.setattr(train_omni.anml, "train", lambda *a, **k: (_ for _ in ()).throw(ValueError("stop")))
    with pytest.raises(ValueError, match="stop"):
        train_omni.main(["--rln", "4", "--nm", "3", "--mask", "36", "-d", "cpu"])
    assert closed == [True]
