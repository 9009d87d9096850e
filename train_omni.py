"""Meta-train an ANML on Omniglot (higherANML's `train_omni.py`).

    python train_omni.py                                  # 256/112/2304, 30000 its, as the paper
    python train_omni.py --rln 4 --nm 3 --mask 36 --epochs 3 -d cpu   # a smoke test
    python train_omni.py --arch oml                       # OML's network (84x84 images), the ANML paper's rival
    python train_omni.py --seeds 1 2 3 4                  # four models at once, in runs/seed1 ... runs/seed4
    python train_omni.py --meta-batch 4                   # four tasks an iteration, their mean meta-gradient
    torchrun --nproc_per_node 2 train_omni.py --seeds 1 2 3 4     # the seeds shared out over two processes

Checkpoints go to `{out_dir}/{rln}_{nm}_{mask}_ANML-{it}.pth` every 1000 iterations and at the last,
with a resumable checkpoint beside them and every --save-minutes. Ctrl-C (or SIGTERM, SIGHUP, or
--time-limit) stops cleanly after the iteration in flight, leaving a resumable checkpoint: run the
same command with `--resume latest` to continue exactly. A run locks its files in --out-dir while it
runs, and a new run does not start in a folder that holds another run of the same network.
"""
import argparse
from pathlib import Path

from harness.quiet_start import quiet_start

if __name__ == "__main__":
    quiet_start()  # a Ctrl-C or SIGTERM while torch loads: one line, exit 130

import anml  # noqa: E402
from harness.cli import (add_run_args, add_session_args, add_size_args, build_config, non_negative_int, positive_float, positive_int,
                 report_end, run_cli)
from harness.config import ARCHS, BACKENDS, MetaTrainConfig
from harness.runtime import join_processes, leave_processes, resolve_device, set_threads, torchrun_ranks


def parse_args(argv=None):
    """The command line as a checked MetaTrainConfig (a bad value: one `error:` line, exit 2)."""
    parser = argparse.ArgumentParser(prog=Path(__file__).name, description=__doc__.splitlines()[0])
    add_size_args(parser)
    parser.add_argument("--epochs", type=positive_int, default=30000, help="meta-training iterations (%(default)s)")
    parser.add_argument("--arch", choices=ARCHS, default="anml",
                        help="anml (default), or oml: OML's network (six strided convolutions of --rln channels and "
                             "a linear last layer, on 84x84 images), its inner loop over the last layer only")
    parser.add_argument("--inner-lr", type=positive_float, nargs="+", metavar="LR",
                        help="inner-loop SGD learning rate (0.1; 0.03 with --arch oml, as OML's code); several: one "
                             "model each, trained together like --seeds, in {out-dir}/seed{SEED}_inner-lr{LR}")
    parser.add_argument("--outer-lr", type=positive_float, nargs="+", metavar="LR",
                        help="outer-loop Adam learning rate (0.001, as higherANML's code and the original ANML; "
                             "higherANML's README table says 0.003; 0.0001 with --arch oml, as OML's code); "
                             "several: one model each, as --inner-lr")
    seeds = parser.add_mutually_exclusive_group()
    seeds.add_argument("--seed", type=non_negative_int, default=None,  # None: argparse sees --seed 1 with --seeds
                       help="seeds torch and the task sampler (1)")
    seeds.add_argument("--seeds", type=non_negative_int, nargs="+", metavar="SEED",
                       help="train one model per seed together, in one batched iteration: each a run of its own "
                            "in {out-dir}/seed{SEED}, as --seed SEED --out-dir {out-dir}/seed{SEED} would write it")
    parser.add_argument("--meta-batch", type=positive_int, default=1, metavar="B",
                        help="tasks per iteration, each its own class and inner loop; the outer step takes the mean "
                             "of their meta-gradients (%(default)s: the paper's algorithm)")
    parser.add_argument("--backend", choices=BACKENDS, default="auto",
                        help="auto (default): graphed func on CUDA, func on CPU; higher: higherANML's code, the "
                             "reference")
    parser.add_argument("--first-order", action="store_true",
                        help="first-order meta-gradient: no differentiation through the inner steps (what the "
                             "original ANML code computed); recorded in the resumable checkpoints")
    add_run_args(parser)
    add_session_args(parser)
    args = parser.parse_args(argv)
    args.seed = 1 if args.seed is None else args.seed
    several = lambda values: tuple(values) if len(values) > 1 else None
    oml = args.arch == "oml"
    args.inner_lr = args.inner_lr or [0.03 if oml else 0.1]
    args.outer_lr = args.outer_lr or [1e-4 if oml else 1e-3]
    config = build_config(parser, MetaTrainConfig, args, device=resolve_device(parser, args.device),
                          inner_lr=args.inner_lr[0], outer_lr=args.outer_lr[0], inner_lrs=several(args.inner_lr),
                          outer_lrs=several(args.outer_lr))
    return config, check_processes(parser, config, torchrun_ranks())


def check_processes(parser, config, ranks):
    """The Ranks of this process, once torchrun's process count is checked against the run: each
    process needs a seed of its own, or, with one seed, an equal share of the meta-batch."""
    if ranks.world == 1:
        return ranks
    if config.several:
        runs = len(config.members())
        if runs < ranks.world:
            parser.error(f"torchrun started {ranks.world} processes for {runs} run{'s' if runs > 1 else ''} "
                         f"(seeds x rates): give at least one per process")
    elif config.meta_batch % ranks.world:
        parser.error(f"torchrun started {ranks.world} processes: they share out --seeds, or the tasks of one "
                     f"model's --meta-batch, which must then be a multiple of {ranks.world} "
                     f"(got {config.meta_batch})")
    return ranks


def main(argv=None):
    config, ranks = parse_args(argv)
    set_threads(config.threads)
    shared = ranks.world > 1 and not config.several  # one run's meta-batch, shared by connected processes
    if shared and ranks.restarted:
        raise ValueError("torchrun restarted this process, but processes that share a --meta-batch cannot reconnect "
                         "after one of them died: run the same command again with --resume latest (the runs' last "
                         "resumable checkpoint continues them exactly)")
    join_processes(ranks, config.device, connect=shared)  # seeds and rates train apart, unconnected
    try:
        _, stopped, lasts = anml.train(config, ranks=ranks)  # checks the folders and the start before it loads the data
    finally:
        leave_processes()
    report_end(stopped, lasts)

if __name__ == "__main__":
    run_cli(main)
