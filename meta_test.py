"""The meta-test engine of `eval_omni.py`: many runs and learning rates (or ridges, distances), every
class count scored along one sequence per run.

- the runs: run r draws its classes, their splits and its last layer's initialisation from its seed
  (`run_seeds`, `run_generators`); every method and rate sees the same runs;
- on frozen features (`fastpath.frozen_features`): seq and iid (one Adam step an image, many runs and
  rates as one batch of last layers), lstsq and ncm; slda and gaussian (`fastpath.generative_heads`);
- the whole network run on every image (higherANML's loop, `anml.original_fit`): `--original-loop`,
  and `--no-freeze` (every parameter learns), one run and rate after another or as the lanes of one
  step (`--lanes`, `fastpath.full_network.Lanes`).

Under torchrun the processes share the runs out. higherANML's meta-test of one run is `anml.test_train`."""
import copy
import functools

import numpy as np
import torch

from anml import learner, original_fit, predict_in_batches, train_accuracy, training_images
from fastpath.frozen_features import (FeatureBank, MetaTestRun, hit_rate, iid_fit, iid_orders, ncm_fit, ridge_fit,
                                      sequential_fit)
from fastpath.full_network import Lanes
from fastpath.generative_heads import gaussian_fit, slda_fit
from harness.checkpoints import load_model
from harness.runtime import Ranks, progress_bar
from protocol import prior_values
from model import reset_last_layer


def meta_test(config, sampler, model=None, progress=True, features=None, results=None, ranks=Ranks()):
    """The meta-test runs of `config` (a config.EvalConfig): every class count and every value of
    its grid (learning rates, or ridge regularisers for lstsq), on `config.runs` reported runs and
    then `config.selection_runs` selection runs. Every value and method sees the same runs: run r
    draws its classes, splits and fc initialisation from (seed, r), or (seed, r, 1) for a selection
    run. A run learns one random order of classes and is scored after the first N of them for each
    count N, which is what a run with N classes alone computes (it draws the same first N classes).

    Returns {"test": [K, L, R], "train": [K, L, R]} accuracies (K counts in increasing order, L grid
    values, R runs: the reported ones, then the selection ones). `model` (already loaded) replaces
    config.model; `features`, a FeatureBank of that model, keeps its features across calls. The
    accuracies are written into `results` (`empty_results`) as runs finish, so that the caller keeps
    them when the meta-test is interrupted.

    `ranks`: torchrun's processes share the runs out (process r takes runs r, r + world, ...; each
    run depends on its own seed alone), then sum their results (`all_reduce`), so that every
    process returns all of them."""
    model = load_model(config.model, config.device) if model is None else model.to(config.device)
    model.requires_grad_(False)
    seeds = run_seeds(config.seed, config.runs) + run_seeds(config.seed, config.selection_runs, selection=True)
    results = empty_results(config) if results is None else results
    mine = list(range(ranks.rank, len(seeds), ranks.world))
    learn = method_runner(config)
    if ranks.world > 1:
        shared = learn(config, sampler, model, seeds, mine, empty_results(config, len(mine)), progress, features)
        return sum_runs_over_processes(results, shared, mine, config.device)
    return learn(config, sampler, model, seeds, mine, results, progress, features)


def method_runner(config):
    """The function that runs `config`'s method on some of the runs, all called alike:
    f(config, sampler, model, seeds, runs (indices into seeds), results [K, L, len(runs)], progress,
    features) -> results."""
    if config.lanes > 1:
        return lanes_meta_test
    if config.original_loop or config.no_freeze:
        return original_meta_test
    return learn_on_features if config.method in ("seq", "iid") else fit_on_features


# ----------------------------------------------------------------------------- the runs


def run_seeds(seed, runs, selection=False):
    """The entropies of `runs` meta-test runs: [seed, r], or [seed, r, 1] for the selection runs
    that choose a learning rate (so they never coincide with the runs that report it)."""
    return [[seed, r, 1] if selection else [seed, r] for r in range(runs)]


def run_generators(*entropy):
    """(numpy, torch) generators of one meta-test run, from its SeedSequence entropy: the same
    (seed, run) repeats it exactly."""
    seq = np.random.SeedSequence(list(entropy))
    return np.random.default_rng(seq), torch.Generator().manual_seed(int(seq.generate_state(1)[0]))


def shuffle_rng(entropy):
    """The numpy generator of a run's i.i.d. shuffles: a child of the run's SeedSequence, so it is
    independent of the classes, splits and initialisation that the run draws."""
    return np.random.default_rng(np.random.SeedSequence(list(entropy)).spawn(1)[0])


def empty_results(config, runs=None):
    """Meta-test accuracies {"test", "train": [K, L, R] NaN until computed, "non_finite": [L, R]}, for
    all the runs of `config` (or `runs` of them)."""
    runs = config.runs + config.selection_runs if runs is None else runs
    shape = (len(config.classes), len(config.grid), runs)
    return {"test": np.full(shape, np.nan), "train": np.full(shape, np.nan),
            "non_finite": np.zeros(shape[1:], dtype=bool)}


def sum_runs_over_processes(results, shared, runs, device):
    """Each process's runs (`shared`, the results of runs `runs`) into `results`, summed over the
    processes (every process ends with all runs; a run is computed by one process, zeros elsewhere)."""
    import torch.distributed as dist
    for key in ("test", "train", "non_finite"):
        mine = np.zeros(results[key].shape)
        mine[..., runs] = shared[key]
        total = torch.as_tensor(mine, dtype=torch.float64, device=device)
        dist.all_reduce(total)
        results[key][...] = total.cpu().numpy().astype(results[key].dtype)
    return results


# ----------------------------------------------------------------------------- on frozen features


def last_layers_and_samples(model, sampler, seeds, num_classes, train_examples):
    """Each run's initial last layer (fc.weight) and sample (classes, splits), drawn from its entropy in
    `seeds`."""
    inits, samples = [], []
    for entropy in seeds:
        sampler.rng, generator = run_generators(*entropy)
        reset_last_layer(model, generator)
        inits.append(model.fc.weight.detach().clone())
        samples.append(MetaTestRun(*sampler.sample_test_indices(num_classes, train_examples)))
    return inits, samples


def runs_on_features(config, sampler, model, seeds, runs, progress, features):
    """(features, samples of `runs`, their initial last layers [R, C, D]): every run is drawn, and the
    features of every run's classes computed (a FeatureBank, `features` if given), as for all of them."""
    inits, samples = last_layers_and_samples(model, sampler, seeds, config.classes[-1], config.train_examples)
    label = f"features ({model_shown(config)})" if model_shown(config) else "features"  # the progress bar's name
    features = features or FeatureBank(model, sampler.evaluation, progress=progress and label)
    features.compute(np.unique(np.concatenate([run.classes for run in samples])))
    return features, [samples[r] for r in runs], torch.stack([inits[r] for r in runs])


def fit_on_features(config, sampler, model, seeds, runs, results, progress=False, features=None):
    """lstsq, ncm, slda or gaussian of the runs `runs` on frozen features (no steps, no initialisation)."""
    features, samples, _ = runs_on_features(config, sampler, model, seeds, runs, progress, features)
    gaussian = functools.partial(gaussian_fit, prediction=config.prediction or "bayes")
    fit = {"lstsq": ridge_fit, "ncm": ncm_fit, "slda": slda_fit, "gaussian": gaussian}[config.method]
    # gaussian's priors "alpha0,beta0[,kappa0]" as numbers
    grid = [prior_values(p) for p in config.grid] if config.method == "gaussian" else list(config.grid)
    return fit(features, samples, grid, list(config.classes), progress and
               f"{config.method} ({counted(config)})", results)


def learn_on_features(config, sampler, model, seeds, runs, results, progress=False, features=None):
    """Test-train and test-test of config.method ("seq" or "iid") for the runs `runs` and every
    learning rate, on frozen features, from the runs' initial last layers and the checkpoint's bias.
    On CUDA all of them train at once; on the CPU one after the other (one last layer's Adam state
    nearly fits in the cache, a batch does not). Fills `results` as each batch finishes, so that an
    interrupted evaluation keeps its finished runs; returns it."""
    features, samples, inits = runs_on_features(config, sampler, model, seeds, runs, progress, features)
    bias = model.fc.bias.detach().clone()
    counts, lrs, R = list(config.classes), list(config.grid), len(samples)
    batches = ([(list(range(len(lrs))), list(range(R)))] if features.device.type == "cuda" else
               [([l], [r]) for r in range(R) for l in range(len(lrs))])
    if config.method == "iid":
        orders = [iid_orders(shuffle_rng(seeds[r]), counts, config.train_examples, config.iid_epochs) for r in runs]
        steps = sum(counts) * config.train_examples * config.iid_epochs
    else:
        steps = counts[-1] * config.train_examples
    with progress_bar(total=steps * len(batches), disable=not progress, desc=f"test-train ({counted(config)})",
                      unit="step", unit_scale=True, smoothing=0) as bar:
        for ls, rs in batches:
            args = (features, [samples[r] for r in rs], inits[rs], bias, [lrs[l] for l in ls])
            if config.method == "iid":
                out = iid_fit(*args, counts=counts, orders=[orders[r] for r in rs], bar=bar)
            else:
                out = sequential_fit(*args, counts=counts, bar=bar)
            for key in ("test", "train"):
                results[key][np.ix_(range(len(counts)), ls, rs)] = out[key]
            results["non_finite"][np.ix_(ls, rs)] = out["non_finite"]
    return results


def counted(config):
    """What a meta-test's progress bar counts: "10 classes, 2 reported + 2 selection runs x 3 rates", with
    ", model 1 of 2" when several models are evaluated one after the other."""
    L, value = len(config.grid), {"lr": "rate"}.get(config.hyperparameter, config.hyperparameter)
    classes = f"{', '.join(map(str, config.classes))} classes"
    runs = f"{config.runs} reported" + (f" + {config.selection_runs} selection" if config.selection_runs else "")
    runs += f" run{'s' if config.runs + config.selection_runs > 1 else ''} x {L} {value}{'s' if L > 1 else ''}"
    return ", ".join(filter(None, (classes, runs, model_shown(config))))


def model_shown(config):
    """"model 2 of 3" while the second of three models (-m a b c) is evaluated, else ""."""
    if not config.models or config.model not in config.models:
        return ""
    return f"model {config.models.index(config.model) + 1} of {len(config.models)}"


# ----------------------------------------------------------------------------- the whole network on every image


def original_meta_test(config, sampler, model, seeds, runs, results, progress=False, features=None):
    """The runs `runs` with higherANML's loop, the whole network run on every image (`original_fit`):
    fc learns, and with config.no_freeze RLN and NM too, one Adam step an image, for every run and
    learning rate. seq learns each run's sequence once and is scored after the first N classes for
    each count N; iid trains each count afresh, from the same initialisation, on the first N classes'
    images in the shuffled orders of the frozen-feature iid (`iid_orders`, from the run's entropy)."""
    counts, lrs = list(config.classes), list(config.grid)
    steps = (sum(counts) * config.iid_epochs if config.method == "iid" else counts[-1]) * config.train_examples
    with progress_bar(total=steps * len(runs) * len(lrs), disable=not progress,
                      desc=f"test-train (full network, {counted(config)})", unit="step", unit_scale=True,
                      smoothing=0) as bar:
        for r, entropy in enumerate(seeds[i] for i in runs):
            orders = (iid_orders(shuffle_rng(entropy), counts, config.train_examples, config.iid_epochs)
                      if config.method == "iid" else None)
            for l, lr in enumerate(lrs):
                sampler.rng, generator = run_generators(*entropy)
                net = learner(model, generator, config.no_freeze)
                scores, finite = full_network_run(net, sampler, counts, lr, config, orders, bar)
                for k, (test, train) in enumerate(scores):
                    results["test"][k, l, r], results["train"][k, l, r] = test, train
                results["non_finite"][l, r] = not finite
    return results


def full_network_run(net, sampler, counts, lr, config, orders=None, bar=None):
    """One run of `original_meta_test` from the run's network `net` (`anml.learner`), its sample drawn
    from `sampler`: ([(test, train accuracy)] per count, whether every trained weight stayed finite).
    Without `orders`, one sequence of classes scored along the way; with them (iid), a copy of `net`
    per count trained on the images in `orders[k]` (indices into the first N classes' class-major
    training images)."""
    train_tasks, test_data, _ = sampler.sample_test(counts[-1], config.train_examples, device=config.device)
    score = lambda model, n: scores_after(model, train_tasks, test_data, n, config.test_examples)
    scores = []
    if orders is None:
        def after_task(t):
            if bar is not None:
                bar.update(config.train_examples)
            if t in counts:
                scores.append(score(net, t))
        original_fit(net, train_tasks, lr, after_task)
        return scores, all_finite(net)
    finite = True
    for n, order in zip(counts, orders):
        images = [pair for task in train_tasks[:n] for pair in task]
        copied = copy.deepcopy(net)
        original_fit(copied, [[images[i] for i in order]], lr)
        if bar is not None:
            bar.update(len(order))
        scores.append(score(copied, n))
        finite &= all_finite(copied)
    return scores, finite


def scores_after(model, train_tasks, test_data, n, test_examples):
    """(test accuracy, train accuracy) of `model` on the first n classes' held-out and training images,
    each the exact count of hits over the images (the mean of the per-class accuracies)."""
    ims, labels = test_data
    rows = n * test_examples
    test = hit_rate(predict_in_batches(model, ims[:rows]) == labels[:rows])
    return float(test), train_accuracy(model, train_tasks[:n])


def all_finite(model):
    """Whether every parameter of `model` is finite (a far too large rate makes them NaN)."""
    return all(bool(torch.isfinite(p).all()) for p in model.parameters())


def lanes_meta_test(config, sampler, model, seeds, runs, results, progress=False, features=None):
    """`original_meta_test` of seq with --no-freeze, `config.lanes` (run, rate) pairs learning at a time
    as the lanes of one step (`fastpath.full_network.Lanes`): each run draws its network and sample as
    there, and each pair takes the same steps, in the same order, scored after the same counts."""
    counts, lrs = list(config.classes), list(config.grid)
    pairs = [(r, l) for r in range(len(runs)) for l in range(len(lrs))]
    steps = counts[-1] * config.train_examples
    with progress_bar(total=steps * len(pairs), disable=not progress,
                      desc=f"test-train (full network, lanes of {config.lanes}, {counted(config)})", unit="step",
                      unit_scale=True, smoothing=0) as bar:
        for start in range(0, len(pairs), config.lanes):
            group = pairs[start:start + config.lanes]
            in_group = sorted({r for r, _ in group})
            nets, train_ims, train_labels, test_ims, test_labels = networks_and_images(
                model, sampler, [seeds[runs[r]] for r in in_group], counts[-1], config)
            of_run = torch.tensor([in_group.index(r) for r, _ in group], device=config.device)
            lanes = Lanes([nets[i] for i in of_run.tolist()], [lrs[l] for _, l in group])
            for s in range(steps):
                lanes.step(train_ims[of_run, s], train_labels[of_run, s])
                t, into_the_task = divmod(s + 1, config.train_examples)
                if into_the_task:  # task t + 1 is not learned yet
                    continue
                bar.update(len(group) * config.train_examples)
                if t in counts:
                    k, tested, trained = counts.index(t), t * config.test_examples, t * config.train_examples
                    test = lanes.predict(test_ims[of_run, :tested]) == test_labels[of_run, :tested]
                    train = lanes.predict(train_ims[of_run, :trained]) == train_labels[of_run, :trained]
                    for i, (r, l) in enumerate(group):  # as scores_after computes them
                        results["test"][k, l, r] = float(hit_rate(test[i]))
                        results["train"][k, l, r] = float(hit_rate(train[i]))
            finite = lanes.finite().tolist()
            for i, (r, l) in enumerate(group):
                results["non_finite"][l, r] = not finite[i]
    return results


def networks_and_images(model, sampler, seeds, num_classes, config):
    """What each run of `seeds` draws, as `full_network_run` draws it: (its networks (`anml.learner`),
    training images [R, S, 1, H, W] in class order, their labels [R, S], test images [R, T, 1, H, W],
    their labels [R, T])."""
    nets, train_ims, train_labels, test_ims, test_labels = [], [], [], [], []
    for entropy in seeds:
        sampler.rng, generator = run_generators(*entropy)
        nets.append(learner(model, generator, no_freeze=True))
        train_tasks, (ims, labels), _ = sampler.sample_test(num_classes, config.train_examples, device=config.device)
        images, classes = training_images(train_tasks)
        train_ims.append(images)
        train_labels.append(classes)
        test_ims.append(ims)
        test_labels.append(labels)
    return nets, *(torch.stack(t) for t in (train_ims, train_labels, test_ims, test_labels))
