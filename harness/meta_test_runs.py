"""The meta-test's runs: what each draws from its seed, the frozen-feature methods that learn on
them (`fastpath.frozen_features`), and higherANML's loop with the whole network run on every image
(`original_fit`), for RLN and NM frozen (--original-loop) or learning too (--no-freeze, the
original ANML code's baseline), the latter also several runs at a time (--lanes, `lanes_meta_test`,
`fastpath.full_network`). `anml.meta_test` runs them; `anml` gives higherANML's names
(`test_test`, `original_fit`) from here."""
import copy

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from fastpath.full_network import Lanes
from fastpath.frozen_features import (FeatureBank, MetaTestRun, empty_results, hit_rate, iid_orders, learn_on_features,
                                      ncm_fit, ridge_fit, shuffle_rng)
from model import reset_last_layer


def run_generators(*entropy):
    """(numpy, torch) generators of one meta-test run, from its SeedSequence entropy: the same
    (seed, run) repeats it exactly."""
    seq = np.random.SeedSequence(list(entropy))
    return np.random.default_rng(seq), torch.Generator().manual_seed(int(seq.generate_state(1)[0]))


def draw_runs(model, sampler, seeds, num_classes, train_examples):
    """Each run's fc initialisation and sample (classes, splits), drawn from its entropy in `seeds`."""
    inits, samples = [], []
    for entropy in seeds:
        sampler.rng, generator = run_generators(*entropy)
        reset_last_layer(model, generator)
        inits.append(model.fc.weight.detach().clone())
        samples.append(MetaTestRun(*sampler.sample_test_indices(num_classes, train_examples)))
    return inits, samples


def predict_in_batches(model, ims, batch_size=100):
    """model(ims).argmax(1), a batch at a time (600 classes' images at once take gigabytes)."""
    with torch.no_grad():
        return torch.cat([model(ims[i:i + batch_size]).argmax(1) for i in range(0, len(ims), batch_size)])


def training_images(train_tasks):
    """(images [S, 1, H, W], labels [S]) of every training image of `train_tasks`, class after class."""
    return (torch.cat([im for task in train_tasks for im, _ in task]),
            torch.cat([label for task in train_tasks for _, label in task]))


def train_accuracy(model, train_tasks):
    """Accuracy of `model` on every training image of `train_tasks`."""
    ims, labels = training_images(train_tasks)
    return float(hit_rate(predict_in_batches(model, ims) == labels))


def per_class_accuracy(correct, test_examples):
    """Per-class accuracy from the held-out images' hits `correct` (classes contiguous, in order)."""
    return hit_rate(correct.view(-1, test_examples))


def test_test(model, test_data, test_examples=5):
    """Per-class accuracy of `model` on the held-out images (classes contiguous, in order)."""
    ims, labels = test_data
    return per_class_accuracy(predict_in_batches(model, ims) == labels, test_examples)


def original_fit(model, train_tasks, lr, after_task=None):
    """higherANML's test-train loop: Adam over model.parameters(), one step an image, task after task.
    The parameters that require grad learn: fc alone when RLN and NM are frozen, every one of them
    with --no-freeze. `after_task(t)`, if given, runs after task t (counted from 1) is learned."""
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    for t, task in enumerate(train_tasks, 1):
        for image, label in task:
            loss = F.cross_entropy(model(image), label)
            opt.zero_grad()
            loss.backward()
            opt.step()
        if after_task is not None:
            after_task(t)
    return model


def run_network(model, generator=None, no_freeze=False):
    """The network one meta-test run trains: a copy of `model` with fc.weight re-initialised from
    `generator` (bias kept), fc learning, and RLN and NM learning too with `no_freeze` (frozen
    otherwise). `model` itself is left as it is."""
    net = copy.deepcopy(model)
    net.requires_grad_(no_freeze)
    net.fc.requires_grad_(True)
    reset_last_layer(net, generator)
    return net


def scores_after(model, train_tasks, test_data, n, test_examples):
    """(test accuracy, train accuracy) of `model` on the first n classes' held-out and training images,
    each the exact count of hits over the images (the mean of the per-class accuracies)."""
    ims, labels = test_data
    rows = n * test_examples
    test = hit_rate(predict_in_batches(model, ims[:rows]) == labels[:rows])
    return float(test), train_accuracy(model, train_tasks[:n])


def meta_test_runs(config, sampler, model, seeds, runs, progress=True, features=None, results=None):
    """`meta_test` of the runs `runs` (indices into `seeds`) alone: results [K, L, len(runs)]. Every
    run is drawn, and the features of every run's classes computed, as for all of them."""
    runs = list(runs)
    results = empty_results(config, len(runs)) if results is None else results
    if config.lanes > 1:
        return lanes_meta_test(config, sampler, model, [seeds[r] for r in runs], results, progress)
    if config.original_loop or config.no_freeze:
        return original_meta_test(config, sampler, model, [seeds[r] for r in runs], results, progress)
    inits, samples = draw_runs(model, sampler, seeds, config.classes[-1], config.train_examples)
    features = features or FeatureBank(model, sampler.evaluation, progress=progress)
    features.compute(np.unique(np.concatenate([run.classes for run in samples])))
    samples, inits = [samples[r] for r in runs], [inits[r] for r in runs]
    if config.method == "lstsq":
        return ridge_fit(features, samples, list(config.grid), list(config.classes), progress, results)
    if config.method == "ncm":
        return ncm_fit(features, samples, list(config.grid), list(config.classes), progress, results)
    return learn_on_features(config, features, samples, torch.stack(inits), model.fc.bias.detach().clone(),
                             [seeds[r] for r in runs], results, progress)


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


def original_meta_test(config, sampler, model, seeds, results, progress):
    """`meta_test` with higherANML's loop, the whole network run on every image (`original_fit`):
    fc learns, and with config.no_freeze RLN and NM too, one Adam step an image, for every run and
    learning rate. seq learns each run's sequence once and is scored after the first N classes for
    each count N; iid trains each count afresh, from the same initialisation, on the first N classes'
    images in the shuffled orders of the frozen-feature iid (`iid_orders`, from the run's entropy)."""
    counts, lrs = list(config.classes), list(config.grid)
    steps = (sum(counts) * config.iid_epochs if config.method == "iid" else counts[-1]) * config.train_examples
    with tqdm(total=steps * len(seeds) * len(lrs), disable=not progress, desc="test-train (full network)",
              unit="step", unit_scale=True, smoothing=0) as bar:
        for r, entropy in enumerate(seeds):
            orders = (iid_orders(shuffle_rng(entropy), counts, config.train_examples, config.iid_epochs)
                      if config.method == "iid" else None)
            for l, lr in enumerate(lrs):
                sampler.rng, generator = run_generators(*entropy)
                net = run_network(model, generator, config.no_freeze)
                scores, finite = full_network_run(net, sampler, counts, lr, config, orders, bar)
                for k, (test, train) in enumerate(scores):
                    results["test"][k, l, r], results["train"][k, l, r] = test, train
                results["non_finite"][l, r] = not finite
    return results


def full_network_run(net, sampler, counts, lr, config, orders=None, bar=None):
    """One run of `original_meta_test` from the run's network `net` (`run_network`), its sample drawn
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
        learner = copy.deepcopy(net)
        original_fit(learner, [[images[i] for i in order]], lr)
        if bar is not None:
            bar.update(len(order))
        scores.append(score(learner, n))
        finite &= all_finite(learner)
    return scores, finite


def lanes_meta_test(config, sampler, model, seeds, results, progress):
    """`original_meta_test` of seq with --no-freeze, `config.lanes` (run, rate) pairs learning at a time
    as the lanes of one step (`fastpath.full_network.Lanes`): each run draws its network and sample as
    there, and each pair takes the same steps, in the same order, scored after the same counts."""
    counts, lrs = list(config.classes), list(config.grid)
    pairs = [(r, l) for r in range(len(seeds)) for l in range(len(lrs))]
    steps = counts[-1] * config.train_examples
    with tqdm(total=steps * len(pairs), disable=not progress, desc=f"test-train (full network, lanes of {config.lanes})",
              unit="step", unit_scale=True, smoothing=0) as bar:
        for start in range(0, len(pairs), config.lanes):
            group = pairs[start:start + config.lanes]
            runs = sorted({r for r, _ in group})
            nets, train_ims, train_labels, test_ims, test_labels = drawn_runs(model, sampler, [seeds[r] for r in runs],
                                                                              counts[-1], config)
            of_run = torch.tensor([runs.index(r) for r, _ in group], device=config.device)
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


def drawn_runs(model, sampler, seeds, num_classes, config):
    """What each run of `seeds` draws, as `full_network_run` draws it: (its networks (`run_network`),
    training images [R, S, 1, H, W] in class order, their labels [R, S], test images [R, T, 1, H, W],
    their labels [R, T])."""
    nets, train_ims, train_labels, test_ims, test_labels = [], [], [], [], []
    for entropy in seeds:
        sampler.rng, generator = run_generators(*entropy)
        nets.append(run_network(model, generator, no_freeze=True))
        train_tasks, (ims, labels), _ = sampler.sample_test(num_classes, config.train_examples, device=config.device)
        images, classes = training_images(train_tasks)
        train_ims.append(images)
        train_labels.append(classes)
        test_ims.append(ims)
        test_labels.append(labels)
    return nets, *(torch.stack(t) for t in (train_ims, train_labels, test_ims, test_labels))


def all_finite(model):
    """Whether every parameter of `model` is finite (a far too large rate makes them NaN)."""
    return all(bool(torch.isfinite(p).all()) for p in model.parameters())
