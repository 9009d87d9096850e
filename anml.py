"""ANML meta-training and meta-testing: the four phases of higherANML, under its names.

- train-train: 20 inner SGD steps on one new class, one image at a time, over RLN + fc (`meta_step`);
- train-test:  outer Adam step on those 20 images plus 64 remembered ones, through the unroll;
- test-train:  frozen RLN and NM, a fresh fc learns N new classes in sequence, one Adam step an image
               (`test_train`; `meta_test` runs many such runs and rates at once);
- test-test:   accuracy on the held-out images of those N classes (`test_test`).

`meta_step(..., backend="higher")` is the reference, higherANML's own code; "func" computes the same
meta-gradient faster (`functional.py`) and "graph" replays it from a CUDA graph (`cuda_graphs.py`).
`train` runs the iterations in the loop that keeps a run safe (`run_loop.py`). The meta-test runs on
frozen features (`frozen_features.py`) unless higherANML's loop is asked for, or every parameter is
to learn (`no_freeze`, the original ANML code's baseline), which only that loop can do.
"""
import copy

import higher
import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from harness import run_loop
from fastpath.batched import MemberOptimizer, StackedMetaStep, one_or_each, seeded_stack, stacked_optimizer
from harness.checkpoints import load_model
from harness.config import IMAGES_PER_CLASS
from fastpath.cuda_graphs import GraphedMetaStep
from datasets import OmniSampler
from fastpath.frozen_features import (FeatureBank, MetaTestRun, empty_results, iid_orders, learn_on_features, ncm_fit, ridge_fit,
                             sequential_fit, shuffle_rng)
from fastpath.functional import accuracy, func_meta_loss, inner_parameter_names
from model import kaiming_std, seeded_network
from fastpath.oml import IMAGE_SIZE, OML, oml_meta_loss, seeded_oml
from harness.runtime import Ranks, any_process

# ----------------------------------------------------------------------------- meta-training


def lobotomize(layer, class_num):
    """Kaiming-normal re-initialisation of one row of `layer.weight` (the bias is untouched).

    `class_num` may be an int or a long tensor on the layer's device (the CUDA graph passes one)."""
    weight = layer.weight
    index = torch.as_tensor(class_num, device=weight.device).reshape(1)
    with torch.no_grad():
        row = torch.empty(1, weight.shape[1], dtype=weight.dtype, device=weight.device).normal_(0, kaiming_std(weight))
        weight.index_copy_(0, index, row)


def meta_step(model, outer_opt, train_data, train_class, valid_ims, valid_labels, inner_lr=0.1,
              backend="higher", first_order=False, outer_chunk=None):
    """One ANML meta-training iteration; returns (outer loss, outer accuracy) as floats.

    Lobotomize the new class's fc row, take one differentiable inner SGD step (`inner_lr`) per
    (image, label) pair of `train_data`, then back-propagate the adapted model's loss on
    `valid_ims` through the whole unrolled loop (second order) and take one `outer_opt` step.
    `backend` is "higher" or "func"; `first_order` does not differentiate through the inner steps
    (the original ANML code's gradient; func only); `outer_chunk` is func's images per chunk of the
    outer backward (None: the device's default, 0: whole)."""
    lobotomize(model.fc, train_class)
    loss, acc = meta_loss(model, train_data, valid_ims, valid_labels, inner_lr, backend, first_order, outer_chunk)
    outer_opt.step()
    outer_opt.zero_grad()
    return loss.item(), acc.item()


def meta_loss(model, train_data, valid_ims, valid_labels, inner_lr, backend, first_order=False, outer_chunk=None):
    """The meta-gradient, left in the parameters' .grad; returns (loss, accuracy) tensors."""
    if backend == "higher":
        if first_order:
            raise ValueError("--first-order is implemented by the func and graph backends, not by higher")
        return higher_meta_loss(model, train_data, valid_ims, valid_labels, inner_lr)
    if backend == "func":
        ims = torch.cat([im for im, _ in train_data])
        labels = torch.cat([label for _, label in train_data])
        return functional_meta_loss(model, inner_lr, ims, labels, valid_ims, valid_labels, first_order, outer_chunk)
    raise ValueError(f"meta_step: unknown backend {backend!r}: choose 'higher' or 'func' "
                     f"(the CUDA graph is `meta_stepper(backend='graph')`)")


def functional_meta_loss(model, inner_lr, train_ims, train_labels, valid_ims, valid_labels, first_order=False,
                         outer_chunk=None):
    """The func backend's meta-gradient of either network: `functional.func_meta_loss` for ANML,
    `oml.oml_meta_loss` for OML."""
    if isinstance(model, OML):
        return oml_meta_loss(model, inner_lr, train_ims, train_labels, valid_ims, valid_labels, first_order)
    return func_meta_loss(model, inner_lr, train_ims, train_labels, valid_ims, valid_labels, first_order, outer_chunk)


def higher_meta_loss(model, train_data, valid_ims, valid_labels, inner_lr):
    """higherANML's inner loop with `higher` (inner SGD over RLN + fc); leaves the meta-gradient in
    the parameters' .grad."""
    params = dict(model.named_parameters())
    inner_opt = torch.optim.SGD([params[n] for n in inner_parameter_names(model)], lr=inner_lr)
    with higher.innerloop_ctx(model, inner_opt, copy_initial_weights=False) as (fnet, diffopt):
        for ims, labels in train_data:
            diffopt.step(F.cross_entropy(fnet(ims), labels))
        out = fnet(valid_ims)
        loss = F.cross_entropy(out, valid_labels)
        loss.backward()
    return loss.detach(), accuracy(out, valid_labels)


def outer_optimizer(model, outer_lr, capturable=False):
    """higherANML's outer optimiser: Adam over everything."""
    return torch.optim.Adam(model.parameters(), lr=outer_lr, capturable=capturable)


def meta_stepper(backend, model, outer_opt, sampler, device, inner_lr=0.1, first_order=False):
    """The one place every backend is dispatched: a function that draws a meta-training episode
    from `sampler` and runs one iteration on it, returning (loss, accuracy) (device tensors with
    "graph": read them rarely). "graph" needs `outer_opt` made with capturable=True on CUDA; on a
    CPU its steps run eagerly (which lets the tests check it)."""
    if backend == "graph":
        def iteration(train_class, train_ims, train_labels, valid_ims, valid_labels):
            lobotomize(model.fc, train_class)
            return functional_meta_loss(model, inner_lr, train_ims, train_labels, valid_ims, valid_labels,
                                        first_order=first_order)
        graph = GraphedMetaStep(model, outer_opt, sampler, iteration)
        return lambda: graph(*sampler.sample_train_indices())

    def step():
        train_data, train_class, (valid_ims, valid_labels) = sampler.sample_train(device=device)
        return meta_step(model, outer_opt, train_data, train_class, valid_ims, valid_labels, inner_lr, backend,
                         first_order)
    return step


def train(config, sampler=None, quiet=False, ranks=Ranks()):
    """Meta-train an ANML as `config` (a config.MetaTrainConfig) says, higherANML's `train`.

    Writes higherANML's checkpoints `{out_dir}/{rln}_{nm}_{mask}_ANML-{it}.pth` every 1000
    iterations and at the last, a resumable checkpoint with each and every `save_minutes`, and the
    CSV log; stops cleanly on a signal or the time limit (see run_loop.run, which gives the
    return value: the model, why it stopped early or None, the last checkpoint's path; lists of
    models and paths with --seeds). With --seeds or --meta-batch the models and tasks train
    together (`batched.py`); under torchrun (`ranks`) the seeds are shared out over the processes,
    or, with one seed, the tasks of its meta-batch."""
    if config.several:
        configs = config.members()[ranks.rank::ranks.world]
        if config.meta_batch == 1 and len(configs) == 1:
            model, stopped, last = train_one(configs[0], sampler, quiet, ranks.restarted)
            return [model], stopped, [last]
        return train_together(configs, sampler, quiet, ranks)
    if config.meta_batch > 1 or ranks.world > 1:
        model, stopped, last = train_together([config], sampler, quiet, ranks, shared=ranks.world > 1)
        return model[0], stopped, last[0]
    return train_one(config, sampler, quiet)


def milestones(total):
    """step -> the index of higherANML's checkpoint to write after it (every SAVE_EVERY and the last
    of `total`), or None."""
    return lambda it: it if it % SAVE_EVERY == 0 or it == total - 1 else None


def train_one(config, sampler=None, quiet=False, restarted=False):
    """One model, one task an iteration: the paper's algorithm, on any backend."""
    def build():  # once the run's files are locked and its start is checked
        print(f"meta-training {config.KIND} {config.name} for {config.epochs} its on {config.device} (backend "
              f"{config.backend}, seed {config.seed}{', first-order' if config.first_order else ''}"
              f"{threads_note(config.device)}) -> {config.out_dir}/",
              flush=True)
        oml = config.arch == "oml"
        data = sampler or OmniSampler(config.data_root, download=config.download, im_size=IMAGE_SIZE if oml else 28)
        data.rng = np.random.default_rng(config.seed)  # the run's seed draws its tasks (a resume restores them)
        model = (seeded_oml(config.rln, config.seed) if oml else
                 seeded_network(config.rln, config.nm, config.mask, config.seed)).to(config.device)
        backend = config.resolved_backend
        outer_opt = outer_optimizer(model, config.outer_lr, capturable=backend == "graph")

        def make_step():  # after the resumable state is loaded: the CUDA graph records those weights
            step = meta_stepper(backend, model, outer_opt, data, config.device, config.inner_lr, config.first_order)
            return lambda it: step()
        return run_loop.Steps(model, outer_opt, data, config.epochs, make_step, milestones(config.epochs), report,
                              "iteration: outer loss | outer accuracy (seconds)")

    def report(it, loss, acc, seconds):
        return f"{it}: {float(loss):.3f} | {float(acc):.3f} ({seconds:.1f}s)" if it % run_loop.LOG_EVERY == 0 else None

    return run_loop.run(config, build, quiet, restarted=restarted)


def train_together(configs, sampler=None, quiet=False, ranks=Ranks(), shared=False):
    """Several models (one per config, as --seeds makes them) and each `meta_batch` tasks an
    iteration, as the lanes of one meta-iteration (`batched.py`). `shared`: the processes of
    torchrun hold the same model and share its meta-batch out; rank 0 writes the files."""
    config = configs[0]
    seeds = [c.seed for c in configs]
    backend = config.resolved_backend
    if backend == "higher":  # MetaTrainConfig refuses it with several models or tasks, not with several processes
        raise ValueError("several models or tasks an iteration run on the func and graph backends, not higher")
    if shared and backend == "graph" and config.backend == "auto":
        backend = "func"  # the all_reduce between the processes is not recorded into the CUDA graph

    def build():  # once the runs' files are locked and their starts are checked
        what = f"{len(seeds)} ANMLs" if len(seeds) > 1 else f"ANML {config.name}, seed {config.seed}"
        tasks = f", meta-batch {config.meta_batch}" if config.meta_batch > 1 else ""
        where = f", process {ranks.rank} of {ranks.world}" if ranks.world > 1 else ""
        print(f"meta-training {what} for {config.epochs} its on {config.device} (backend {backend}{tasks}"
              f"{', first-order' if config.first_order else ''}{where}{threads_note(config.device)}) -> "
              f"{', '.join(c.out_dir + '/' for c in configs)}", flush=True)
        data = sampler or OmniSampler(config.data_root, download=config.download)
        stack, generators = seeded_stack(config.rln, config.nm, config.mask, seeds, config.device)
        outer_opt = stacked_optimizer(stack, [c.outer_lr for c in configs], capturable=backend == "graph")
        inner_lr = one_or_each([c.inner_lr for c in configs], config.device)
        holders = []
        for seed, generator in zip(seeds, generators):
            holder = copy.copy(data)  # the same images, the seed's own task draws
            holder.rng, holder.generator = np.random.default_rng(seed), generator
            holders.append(holder)
        optimizers = [MemberOptimizer(outer_opt, k) for k in range(len(seeds))]

        def make_step():  # after the resumable states are loaded: the CUDA graph records those weights
            step = StackedMetaStep(stack, outer_opt, holders, generators, config.meta_batch, inner_lr,
                                   config.first_order, graphed=backend == "graph",
                                   share=(ranks.rank, ranks.world) if shared else (0, 1))
            return lambda it: step()
        agree = (lambda stop: any_process(stop, config.device)) if shared else None
        header = f"iteration: outer loss | outer accuracy{', per run' if len(seeds) > 1 else ''} (seconds)"
        return run_loop.Steps(stack.members, optimizers, holders, config.epochs, make_step, milestones(config.epochs),
                              report, header, agree=agree)

    def report(it, loss, acc, seconds):
        if it % run_loop.LOG_EVERY:
            return None
        values = lambda t: " ".join(f"{v:.3f}" for v in t.tolist())
        return f"{it}: {values(loss)} | {values(acc)} ({seconds:.1f}s)"

    return run_loop.run(configs, build, quiet, writer=ranks.rank == 0 or not shared, restarted=ranks.restarted)


SAVE_EVERY = 1000  # iterations between higherANML's checkpoints


def threads_note(device):
    """", N threads" on the CPU (the announcement of a run), else nothing."""
    n = torch.get_num_threads()
    return f", {n} thread{'s' if n > 1 else ''}" if device == "cpu" else ""

# ----------------------------------------------------------------------------- meta-testing


def reset_last_layer(model, generator=None):
    """Kaiming-normal re-initialisation of the whole fc weight (bias kept), as higherANML does."""
    weight = model.fc.weight
    with torch.no_grad():
        weight.copy_(torch.randn(weight.shape, generator=generator, dtype=weight.dtype) * kaiming_std(weight))


def run_generators(*entropy):
    """(numpy, torch) generators of one meta-test run, from its SeedSequence entropy: the same
    (seed, run) repeats it exactly."""
    seq = np.random.SeedSequence(list(entropy))
    return np.random.default_rng(seq), torch.Generator().manual_seed(int(seq.generate_state(1)[0]))


def run_seeds(seed, runs, selection=False):
    """The entropies of `runs` meta-test runs: [seed, r], or [seed, r, 1] for the selection runs
    that choose a learning rate (so they never coincide with the runs that report it)."""
    return [[seed, r, 1] if selection else [seed, r] for r in range(runs)]


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


def train_accuracy(model, train_tasks):
    """Accuracy of `model` on every training image of `train_tasks`."""
    ims = torch.cat([im for task in train_tasks for im, _ in task])
    labels = torch.cat([label for task in train_tasks for _, label in task])
    return (predict_in_batches(model, ims) == labels).float().mean().item()


def test_test(model, test_data, test_examples=5):
    """Per-class accuracy of `model` on the held-out images (classes contiguous, in order)."""
    ims, labels = test_data
    correct = predict_in_batches(model, ims) == labels
    return correct.view(-1, test_examples).float().mean(1).cpu().numpy()


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
    """(test accuracy, train accuracy) of `model` on the first n classes' held-out and training images."""
    ims, labels = test_data
    rows = n * test_examples
    test = test_test(model, (ims[:rows], labels[:rows]), test_examples)
    return float(test.mean()), train_accuracy(model, train_tasks[:n])


def test_train(PATH, sampler, num_classes=10, train_examples=15, device="cpu", lr=1e-3, quiet=False,
               fast=True, generator=None, no_freeze=False):
    """higherANML's meta-test of one run: returns the per-class test accuracies (numpy) and, which
    higherANML does not, the accuracy on the training images after the whole sequence.

    Loads the checkpoint (`PATH`, or a model, which is copied), freezes RLN and NM, re-initialises
    fc.weight from `generator`, learns `num_classes` new classes in sequence (one Adam step per
    training image), then tests on the rest. `fast=True` computes the frozen features once and runs
    the same Adam steps on fc alone. `no_freeze` (with fast=False) freezes nothing: every parameter
    learns, as with the original ANML code's --no_freeze."""
    if fast and no_freeze:
        raise ValueError("test_train: no_freeze trains the whole network, which the frozen features cannot "
                         "(give fast=False)")
    model = PATH if isinstance(PATH, torch.nn.Module) else load_model(PATH)
    model = run_network(model, generator, no_freeze).to(device)
    if fast:
        model.requires_grad_(False)
        run = MetaTestRun(*sampler.sample_test_indices(num_classes, train_examples))
        result = sequential_fit(FeatureBank(model, sampler.evaluation), [run], model.fc.weight[None], model.fc.bias,
                                [lr])
        return result["test_per_class"][0, 0], float(result["train"][0, 0, 0])
    train_tasks, test_data, _ = sampler.sample_test(num_classes, train_examples, device=device)
    original_fit(model, train_tasks, lr)
    train_acc = train_accuracy(model, train_tasks)
    if not quiet:
        print(f"train accuracy {train_acc:.3f}")
    return test_test(model, test_data, test_examples=IMAGES_PER_CLASS - train_examples), train_acc


def meta_test(config, sampler, model=None, progress=True, features=None, results=None, share=(0, 1)):
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

    `share` = (rank, world): torchrun's processes share the runs out (process r takes runs r, r +
    world, ...; each run depends on its own seed alone), then sum their results (`all_reduce`), so
    that every process returns all of them."""
    model = load_model(config.model, config.device) if model is None else model.to(config.device)
    model.requires_grad_(False)
    seeds = run_seeds(config.seed, config.runs) + run_seeds(config.seed, config.selection_runs, selection=True)
    results = empty_results(config) if results is None else results
    rank, world = share
    if world > 1:
        mine = list(range(rank, len(seeds), world))
        shared = meta_test_runs(config, sampler, model, seeds, mine, progress, features)
        return sum_runs_over_processes(results, shared, mine, config.device)
    return meta_test_runs(config, sampler, model, seeds, range(len(seeds)), progress, features, results)


def meta_test_runs(config, sampler, model, seeds, runs, progress=True, features=None, results=None):
    """`meta_test` of the runs `runs` (indices into `seeds`) alone: results [K, L, len(runs)]. Every
    run is drawn, and the features of every run's classes computed, as for all of them."""
    runs = list(runs)
    results = empty_results(config, len(runs)) if results is None else results
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


def all_finite(model):
    """Whether every parameter of `model` is finite (a far too large rate makes them NaN)."""
    return all(bool(torch.isfinite(p).all()) for p in model.parameters())
