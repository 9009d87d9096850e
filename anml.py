"""ANML meta-training and meta-testing (the four phases of the higherANML README).

- train-train: 20 inner SGD steps on one new class, one image at a time, over RLN + fc;
- train-test:  outer Adam step on those 20 images plus 64 remembered ones, through the unroll;
- test-train:  frozen RLN and NM, a fresh fc learns N new classes in sequence (Adam, one image a step);
- test-test:   accuracy on the held-out images of those N classes.

`meta_step(..., backend="higher")` is the reference (the seed's code); `backend="func"` computes
the same meta-gradient faster (`functional.py`), and "graph" replays it from a CUDA graph
(`cuda_graphs.py`). The meta-test runs on frozen features (`frozen_features.py`) unless asked for
the seed's loop; checkpoints and the run's state are in `checkpoints.py`.
"""
import itertools
import math
import os
import time
from pathlib import Path

import higher
import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from atomic import WriteError
from checkpoints import (Diverged, RunLock, StopSignal, TrainingLog, apply_training_state, check_finite_parameters,
                         check_out_dir, checkpoint_path, clean_out_dir, cpu_state_dict, finished_already, last_good,
                         load_model, restore_torch_rng, run_config, run_name, save_atomic, save_training_state,
                         starting_state)
from cuda_graphs import GraphedMetaStep
from frozen_features import FeatureBank, MetaTestRun, iid_fit, iid_orders, ridge_fit, sequential_fit
from functional import accuracy, func_meta_loss
from model import ANML

BACKENDS = ("auto", "higher", "func", "graph")  # auto: graph on CUDA, func elsewhere


# ----------------------------------------------------------------------------- meta-training


def kaiming_std(weight):
    """The std of kaiming_normal_ (fan_in, gain sqrt(2)) for a [out, in] weight."""
    return math.sqrt(2.0 / weight.shape[1])


def lobotomize(layer, class_num):
    """Kaiming-normal re-initialisation of one row of `layer.weight` (the bias is untouched).

    `class_num` may be an int or a long tensor on the layer's device (the CUDA graph passes one)."""
    weight = layer.weight
    index = torch.as_tensor(class_num, device=weight.device).reshape(1)
    with torch.no_grad():
        row = torch.empty(1, weight.shape[1], dtype=weight.dtype, device=weight.device).normal_(0, kaiming_std(weight))
        weight.index_copy_(0, index, row)


def meta_step(model, inner_opt, outer_opt, train_data, train_class, valid_ims, valid_labels,
              backend="higher", first_order=False):
    """One ANML meta-training iteration; returns (outer loss, outer accuracy) as floats.

    Lobotomize the new class's fc row, take one differentiable inner step per (image, label)
    pair of `train_data`, then back-propagate the adapted model's loss on `valid_ims` through
    the whole unrolled loop (second order) and take one `outer_opt` step. `backend` is "higher"
    or "func" ("auto" is "func" here: one iteration alone is not worth a CUDA graph). `first_order`
    does not differentiate through the inner steps (the original ANML code's gradient; not "higher")."""
    lobotomize(model.fc, train_class)
    loss, acc = meta_loss(model, inner_opt, train_data, valid_ims, valid_labels, backend, first_order)
    outer_opt.step()
    outer_opt.zero_grad()
    return loss.item(), acc.item()


def meta_loss(model, inner_opt, train_data, valid_ims, valid_labels, backend, first_order=False):
    """The meta-gradient, left in the parameters' .grad; returns (loss, accuracy) tensors."""
    if backend == "higher":
        check_first_order(backend, first_order)
        return higher_meta_loss(model, inner_opt, train_data, valid_ims, valid_labels)
    if backend in ("func", "auto"):
        ims = torch.cat([im for im, _ in train_data])
        labels = torch.cat([label for _, label in train_data])
        return func_meta_loss(model, inner_opt, ims, labels, valid_ims, valid_labels, first_order=first_order)
    raise ValueError(f"meta_step: unknown backend {backend!r}: choose 'higher' or 'func' "
                     f"(the CUDA graph is `meta_stepper(backend='graph')`)")


def check_first_order(backend, first_order):
    """The first-order meta-gradient is implemented by the func and graph backends only."""
    if first_order and backend == "higher":
        raise ValueError("--first-order is implemented by the func and graph backends (--backend auto, func), "
                         "not by higher, the second-order reference")


def higher_meta_loss(model, inner_opt, train_data, valid_ims, valid_labels):
    """The seed's inner loop with `higher`; leaves the meta-gradient in the parameters' .grad."""
    with higher.innerloop_ctx(model, inner_opt, copy_initial_weights=False) as (fnet, diffopt):
        for ims, labels in train_data:
            diffopt.step(F.cross_entropy(fnet(ims), labels))
        out = fnet(valid_ims)
        loss = F.cross_entropy(out, valid_labels)
        loss.backward()
    return loss.detach(), accuracy(out, valid_labels)


def make_optimizers(model, inner_lr, outer_lr, capturable=False):
    """The seed's optimisers: inner SGD over RLN + fc, outer Adam over everything."""
    inner_opt = torch.optim.SGD(list(model.rln.parameters()) + list(model.fc.parameters()), lr=inner_lr)
    outer_opt = torch.optim.Adam(model.parameters(), lr=outer_lr, capturable=capturable)
    return inner_opt, outer_opt


def resolve_backend(backend, device):
    """One of BACKENDS for `device`: "auto" is "graph" on CUDA and "func" elsewhere."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}: choose one of {', '.join(BACKENDS)}")
    if backend == "auto":
        return "graph" if torch.device(device).type == "cuda" else "func"
    return backend


def meta_stepper(backend, model, inner_opt, outer_opt, sampler, device, first_order=False):
    """The one place every backend is dispatched: a function that draws a meta-training episode
    from `sampler` and runs one iteration on it, returning (loss, accuracy) (device tensors with
    "graph": read them rarely). "graph" needs `outer_opt` made with capturable=True on CUDA."""
    backend = resolve_backend(backend, device)
    check_first_order(backend, first_order)
    if backend == "graph":
        def iteration(train_class, train_ims, train_labels, valid_ims, valid_labels):
            lobotomize(model.fc, train_class)
            return func_meta_loss(model, inner_opt, train_ims, train_labels, valid_ims, valid_labels,
                                  first_order=first_order)
        graph = GraphedMetaStep(model, outer_opt, sampler, iteration)
        return lambda: graph(*sampler.sample_train_indices())

    def step():
        train_data, train_class, (valid_ims, valid_labels) = sampler.sample_train(device=device)
        return meta_step(model, inner_opt, outer_opt, train_data, train_class, valid_ims, valid_labels, backend,
                         first_order)
    return step


def train(rln, nm, mask, inner_lr=0.1, outer_lr=1e-3, its=30000, device="cpu", sampler=None,
          out_dir="trained_anmls", seed=1, backend="auto", log_every=10, save_every=1000, quiet=False,
          resume=None, time_limit=None, save_minutes=5, first_order=False):
    """Meta-train an ANML for `its` iterations.

    Writes the seed's checkpoints `{out_dir}/{rln}_{nm}_{mask}_ANML-{it}.pth` (bare state_dicts)
    every `save_every` iterations and at the last one, a resumable checkpoint (model, Adam,
    iteration, every RNG state, the flags) with each and every `save_minutes` minutes, and a CSV
    log of every iteration. `resume` (a path, or "latest") continues a run exactly, with its own
    flags (only `its` may change); after `time_limit` seconds, or on SIGINT/SIGTERM, it stops
    cleanly after the iteration in flight, writing a resumable checkpoint.

    The run holds a lock on its files in `out_dir` (ValueError if another process holds it), and
    refuses to start over an unfinished run there. A non-finite loss or weight (Diverged) or a
    failed write (WriteError, for any OSError) stops it before anything bad is saved: the last
    resumable checkpoint stays good.

    Returns (the model, why it stopped early: None when it ran to `its`, else the signal's name
    or the time limit). `first_order` trains with the first-order meta-gradient (recorded with the
    run's other flags: a resume with the other setting is refused)."""
    out_dir, name = Path(out_dir), run_name(rln, nm, mask)
    config = run_config(rln, nm, mask, inner_lr, outer_lr, seed, backend, its, first_order)
    check_first_order(resolve_backend(backend, device), first_order)
    check_out_dir(out_dir)
    with RunLock(out_dir, name):
        clean_out_dir(out_dir)
        state, path = starting_state(resume, out_dir, name, config)
        try:
            return train_locked(config, device, sampler, out_dir, state, path, log_every, save_every, quiet,
                                time_limit, save_minutes)
        except Diverged as e:
            raise Diverged(f"{e}; {last_good(out_dir, name)} (a smaller --outer-lr is a new run: "
                           f"another --out-dir)") from e
        except OSError as e:  # a checkpoint or the log could not be written (WriteError, a full disk)
            raise WriteError(f"{e}; {last_good(out_dir, name)}: free some space (or fix the folder), then "
                             f"continue with --resume latest") from e


def train_locked(config, device, sampler, out_dir, state, state_path, log_every, save_every, quiet, time_limit,
                 save_minutes):
    """The training loop of `train`, once the run's files are locked and its start is checked."""
    name, its = run_name(config["rln"], config["nm"], config["mask"]), config["epochs"]
    if sampler is None:
        from datasets import OmniSampler
        sampler = OmniSampler(seed=config["seed"])
    torch.manual_seed(config["seed"])
    model = ANML(config["rln"], config["nm"], config["mask"]).to(device)
    backend = resolve_backend(config["backend"], device)
    inner_opt, outer_opt = make_optimizers(model, config["inner_lr"], config["outer_lr"],
                                           capturable=backend == "graph")
    first, elapsed, rng = 0, 0.0, None
    if state is not None:
        first, elapsed, rng = apply_training_state(state, state_path, model, outer_opt, sampler)
    if first == its:
        return finished_already(model, out_dir, name, its), None
    step = meta_stepper(backend, model, inner_opt, outer_opt, sampler, device, config["first_order"])
    restore_torch_rng(rng)  # after the graph's warm-up, which draws from the CUDA generator
    log = TrainingLog(out_dir / f"{name}_train_log.csv", first)
    start = time.perf_counter()
    clock = lambda: time.perf_counter() - start
    last_save = 0.0
    with StopSignal(time_limit, clock) as stop:
        for it in tqdm(range(first, its), initial=first, total=its, disable=quiet, desc="meta-train"):
            loss, acc = step()
            log.add(it, loss, acc, elapsed + clock())
            if it % log_every == 0:
                log.flush()  # raises Diverged on a non-finite loss
                tqdm.write(f"{it}: {float(loss):.3f} | {float(acc):.3f} ({elapsed + clock():.1f}s)")
            milestone = it % save_every == 0 or it == its - 1
            timed = save_minutes is not None and clock() - last_save >= save_minutes * 60
            if milestone or timed or stop.requested():
                log.flush()
                if milestone:
                    check_finite_parameters(model, it)
                    save_atomic(cpu_state_dict(model), checkpoint_path(out_dir, name, it))
                save_training_state(out_dir, name, it, model, outer_opt, sampler, elapsed + clock(), config)
                last_save = clock()
            if stop.requested() and it < its - 1:
                tqdm.write(f"stopped after iteration {it} ({stop.reason}); continue with --resume latest")
                return model, stop.reason
    log.flush()
    return model, None


# ----------------------------------------------------------------------------- meta-testing


def reset_last_layer(model, generator=None):
    """Kaiming-normal re-initialisation of the whole fc weight (bias kept), as the seed does."""
    weight = model.fc.weight
    with torch.no_grad():
        weight.copy_(torch.randn(weight.shape, generator=generator, dtype=weight.dtype) * kaiming_std(weight))


def predict_in_batches(model, ims, batch_size=100):
    """model(ims).argmax(1), a batch at a time (600 classes' images at once take gigabytes)."""
    with torch.no_grad():
        return torch.cat([model(ims[i:i + batch_size]).argmax(1) for i in range(0, len(ims), batch_size)])


def test_test(model, test_data, test_examples=5):
    """Per-class accuracy of `model` on the held-out images (classes contiguous, in order)."""
    ims, labels = test_data
    correct = predict_in_batches(model, ims) == labels
    return correct.view(-1, test_examples).float().mean(1).cpu().numpy()


def seed_style_fit(model, train_tasks, lr):
    """The seed's test-train loop: Adam over the model (only fc is trainable), one step an image."""
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    for task in train_tasks:
        for image, label in task:
            loss = F.cross_entropy(model(image), label)
            opt.zero_grad()
            loss.backward()
            opt.step()
    return model


def test_train(PATH, sampler, num_classes=10, train_examples=15, device="cpu", lr=1e-3, quiet=False,
               fast=True, generator=None):
    """The seed's meta-test: returns the per-class test accuracies (numpy) of one run.

    Loads the checkpoint, re-initialises fc.weight, freezes RLN and NM, learns `num_classes`
    new classes in sequence (one Adam step per training image), then tests on the rest.
    `fast=True` computes the frozen features once and runs the same Adam steps on fc alone."""
    model = load_model(PATH, device)
    model.rln.requires_grad_(False)
    model.nm.requires_grad_(False)
    reset_last_layer(model, generator)
    if fast:
        classes, train_idx, test_idx = sampler.sample_test_indices(num_classes, train_examples)
        features = FeatureBank(model, sampler.evaluation)
        run = MetaTestRun(classes, train_idx, test_idx)
        result = sequential_fit(features, [run], model.fc.weight[None], model.fc.bias, [lr])
        return result["test_per_class"][0, 0]
    train_tasks, test_data, _ = sampler.sample_test(num_classes, train_examples, device=device)
    seed_style_fit(model, train_tasks, lr)
    if not quiet:
        print(f"train accuracy {train_accuracy(model, train_tasks):.3f}")
    return test_test(model, test_data, test_examples=20 - train_examples)


def run_generators(*entropy):
    """(numpy, torch) generators of one meta-test run, from its SeedSequence entropy: the same
    (seed, run) repeats it exactly. `run_seeds` gives the entropies of report and selection runs."""
    seq = np.random.SeedSequence(list(entropy))
    return np.random.default_rng(seq), torch.Generator().manual_seed(int(seq.generate_state(1)[0]))


def run_seeds(seed, runs, selection=False):
    """The entropies of `runs` meta-test runs: [seed, r], or [seed, r, 1] for the selection runs
    that choose a learning rate (so they never coincide with the runs that report it)."""
    return [[seed, r, 1] if selection else [seed, r] for r in range(runs)]


def class_counts(num_classes):
    """One count or several, as a sorted list without repeats."""
    return sorted({int(n) for n in np.atleast_1d(num_classes)})


METHODS = ("seq", "iid", "lstsq")  # the meta-test's last layer: in sequence, shuffled, closed form


def shuffle_rng(entropy):
    """The numpy generator of a run's i.i.d. shuffles: a child of the run's SeedSequence, so it is
    independent of the classes, splits and initialisation that the run draws."""
    return np.random.default_rng(np.random.SeedSequence(list(entropy)).spawn(1)[0])


def meta_test(PATH, sampler, num_classes=10, train_examples=15, lrs=(1e-3,), runs=10, device="cpu",
              seed=0, fast=True, progress=True, method="seq", epochs_iid=1, ridges=(1.0,)):
    """Meta-test runs for every learning rate (or ridge regulariser) and class count.

    `method` says how the last layer learns the classes on the frozen features: "seq" (the seed's
    one Adam step per image, class after class), "iid" (the same images and number of steps, or
    `epochs_iid` times as many, with the N classes' images shuffled together: the oracle), or
    "lstsq" (ridge least squares in closed form for each of `ridges`, which then play the role of
    the learning rates). Every method sees the same runs: classes, splits and initialisation.

    `runs` is a count (run r draws from (seed, r)) or a list of SeedSequence entropies. Each run
    draws the same classes, splits and fc initialisation for every learning rate, so the rates are
    compared on equal terms. `num_classes` may be several counts: a run learns one random order of
    classes and is scored after the first N of them for each N, which is what a separate run with N
    classes computes (it draws the same first N classes; tested).

    Returns {"test": [K, L, R], "train": [K, L, R]} accuracies (K class counts in increasing order).
    With `fast`, the frozen features are computed once; on CUDA all L*R runs train at once, on the
    CPU one after the other (one last layer's Adam state nearly fits in the cache, a batch does not)."""
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}: choose one of {', '.join(METHODS)}")
    if method != "seq" and not fast:
        raise ValueError(f"the seed's loop is the sequential method: method {method!r} needs fast=True")
    counts = class_counts(num_classes)
    seeds = run_seeds(seed, runs) if isinstance(runs, int) else [list(e) for e in runs]
    model = load_model(PATH, device) if isinstance(PATH, (str, os.PathLike)) else PATH.to(device)
    model.requires_grad_(False)
    bias = model.fc.bias.detach().clone()  # the checkpoint's: kept, as the seed does
    inits, samples = [], []
    for entropy in seeds:
        sampler.rng, generator = run_generators(*entropy)
        reset_last_layer(model, generator)
        inits.append(model.fc.weight.detach().clone())
        samples.append(MetaTestRun(*sampler.sample_test_indices(counts[-1], train_examples)))
    R, L = len(seeds), len(ridges if method == "lstsq" else lrs)
    results = {k: np.zeros((len(counts), L, R)) for k in ("test", "train")}
    if not fast:
        for r in tqdm(range(R), disable=not progress, desc="runs"):
            for (k, n), (l, lr) in itertools.product(enumerate(counts), enumerate(lrs)):
                sampler.rng, _ = run_generators(*seeds[r])
                train_tasks, test_data, _ = sampler.sample_test(n, train_examples, device=device)
                with torch.no_grad():
                    model.fc.weight.copy_(inits[r])
                    model.fc.bias.copy_(bias)
                model.fc.requires_grad_(True)
                seed_style_fit(model, train_tasks, lr)
                model.fc.requires_grad_(False)
                results["test"][k, l, r] = test_test(model, test_data, 20 - train_examples).mean()
                results["train"][k, l, r] = train_accuracy(model, train_tasks)
        return results
    features = FeatureBank(model, sampler.evaluation)
    if method == "lstsq":
        return ridge_fit(features, samples, list(ridges), counts)
    if torch.device(device).type == "cuda":
        batches = [(list(range(L)), list(range(R)))]
    else:
        batches = [([l], [r]) for r in range(R) for l in range(L)]
    if method == "iid":
        orders = [iid_orders(shuffle_rng(entropy), counts, train_examples, epochs_iid) for entropy in seeds]
        steps = sum(counts) * train_examples * epochs_iid
    else:
        steps = counts[-1] * train_examples
    with tqdm(total=steps * len(batches), disable=not progress, desc="test-train steps", unit="step",
              unit_scale=True, smoothing=0) as bar:
        for ls, rs in batches:
            args = (features, [samples[r] for r in rs], torch.stack([inits[r] for r in rs]), bias, [lrs[l] for l in ls])
            if method == "iid":
                out = iid_fit(*args, counts=counts, orders=[orders[r] for r in rs], bar=bar)
            else:
                out = sequential_fit(*args, counts=counts, bar=bar)
            for key in results:
                results[key][np.ix_(range(len(counts)), ls, rs)] = out[key]
    return results


def train_accuracy(model, train_tasks):
    ims = torch.cat([im for task in train_tasks for im, _ in task])
    labels = torch.cat([label for task in train_tasks for _, label in task])
    return (predict_in_batches(model, ims) == labels).float().mean().item()
