"""ANML meta-training and meta-testing: the four phases of higherANML, under its names.

- train-train: 20 inner SGD steps on one new class, one image at a time, over RLN + fc (`meta_step`);
- train-test:  outer Adam step on those 20 images plus 64 remembered ones, through the unroll;
- test-train:  frozen RLN and NM, a fresh fc learns N new classes in sequence, one Adam step an image
               (`test_train`, with `original_fit`; `meta_test.py` runs many such runs and rates at once);
- test-test:   accuracy on the held-out images of those N classes (`test_test`).

`meta_loss` is the one place a backend and an architecture are dispatched: "higher" is the
reference, higherANML's own code; "func" computes the same meta-gradient faster
(`fastpath/functional.py`, ANML's and OML's) and "graph" replays "func" from a CUDA graph
(`fastpath/cuda_graphs.py`). `train_one` is the paper's loop (draw a task, `meta_step`, log, save),
kept safe by `harness/training_run.TrainingRuns`; `train_together` the same for several models.
`test_train` runs on frozen features (`fastpath/frozen_features.py`) unless higherANML's loop is
asked for, or every parameter is to learn (`no_freeze`, the original ANML code's baseline), which
only that loop can do (`original_fit`).
"""
import copy

import higher
import numpy as np
import torch
import torch.nn.functional as F

from datasets import OmniSampler
from fastpath.batched import MemberOptimizer, StackedMetaStep, shared_or_per_model_rate, seeded_stack, stacked_optimizer
from fastpath.cuda_graphs import GraphedMetaStep
from fastpath.frozen_features import FeatureBank, MetaTestRun, hit_rate, sequential_fit
from fastpath.functional import accuracy, func_meta_loss, oml_meta_loss
from harness.checkpoints import load_model
from harness.config import backend_refusal
from harness.runtime import Ranks, any_process
from harness.training_run import TrainingRuns, threads_note
from model import IMAGE_SIZE, OML, inner_parameter_names, kaiming_std, reset_last_layer, seeded_network, seeded_oml
from protocol import IMAGES_PER_CLASS

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
    `backend`, `first_order` and `outer_chunk`: as `meta_loss`."""
    lobotomize(model.fc, train_class)
    train_ims, train_labels = (torch.cat(parts) for parts in zip(*train_data))
    loss, acc = meta_loss(model, inner_lr, train_ims, train_labels, valid_ims, valid_labels, backend, first_order,
                          outer_chunk)
    outer_opt.step()
    outer_opt.zero_grad()
    return loss.item(), acc.item()


def meta_loss(model, inner_lr, train_ims, train_labels, valid_ims, valid_labels, backend="higher", first_order=False,
              outer_chunk=None):
    """The meta-gradient of one episode (the inner loop learns `train_ims` one image a step, the
    outer loss is on `valid_ims`), left in the parameters' .grad; returns (loss, accuracy) tensors.

    The one dispatch of backend and architecture, eager or recorded into a CUDA graph: "higher"
    (higherANML's unroll), else the functional meta-gradient of ANML or of OML ("func", and "graph",
    which records it). `first_order` does not differentiate through the inner steps (the original
    ANML code's gradient); `outer_chunk` is func's images per chunk of the outer backward (None: the
    device's default, 0: whole). What cannot run together is refused by `config.backend_refusal`."""
    arch = "oml" if isinstance(model, OML) else "anml"
    refusal = backend_refusal(backend, arch, first_order)
    if refusal:
        raise ValueError(refusal)
    if backend == "higher":
        return higher_meta_loss(model, inner_lr, train_ims, train_labels, valid_ims, valid_labels)
    if arch == "oml":
        return oml_meta_loss(model, inner_lr, train_ims, train_labels, valid_ims, valid_labels, first_order)
    return func_meta_loss(model, inner_lr, train_ims, train_labels, valid_ims, valid_labels, first_order, outer_chunk)


def higher_meta_loss(model, inner_lr, train_ims, train_labels, valid_ims, valid_labels):
    """higherANML's inner loop with `higher` (inner SGD over RLN + fc); leaves the meta-gradient in
    the parameters' .grad."""
    params = dict(model.named_parameters())
    inner_opt = torch.optim.SGD([params[n] for n in inner_parameter_names(model)], lr=inner_lr)
    with higher.innerloop_ctx(model, inner_opt, copy_initial_weights=False) as (fnet, diffopt):
        for ims, labels in zip(train_ims.split(1), train_labels.split(1)):
            diffopt.step(F.cross_entropy(fnet(ims), labels))
        out = fnet(valid_ims)
        loss = F.cross_entropy(out, valid_labels)
        loss.backward()
    return loss.detach(), accuracy(out, valid_labels)


def outer_optimizer(model, outer_lr, capturable=False):
    """higherANML's outer optimiser: Adam over everything."""
    return torch.optim.Adam(model.parameters(), lr=outer_lr, capturable=capturable)


def meta_stepper(backend, model, outer_opt, sampler, device, inner_lr=0.1, first_order=False):
    """A function that draws a meta-training episode from `sampler` and runs one iteration on it,
    returning (loss, accuracy) (device tensors with "graph": read them rarely). "graph" records
    the lobotomy, `meta_loss` and the Adam step as one CUDA graph, and needs `outer_opt` made with
    capturable=True on CUDA; on a CPU its steps run eagerly (which lets the tests check it)."""
    if backend == "graph":
        def iteration(train_class, train_ims, train_labels, valid_ims, valid_labels):
            lobotomize(model.fc, train_class)
            return meta_loss(model, inner_lr, train_ims, train_labels, valid_ims, valid_labels, backend, first_order)
        graph = GraphedMetaStep(model, outer_opt, sampler, iteration)
        return lambda: graph(*sampler.sample_train_indices())

    def step():
        train_data, train_class, (valid_ims, valid_labels) = sampler.sample_train(device=device)
        return meta_step(model, outer_opt, train_data, train_class, valid_ims, valid_labels, inner_lr, backend,
                         first_order)
    return step


def train(config, sampler=None, quiet=False, ranks=Ranks()):
    """Meta-train ANMLs as `config` (a config.MetaTrainConfig) says, higherANML's `train`.

    Writes higherANML's checkpoints `{out_dir}/{rln}_{nm}_{mask}_ANML-{it}.pth` every 1000
    iterations and at the last, a resumable checkpoint with each and every `save_minutes`, and the
    CSV log; stops cleanly on a signal or the time limit. Returns (the models, why
    they stopped early or None, each one's last checkpoint): one of each with one seed, one per run
    with --seeds or several rates, which train together (`fastpath/batched.py`), as do the tasks of
    a --meta-batch. Under torchrun (`ranks`) the runs are shared out over the processes, or, with
    one run, the tasks of its meta-batch."""
    if config.several:
        configs = config.members()[ranks.rank::ranks.world]
        if config.meta_batch == 1 and len(configs) == 1:
            return train_one(configs[0], sampler, quiet, ranks.restarted)
        return train_together(configs, sampler, quiet, ranks)
    if config.meta_batch > 1 or ranks.world > 1:
        return train_together([config], sampler, quiet, ranks, shared=ranks.world > 1)
    return train_one(config, sampler, quiet)


def train_one(config, sampler=None, quiet=False, restarted=False):
    """One model, one task an iteration: the paper's algorithm, on any backend."""
    with TrainingRuns([config], quiet, restarted=restarted) as run:  # its folder locked, its start checked
        backend = config.resolved_backend
        run.announce(f"meta-training {config.kind} {config.name}", f"for {config.epochs} its",
                     f"on {config.device} (backend {backend}, seed {config.seed}"  # the backend that runs
                     f"{', first-order' if config.first_order else ''}{threads_note(config.device)}) -> "
                     f"{config.out_dir}/")
        oml = config.arch == "oml"
        data = sampler or OmniSampler(config.data_root, download=config.download, im_size=IMAGE_SIZE if oml else 28)
        data.rng = np.random.default_rng(config.seed)  # the run's seed draws its tasks (a resume restores them)
        model = (seeded_oml(config.rln, config.seed) if oml else
                 seeded_network(config.rln, config.nm, config.mask, config.seed)).to(config.device)
        outer_opt = outer_optimizer(model, config.outer_lr, capturable=backend == "graph")
        run.restore([model], [outer_opt], [data], config.epochs)
        graphed = None  # after the restore: a CUDA graph records the weights it restored
        if backend == "graph":
            graphed = meta_stepper(backend, model, outer_opt, data, config.device, config.inner_lr, config.first_order)
        for it in run.iterations():
            if graphed is not None:
                loss, acc = graphed()
            else:
                train_data, train_class, (valid_ims, valid_labels) = data.sample_train(device=config.device)
                loss, acc = meta_step(model, outer_opt, train_data, train_class, valid_ims, valid_labels,
                                      config.inner_lr, backend, config.first_order)
            run.log(it, [loss], [acc])
            run.save(it)
    return run.outcome()


def train_together(configs, sampler=None, quiet=False, ranks=Ranks(), shared=False):
    """Several models (one per config, as --seeds makes them) and each `meta_batch` tasks an
    iteration, as the lanes of one meta-iteration (`batched.py`). `shared`: the processes of
    torchrun hold the same model and share its meta-batch out; rank 0 writes the files."""
    config = configs[0]
    seeds = [c.seed for c in configs]
    backend = config.resolved_backend
    if shared and backend == "graph" and config.backend == "auto":
        backend = "func"  # the all_reduce between the processes is not recorded into the CUDA graph
    with TrainingRuns(configs, quiet, writer=ranks.rank == 0 or not shared, restarted=ranks.restarted) as run:
        what = f"{len(seeds)} ANMLs" if len(seeds) > 1 else f"ANML {config.name}, seed {config.seed}"
        tasks = f", meta-batch {config.meta_batch}" if config.meta_batch > 1 else ""
        where = f", process {ranks.rank} of {ranks.world}" if ranks.world > 1 else ""
        run.announce(f"meta-training {what}", f"for {config.epochs} its",
                     f"on {config.device} (backend {backend}{tasks}{', first-order' if config.first_order else ''}"
                     f"{where}{threads_note(config.device)}) -> {', '.join(c.out_dir + '/' for c in configs)}")
        data = sampler or OmniSampler(config.data_root, download=config.download)
        stack, generators = seeded_stack(config.rln, config.nm, config.mask, seeds, config.device)
        outer_opt = stacked_optimizer(stack, [c.outer_lr for c in configs], capturable=backend == "graph")
        inner_lr = shared_or_per_model_rate([c.inner_lr for c in configs], config.device)
        task_draws = []
        for seed, generator in zip(seeds, generators):
            draws = copy.copy(data)  # the same images, the seed's own task draws
            draws.rng, draws.generator = np.random.default_rng(seed), generator
            task_draws.append(draws)
        header = f"iteration: outer loss | outer accuracy{', per run' if len(seeds) > 1 else ''} (seconds)"
        agree = (lambda stop: any_process(stop, config.device)) if shared else None
        run.restore(stack.members, [MemberOptimizer(outer_opt, k) for k in range(len(seeds))], task_draws,
                    config.epochs, header=header, agree=agree)
        step = StackedMetaStep(stack, outer_opt, task_draws, generators, config.meta_batch, inner_lr,
                               config.first_order, graphed=backend == "graph",  # records the restored weights
                               ranks=ranks if shared else Ranks())
        for it in run.iterations():
            losses, accuracies = step()
            run.log(it, losses, accuracies)
            run.save(it)
    return run.outcome()

# ----------------------------------------------------------------------------- meta-testing


def learner(model, generator=None, no_freeze=False):
    """The network one meta-test run trains: a copy of `model` with fc.weight re-initialised from
    `generator` (bias kept), fc learning, and RLN and NM learning too with `no_freeze` (frozen
    otherwise). `model` itself is left as it is."""
    net = copy.deepcopy(model)
    net.requires_grad_(no_freeze)
    net.fc.requires_grad_(True)
    reset_last_layer(net, generator)
    return net


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


def test_test(model, test_data, test_examples=5):
    """Per-class accuracy of `model` on the held-out images (classes contiguous, in order)."""
    ims, labels = test_data
    return hit_rate((predict_in_batches(model, ims) == labels).view(-1, test_examples))


def test_train(model_or_path, sampler, num_classes=10, train_examples=15, device="cpu", lr=1e-3, quiet=False,
               fast=True, generator=None, no_freeze=False):
    """higherANML's meta-test of one run: returns the per-class test accuracies (numpy) and, which
    higherANML does not, the accuracy on the training images after the whole sequence.

    Loads the checkpoint at `model_or_path` (or copies the model given), freezes RLN and NM,
    re-initialises fc.weight from `generator`, learns `num_classes` new classes in sequence (one Adam
    step per training image), then tests on the rest. `fast=True` computes the frozen features once and runs
    the same Adam steps on fc alone. `no_freeze` (with fast=False) freezes nothing: every parameter
    learns, as with the original ANML code's --no_freeze."""
    if fast and no_freeze:
        raise ValueError("test_train: no_freeze trains the whole network, which the frozen features cannot "
                         "(give fast=False)")
    model = model_or_path if isinstance(model_or_path, torch.nn.Module) else load_model(model_or_path)
    model = learner(model, generator, no_freeze).to(device)
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
