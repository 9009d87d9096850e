"""The CUDA graphs: their logic run eagerly on the CPU against the eager code, and, where CUDA is
present, the replayed graphs against eager CUDA and the CPU (`pytest -k cuda` selects those)."""
import copy

import numpy as np
import pytest
import torch

import anml
from meta_test import meta_test
from harness.config import EvalConfig
from conftest import INNER_LR, flat
from fastpath.cuda_graphs import GraphedMetaStep, gather_train_batch
from fastpath.functional import func_meta_loss
from model import ANML

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def graph_step(model, outer_opt, sampler, first_order=False):
    """The CUDA-graph step as `anml.meta_stepper` builds it, called with explicit indices."""
    def iteration(train_class, train_ims, train_labels, valid_ims, valid_labels):
        anml.lobotomize(model.fc, train_class)
        return func_meta_loss(model, INNER_LR, train_ims, train_labels, valid_ims, valid_labels, first_order)
    return GraphedMetaStep(model, outer_opt, sampler, iteration)


def test_graph_gathers_the_samplers_batch(sampler):
    """The CUDA graph's on-device gather gives `sample_train`'s batch for the same indices (on CPU)."""
    sampler.rng = np.random.default_rng(5)
    train_data, cls, (valid_ims, valid_labels) = sampler.sample_train()
    sampler.rng = np.random.default_rng(5)
    index_cls, remember = sampler.sample_train_indices()
    assert index_cls == cls
    train_ims, train_labels, g_valid_ims, g_valid_labels = gather_train_batch(
        sampler.background.flatten(0, 1), 20, torch.tensor(cls), torch.as_tensor(remember))
    assert torch.equal(train_ims, torch.cat([im for im, _ in train_data]))
    assert torch.equal(train_labels, torch.cat([label for _, label in train_data]))
    assert torch.equal(g_valid_ims, valid_ims) and torch.equal(g_valid_labels, valid_labels)


@pytest.mark.parametrize("first_order", [False, True])
def test_graphed_step_logic_equals_meta_step_on_cpu(sampler, first_order):
    """GraphedMetaStep without CUDA runs its steps eagerly: warm-up, undoing the warm-up (weights,
    Adam state and the generator the lobotomy draws from), the on-device gather and the step itself
    must give exactly what meta_step gives from the same seed (second and first order)."""
    torch.manual_seed(0)
    base = ANML(4, 3, 36).double()
    images = sampler.background.flatten(0, 1).double()
    results = {}
    for graphed in (False, True):
        model = copy.deepcopy(base)
        outer_opt = anml.outer_optimizer(model, 1e-3)
        sampler.rng = np.random.default_rng(8)
        torch.manual_seed(1)  # before the warm-up, which must leave the generator as it found it
        if graphed:
            step = graph_step(model, outer_opt, sampler, first_order)
        for _ in range(3):
            cls, remember = sampler.sample_train_indices()
            if graphed:
                step(cls, remember)
            else:
                train_ims, train_labels, valid_ims, valid_labels = gather_train_batch(
                    images, 20, torch.tensor(cls), torch.as_tensor(remember))
                train_data = [(train_ims[i:i + 1], train_labels[i:i + 1]) for i in range(20)]
                anml.meta_step(model, outer_opt, train_data, cls, valid_ims, valid_labels, INNER_LR, "func",
                               first_order)
        results[graphed] = flat(model)
    assert not torch.equal(results[False], flat(base))
    torch.testing.assert_close(results[True], results[False], rtol=1e-12, atol=0)


@needs_cuda
def test_graphed_step_equals_eager_on_cuda(sampler):
    """Three replays of the CUDA graph move every parameter as three eager iterations on CUDA. In
    float64, so that the order of the GPU's reductions (which differs between a graph and eager
    code) stays far below the tolerance, while a graph that replays a stale batch, misses the
    warm-up's undoing or the lobotomy would be off by orders of magnitude more."""
    torch.manual_seed(0)
    base = ANML(16, 8, 144).double().cuda()
    images = sampler.background.flatten(0, 1).double()
    results = {}
    for graphed in (False, True):
        model = copy.deepcopy(base)
        outer_opt = anml.outer_optimizer(model, 1e-3, capturable=True)
        torch.cuda.manual_seed(1)  # before the warm-up and capture, which must leave the generator as it was
        step = graph_step(model, outer_opt, sampler) if graphed else None
        rng = np.random.default_rng(0)
        for _ in range(3):
            cls = int(rng.integers(sampler.background.shape[0]))
            remember = rng.choice(sampler.background.shape[0] * 20, 64, replace=False)
            if graphed:
                step(cls, remember)
            else:
                train_data = [(images[cls * 20 + i:cls * 20 + i + 1].cuda(), torch.tensor([cls]).cuda())
                              for i in range(20)]
                labels = torch.cat([torch.full((20,), cls), torch.as_tensor(remember) // 20]).cuda()
                valid_ims = torch.cat([images[cls * 20:(cls + 1) * 20], images[remember]]).cuda()
                anml.meta_step(model, outer_opt, train_data, cls, valid_ims, labels, INNER_LR, "func")
        results[graphed] = flat(model)
    assert not torch.equal(results[False], flat(base))
    torch.testing.assert_close(results[True], results[False], rtol=1e-9, atol=1e-12)


@needs_cuda
def test_graphed_meta_test_on_cuda_equals_cpu(small_checkpoint, sampler):
    config = lambda device: EvalConfig(model=str(small_checkpoint), classes=(5, 20), lrs=(1e-3, 5e-4), runs=2, seed=3,
                                       device=device)
    gpu = meta_test(config("cuda"), sampler, progress=False)
    cpu = meta_test(config("cpu"), sampler, progress=False)
    # float32 on both (TF32 is off: runtime.use_float32), but the GPU sums in another order, which may
    # flip a near-tie: allow one image of the smallest set (5 classes x 5 test images: 0.04, x 15
    # training images: 0.013) per run, and no more
    np.testing.assert_allclose(gpu["test"], cpu["test"], atol=0.04 + 1e-9)
    np.testing.assert_allclose(gpu["train"], cpu["train"], atol=1 / 75 + 1e-9)
    assert np.abs(gpu["test"] - cpu["test"]).mean() < 0.01
