"""Pretrain the ANML network the ordinary way: a baseline for the meta-test.

    python pretrain_omni.py                                   # 256/112/2304, i.i.d. minibatches
    python pretrain_omni.py --rln 4 --nm 3 --mask 36 --epochs 1 -d cpu   # a smoke test
    python pretrain_omni.py --init-only --out-dir results/random         # the network at its init

The same architecture as ANML (RLN, NM gate, 1000-way last layer), trained with cross-entropy and
Adam on shuffled minibatches of all 964 background classes' images (labels 0..963): no inner loop,
no meta-gradient. Each epoch is one pass in a new random order; `{out_dir}/{name}_pretrain-{epoch}.pth`
(a seed-format state_dict, loadable by eval_omni.py) is written after every epoch. Ctrl-C, SIGTERM or
--time-limit stop cleanly with a resumable checkpoint: continue with the same command and --resume latest.

--init-only writes `{out_dir}/{name}_init.pth`: the network as `torch.manual_seed(seed)` initialises
it, before any training; with the same --seed it is where this script and train_omni.py start.
"""
import argparse
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

import anml
from checkpoints import (StopSignal, TrainingLog, checkpoint_path, cpu_state_dict, find_resumable,
                         load_training_state, restore_torch_rng, run_name, save_atomic, save_training_state)
from cli import (add_common_args, add_size_args, check_device, check_size_args, non_negative_int,
                 positive_float, positive_int, run_cli)
from datasets import OmniSampler
from model import ANML

KIND = "pretrain"  # checkpoint names: {rln}_{nm}_{mask}_pretrain-{epoch}.pth


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_size_args(parser)
    parser.add_argument("--epochs", type=positive_int, default=6,
                        help="passes over the 19,280 background images (%(default)s)")
    parser.add_argument("--lr", type=positive_float, default=1e-3, help="Adam learning rate (%(default)s)")
    parser.add_argument("--batch-size", type=positive_int, default=128, help="images per step (%(default)s)")
    parser.add_argument("--lobotomize", action="store_true",
                        help="before each step, re-initialise the last-layer row of the batch's first image's "
                             "class, as ANML does for the class it is about to learn")
    parser.add_argument("--seed", type=non_negative_int, default=1,
                        help="seeds the initialisation (torch) and the epochs' orders (%(default)s)")
    parser.add_argument("--out-dir", default="trained_pretrain", help="where checkpoints are written (%(default)s)")
    parser.add_argument("--resume", metavar="PATH|latest",
                        help="continue a stopped run exactly from its resumable checkpoint (latest: the newest "
                             "in --out-dir); pass the same flags")
    parser.add_argument("--time-limit", type=positive_float, metavar="SECONDS",
                        help="stop cleanly after the step in flight once this much time has passed")
    parser.add_argument("--init-only", action="store_true",
                        help="write the untrained network ({out_dir}/{rln}_{nm}_{mask}_init.pth) and stop")
    add_common_args(parser)
    args = parser.parse_args(argv)
    check_device(parser, args.device)
    check_size_args(parser, args)
    return args


def initial_model(rln, nm, mask, seed):
    """The network as train_omni.py also starts it: ANML(...) right after torch.manual_seed(seed)."""
    torch.manual_seed(seed)
    return ANML(rln, nm, mask)


def init_path(out_dir, name):
    return Path(out_dir) / f"{name}_init.pth"


def epoch_order(seed, epoch, n):
    """The order of the n images in `epoch`: drawn from (seed, epoch) alone, so a resumed run
    draws the same order without any saved state."""
    return torch.from_numpy(np.random.default_rng([seed, epoch]).permutation(n))


def background_set(sampler):
    """All background images [964 * 20, 1, H, W] and their class labels (class-major)."""
    images = sampler.background.flatten(0, 1)
    labels = torch.arange(len(sampler.background)).repeat_interleave(sampler.background.shape[1])
    return images, labels


def pretrain(args, sampler):
    """Train for args.epochs; returns (final checkpoint path or None, the stop reason or None)."""
    name, out_dir = run_name(args.rln, args.nm, args.mask), Path(args.out_dir)
    model = initial_model(args.rln, args.nm, args.mask, args.seed).to(args.device)
    opt = torch.optim.Adam(model.parameters(), lr=args.lr)
    images, labels = background_set(sampler)
    per_epoch = math.ceil(len(images) / args.batch_size)
    total = args.epochs * per_epoch
    first, elapsed, rng = 0, 0.0, None
    if args.resume is not None:
        path = find_resumable(args.resume, out_dir, name, kind=KIND)
        first, elapsed, rng = load_training_state(path, model, opt, sampler)
    restore_torch_rng(rng)
    log = TrainingLog(out_dir / f"{name}_pretrain_log.csv", first)
    start = time.perf_counter()
    clock = lambda: elapsed + time.perf_counter() - start
    order = None
    with StopSignal(args.time_limit, lambda: time.perf_counter() - start) as stop:
        for step in tqdm(range(first, total), initial=first, total=total, desc="pretrain", unit="step"):
            epoch, i = divmod(step, per_epoch)
            if order is None or i == 0:
                order = epoch_order(args.seed, epoch, len(images))
            batch = order[i * args.batch_size:(i + 1) * args.batch_size]
            x, y = images[batch].to(args.device), labels[batch].to(args.device)
            loss, acc = train_step(model, opt, x, y, args.lobotomize)
            log.add(step, loss, acc, clock())
            if i == per_epoch - 1:
                save_atomic(cpu_state_dict(model), checkpoint_path(out_dir, name, epoch, kind=KIND))
                log.flush()
                tqdm.write(f"epoch {epoch}: loss {float(loss):.3f} | accuracy {float(acc):.3f} ({clock():.1f}s)")
            if i == per_epoch - 1 or stop.requested():
                log.flush()
                save_training_state(out_dir, name, step, model, opt, sampler, clock(), kind=KIND)
            if stop.requested() and step < total - 1:
                tqdm.write(f"stopped after step {step} ({stop.reason}); continue with --resume latest")
                return None, stop.reason
    log.flush()
    return checkpoint_path(out_dir, name, args.epochs - 1, kind=KIND), None


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


def main(argv=None):
    args = parse_args(argv)
    name = run_name(args.rln, args.nm, args.mask)
    if args.init_only:
        path = init_path(args.out_dir, name)
        save_atomic(cpu_state_dict(initial_model(args.rln, args.nm, args.mask, args.seed)), path)
        print(f"wrote the untrained network (seed {args.seed}): {path}")
        return
    sampler = OmniSampler(args.data_root, download=not args.no_download, seed=args.seed)
    print(f"pretraining {name} for {args.epochs} epochs of batch {args.batch_size} on {args.device} "
          f"(lr {args.lr:g}, seed {args.seed}{', lobotomize' if args.lobotomize else ''}) -> {args.out_dir}/", flush=True)
    done, stopped = pretrain(args, sampler)
    if stopped is None:
        print(f"done: {done}")
    elif stopped.startswith("time limit"):
        print("time limit reached: continue with the same command and --resume latest")
    else:
        print("interrupted: continue with the same command and --resume latest", file=sys.stderr)
        sys.exit(130)


if __name__ == "__main__":
    run_cli(main)
