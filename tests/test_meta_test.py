"""The meta-test: the frozen-feature path against higherANML's loop, several class counts along one
sequence, and the batched grid of runs and learning rates against separate runs."""
import numpy as np
import pytest
import torch

import anml
from checkpoints import load_model
from config import EvalConfig
from frozen_features import FeatureBank, MetaTestRun, sequential_fit


def evaluate(checkpoint, sampler, num_classes=10, **settings):
    """anml.meta_test of `checkpoint` with these EvalConfig settings, without progress bars."""
    classes = tuple(np.atleast_1d(num_classes).tolist())
    return anml.meta_test(EvalConfig(model=str(checkpoint), classes=classes, **settings), sampler, progress=False)


def test_fast_meta_test_equals_the_original_loop(small_checkpoint, sampler):
    kwargs = dict(num_classes=8, train_examples=15, lrs=(1e-3, 3e-4), runs=2, seed=4)
    fast = evaluate(small_checkpoint, sampler, **kwargs)
    slow = evaluate(small_checkpoint, sampler, original_loop=True, **kwargs)
    np.testing.assert_array_equal(fast["test"], slow["test"])
    np.testing.assert_array_equal(fast["train"], slow["train"])
    assert fast["test"].shape == (1, 2, 2)  # [class counts, lrs, runs]
    assert fast["train"][0, 0].mean() > 0.05  # it learned: a guess among 1000 outputs scores 0.001


def test_several_class_counts_equal_separate_runs(small_checkpoint, sampler):
    """A run scored after the first 3, 6 and 8 classes of its sequence gives what separate runs with
    3, 6 and 8 classes give (fast path), and higherANML's loop run separately for each count agrees."""
    kwargs = dict(train_examples=15, lrs=(1e-3, 3e-4), runs=2, seed=4)
    nested = evaluate(small_checkpoint, sampler, num_classes=[8, 3, 6], **kwargs)
    assert nested["test"].shape == (3, 2, 2)
    for k, n in enumerate([3, 6, 8]):
        alone = evaluate(small_checkpoint, sampler, num_classes=n, **kwargs)
        np.testing.assert_array_equal(nested["test"][k], alone["test"][0])
        np.testing.assert_array_equal(nested["train"][k], alone["train"][0])
    loop = evaluate(small_checkpoint, sampler, num_classes=[3, 6, 8], original_loop=True, **kwargs)
    np.testing.assert_array_equal(nested["test"], loop["test"])
    np.testing.assert_array_equal(nested["train"], loop["train"])
    assert not np.array_equal(nested["test"][0], nested["test"][2])  # 3 and 8 classes score differently


def test_test_train_fast_equals_the_original_loop(small_checkpoint, sampler, capsys):
    """higherANML's test_train, on frozen features and as its own loop: the same per-class test
    accuracies and training accuracy; the loop prints the latter unless quiet."""
    accs = {}
    for fast in (True, False):
        sampler.rng = np.random.default_rng(9)
        accs[fast] = anml.test_train(small_checkpoint, sampler, num_classes=6, lr=1e-2, quiet=fast,
                                     fast=fast, generator=torch.Generator().manual_seed(2))
    (test_fast, train_fast), (test_loop, train_loop) = accs[True], accs[False]
    assert test_fast.shape == (6,) and train_fast > 0.3  # it learned: chance among 1000 outputs is 0.001
    np.testing.assert_array_equal(test_fast, test_loop)
    assert train_fast == pytest.approx(train_loop, abs=1e-6)
    assert capsys.readouterr().out == f"train accuracy {train_loop:.3f}\n"


def test_vectorised_grid_equals_separate_runs(small_checkpoint, sampler):
    model = load_model(small_checkpoint)
    features = FeatureBank(model, sampler.evaluation)
    runs, inits = [], []
    for r in range(3):
        sampler.rng, generator = anml.run_generators(1, r)
        anml.reset_last_layer(model, generator)
        inits.append(model.fc.weight.detach().clone())
        runs.append(MetaTestRun(*sampler.sample_test_indices(5, 15)))
    lrs = [1e-3, 5e-4]
    grid = sequential_fit(features, runs, torch.stack(inits), model.fc.bias, lrs, counts=[2, 5])
    for r in range(3):
        for l, lr in enumerate(lrs):
            one = sequential_fit(features, [runs[r]], inits[r][None], model.fc.bias, [lr], counts=[2, 5])
            np.testing.assert_array_equal(one["test"][:, 0, 0], grid["test"][:, l, r])
            np.testing.assert_array_equal(one["train"][:, 0, 0], grid["train"][:, l, r])
    assert len({tuple(run.classes) for run in runs}) == 3


# ----------------------------------------------------------------------------- other methods: iid, lstsq

from frozen_features import iid_fit, iid_orders, ridge_solutions  # noqa: E402


def sampled_runs(model, sampler, n_runs, n_classes, seed=1):
    """Runs drawn as `meta_test` draws them, with their last-layer initialisations."""
    runs, inits = [], []
    for r in range(n_runs):
        sampler.rng, generator = anml.run_generators(seed, r)
        anml.reset_last_layer(model, generator)
        inits.append(model.fc.weight.detach().clone())
        runs.append(MetaTestRun(*sampler.sample_test_indices(n_classes, 15)))
    return runs, torch.stack(inits)


def test_iid_equals_the_original_loop_on_shuffled_images(small_checkpoint, sampler):
    """The i.i.d. oracle (2 epochs of shuffles) against higherANML's full-network loop fed the same
    images in the same shuffled order, one Adam step each."""
    model = load_model(small_checkpoint)
    runs, inits = sampled_runs(model, sampler, 1, 4)
    (run,) = runs
    orders = [iid_orders(np.random.default_rng(3), [4], 15, epochs=2)]
    lr = 0.01
    fast = iid_fit(FeatureBank(model, sampler.evaluation), runs, inits, model.fc.bias, [lr], [4], orders)
    images = [(sampler.evaluation[c, i][None], torch.tensor([c])) for c, idx in zip(run.classes, run.train_idx)
              for i in idx]
    assert len(orders[0][0]) == 2 * len(images) and sorted(orders[0][0][:60]) == list(range(60))
    with torch.no_grad():
        model.fc.weight.copy_(inits[0])
    model.rln.requires_grad_(False)
    model.nm.requires_grad_(False)
    anml.original_fit(model, [[images[i] for i in orders[0][0]]], lr)
    test_ims = sampler.evaluation[run.classes[:, None], run.test_idx].flatten(0, 1)
    test_labels = torch.as_tensor(np.repeat(run.classes, 5))
    test_acc = (anml.predict_in_batches(model, test_ims) == test_labels).float().mean().item()
    train_acc = anml.train_accuracy(model, [images])
    np.testing.assert_allclose(fast["test"][0, 0, 0], test_acc, atol=1e-6)
    np.testing.assert_allclose(fast["train"][0, 0, 0], train_acc, atol=1e-6)
    assert train_acc > 0.5  # it learned something: the comparison is not 0 == 0


def test_iid_in_class_order_is_the_sequential_method(small_checkpoint, sampler):
    """Unshuffled (class-major) orders make the i.i.d. machinery the sequential one, count by count;
    shuffled, the same runs score differently (the order matters)."""
    model = load_model(small_checkpoint)
    runs, inits = sampled_runs(model, sampler, 2, 6)
    features, lrs, counts = FeatureBank(model, sampler.evaluation), [0.01, 1e-3], [3, 6]
    seq = sequential_fit(features, runs, inits, model.fc.bias, lrs, counts=counts)
    in_order = [[np.arange(n * 15) for n in counts] for _ in runs]
    same = iid_fit(features, runs, inits, model.fc.bias, lrs, counts, in_order)
    np.testing.assert_array_equal(same["test"], seq["test"])
    np.testing.assert_array_equal(same["train"], seq["train"])
    shuffled = [iid_orders(np.random.default_rng(r), counts, 15) for r in range(2)]
    iid = iid_fit(features, runs, inits, model.fc.bias, lrs, counts, shuffled)
    assert not np.array_equal(iid["train"], seq["train"])


def test_meta_test_iid_repeats_and_keeps_the_runs(small_checkpoint, sampler):
    kwargs = dict(num_classes=[2, 5], lrs=(0.01,), runs=2, seed=3)
    iid = evaluate(small_checkpoint, sampler, method="iid", **kwargs)
    again = evaluate(small_checkpoint, sampler, method="iid", **kwargs)
    np.testing.assert_array_equal(iid["test"], again["test"])
    assert iid["test"].shape == (2, 1, 2)
    two = evaluate(small_checkpoint, sampler, method="iid", epochs_iid=2, **kwargs)
    assert not np.array_equal(two["train"], iid["train"])


@pytest.mark.parametrize("rows", [30, 100])  # fewer rows than features (kernel form), more (Gram form)
def test_ridge_solutions_equal_sklearn(rows):
    from sklearn.linear_model import Ridge
    gen = torch.Generator().manual_seed(rows)
    x = torch.rand(rows, 72, generator=gen, dtype=torch.float64)
    y = torch.nn.functional.one_hot(torch.randint(4, (rows,), generator=gen), 4).double()
    ridges = [1e-2, 1.0, 30.0]
    weights, intercepts = ridge_solutions(x, y, ridges)
    for l, lam in enumerate(ridges):
        ref = Ridge(alpha=lam, fit_intercept=True, solver="cholesky").fit(x.numpy(), y.numpy())
        np.testing.assert_allclose(weights[l].numpy(), ref.coef_.T, rtol=1e-6, atol=1e-9)
        np.testing.assert_allclose(intercepts[l].numpy(), ref.intercept_, rtol=1e-6, atol=1e-9)


def test_lstsq_meta_test(small_checkpoint, sampler):
    """Closed form on the frozen features: several counts equal separate runs, a tiny ridge fits the
    training images of 3 classes exactly (45 rows, 72 features), and the scores lie in [0, 1]."""
    kwargs = dict(runs=2, seed=5, method="lstsq", ridges=(1e-6, 1.0, 100.0))
    both = evaluate(small_checkpoint, sampler, num_classes=[3, 8], **kwargs)
    assert both["test"].shape == (2, 3, 2)
    for k, n in enumerate([3, 8]):
        alone = evaluate(small_checkpoint, sampler, num_classes=n, **kwargs)
        np.testing.assert_array_equal(both["test"][k], alone["test"][0])
    assert (both["train"][0, 0] == 1).all()
    assert ((both["test"] >= 0) & (both["test"] <= 1)).all() and both["test"].max() > 1 / 3


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("method", ["iid", "lstsq"])
def test_other_methods_on_cuda_equal_cpu(small_checkpoint, sampler, method):
    """The batched (CUDA-graphed for iid) GPU path against the CPU's, as for seq in test_cuda_graphs."""
    kwargs = dict(num_classes=[5, 20], runs=2, seed=3, method=method,
                  **(dict(ridges=(0.1, 10.0)) if method == "lstsq" else dict(lrs=(1e-3, 5e-4), epochs_iid=2)))
    gpu = evaluate(small_checkpoint, sampler, device="cuda", **kwargs)
    cpu = evaluate(small_checkpoint, sampler, device="cpu", **kwargs)
    np.testing.assert_allclose(gpu["test"], cpu["test"], atol=0.02)
    np.testing.assert_allclose(gpu["train"], cpu["train"], atol=0.02)
