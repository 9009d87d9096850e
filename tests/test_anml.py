"""Meta-training and meta-testing mathematics, checked against independent computations."""
import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch.func import functional_call

import anml
from model import ANML

INNER_LR = 0.1


def real_batch(sampler, dtype=torch.float64, remember_size=64):
    """One meta-training batch of real Omniglot images, as the seed's sampler returns it."""
    train_data, train_class, (valid_ims, valid_labels) = sampler.sample_train(remember_size=remember_size)
    train_data = [(im.to(dtype), label) for im, label in train_data]
    return train_data, train_class, valid_ims.to(dtype), valid_labels


def flat(model):
    return torch.cat([p.detach().flatten() for p in model.parameters()])


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


def one_meta_step(model, batch, backend, outer="sgd", rng_seed=7):
    train_data, train_class, valid_ims, valid_labels = batch
    inner_opt = torch.optim.SGD(list(model.rln.parameters()) + list(model.fc.parameters()), lr=INNER_LR)
    outer_opt = (torch.optim.SGD(model.parameters(), lr=1.0) if outer == "sgd"
                 else torch.optim.Adam(model.parameters(), lr=1e-3))
    torch.manual_seed(rng_seed)
    return anml.meta_step(model, inner_opt, outer_opt, train_data, train_class, valid_ims, valid_labels,
                          backend=backend)


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return ANML(4, 3, 36).double()


@pytest.fixture(params=["chunked", "whole"])
def outer_chunk(request, monkeypatch):
    """The func backend's outer backward both ways: in chunks (the CPU default) and whole (GPU)."""
    if request.param == "whole":
        monkeypatch.setattr(anml, "OUTER_CHUNK", {})
    return request.param


@pytest.mark.parametrize("backend", ["higher", "func"])
def test_meta_step_moves_by_minus_the_meta_gradient(tiny, sampler, backend, outer_chunk):
    batch = real_batch(sampler)
    reference = copy.deepcopy(tiny)
    torch.manual_seed(7)
    start, grad = reference_meta_grad(reference, batch)
    model = copy.deepcopy(tiny)
    one_meta_step(model, batch, backend, outer="sgd")
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
    outs = {b: one_meta_step(m, batch, b, outer="adam") for b, m in models.items()}
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
        inner_opt, outer_opt = anml.make_optimizers(model, INNER_LR, 1e-3)
        sampler.rng = np.random.default_rng(11)
        torch.manual_seed(5)
        for _ in range(3):
            train_data, cls, valid_ims, valid_labels = real_batch(sampler)
            anml.meta_step(model, inner_opt, outer_opt, train_data, cls, valid_ims, valid_labels, backend)
        params[backend] = {n: p.detach() for n, p in model.named_parameters() if not n.endswith("conv.bias")}
    diff = torch.cat([(params["higher"][n] - params["func"][n]).flatten() for n in params["func"]])
    scale = torch.cat([p.flatten() for p in params["func"].values()])
    assert (diff.norm() / scale.norm()).item() < 1e-10


def test_meta_step_float32_and_any_outer_optimiser(sampler):
    torch.manual_seed(0)
    batch = real_batch(sampler, dtype=torch.float32)
    for backend in ("higher", "func"):
        model = ANML(4, 3, 36)
        inner_opt = torch.optim.SGD(list(model.rln.parameters()) + list(model.fc.parameters()), lr=INNER_LR)
        outer_opt = torch.optim.RMSprop(model.parameters(), lr=1e-3)
        before = flat(model)
        loss, acc = anml.meta_step(model, inner_opt, outer_opt, *batch[:2], *batch[2:], backend=backend)
        assert np.isfinite(loss) and 0 <= acc <= 1
        assert not torch.equal(before, flat(model))
        assert all(p.grad is None or not p.grad.any() for p in model.parameters())  # zeroed


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


@pytest.fixture(scope="module")
def small_checkpoint(sampler, tmp_path_factory):
    """A small ANML meta-trained for a few iterations on real data (fast backend)."""
    torch.manual_seed(0)
    model = ANML(8, 4, 72)
    inner_opt, outer_opt = anml.make_optimizers(model, INNER_LR, 1e-3)
    sampler.rng = np.random.default_rng(0)
    for _ in range(10):
        train_data, cls, (valid_ims, valid_labels) = sampler.sample_train()
        anml.meta_step(model, inner_opt, outer_opt, train_data, cls, valid_ims, valid_labels, "func")
    path = tmp_path_factory.mktemp("ckpt") / "8_4_72_ANML-9.pth"
    anml.save_atomic(model.state_dict(), path)
    return path


def test_fast_meta_test_equals_seed_loop(small_checkpoint, sampler):
    kwargs = dict(num_classes=8, train_examples=15, lrs=(1e-3, 3e-4), runs=2, seed=4, progress=False)
    fast = anml.meta_test(small_checkpoint, sampler, fast=True, **kwargs)
    slow = anml.meta_test(small_checkpoint, sampler, fast=False, **kwargs)
    np.testing.assert_array_equal(fast["test"], slow["test"])
    np.testing.assert_array_equal(fast["train"], slow["train"])
    assert fast["test"].shape == (1, 2, 2)  # [class counts, lrs, runs]
    assert fast["train"][0, 0].mean() > 0.05  # it learned: a guess among 1000 outputs scores 0.001


def test_several_class_counts_equal_separate_runs(small_checkpoint, sampler):
    """A run scored after the first 3, 6 and 8 classes of its sequence gives what separate runs with
    3, 6 and 8 classes give (fast path), and the seed's loop run separately for each count agrees."""
    kwargs = dict(train_examples=15, lrs=(1e-3, 3e-4), runs=2, seed=4, progress=False)
    nested = anml.meta_test(small_checkpoint, sampler, num_classes=[8, 3, 6], **kwargs)
    assert nested["test"].shape == (3, 2, 2)
    for k, n in enumerate([3, 6, 8]):
        alone = anml.meta_test(small_checkpoint, sampler, num_classes=n, **kwargs)
        np.testing.assert_array_equal(nested["test"][k], alone["test"][0])
        np.testing.assert_array_equal(nested["train"][k], alone["train"][0])
    loop = anml.meta_test(small_checkpoint, sampler, num_classes=[3, 6, 8], fast=False, **kwargs)
    np.testing.assert_array_equal(nested["test"], loop["test"])
    np.testing.assert_array_equal(nested["train"], loop["train"])
    assert not np.array_equal(nested["test"][0], nested["test"][2])  # 3 and 8 classes score differently


def test_test_train_fast_equals_seed_loop(small_checkpoint, sampler):
    accs = {}
    for fast in (True, False):
        sampler.rng = np.random.default_rng(9)
        accs[fast] = anml.test_train(small_checkpoint, sampler, num_classes=6, lr=1e-3, quiet=True,
                                     fast=fast, generator=torch.Generator().manual_seed(2))
    assert accs[True].shape == (6,)
    np.testing.assert_array_equal(accs[True], accs[False])


def test_vectorised_grid_equals_separate_runs(small_checkpoint, sampler):
    model = anml.load_model(small_checkpoint)
    features = anml.FeatureBank(model, sampler.evaluation)
    runs, inits = [], []
    for r in range(3):
        sampler.rng, generator = anml.run_generators(1, r)
        anml.reset_last_layer(model, generator)
        inits.append(model.fc.weight.detach().clone())
        runs.append(anml.MetaTestRun(*sampler.sample_test_indices(5, 15)))
    lrs = [1e-3, 5e-4]
    grid = anml.sequential_fit(features, runs, torch.stack(inits), model.fc.bias, lrs, counts=[2, 5])
    for r in range(3):
        for l, lr in enumerate(lrs):
            one = anml.sequential_fit(features, [runs[r]], inits[r][None], model.fc.bias, [lr], counts=[2, 5])
            np.testing.assert_array_equal(one["test"][:, 0, 0], grid["test"][:, l, r])
            np.testing.assert_array_equal(one["train"][:, 0, 0], grid["train"][:, l, r])
    assert len({tuple(run.classes) for run in runs}) == 3


def test_graph_gathers_the_samplers_batch(sampler):
    """The CUDA graph's on-device gather gives `sample_train`'s batch for the same indices (on CPU)."""
    sampler.rng = np.random.default_rng(5)
    train_data, cls, (valid_ims, valid_labels) = sampler.sample_train()
    sampler.rng = np.random.default_rng(5)
    index_cls, remember = sampler.sample_train_indices()
    assert index_cls == cls
    train_ims, train_labels, g_valid_ims, g_valid_labels = anml.gather_train_batch(
        sampler.background.flatten(0, 1), 20, torch.tensor(cls), torch.as_tensor(remember))
    assert torch.equal(train_ims, torch.cat([im for im, _ in train_data]))
    assert torch.equal(train_labels, torch.cat([label for _, label in train_data]))
    assert torch.equal(g_valid_ims, valid_ims) and torch.equal(g_valid_labels, valid_labels)


def test_graphed_step_logic_equals_meta_step_on_cpu(sampler):
    """GraphedMetaStep without CUDA runs its steps eagerly: warm-up, undoing the warm-up, the
    on-device gather and the step itself must give exactly what meta_step gives."""
    torch.manual_seed(0)
    base = ANML(4, 3, 36).double()
    images = sampler.background.flatten(0, 1).double()
    results = {}
    for graphed in (False, True):
        model = copy.deepcopy(base)
        inner_opt, outer_opt = anml.make_optimizers(model, INNER_LR, 1e-3)
        if graphed:
            step = anml.GraphedMetaStep(model, inner_opt, outer_opt, sampler)
        sampler.rng = np.random.default_rng(8)
        torch.manual_seed(1)
        for _ in range(3):
            cls, remember = sampler.sample_train_indices()
            if graphed:
                step(cls, remember)
            else:
                train_ims, train_labels, valid_ims, valid_labels = anml.gather_train_batch(
                    images, 20, torch.tensor(cls), torch.as_tensor(remember))
                train_data = [(train_ims[i:i + 1], train_labels[i:i + 1]) for i in range(20)]
                anml.meta_step(model, inner_opt, outer_opt, train_data, cls, valid_ims, valid_labels, "func")
        results[graphed] = flat(model)
    assert not torch.equal(results[False], flat(base))
    torch.testing.assert_close(results[True], results[False], rtol=1e-12, atol=0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_graphed_step_equals_eager_on_cuda(sampler):
    torch.manual_seed(0)
    base = ANML(16, 8, 144).cuda()
    results = {}
    for graphed in (False, True):
        model = copy.deepcopy(base)
        inner_opt, outer_opt = anml.make_optimizers(model, INNER_LR, 1e-3, capturable=True)
        step = anml.GraphedMetaStep(model, inner_opt, outer_opt, sampler) if graphed else None
        rng = np.random.default_rng(0)
        torch.cuda.manual_seed(1)
        for _ in range(3):
            cls = int(rng.integers(sampler.background.shape[0]))
            remember = rng.choice(sampler.background.shape[0] * 20, 64, replace=False)
            if graphed:
                step(cls, remember)
            else:
                images = sampler.background.flatten(0, 1)
                train_data = [(images[cls * 20 + i:cls * 20 + i + 1].cuda(), torch.tensor([cls]).cuda())
                              for i in range(20)]
                labels = torch.cat([torch.full((20,), cls), torch.as_tensor(remember) // 20]).cuda()
                valid_ims = torch.cat([images[cls * 20:(cls + 1) * 20], images[remember]]).cuda()
                anml.meta_step(model, inner_opt, outer_opt, train_data, cls, valid_ims, labels, "func")
        results[graphed] = flat(model)
    torch.testing.assert_close(results[True], results[False], rtol=1e-4, atol=1e-5)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_graphed_meta_test_equals_cpu(small_checkpoint, sampler):
    kwargs = dict(num_classes=[5, 20], lrs=(1e-3, 5e-4), runs=2, seed=3, progress=False)
    gpu = anml.meta_test(small_checkpoint, sampler, device="cuda", **kwargs)
    cpu = anml.meta_test(small_checkpoint, sampler, device="cpu", **kwargs)
    np.testing.assert_allclose(gpu["test"], cpu["test"], atol=0.02)
    np.testing.assert_allclose(gpu["train"], cpu["train"], atol=0.02)


def test_half_then_resume_equals_one_run(sampler, tmp_path):
    """N iterations straight = N/2, then a resume for the other N/2: bit-identical on the CPU,
    and the CSV log holds the same losses and accuracies, each iteration once."""
    def run(out_dir, its, resume=None):
        sampler.rng = np.random.default_rng(1)  # what OmniSampler(seed=1) starts from
        return anml.train(4, 3, 36, its=its, sampler=sampler, out_dir=out_dir, seed=1, quiet=True,
                          resume=resume)

    _, stopped = run(tmp_path / "straight", 4)
    assert stopped is None
    run(tmp_path / "split", 2)
    run(tmp_path / "split", 4, resume="latest")
    load = lambda d: torch.load(d / "4_3_36_ANML-3.pth", weights_only=True)
    straight, split = load(tmp_path / "straight"), load(tmp_path / "split")
    assert all(torch.equal(straight[k], split[k]) for k in straight)
    logs = [np.loadtxt(d / "4_3_36_train_log.csv", delimiter=",", skiprows=1)
            for d in (tmp_path / "straight", tmp_path / "split")]
    np.testing.assert_array_equal(logs[0][:, :3], logs[1][:, :3])
    assert logs[0][:, 0].tolist() == [0, 1, 2, 3]
    assert [p.name for p in (tmp_path / "split").glob("*_resume.pt")] == ["4_3_36_ANML-3_resume.pt"]
