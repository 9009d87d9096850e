"""Pretrain the ANML network the ordinary way: a baseline for the meta-test.

    python pretrain_omni.py                                   # 256/112/2304, i.i.d. minibatches
    python pretrain_omni.py --rln 4 --nm 3 --mask 36 --epochs 1 -d cpu   # a smoke test
    python pretrain_omni.py --init-only --out-dir results/random         # the network at its init
    python pretrain_omni.py --zap                             # i.i.d., the last layer reset every epoch
    python pretrain_omni.py --schedule asb --zap              # alternating sequential and batch, zapping

The same architecture as ANML (RLN, NM gate, 1000-way last layer), trained with cross-entropy and
Adam on shuffled minibatches of all 964 background classes' images (labels 0..963): no inner loop,
no meta-gradient. Each epoch is one pass in a new random order; `{out_dir}/{name}_pretrain-{epoch}.pth`
(a higherANML-format state_dict, loadable by eval_omni.py) is written after every epoch. The run is
kept as train_omni.py keeps its runs: a lock, no new run over another's files, resumable checkpoints
every --save-minutes and on Ctrl-C, SIGTERM, SIGHUP or --time-limit (continue with the same command
and --resume latest, with the same flags), a NaN stop.

`--schedule asb` trains by alternating sequential and batch learning (ASB, Frati et al. 2023, "Reset
It and Forget It"): each episode takes ANML's meta-training episode (one background class's 20
images, then those and 64 remembered images), makes 20 one-image SGD steps (--seq-lr) over the
parameters ANML's inner loop adapts (RLN and last layer) and keeps them, then one Adam step (--lr) on
the 84 images: ANML's episode without a meta-gradient. It writes `{name}_asb-{episode}.pth` every 1000
episodes and at the last. `--zap` re-initialises (Kaiming normal, bias kept) the whole last layer at
the start of every epoch after the first (iid), or the episode's class row before its sequential
steps (asb), as that paper's code does. `--open-gate` fixes the NM's gate at 1 and `--conv-init
kaiming` draws the convolutions with `kaiming_normal_`: together, that paper's plain convnet.

--init-only writes `{out_dir}/{name}_init.pth`: the network as `torch.manual_seed(seed)` initialises
it, before any training; with the same --seed it is where this script and train_omni.py start.
"""
import argparse
from pathlib import Path

from harness.quiet_start import quiet_start

if __name__ == "__main__":
    quiet_start()  # a Ctrl-C or SIGTERM while torch loads: one line, exit 130

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F

import anml
from harness.checkpoints import cpu_state_dict, save_atomic
from harness.cli import (add_run_args, add_session_args, add_size_args, build_config, non_negative_int, positive_float, positive_int,
                 report_end, run_cli)
from harness.config import CONV_INITS, SCHEDULES, PretrainConfig
from datasets import OmniSampler
from model import adapted_in_the_inner_loop, kaiming_convs, open_gate, reset_last_layer, seeded_network
from harness.runtime import resolve_device, set_threads
from harness.training_run import TrainingRuns, progress_line, threads_note


def parse_args(argv=None):
    """The command line as a checked PretrainConfig (a bad value: one `error:` line, exit 2)."""
    parser = argparse.ArgumentParser(prog=Path(__file__).name, description=__doc__.splitlines()[0])
    add_size_args(parser)
    parser.add_argument("--epochs", type=positive_int, default=6,
                        help="passes over the 19,280 background images (%(default)s)")
    parser.add_argument("--lr", type=positive_float, default=1e-3, help="Adam learning rate (%(default)s)")
    parser.add_argument("--batch-size", type=positive_int, default=128, help="images per step (%(default)s)")
    parser.add_argument("--lobotomize", action="store_true",
                        help="before each step, re-initialise the last-layer row of the batch's first image's "
                             "class, as ANML does for the class it is about to learn")
    parser.add_argument("--schedule", choices=SCHEDULES, default="iid",
                        help="iid: shuffled minibatches (default); asb: alternating sequential and batch episodes")
    parser.add_argument("--zap", action="store_true",
                        help="re-initialise the last layer: all of it every epoch (iid), the episode's class row "
                             "before its sequential steps (asb)")
    parser.add_argument("--episodes", type=positive_int, default=9000, help="asb: episodes (%(default)s)")
    parser.add_argument("--seq-lr", type=positive_float, default=0.1,
                        help="asb: SGD rate of the sequential one-image steps (%(default)s)")
    parser.add_argument("--open-gate", action="store_true",
                        help="fix the NM's gate at 1 (it never learns): the RLN and last layer alone, the network "
                             "of Frati et al.'s ASB, saved in ANML's format")
    parser.add_argument("--conv-init", choices=CONV_INITS, default="torch",
                        help="how the convolutions start: torch (PyTorch's default, as train_omni.py; default) or "
                             "kaiming (kaiming_normal_, as Frati et al.'s convnet)")
    parser.add_argument("--seed", type=non_negative_int, default=1,
                        help="seeds the initialisation (torch) and the epochs' orders or the episodes (%(default)s)")
    parser.add_argument("--init-only", action="store_true",
                        help="write the untrained network ({out_dir}/{rln}_{nm}_{mask}_init.pth) and stop")
    add_run_args(parser, step="step")
    add_session_args(parser)
    args = parser.parse_args(argv)
    return build_config(parser, PretrainConfig, args, device=resolve_device(parser, args.device))


def initial_model(config):
    """The network as train_omni.py also starts it (model.seeded_network), its convolutions drawn
    again with --conv-init kaiming (model.kaiming_convs), its gate fixed open with --open-gate
    (model.open_gate: no draw is taken, so the run's other draws are the gated run's)."""
    model = seeded_network(config.rln, config.nm, config.mask, config.seed)
    if config.conv_init == "kaiming":
        kaiming_convs(model)
    return open_gate(model) if config.open_gate else model


def network_note(config):
    """How the start line names the network's departures from train_omni.py's: its gate and conv draw."""
    return (f"{', gate fixed open' if config.open_gate else ''}"
            f"{', kaiming convolutions' if config.conv_init == 'kaiming' else ''}")


def init_path(config):
    return Path(config.out_dir) / f"{config.name}_init.pth"


def epoch_order(seed, epoch, n):
    """The order of the n images in `epoch`: drawn from (seed, epoch) alone, so a resumed run
    draws the same order without any saved state."""
    return torch.from_numpy(np.random.default_rng([seed, epoch]).permutation(n))


def background_set(sampler):
    """All background images [964 * 20, 1, H, W] and their class labels (class-major)."""
    images = sampler.background.flatten(0, 1)
    labels = torch.arange(len(sampler.background)).repeat_interleave(sampler.background.shape[1])
    return images, labels


def train_step(model, opt, x, y, lobotomize=False):
    """One Adam step of cross-entropy on a minibatch; returns (loss, accuracy) tensors."""
    if lobotomize:
        anml.lobotomize(model.fc, y[0])
    out = model(x)
    loss = F.cross_entropy(out, y)
    opt.zero_grad()
    loss.backward()
    opt.step()
    return loss.detach(), (out.argmax(1) == y).float().mean()


def sequential_steps(model, train_data, lr):
    """ASB's sequential phase: one SGD step per (image, label) of `train_data` over the RLN and the
    last layer (the parameters ANML's inner loop adapts), kept in the model."""
    params = [p for n, p in model.named_parameters() if adapted_in_the_inner_loop(n)]
    for ims, labels in train_data:
        grads = torch.autograd.grad(F.cross_entropy(model(ims), labels), params)
        with torch.no_grad():
            for p, g in zip(params, grads):
                p.sub_(g, alpha=lr)


def asb_episode(model, opt, episode, seq_lr, zap=False):
    """One episode of alternating sequential and batch learning: the class's row re-initialised if
    `zap`, its 20 images learned one SGD step each, then one `opt` step on the episode's batch (those
    images and the remembered ones). Returns the batch's (loss, accuracy) before its step."""
    train_data, train_class, (valid_ims, valid_labels) = episode
    if zap:
        anml.lobotomize(model.fc, train_class)
    sequential_steps(model, train_data, seq_lr)
    return train_step(model, opt, valid_ims, valid_labels)


def pretrain(config, sampler=None, quiet=False):
    """Train for config.epochs (config.episodes with --schedule asb), kept safe as train_omni.py keeps
    its runs (`TrainingRuns`). Returns ([the model], why it stopped early or None, [the last
    checkpoint's path])."""
    if config.schedule == "asb":
        return pretrain_asb(config, sampler, quiet)
    per_epoch = config.steps_per_epoch
    with TrainingRuns([config], quiet) as run:  # its folder locked, its start checked
        run.announce(f"pretraining {config.name}", f"for {config.epochs} epochs of batch {config.batch_size}",
                     f"on {config.device} (lr {config.lr:g}, seed {config.seed}"
                     f"{', lobotomize' if config.lobotomize else ''}{', zapping every epoch' if config.zap else ''}"
                     f"{network_note(config)}"
                     f"{threads_note(config.device)}) -> {config.out_dir}/")
        data = sampler or OmniSampler(config.data_root, download=config.download, seed=config.seed)
        model = initial_model(config).to(config.device)
        opt = torch.optim.Adam(model.parameters(), lr=config.lr)
        images, labels = background_set(data)
        if len(images) != config.images_per_epoch:
            raise ValueError(f"the background set has {len(images)} images, not {config.images_per_epoch}")
        run.restore([model], [opt], [data], config.total_steps, milestone=lambda i: epoch_end(i, per_epoch),
                    report=lambda i, losses, accuracies, seconds: epoch_line(i, per_epoch, losses, accuracies, seconds),
                    header="epoch: loss | accuracy (seconds)", unit="step")
        order = None
        for i in run.iterations():
            epoch, j = divmod(i, per_epoch)
            if j == 0 or order is None:
                order = epoch_order(config.seed, epoch, len(images))
                if config.zap and j == 0 and epoch > 0:
                    reset_last_layer(model)  # zapping: the whole last layer afresh every epoch
            batch = order[j * config.batch_size:(j + 1) * config.batch_size]
            x, y = images[batch].to(config.device), labels[batch].to(config.device)
            loss, acc = train_step(model, opt, x, y, config.lobotomize)
            run.log(i, [loss], [acc])
            run.save(i)
    return run.outcome()


def epoch_end(i, per_epoch):
    """The epoch whose checkpoint is written after step `i` (its last step), or None."""
    return i // per_epoch if i % per_epoch == per_epoch - 1 else None


def epoch_line(i, per_epoch, losses, accuracies, seconds):
    """`epoch E: loss | accuracy (seconds)` after an epoch's last step, else None."""
    if i % per_epoch == per_epoch - 1:
        return f"epoch {i // per_epoch}: loss {float(losses[0]):.3f} | accuracy {float(accuracies[0]):.3f} ({seconds:.1f}s)"
    return None


def pretrain_asb(config, sampler=None, quiet=False):
    """`pretrain` with --schedule asb: config.episodes episodes of `asb_episode`."""
    with TrainingRuns([config], quiet) as run:  # its folder locked, its start checked
        run.announce(f"pretraining {config.name} by alternating sequential and batch learning",
                     f"for {config.episodes} episodes",
                     f"on {config.device} (sequential SGD {config.seq_lr:g}, batch Adam {config.lr:g}, seed "
                     f"{config.seed}{', zapping' if config.zap else ''}{network_note(config)}"
                     f"{threads_note(config.device)}) -> {config.out_dir}/")
        data = sampler or OmniSampler(config.data_root, download=config.download)
        data.rng = np.random.default_rng(config.seed)  # the run's seed draws its episodes (a resume restores them)
        model = initial_model(config).to(config.device)
        opt = torch.optim.Adam(model.parameters(), lr=config.lr)
        run.restore([model], [opt], [data], config.episodes, report=every_hundredth,
                    header="episode: batch loss | batch accuracy (seconds)", unit="episode")
        for i in run.iterations():
            loss, acc = asb_episode(model, opt, data.sample_train(device=config.device), config.seq_lr, config.zap)
            run.log(i, [loss], [acc])
            run.save(i)
    return run.outcome()


def every_hundredth(i, losses, accuracies, seconds):
    """ASB's progress line, every 100 episodes."""
    return progress_line(i, losses, accuracies, seconds) if i % 100 == 0 else None


def main(argv=None):
    config = parse_args(argv)
    set_threads(config.threads)
    if config.init_only:
        path = init_path(config)
        save_atomic(cpu_state_dict(initial_model(config)), path)
        print(f"wrote the untrained network (seed {config.seed}): {path}")
        return
    _, stopped, lasts = pretrain(config)  # checks the folder and the start before it loads the data
    report_end(stopped, lasts)

if __name__ == "__main__":
    run_cli(main)
