"""The meta-gradient (`anml.meta_step`, `higher` and functional), checked against independent computations."""
import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch.func import functional_call

import anml
from fastpath import functional
from conftest import INNER_LR, flat
from model import ANML


def real_batch(sampler, dtype=torch.float64, remember_size=64, seed=0):
    """One meta-training batch of real Omniglot images, as the sampler returns it, drawn from `seed`
    (the same batch whatever ran before, in whichever order the tests run)."""
    sampler.rng = np.random.default_rng(seed)
    train_data, train_class, (valid_ims, valid_labels) = sampler.sample_train(remember_size=remember_size)
    train_data = [(im.to(dtype), label) for im, label in train_data]
    return train_data, train_class, valid_ims.to(dtype), valid_labels


def unrolled_loss(model, params, train_data, valid_ims, valid_labels, create_graph=True):
    """Independent reference: the whole model called functionally, 20 SGD steps over rln + fc."""
    inner = [n for n in params if n.startswith(("rln.", "fc."))]
    fast = dict(params)
    for im, label in train_data:
        loss = F.cross_entropy(functional_call(model, fast, (im,)), label)
        grads = torch.autograd.grad(loss, [fast[n] for n in inner], create_graph=create_graph)
        fast.update({n: fast[n] - INNER_LR * g for n, g in zip(inner, grads)})
    return F.cross_entropy(functional_call(model, fast, (valid_ims,)), valid_labels)


def reference_meta_grad(model, batch, create_graph=True):
    """Lobotomized parameters and their meta-gradient, by `unrolled_loss`."""
    train_data, train_class, valid_ims, valid_labels = batch
    anml.lobotomize(model.fc, train_class)
    params = {n: p.detach().clone().requires_grad_() for n, p in model.named_parameters()}
    loss = unrolled_loss(model, params, train_data, valid_ims, valid_labels, create_graph)
    grads = torch.autograd.grad(loss, list(params.values()), allow_unused=True)
    start = torch.cat([p.detach().flatten() for p in params.values()])
    grad = torch.cat([(g if g is not None else torch.zeros_like(p)).flatten()
                      for g, p in zip(grads, params.values())])
    return start, grad


def one_meta_step(model, batch, backend, outer="sgd", rng_seed=7, first_order=False, outer_chunk=None):
    train_data, train_class, valid_ims, valid_labels = batch
    outer_opt = (torch.optim.SGD(model.parameters(), lr=1.0) if outer == "sgd"
                 else torch.optim.Adam(model.parameters(), lr=1e-3))
    torch.manual_seed(rng_seed)
    return anml.meta_step(model, outer_opt, train_data, train_class, valid_ims, valid_labels, INNER_LR,
                          backend=backend, first_order=first_order, outer_chunk=outer_chunk)


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return ANML(4, 3, 36).double()


@pytest.fixture(params=["chunked", "whole"])
def outer_chunk(request):
    """The func backend's outer backward both ways: in chunks (the CPU default) and whole (as on a GPU)."""
    return None if request.param == "chunked" else 0


@pytest.mark.parametrize("backend", ["higher", "func"])
def test_meta_step_moves_by_minus_the_meta_gradient(tiny, sampler, backend, outer_chunk):
    batch = real_batch(sampler)
    reference = copy.deepcopy(tiny)
    torch.manual_seed(7)
    start, grad = reference_meta_grad(reference, batch)
    model = copy.deepcopy(tiny)
    one_meta_step(model, batch, backend, outer="sgd", outer_chunk=outer_chunk)
    move = flat(model) - start
    assert grad.norm() > 0
    torch.testing.assert_close(move, -grad, rtol=1e-9, atol=1e-12)


def test_meta_gradient_matches_finite_differences(tiny, sampler):
    batch = real_batch(sampler)
    model = copy.deepcopy(tiny)
    torch.manual_seed(7)
    start, grad = reference_meta_grad(model, batch)
    direction = torch.randn(start.shape, generator=torch.Generator().manual_seed(1), dtype=start.dtype)
    direction /= direction.norm()

    def loss_at(vector):
        vector, params, offset = vector.detach().requires_grad_(), {}, 0
        for n, p in model.named_parameters():
            params[n] = vector[offset:offset + p.numel()].view_as(p)
            offset += p.numel()
        train_data, _, valid_ims, valid_labels = batch
        return unrolled_loss(model, params, train_data, valid_ims, valid_labels, create_graph=False).item()

    eps = 1e-5
    numeric = (loss_at(start + eps * direction) - loss_at(start - eps * direction)) / (2 * eps)
    analytic = (grad @ direction).item()
    assert numeric == pytest.approx(analytic, rel=1e-5, abs=1e-9)

    # The second-order terms matter: the first-order gradient is measurably different.
    torch.manual_seed(7)
    _, first_order = reference_meta_grad(copy.deepcopy(tiny), batch, create_graph=False)
    assert (first_order - grad).norm() > 1e-3 * grad.norm()


def test_func_backend_moves_every_parameter_as_higher(tiny, sampler, outer_chunk):
    """float64, outer Adam: every parameter moves as with `higher`, to < 1e-10 relative.

    The conv biases feeding an InstanceNorm are the exception by construction: their true
    meta-gradient is zero. `func` leaves them in place; `higher` gives them round-off gradients
    (~1e-17) that Adam's normalisation turns into moves far below 1e-8."""
    batch = real_batch(sampler)
    models = {b: copy.deepcopy(tiny) for b in ("higher", "func")}
    outs = {b: one_meta_step(m, batch, b, outer="adam", outer_chunk=outer_chunk) for b, m in models.items()}
    assert outs["higher"] == pytest.approx(outs["func"], rel=1e-12)
    start = dict(tiny.named_parameters())
    moved_h, moved_f = dict(models["higher"].named_parameters()), dict(models["func"].named_parameters())
    real = [n for n in start if not n.endswith("conv.bias")]
    diff = torch.cat([(moved_h[n] - moved_f[n]).flatten() for n in real])
    move = torch.cat([(moved_h[n] - start[n]).flatten() for n in real])
    assert (diff.norm() / move.norm()).item() < 1e-10
    for n in start:
        if n.endswith("conv.bias"):
            assert torch.equal(moved_f[n], start[n])
            assert (moved_h[n] - start[n]).abs().max() < 1e-8


def test_func_equals_higher_after_three_iterations(sampler):
    """Three full iterations from the same seed, float64, real batches."""
    torch.manual_seed(3)
    base = ANML(4, 3, 36).double()
    params = {}
    for backend in ("higher", "func"):
        model = copy.deepcopy(base)
        outer_opt = anml.outer_optimizer(model, 1e-3)
        torch.manual_seed(5)
        for it in range(3):
            train_data, cls, valid_ims, valid_labels = real_batch(sampler, seed=11 + it)
            anml.meta_step(model, outer_opt, train_data, cls, valid_ims, valid_labels, INNER_LR, backend)
        params[backend] = {n: p.detach() for n, p in model.named_parameters() if not n.endswith("conv.bias")}
    diff = torch.cat([(params["higher"][n] - params["func"][n]).flatten() for n in params["func"]])
    scale = torch.cat([p.flatten() for p in params["func"].values()])
    assert (diff.norm() / scale.norm()).item() < 1e-10


def test_meta_step_float32_and_any_outer_optimiser(sampler):
    """float32 and RMSprop: both backends report the same outer loss and accuracy (a count of the 84
    images, computed from the adapted network's outputs), move the weights, and leave no gradient."""
    torch.manual_seed(0)
    batch = real_batch(sampler, dtype=torch.float32)
    base, results = ANML(4, 3, 36), {}
    for backend in ("higher", "func"):
        model = copy.deepcopy(base)
        outer_opt = torch.optim.RMSprop(model.parameters(), lr=1e-3)
        torch.manual_seed(1)
        results[backend] = anml.meta_step(model, outer_opt, *batch[:2], *batch[2:], INNER_LR, backend=backend)
        assert not torch.equal(flat(base), flat(model))
        assert all(p.grad is None or not p.grad.any() for p in model.parameters())  # zeroed
    (loss_h, acc_h), (loss_f, acc_f) = results["higher"], results["func"]
    assert loss_f == pytest.approx(loss_h, rel=1e-5) and np.isfinite(loss_f)
    assert acc_f == acc_h and acc_f * 84 == pytest.approx(round(acc_f * 84), abs=1e-6)


def test_lobotomize_changes_exactly_one_row():
    layer = torch.nn.Linear(36, 10)
    before_w, before_b = layer.weight.detach().clone(), layer.bias.detach().clone()
    anml.lobotomize(layer, 4)
    changed = (layer.weight != before_w).any(1)
    assert changed.tolist() == [i == 4 for i in range(10)]
    assert torch.equal(layer.bias, before_b)
    big = torch.nn.Linear(2304, 1000)
    anml.lobotomize(big, 0)
    assert big.weight[0].std().item() == pytest.approx((2 / 2304) ** 0.5, rel=0.1)  # Kaiming normal


def first_order_reference_grads(model, batch):
    """Independent first-order meta-gradient (FOMAML), by name: 20 SGD steps over rln + fc with
    gradients taken without a graph, then the outer loss's gradient at the adapted weights, which is
    the initial weights' (the NM, never adapted, gets only the outer pass's)."""
    train_data, train_class, valid_ims, valid_labels = batch
    anml.lobotomize(model.fc, train_class)
    inner = [n for n, _ in model.named_parameters() if n.startswith(("rln.", "fc."))]
    weights = {n: p.detach().clone() for n, p in model.named_parameters()}
    for im, label in train_data:
        leaves = {n: w.requires_grad_() if n in inner else w for n, w in weights.items()}
        loss = F.cross_entropy(functional_call(model, leaves, (im,)), label)
        grads = torch.autograd.grad(loss, [leaves[n] for n in inner], create_graph=False)
        weights.update({n: (leaves[n] - INNER_LR * g).detach() for n, g in zip(inner, grads)})
        weights = {n: w.detach() for n, w in weights.items()}
    adapted = {n: w.requires_grad_() for n, w in weights.items()}
    outer = F.cross_entropy(functional_call(model, adapted, (valid_ims,)), valid_labels)
    return dict(zip(adapted, torch.autograd.grad(outer, list(adapted.values()))))


def func_grads(model, batch, first_order, outer_chunk=None):
    """The meta-gradient that func_meta_loss leaves in .grad (after the lobotomy), by name."""
    train_data, train_class, valid_ims, valid_labels = batch
    anml.lobotomize(model.fc, train_class)
    ims, labels = torch.cat([im for im, _ in train_data]), torch.cat([label for _, label in train_data])
    functional.func_meta_loss(model, INNER_LR, ims, labels, valid_ims, valid_labels, first_order, outer_chunk)
    return {n: p.grad.detach().clone() for n, p in model.named_parameters()}


def test_first_order_equals_an_independent_first_order_unroll(tiny, sampler, outer_chunk):
    """float64: first_order=True gives FOMAML's gradient for every parameter (the conv biases' true
    gradient is zero; the reference's round-off there is far below atol), and it is not the
    second-order meta-gradient."""
    batch = real_batch(sampler)
    torch.manual_seed(7)
    reference = first_order_reference_grads(copy.deepcopy(tiny), batch)
    torch.manual_seed(7)
    first = func_grads(copy.deepcopy(tiny), batch, True, outer_chunk)
    torch.manual_seed(7)
    second = func_grads(copy.deepcopy(tiny), batch, False, outer_chunk)
    assert set(first) == set(reference)
    for n in reference:
        torch.testing.assert_close(first[n], reference[n], rtol=1e-9, atol=1e-12)
    assert first["nm.fc.weight"].norm() > 0 and first["rln.convBlock1.conv.weight"].norm() > 0
    as_vector = lambda grads: torch.cat([g.flatten() for g in grads.values()])
    assert (as_vector(first) - as_vector(second)).norm() > 1e-3 * as_vector(second).norm()
    for n in ("nm.fc.weight", "rln.convBlock1.conv.weight", "fc.weight"):
        assert (first[n] - second[n]).norm() > 1e-3 * second[n].norm(), n


def test_first_order_refused_by_higher(tiny, sampler):
    batch = real_batch(sampler)
    with pytest.raises(ValueError, match="--first-order is implemented by the func and graph backends"):
        one_meta_step(copy.deepcopy(tiny), batch, "higher", first_order=True)
