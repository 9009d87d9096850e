"""The meta-test: the frozen-feature path against higherANML's loop, several class counts along one
sequence, and the batched grid of runs and learning rates against separate runs."""
from dataclasses import replace

import numpy as np
import pytest
import torch

import anml
import meta_test
from model import reset_last_layer
from harness.checkpoints import load_model
from harness.config import EvalConfig
from protocol import ConfigError
from fastpath.frozen_features import FeatureBank, MetaTestRun, hit_rate, sequential_fit
from meta_test import empty_results, run_generators
from conftest import synthetic_feature_runs


def evaluate(checkpoint, sampler, num_classes=10, **settings):
    """meta_test.meta_test of `checkpoint` with these EvalConfig settings, without progress bars."""
    classes = tuple(np.atleast_1d(num_classes).tolist())
    return meta_test.meta_test(EvalConfig(model=str(checkpoint), classes=classes, **settings), sampler, progress=False)


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
    3, 6 and 8 classes give, on the fast path and in higherANML's loop (which scores one sequence
    along the way too), and the two agree."""
    kwargs = dict(train_examples=15, lrs=(1e-3, 3e-4), runs=2, seed=4)
    nested = evaluate(small_checkpoint, sampler, num_classes=[8, 3, 6], **kwargs)
    assert nested["test"].shape == (3, 2, 2)
    for k, n in enumerate([3, 6, 8]):
        for loop in (False, True):
            alone = evaluate(small_checkpoint, sampler, num_classes=n, original_loop=loop, **kwargs)
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
    assert train_fast == train_loop  # both the exact count of hits over the images
    assert capsys.readouterr().out == f"train accuracy {train_loop:.3f}\n"


def test_vectorised_grid_equals_separate_runs(small_checkpoint, sampler):
    model = load_model(small_checkpoint)
    features = FeatureBank(model, sampler.evaluation)
    runs, inits = [], []
    for r in range(3):
        sampler.rng, generator = run_generators(1, r)
        reset_last_layer(model, generator)
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

from fastpath.frozen_features import iid_fit, iid_orders, ridge_solutions  # noqa: E402


def sampled_runs(model, sampler, n_runs, n_classes, seed=1):
    """Runs drawn as `meta_test` draws them, with their last-layer initialisations."""
    runs, inits = [], []
    for r in range(n_runs):
        sampler.rng, generator = run_generators(seed, r)
        reset_last_layer(model, generator)
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
    test_acc = (anml.predict_in_batches(model, test_ims) == test_labels).sum().item() / len(test_labels)
    train_acc = anml.train_accuracy(model, [images])
    assert (fast["test"][0, 0, 0], fast["train"][0, 0, 0]) == (test_acc, train_acc)
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
@pytest.mark.parametrize("method", ["iid", "lstsq", "ncm"])
def test_other_methods_on_cuda_equal_cpu(small_checkpoint, sampler, method):
    """The batched (CUDA-graphed for iid) GPU path against the CPU's, as for seq in test_cuda_graphs."""
    grid = {"lstsq": dict(ridges=(0.1, 10.0)), "ncm": dict(distances=("euclidean", "cosine")),
            "iid": dict(lrs=(1e-3, 5e-4), epochs_iid=2)}[method]
    kwargs = dict(num_classes=[5, 20], runs=2, seed=3, method=method, **grid)
    gpu = evaluate(small_checkpoint, sampler, device="cuda", **kwargs)
    cpu = evaluate(small_checkpoint, sampler, device="cpu", **kwargs)
    np.testing.assert_allclose(gpu["test"], cpu["test"], atol=0.02)
    np.testing.assert_allclose(gpu["train"], cpu["train"], atol=0.02)


# ----------------------------------------------------------------------------- every parameter learns: --no-freeze

from model import kaiming_std  # noqa: E402


def trained_states(monkeypatch):
    """Spies on original_fit (anml.py, as meta_test.py calls it): the list of (the model's weights when it starts, the images it is
    given in order, its weights when it ends), one entry a call."""
    calls, real = [], anml.original_fit

    def spy(model, train_tasks, lr, after_task=None):
        start = {k: v.clone() for k, v in model.state_dict().items()}
        real(model, train_tasks, lr, after_task)
        images = [(image, int(label)) for task in train_tasks for image, label in task]
        calls.append((start, images, {k: v.clone() for k, v in model.state_dict().items()}))
        return model
    monkeypatch.setattr(meta_test, "original_fit", spy)
    return calls


def changed(before, after, prefix):
    """Whether any tensor of the sub-network `prefix` (rln., nm., fc.) differs between two states."""
    return any(not torch.equal(before[k], after[k]) for k in before if k.startswith(prefix))


def test_no_freeze_trains_rln_and_nm_and_the_default_does_not(small_checkpoint, sampler, monkeypatch):
    """--no-freeze: RLN, NM and fc all move. higherANML's loop without it: only fc moves. The default
    (frozen features) runs no full-network step at all. The RLN and NM of the model given never change."""
    calls = trained_states(monkeypatch)
    model = load_model(small_checkpoint)
    original = {k: v.clone() for k, v in model.state_dict().items()}
    settings = dict(model=str(small_checkpoint), classes=(3,), runs=1, lrs=(3e-3,))
    meta_test.meta_test(EvalConfig(no_freeze=True, **settings), sampler, model, progress=False)
    ((start, _, end),) = calls
    assert all(changed(start, end, part) for part in ("rln.", "nm.", "fc."))
    assert not changed(original, start, "rln.") and not changed(original, start, "nm.")
    calls.clear()
    meta_test.meta_test(EvalConfig(original_loop=True, **settings), sampler, model, progress=False)
    ((start, _, end),) = calls
    assert changed(start, end, "fc.") and not changed(start, end, "rln.") and not changed(start, end, "nm.")
    calls.clear()
    meta_test.meta_test(EvalConfig(**settings), sampler, model, progress=False)
    assert calls == []
    assert not changed(original, model.state_dict(), "rln.") and not changed(original, model.state_dict(), "nm.")


def hand_trained_run(checkpoint, sampler, seed, r, counts, lr):
    """The no-freeze protocol written out: run r's sample and generator, fc.weight drawn Kaiming-normal
    (bias kept), torch.optim.Adam over every parameter, one step an image in class order; the test
    and train accuracy after the first N classes for each N of `counts`, and the final weights."""
    sampler.rng, generator = run_generators(seed, r)
    model = load_model(checkpoint)
    with torch.no_grad():
        model.fc.weight.copy_(torch.randn(model.fc.weight.shape, generator=generator) * kaiming_std(model.fc.weight))
    tasks, (test_ims, test_labels), _ = sampler.sample_test(counts[-1], 15)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    accuracy = lambda ims, labels: (model(ims).argmax(1) == labels).sum().item() / len(labels)  # hits / images
    scores = []
    for c, task in enumerate(tasks, 1):
        for image, label in task:
            opt.zero_grad()
            torch.nn.functional.cross_entropy(model(image), label).backward()
            opt.step()
        if c in counts:
            with torch.no_grad():
                train_ims = torch.cat([im for t in tasks[:c] for im, _ in t])
                train_labels = torch.cat([label for t in tasks[:c] for _, label in t])
                scores.append((accuracy(test_ims[:5 * c], test_labels[:5 * c]), accuracy(train_ims, train_labels)))
    return scores, model.state_dict()


def test_no_freeze_run_equals_adam_over_every_parameter_one_image_at_a_time(small_checkpoint, sampler):
    """A no-freeze sequential run against the loop written out by hand: the weights and accuracies
    bit for bit; its counts nest along one sequence as separate runs would give them; and it is not
    the frozen protocol's result."""
    counts, lrs, seed = [2, 4], [3e-3, 1e-2], 6
    config = EvalConfig(model=str(small_checkpoint), classes=tuple(counts), runs=2, lrs=tuple(lrs), seed=seed,
                        no_freeze=True)
    model = load_model(small_checkpoint)
    results = meta_test.meta_test(config, sampler, model, progress=False)
    for r in range(2):
        for l, lr in enumerate(lrs):
            scores, weights = hand_trained_run(small_checkpoint, sampler, seed, r, counts, lr)
            np.testing.assert_array_equal(results["test"][:, l, r], [test for test, _ in scores])
            np.testing.assert_array_equal(results["train"][:, l, r], [train for _, train in scores])
    sampler.rng, generator = run_generators(seed, 1)
    net = anml.learner(model, generator, no_freeze=True)
    meta_test.full_network_run(net, sampler, counts, lrs[1], config)
    assert all(torch.equal(v, weights[k]) for k, v in net.state_dict().items())
    sampler.rng, generator = run_generators(seed, 1)
    per_class, train = anml.test_train(model, sampler, 4, lr=lrs[1], quiet=True, fast=False, generator=generator,
                                       no_freeze=True)  # higherANML's one-run API, every parameter learning
    assert train == scores[-1][1] and per_class.mean() == pytest.approx(scores[-1][0], rel=1e-12)
    assert results["train"][-1].min() > 0.3  # it learned: chance among 1000 outputs is 0.001
    alone = meta_test.meta_test(replace(config, classes=(4,)), sampler, model, progress=False)
    np.testing.assert_array_equal(alone["test"][0], results["test"][1])
    frozen = meta_test.meta_test(replace(config, no_freeze=False), sampler, model, progress=False)
    assert not np.array_equal(frozen["train"], results["train"])


def test_no_freeze_iid_sees_each_image_once_an_epoch_shuffled(small_checkpoint, sampler, monkeypatch):
    """The i.i.d. variant: for each count a fresh copy of the run's network (the same start each time)
    takes one Adam step per image over E epochs, each epoch every training image of the first N
    classes once, in the frozen-feature iid's orders; and without --no-freeze this loop gives what
    the frozen-feature iid gives."""
    from meta_test import shuffle_rng
    counts, seed, epochs = [2, 3], 2, 2
    calls = trained_states(monkeypatch)
    config = EvalConfig(model=str(small_checkpoint), classes=tuple(counts), runs=1, lrs=(1e-2,), seed=seed,
                        method="iid", epochs_iid=epochs, no_freeze=True)
    meta_test.meta_test(config, sampler, load_model(small_checkpoint), progress=False)
    sampler.rng, _ = run_generators(seed, 0)
    tasks, _, _ = sampler.sample_test(counts[-1], 15)
    orders = iid_orders(shuffle_rng([seed, 0]), counts, 15, epochs)
    assert len(calls) == len(counts)
    for (start, images, end), n, order in zip(calls, counts, orders):
        in_class_order = [(image, int(label)) for task in tasks[:n] for image, label in task]
        index = [next(i for i, (im, _) in enumerate(in_class_order) if torch.equal(im, image)) for image, _ in images]
        assert len(images) == epochs * n * 15
        for e in range(epochs):  # each epoch: every image once
            assert sorted(index[e * n * 15:(e + 1) * n * 15]) == list(range(n * 15))
        assert index == order.tolist() and index[:n * 15] != sorted(index[:n * 15])
        assert [label for _, label in images] == [in_class_order[i][1] for i in index]
        assert not changed(calls[0][0], start, "") and changed(start, end, "rln.")
    frozen = replace(config, no_freeze=False)
    loop = meta_test.original_meta_test(frozen, sampler, load_model(small_checkpoint), [[seed, 0]], [0],
                                        empty_results(frozen, 1))
    fast = meta_test.meta_test(frozen, sampler, load_model(small_checkpoint), progress=False)
    np.testing.assert_array_equal(loop["test"], fast["test"])
    np.testing.assert_array_equal(loop["train"], fast["train"])


def test_lanes_equal_separate_networks_learning_with_adam_in_float64():
    """fastpath.full_network.Lanes: three networks of one shape, each with its own images and rate,
    learn side by side; every weight and output equals that of each network trained alone by
    torch.optim.Adam over model.parameters(), one image at a time (float64). The conv biases, left
    out of the lanes, change no output."""
    from fastpath.full_network import Lanes, learned_names
    from model import ANML
    torch.manual_seed(0)
    nets = [ANML(4, 3, 36).double() for _ in range(3)]
    lrs, steps = [1e-2, 3e-3, 1e-3], 6
    images = torch.rand(3, steps, 1, 1, 28, 28, dtype=torch.float64)
    labels = torch.randint(0, 1000, (3, steps))
    start = nets[0].get_parameter("rln.convBlock1.conv.weight").detach().clone()
    lanes = Lanes(nets, lrs)
    for s in range(steps):
        lanes.step(images[:, s, 0], labels[:, s])
    test = torch.rand(3, 7, 1, 28, 28, dtype=torch.float64)
    predicted = lanes.predict(test, images_per_pass=6)  # several passes, the last one short
    for l, (net, lr) in enumerate(zip(nets, lrs)):
        opt = torch.optim.Adam(net.parameters(), lr=lr)
        for s in range(steps):
            opt.zero_grad()
            torch.nn.functional.cross_entropy(net(images[l, s]), labels[l, s:s + 1]).backward()
            opt.step()
        state = lanes.lane_state(l)
        assert set(state) == set(learned_names(net)) and not any("conv.bias" in n for n in state)
        for name, weight in state.items():
            torch.testing.assert_close(weight, net.get_parameter(name).detach(), rtol=1e-8, atol=1e-9)
        with torch.no_grad():
            assert torch.equal(predicted[l], net(test[l]).argmax(1))
    assert not torch.equal(lanes.lane_state(0)["rln.convBlock1.conv.weight"], start)  # the RLN learned
    assert lanes.finite().tolist() == [True] * 3


def test_no_freeze_lanes_give_the_runs_of_the_loop(small_checkpoint, sampler):
    """--lanes: the meta-test's runs and rates learning as lanes, in groups that cut across runs (5 of
    2 runs x 3 rates, then 1), score what the one-run loop scores (float32: to a test image's worth),
    on the same draws; a rate so large that its lane diverges is flagged and leaves the others alone."""
    counts, lrs = (2, 4), (3e-3, 1e-2, 1e30)
    config = EvalConfig(model=str(small_checkpoint), classes=counts, runs=2, lrs=lrs, seed=6, no_freeze=True)
    model = load_model(small_checkpoint)
    loop = meta_test.meta_test(config, sampler, model, progress=False)
    lanes = meta_test.meta_test(replace(config, lanes=5), sampler, model, progress=False)
    finite = ~loop["non_finite"][:2]
    np.testing.assert_allclose(lanes["test"][:, :2], loop["test"][:, :2], atol=1 / (5 * counts[0]) + 1e-6)
    # train: a few images' worth (4 of the 60 at 4 classes): every parameter learns at 1e-2, and the
    # lanes' batched convolutions round differently on each CPU (one Intel Xeon: 3 images of 60)
    np.testing.assert_allclose(lanes["train"][:, :2], loop["train"][:, :2], atol=2 / (15 * counts[0]) + 1e-6)
    assert (lanes["train"][:, :2] == loop["train"][:, :2]).mean() >= 0.75  # most exactly: the same hits
    assert (lanes["test"][:, :2] == loop["test"][:, :2]).mean() >= 0.75
    assert finite.all() and lanes["non_finite"].tolist() == loop["non_finite"].tolist() == [[False] * 2] * 2 + [[True] * 2]
    assert lanes["train"][-1, :2].min() > 0.3  # it learned: chance among 1000 outputs is 0.001
    grouped_by_two = meta_test.meta_test(replace(config, lanes=2, lrs=lrs[:2]), sampler, model, progress=False)
    np.testing.assert_allclose(grouped_by_two["test"], lanes["test"][:, :2], atol=1 / (5 * counts[0]) + 1e-6)


def test_lanes_flag_is_for_the_whole_network_runs():
    for settings in ({}, {"method": "iid", "no_freeze": True}, {"method": "ncm"}):
        with pytest.raises(ConfigError, match="--lanes batches the runs where every parameter learns"):
            EvalConfig(model="m.pth", lanes=4, **settings)
    with pytest.raises(ConfigError, match="one run at a time: leave out --lanes"):
        EvalConfig(model="m.pth", lanes=4, no_freeze=True, original_loop=True)
    with pytest.raises(ConfigError, match="--lanes must be a whole number > 0"):
        EvalConfig(model="m.pth", lanes=0, no_freeze=True)
    assert EvalConfig(model="m.pth", lanes=4, no_freeze=True).lanes == 4


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_no_freeze_lanes_on_cuda_equal_cpu(small_checkpoint, sampler):
    """The lanes on the GPU against the one-run loop on the CPU."""
    config = EvalConfig(model=str(small_checkpoint), classes=(3, 6), runs=2, lrs=(3e-3, 1e-3), seed=2, no_freeze=True)
    cpu = meta_test.meta_test(config, sampler, load_model(small_checkpoint), progress=False)
    gpu = meta_test.meta_test(replace(config, device="cuda", lanes=4), sampler, load_model(small_checkpoint), progress=False)
    np.testing.assert_allclose(gpu["test"], cpu["test"], atol=0.07)
    np.testing.assert_allclose(gpu["train"], cpu["train"], atol=0.03)


# ----------------------------------------------------------------------------- the nearest class mean

from fastpath.frozen_features import ncm_fit, nearest_mean, running_class_means  # noqa: E402


def numpy_ncm(bank, run, n, distance, split):
    """Accuracy of the nearest class mean of the run's first n classes, by numpy, on their `split` images."""
    classes = run.classes[:n]
    means = np.stack([bank[c, run.train_idx[i]].mean(0) for i, c in enumerate(classes)])
    idx = run.train_idx if split == "train" else run.test_idx
    x = np.concatenate([bank[c, idx[i]] for i, c in enumerate(classes)])
    labels = np.repeat(np.arange(n), idx.shape[1])
    if distance == "euclidean":
        predictions = ((x[:, None] - means[None]) ** 2).sum(2).argmin(1)
    else:
        cos = x @ means.T / np.linalg.norm(x, axis=1)[:, None] / np.linalg.norm(means, axis=1)[None]
        predictions = (1 - cos).argmin(1)
    return (predictions == labels).mean()


def test_ncm_equals_class_means_and_nearest_mean_by_numpy():
    bank, features, runs = synthetic_feature_runs()
    counts, distances = [2, 4, 6], ["euclidean", "cosine"]
    scores = ncm_fit(features, runs, distances, counts)
    assert scores["test"].shape == (3, 2, 2)
    for key in ("test", "train"):
        for k, n in enumerate(counts):
            for l, distance in enumerate(distances):
                for r, run in enumerate(runs):
                    assert scores[key][k, l, r] == pytest.approx(numpy_ncm(bank, run, n, distance, key), abs=1e-12)
    assert 0.2 < scores["test"].mean() < 0.95  # neither trivial nor broken: the classes overlap
    assert not np.array_equal(scores["test"][:, 0], scores["test"][:, 1])  # the two distances differ here


def test_the_running_mean_is_the_batch_mean():
    """After each whole class the running means are the batch means of the classes seen; in the middle
    of a class, its row is the mean of its images seen so far; unseen classes are zero."""
    x = torch.randn(4 * 15, 7, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    at_2, in_3rd, at_4 = running_class_means(x, 15, [30, 37, 60])
    batch = x.view(4, 15, 7).mean(1)
    torch.testing.assert_close(at_4, batch, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(at_2[:2], batch[:2], rtol=1e-12, atol=1e-12)
    assert (at_2[2:] == 0).all() and (in_3rd[3] == 0).all()
    torch.testing.assert_close(in_3rd[2], x[30:37].mean(0), rtol=1e-12, atol=1e-12)


def test_cosine_ignores_the_scale_that_euclidean_reads():
    """A long vector along a short mean's direction: nearest to that mean by angle, to the long mean by
    Euclidean distance; scaling the rows changes Euclidean's answer, never cosine's."""
    means = torch.tensor([[1.0, 0.0], [10.0, 1.0]], dtype=torch.float64)
    x = torch.tensor([[9.0, 0.0], [0.5, 0.05]], dtype=torch.float64)
    assert nearest_mean(x, means, "euclidean").tolist() == [1, 0]
    assert nearest_mean(x, means, "cosine").tolist() == [0, 1]
    for scale in (0.01, 100.0):
        assert nearest_mean(scale * x, means, "cosine").tolist() == [0, 1]
    assert nearest_mean(100 * x, means, "euclidean").tolist() == [1, 1]


def test_ncm_meta_test_nests_its_counts_and_learns(small_checkpoint, sampler):
    """On the real features: counts along one sequence equal separate runs, both distances are scored,
    and the class means classify far above chance among the classes learned."""
    kwargs = dict(runs=2, seed=5, method="ncm", distances=("euclidean", "cosine"))
    both = evaluate(small_checkpoint, sampler, num_classes=[3, 8], **kwargs)
    assert both["test"].shape == (2, 2, 2)
    for k, n in enumerate([3, 8]):
        alone = evaluate(small_checkpoint, sampler, num_classes=n, **kwargs)
        np.testing.assert_array_equal(both["test"][k], alone["test"][0])
        np.testing.assert_array_equal(both["train"][k], alone["train"][0])
    assert both["test"][1].mean() > 3 / 8 and both["train"][1].mean() > 3 / 8  # chance is 1/8


def test_hit_rate_is_the_exact_count_over_the_images_along_the_last_dimension():
    hits = torch.zeros(2, 3, 20, dtype=torch.bool)
    hits[0, 1, :7] = hits[1, 2] = True
    rates = hit_rate(hits)
    assert rates.dtype == np.float64 and rates.shape == (2, 3)
    assert rates[0, 1] == 7 / 20 and rates[1, 2] == 1.0 and rates.sum() == 7 / 20 + 1.0
    assert hit_rate(hits[0, 1]) == 0.35  # a float32 mean of the same hits can be 0.35000002
