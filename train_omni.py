"""Meta-train an ANML on Omniglot (the seed's `train_omni.py`).

    python train_omni.py                                  # 256/112/2304, 30000 its, as the paper
    python train_omni.py --rln 4 --nm 3 --mask 36 --epochs 3 -d cpu   # a smoke test

Checkpoints go to `{out_dir}/{rln}_{nm}_{mask}_ANML-{it}.pth` every 1000 iterations and at the last,
with a resumable checkpoint beside them and every --save-minutes. Ctrl-C (or SIGTERM, or --time-limit)
stops cleanly after the iteration in flight, leaving a resumable checkpoint: run the same command with
`--resume latest` to continue exactly. A run locks its files in --out-dir while it runs.
"""
import argparse
import sys

import anml
from checkpoints import RunLock, check_out_dir, checkpoint_path, run_name
from cli import (add_common_args, add_size_args, check_device, check_size_args, non_negative_int,
                 positive_float, positive_int, run_cli)
from datasets import OmniSampler


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_size_args(parser)
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
    parser.add_argument("--first-order", action="store_true",
                        help="first-order meta-gradient: no differentiation through the inner steps (what the "
                             "original ANML code computed); recorded in {out_dir}/{name}_settings.json")
    parser.add_argument("--resume", metavar="PATH|latest",
                        help="continue a stopped run exactly from its resumable checkpoint (latest: the newest "
                             "in --out-dir); with the run's own flags (checked), --epochs may be raised")
    parser.add_argument("--save-minutes", type=positive_float, default=5, metavar="MINUTES",
                        help="also write a resumable checkpoint this often (%(default)s), so that a crash or a "
                             "kill -9 loses minutes, not up to 1000 iterations")
    parser.add_argument("--time-limit", type=positive_float, metavar="SECONDS",
                        help="stop cleanly after the iteration in flight once this much time has passed")
    add_common_args(parser)
    args = parser.parse_args(argv)
    check_device(parser, args.device)
    if args.first_order and args.backend == "higher":
        parser.error("--first-order is implemented by the func and graph backends, not by higher (the reference)")
    check_size_args(parser, args)
    return args


def main(argv=None):
    args = parse_args(argv)
    name = run_name(args.rln, args.nm, args.mask)
    check_out_dir(args.out_dir)  # before the data is loaded: an unusable --out-dir or a run in it fail at once
    with RunLock(args.out_dir, name):
        sampler = OmniSampler(args.data_root, download=not args.no_download, seed=args.seed)
        print(f"meta-training ANML {name} for {args.epochs} its on {args.device} "
              f"(backend {args.backend}, seed {args.seed}{', first-order' if args.first_order else ''}) "
              f"-> {args.out_dir}/", flush=True)
        _, stopped = anml.train(args.rln, args.nm, args.mask, inner_lr=args.inner_lr, outer_lr=args.outer_lr,
                                its=args.epochs, device=args.device, sampler=sampler, out_dir=args.out_dir,
                                seed=args.seed, backend=args.backend, resume=args.resume,
                                time_limit=args.time_limit, save_minutes=args.save_minutes,
                                first_order=args.first_order)
    if stopped is None:  # train() wrote this checkpoint (or found it, when nothing was left to train)
        print(f"done: {checkpoint_path(args.out_dir, name, args.epochs - 1)}")
    elif stopped.startswith("time limit"):
        print("time limit reached: continue with the same command and --resume latest")
    else:  # train() turned Ctrl-C / SIGTERM into a clean stop after a resumable checkpoint
        print("interrupted: continue with the same command and --resume latest", file=sys.stderr)
        sys.exit(130)


if __name__ == "__main__":
    run_cli(main)
