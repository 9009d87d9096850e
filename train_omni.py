"""Meta-train an ANML on Omniglot (the seed's `train_omni.py`).

    python train_omni.py                                  # 256/112/2304, 30000 its, as the paper
    python train_omni.py --rln 4 --nm 3 --mask 36 --epochs 3 -d cpu   # a smoke test

Checkpoints go to `{out_dir}/{rln}_{nm}_{mask}_ANML-{it}.pth` every 1000 iterations and at the last.
Ctrl-C (or SIGTERM, or --time-limit) stops cleanly after the iteration in flight, leaving a resumable
checkpoint: run the same command with `--resume latest` to continue exactly.
The helpers below (argument types, device and data flags, `run_cli`) are shared with `eval_omni.py`.
"""
import argparse
import math
import sys
from pathlib import Path

import torch

import anml
from datasets import DataError, OmniSampler
from model import check_sizes


# ----------------------------------------------------------------------------- shared CLI helpers

def positive_int(text):
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def non_negative_int(text):
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {value}")
    return value


def positive_float(text):
    value = float(text)
    if not (value > 0 and math.isfinite(value)):
        raise argparse.ArgumentTypeError(f"must be a finite number > 0, got {text}")
    return value


def default_device():
    return "cuda" if torch.cuda.is_available() else "cpu"


def add_common_args(parser):
    """-d/--device, --data-root and --no-download, as both scripts take them."""
    parser.add_argument("-d", "--device", choices=("cpu", "cuda"), default=default_device(),
                        help="default: cuda if available, else cpu (here: %(default)s)")
    parser.add_argument("--data-root", metavar="DIR",
                        help="folder with images_background.zip and images_evaluation.zip "
                             "(default: $OMNIGLOT_ROOT, else a per-user cache)")
    parser.add_argument("--no-download", action="store_true",
                        help="fail instead of downloading Omniglot when it is not in the data root")


def check_device(parser, device):
    if device == "cuda" and not torch.cuda.is_available():
        parser.error("-d cuda: CUDA is not available on this machine (use -d cpu)")


def run_cli(main):
    """Run main(); a library ValueError / DataError, an OSError (an unwritable output, say) or Ctrl-C
    becomes a short message on stderr and a non-zero exit, never a traceback."""
    try:
        main()
    except (ValueError, DataError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)


# ----------------------------------------------------------------------------- train_omni

def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rln", type=positive_int, default=256, help="RLN channels (%(default)s)")
    parser.add_argument("--nm", type=positive_int, default=112, help="NM channels (%(default)s)")
    parser.add_argument("--mask", type=positive_int, default=2304, help="NM gate size, 9 x --rln (%(default)s)")
    parser.add_argument("--epochs", type=positive_int, default=30000, help="meta-training iterations (%(default)s)")
    parser.add_argument("--inner-lr", type=positive_float, default=0.1,
                        help="inner-loop SGD learning rate (%(default)s)")
    parser.add_argument("--outer-lr", type=positive_float, default=1e-3,
                        help="outer-loop Adam learning rate (%(default)s, as the seed's code and the original "
                             "ANML; the seed README's table says 0.003)")
    parser.add_argument("--seed", type=non_negative_int, default=1,
                        help="seeds torch and the task sampler (%(default)s)")
    parser.add_argument("--out-dir", default="trained_anmls", help="where checkpoints are written (%(default)s)")
    parser.add_argument("--backend", choices=anml.BACKENDS, default="auto",
                        help="auto (default): graphed func on CUDA, func on CPU; higher: the seed's reference")
    parser.add_argument("--resume", metavar="PATH|latest",
                        help="continue a stopped run exactly from its resumable checkpoint (latest: the newest "
                             "in --out-dir); pass the same sizes, learning rates and seed")
    parser.add_argument("--time-limit", type=positive_float, metavar="SECONDS",
                        help="stop cleanly after the iteration in flight once this much time has passed")
    add_common_args(parser)
    args = parser.parse_args(argv)
    check_device(parser, args.device)
    try:
        check_sizes(args.rln, args.nm, args.mask)
    except ValueError as e:
        parser.error(str(e))
    return args


def main(argv=None):
    args = parse_args(argv)
    sampler = OmniSampler(args.data_root, download=not args.no_download, seed=args.seed)
    print(f"meta-training ANML {args.rln}_{args.nm}_{args.mask} for {args.epochs} its on {args.device} "
          f"(backend {args.backend}, seed {args.seed}) -> {args.out_dir}/", flush=True)
    _, stopped = anml.train(args.rln, args.nm, args.mask, inner_lr=args.inner_lr, outer_lr=args.outer_lr,
                            its=args.epochs, device=args.device, sampler=sampler, out_dir=args.out_dir,
                            seed=args.seed, backend=args.backend, resume=args.resume, time_limit=args.time_limit)
    if stopped is None:
        print(f"done: {Path(args.out_dir) / f'{args.rln}_{args.nm}_{args.mask}_ANML-{args.epochs - 1}.pth'}")
    elif stopped.startswith("time limit"):
        print("time limit reached: continue with the same command and --resume latest")
    else:  # train() turned Ctrl-C / SIGTERM into a clean stop after a resumable checkpoint
        print("interrupted: continue with the same command and --resume latest", file=sys.stderr)
        sys.exit(130)


if __name__ == "__main__":
    run_cli(main)
