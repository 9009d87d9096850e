"""Several models or tasks in one meta-iteration (`batched.py`), proven equal in float64 to separate runs."""
import copy

import numpy as np
import pytest
import torch

import anml
from fastpath.batched import MemberOptimizer, StackedAdam, StackedMetaStep, shared_or_per_model_rate, seeded_stack, stacked_optimizer
from fastpath.functional import func_meta_loss
from conftest import INNER_LR, TINY
from model import seeded_network

SEEDS = (3, 5, 8)


def single_runs(sampler, seeds, iterations, first_order=False, device="cpu", inner_lrs=None, outer_lrs=None,
                capturable=False):
    """Each seed's parameters after `iterations` of a single run, as anml.train makes them (the same
    draws from the seed's sampler and torch generator), in float64. `capturable`: the Adam of the
    graph backend (its float32 bias corrections differ from the ordinary Adam's by ~1e-5 of a step)."""
    finals = []
    for i, seed in enumerate(seeds):
        model = seeded_network(*TINY.values(), seed).to(device, torch.float64)
        opt = anml.outer_optimizer(model, outer_lrs[i] if outer_lrs else 1e-3, capturable=capturable)
        sampler.rng = np.random.default_rng(seed)
        for _ in range(iterations):
            train_data, train_class, (valid_ims, valid_labels) = sampler.sample_train(device=device)
            train_data = [(im.double(), label) for im, label in train_data]
            anml.meta_step(model, opt, train_data, train_class, valid_ims.double(), valid_labels,
                           inner_lrs[i] if inner_lrs else INNER_LR, "func", first_order, outer_chunk=0)
        finals.append(dict(model.named_parameters()))
    return finals


def stacked_run(sampler, seeds, iterations, tasks=1, first_order=False, device="cpu", graphed=False, inner_lrs=None,
                outer_lrs=None):
    stack, generators = seeded_stack(**TINY, seeds=seeds, device=device, dtype=torch.float64)
    opt = stacked_optimizer(stack, outer_lrs or [1e-3] * len(seeds), capturable=graphed)
    inner_lr = shared_or_per_model_rate(inner_lrs, device) if inner_lrs else INNER_LR
    samplers = [copy.copy(sampler) for _ in seeds]
    for s, seed in zip(samplers, seeds):
        s.rng = np.random.default_rng(seed)
    step = StackedMetaStep(stack, opt, samplers, generators, tasks, inner_lr, first_order, graphed=graphed)
    losses = [step()[0] for _ in range(iterations)]
    return stack, opt, losses


def assert_relatively_equal(a, b, name, tolerance=1e-10):
    scale = b.abs().max()
    assert scale > 0, name
    assert (a - b).abs().max() / scale < tolerance, name


@pytest.mark.parametrize("iterations", [1, 3])
@pytest.mark.parametrize("first_order", [False, True])
def test_three_stacked_models_equal_three_single_runs(sampler, iterations, first_order):
    singles = single_runs(sampler, SEEDS, iterations, first_order)
    stack, _, _ = stacked_run(sampler, SEEDS, iterations, first_order=first_order)
    for k, single in enumerate(singles):
        member = dict(stack.members[k].named_parameters())
        assert member.keys() == single.keys()
        for name, p in single.items():
            assert_relatively_equal(member[name].detach(), p.detach(), f"seed {SEEDS[k]} {name}")
    start = dict(seeded_network(*TINY.values(), SEEDS[0]).named_parameters())
    assert not torch.equal(start["rln.convBlock1.conv.weight"].double(),
                           dict(stack.members[0].named_parameters())["rln.convBlock1.conv.weight"])


def test_models_with_their_own_rates_equal_single_runs_with_those_rates(sampler):
    """--inner-lr and --outer-lr lists: each model its own inner SGD rate (per lane in the inner loop)
    and its own Adam rate (StackedAdam), equal in float64 to single runs with those rates."""
    rates = dict(inner_lrs=[0.1, 0.05, 0.2], outer_lrs=[1e-3, 3e-3, 5e-4])
    singles = single_runs(sampler, SEEDS, 3, **rates)
    stack, opt, _ = stacked_run(sampler, SEEDS, 3, **rates)
    assert isinstance(opt, StackedAdam)
    for k, single in enumerate(singles):
        member = dict(stack.members[k].named_parameters())
        for name, p in single.items():
            assert_relatively_equal(member[name].detach(), p.detach(), f"model {k} {name}")
    saved = MemberOptimizer(opt, 1).state_dict()
    assert saved["param_groups"][0]["lr"] == 3e-3
    single = seeded_network(*TINY.values(), SEEDS[1]).double()
    torch.optim.Adam(single.parameters(), lr=1.0).load_state_dict(saved)  # a single run's Adam takes it


def test_stacked_adam_with_one_rate_is_torchs_adam():
    g = torch.Generator().manual_seed(0)
    params = [torch.randn(3, 4, 5, generator=g, dtype=torch.float64) for _ in range(2)]
    ours = [p.clone().requires_grad_() for p in params]
    torchs = [p.clone().requires_grad_() for p in params]
    opt_ours, opt_torch = StackedAdam(ours, [2e-3] * 3), torch.optim.Adam(torchs, lr=2e-3)
    for _ in range(4):
        grads = [torch.randn(p.shape, generator=g, dtype=torch.float64) for p in params]
        for group, opt in ((ours, opt_ours), (torchs, opt_torch)):
            for p, grad in zip(group, grads):
                p.grad = grad.clone()
            opt.step()
    for a, b in zip(ours, torchs):
        assert_relatively_equal(a.detach(), b.detach(), "param", tolerance=1e-14)
        assert not torch.equal(a.detach(), params[0])


def test_stacked_adam_is_torchs_fused_adam_with_a_param_group_per_model():
    """Each model's slices move bit for bit as torch's fused Adam moves a param group of them with
    the model's rate (what the meta-test's last layers took before sharing StackedAdam), whatever
    the gradients' layout (a transposed one, as a batched product's weight gradient is)."""
    g = torch.Generator().manual_seed(1)
    lrs = [1e-3, 5e-4, 2e-3]
    params = [torch.randn(3, 6, 5, generator=g), torch.randn(3, 6, generator=g)]
    ours = [p.clone() for p in params]
    theirs = [p.clone() for p in params]
    groups = [{"params": [p[k] for p in theirs], "lr": lr} for k, lr in enumerate(lrs)]
    opt_ours, opt_fused = StackedAdam(ours, lrs), torch.optim.Adam(groups, fused=True)
    for _ in range(5):
        grads = [torch.randn(3, 5, 6, generator=g).mT, torch.randn(3, 6, generator=g)]
        for p, grad in zip(ours, grads):
            p.grad = grad.clone()
        for k, group in enumerate(groups):
            for p, grad in zip(group["params"], grads):
                p.grad = grad[k].contiguous()  # torch's fused kernel reads a gradient as laid out like its parameter
        opt_ours.step()
        opt_fused.step()
    for a, b, start in zip(ours, theirs, params):
        assert torch.equal(a, b) and not torch.equal(a, start)


def test_a_member_saves_and_loads_as_a_single_run(sampler):
    """The k-th member's model and optimizer state are a single run's; loading them back restores it."""
    stack, opt, _ = stacked_run(sampler, SEEDS, 2)
    single = seeded_network(*TINY.values(), SEEDS[1]).double()
    single_opt = anml.outer_optimizer(single, 1e-3)
    single.load_state_dict(stack.members[1].state_dict())
    single_opt.load_state_dict(MemberOptimizer(opt, 1).state_dict())
    saved = copy.deepcopy(single_opt.state_dict())
    assert float(saved["state"][0]["step"]) == 2
    fresh, fresh_gens = seeded_stack(**TINY, seeds=SEEDS, dtype=torch.float64)
    fresh_opt = torch.optim.Adam(fresh.parameters(), lr=1e-3)
    for k in range(len(SEEDS)):
        fresh.members[k].load_state_dict(stack.members[k].state_dict())
        MemberOptimizer(fresh_opt, k).load_state_dict(MemberOptimizer(opt, k).state_dict())
    for a, b in zip(fresh.parameters(), stack.parameters()):
        assert torch.equal(a, b)
    for a, b in zip(fresh_opt.state.values(), opt.state.values()):
        assert all(torch.equal(a[key], b[key]) for key in ("step", "exp_avg", "exp_avg_sq"))
    assert torch.equal(saved["state"][3]["exp_avg"], opt.state[list(opt.state)[3]]["exp_avg"][1])


def test_a_meta_batch_is_the_mean_of_its_tasks_meta_gradients(sampler):
    """B = 3 tasks of one model: the gradient left in the stack is the mean of the three meta-gradients
    taken one task at a time from the same (lobotomized) weights."""
    tasks = 3
    stack, generators = seeded_stack(**TINY, seeds=[7], dtype=torch.float64)
    opt = torch.optim.SGD(stack.parameters(), lr=0.0)
    sampler_copy = copy.copy(sampler)
    sampler_copy.rng = np.random.default_rng(7)
    step = StackedMetaStep(stack, opt, [sampler_copy], generators, tasks, INNER_LR)
    classes, remember = step.draw()
    assert len(set(classes)) == tasks
    opt.zero_grad(set_to_none=True)
    step.graph(classes, remember)
    batched = {n: p.grad.clone() for n, p in stack.params().items()}
    lobotomized = {n: p.detach().clone() for n, p in stack.params().items()}
    separate = {n: torch.zeros_like(p) for n, p in lobotomized.items()}
    images = sampler.background.double().flatten(0, 1)
    from fastpath.cuda_graphs import gather_train_batch
    for b in range(tasks):
        params = {n: p.clone().requires_grad_() for n, p in lobotomized.items()}
        batch = gather_train_batch(images, 20, torch.tensor([classes[b]]), torch.from_numpy(remember[b:b + 1]))
        func_meta_loss(params, INNER_LR, *batch, lanes_per_model=1)
        for n, p in params.items():
            if p.grad is not None:
                separate[n] += p.grad / tasks
    for n in separate:
        if n.endswith("conv.bias"):
            assert not batched[n].any()
            continue
        assert_relatively_equal(batched[n], separate[n], n)


def test_a_meta_batch_of_one_single_model_equals_the_single_meta_gradient(sampler):
    """The lanes' meta-gradient of one task equals anml.meta_step's (func) in float64."""
    [single] = single_runs(sampler, [4], 1)
    stack, _, _ = stacked_run(sampler, [4], 1)
    for name, p in single.items():
        assert_relatively_equal(stack.params()[name][0].detach(), p.detach(), name)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_graphed_stack_equals_single_runs(sampler):
    """The graph backend's replay of a stack of three models, against three eager single runs on CUDA
    with the same (capturable) Adam."""
    singles = single_runs(sampler, SEEDS, 3, device="cuda", capturable=True)
    stack, _, _ = stacked_run(sampler, SEEDS, 3, device="cuda", graphed=True)
    for k, single in enumerate(singles):
        member = dict(stack.members[k].named_parameters())
        for name, p in single.items():
            assert_relatively_equal(member[name].detach(), p.detach(), f"seed {SEEDS[k]} {name}")
