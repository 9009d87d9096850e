"""Benchmark: higherANML's paths against the fast ones, in one run, with ratios.

    python bench.py                       # full-size network on the default device
    python bench.py --device cuda         # adds the CUDA-graphed meta-iteration
    python bench.py --rln 4 --nm 3 --mask 36 --iters 1 --classes 5   # smoke test
    python bench.py --only iteration --count-ops   # adds the ATen operations per iteration
    python bench.py --models 1 2 4 8 --meta-batch 4 --count-ops   # several models or tasks an iteration

Each case runs in a fresh subprocess, so that its peak memory (CPU max RSS, or GPU
max_memory_allocated) is its own. Times are medians over --iters timed repetitions after
one warm-up.
"""
import argparse
import collections
import copy
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from harness.quiet_start import quiet_start

if __name__ == "__main__":
    quiet_start()  # a Ctrl-C or SIGTERM while torch loads: one line, exit 130

import torch
import numpy as np
from torch.utils._python_dispatch import TorchDispatchMode

import anml
from meta_test import meta_test
from fastpath.batched import StackedMetaStep, seeded_stack
from harness.checkpoints import checkpoint_path, save_atomic
from harness.cli import add_session_args, add_size_args, positive_int, run_cli
from harness.config import EvalConfig
from protocol import NUM_EVALUATION, ConfigError, check_sizes, network_name
from datasets import OmniSampler
from model import ANML
from harness.runtime import device_name, resolve_device, set_threads


def synchronize(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def time_meta_iterations(args, backend):
    """Median seconds of one meta-training iteration with the given backend."""
    sampler = OmniSampler(args.data_root, download=not args.no_download, seed=0)
    torch.manual_seed(0)
    model = ANML(args.rln, args.nm, args.mask).to(args.device)
    outer_opt = anml.outer_optimizer(model, 1e-3, capturable=backend == "graph")
    return median_seconds(anml.meta_stepper(backend, model, outer_opt, sampler, args.device), args)


def median_seconds(step, args):
    """The median seconds of `step()` over --iters calls, after one warm-up call."""
    times = []
    for _ in range(args.iters + 1):
        synchronize(args.device)
        start = time.perf_counter()
        step()
        synchronize(args.device)
        times.append(time.perf_counter() - start)
    return statistics.median(times[1:])


def time_meta_test(args, fast):
    """Seconds of one --classes meta-test run (test-train and test-test) on a random checkpoint."""
    sampler = OmniSampler(args.data_root, download=not args.no_download, seed=0)
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        path = checkpoint_path(tmp, network_name(args.rln, args.nm, args.mask), 0)
        save_atomic(ANML(args.rln, args.nm, args.mask).state_dict(), path)
        config = EvalConfig(model=str(path), classes=(args.classes,), runs=1, original_loop=not fast,
                            device=args.device)
        synchronize(args.device)
        start = time.perf_counter()
        meta_test(config, sampler, progress=False)
        synchronize(args.device)
        return time.perf_counter() - start


class OpCounter(TorchDispatchMode):
    """Counts the ATen operations dispatched inside it, by name; views (which launch no kernel) are left out."""

    def __init__(self):
        super().__init__()
        self.counts = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if not func.is_view:
            self.counts[func.overloadpacket.__name__] += 1
        return func(*args, **(kwargs or {}))


def count_ops(fn):
    """(fn(), Counter of the non-view ATen operations it dispatched, by name)."""
    with OpCounter() as counter:
        result = fn()
    return result, counter.counts


def count_iteration_ops(args, backend):
    """Non-view ATen operations of one meta-iteration (forward, backward and Adam step, after one
    warm-up iteration), counted on the CPU with the outer backward taken whole, as on CUDA."""
    sampler = OmniSampler(args.data_root, download=not args.no_download, seed=0)
    torch.manual_seed(0)
    model = ANML(args.rln, args.nm, args.mask)
    outer_opt = anml.outer_optimizer(model, 1e-3)

    def next_iteration():  # the batch is drawn before counting; the outer backward whole, as on CUDA
        train_data, train_class, (valid_ims, valid_labels) = sampler.sample_train()
        return lambda: anml.meta_step(model, outer_opt, train_data, train_class, valid_ims, valid_labels,
                                      backend=backend, outer_chunk=0)

    next_iteration()()  # warm-up
    _, counts = count_ops(next_iteration())
    return counts


def lanes_step(args, models, tasks, backend, device):
    """One meta-iteration of `models` stacked ANMLs with `tasks` tasks each (`batched.py`)."""
    sampler = OmniSampler(args.data_root, download=not args.no_download, seed=0)
    stack, generators = seeded_stack(args.rln, args.nm, args.mask, range(1, models + 1), device)
    outer_opt = torch.optim.Adam(stack.parameters(), lr=1e-3, capturable=backend == "graph")
    samplers = [copy.copy(sampler) for _ in range(models)]
    for seed, s in enumerate(samplers, 1):
        s.rng = np.random.default_rng(seed)
    return StackedMetaStep(stack, outer_opt, samplers, generators, tasks, 0.1, graphed=backend == "graph")


def time_lanes(args):
    """Median seconds of one iteration of --case-models models x --case-tasks tasks (graphed on CUDA)."""
    backend = "graph" if args.device == "cuda" else "func"
    return median_seconds(lanes_step(args, args.case_models, args.case_tasks, backend, args.device), args)


def count_lanes_ops(args):
    """Non-view ATen operations of one eager iteration of the lanes (after one warm-up), on the CPU."""
    step = lanes_step(args, args.case_models, args.case_tasks, "func", "cpu")
    step()
    _, counts = count_ops(step)
    return counts


COUNTED = {"iteration-higher": "higher", "iteration-func": "func"}

CASES = {
    "iteration-higher": lambda a: time_meta_iterations(a, "higher"),
    "iteration-func": lambda a: time_meta_iterations(a, "func"),
    "iteration-graph": lambda a: time_meta_iterations(a, "graph"),
    "meta-test-original": lambda a: time_meta_test(a, fast=False),
    "meta-test-fast": lambda a: time_meta_test(a, fast=True),
    "lanes": time_lanes,
}


def peak_memory_mib(device):
    if torch.device(device).type == "cuda":
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def run_case(args):
    result = {"seconds": CASES[args.case](args), "peak_mib": peak_memory_mib(args.device)}
    if args.count_ops and args.case in (*COUNTED, "lanes"):
        counts = count_lanes_ops(args) if args.case == "lanes" else count_iteration_ops(args, COUNTED[args.case])
        result["ops"], result["top_ops"] = sum(counts.values()), counts.most_common(8)
    print(json.dumps(result))


def parse_args(argv=None):
    parser = argparse.ArgumentParser(prog=Path(__file__).name, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_size_args(parser)
    parser.add_argument("--iters", type=positive_int, default=3, help="timed meta-iterations per backend (%(default)s)")
    parser.add_argument("--classes", type=int, default=600, help="classes of the meta-test run (%(default)s)")
    parser.add_argument("--only", choices=("iteration", "meta-test"), help="run one of the two comparisons")
    parser.add_argument("--count-ops", action="store_true",
                        help="also count the ATen operations of one iteration (higher and func, on the CPU)")
    parser.add_argument("--models", type=positive_int, nargs="+", metavar="K",
                        help="instead: time K models an iteration (`train_omni.py --seeds`) for each K, per model "
                             "against K = 1 (graphed on CUDA, func on the CPU)")
    parser.add_argument("--meta-batch", type=positive_int, nargs="+", metavar="B",
                        help="instead: time B tasks an iteration of one model (`train_omni.py --meta-batch`) for "
                             "each B, per task against B = 1")
    parser.add_argument("--case", choices=CASES, help=argparse.SUPPRESS)
    parser.add_argument("--case-models", type=positive_int, default=1, help=argparse.SUPPRESS)
    parser.add_argument("--case-tasks", type=positive_int, default=1, help=argparse.SUPPRESS)
    add_session_args(parser)
    args = parser.parse_args(argv)
    args.device = resolve_device(parser, args.device)
    try:
        check_sizes(args.rln, args.nm, args.mask)
    except ConfigError as e:
        parser.error(str(e))
    if not 1 <= args.classes <= NUM_EVALUATION:
        parser.error(f"--classes must be in 1..{NUM_EVALUATION} (Omniglot's evaluation classes), got {args.classes}")
    return args


def run_in_subprocess(argv, case, *extra):
    """One case in a fresh process (its own peak memory): its JSON result."""
    cmd = [sys.executable, __file__, "--case", case, *map(str, extra)] + list(argv)
    out = subprocess.run(cmd, capture_output=True, text=True)
    if out.returncode != 0:
        last = (out.stderr.strip().splitlines() or ["no output"])[-1]
        raise ValueError(f"case {case} failed (exit {out.returncode}): {last}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def compare_lanes(args, argv):
    """K models x 1 task for each --models K, then 1 model x B tasks for each --meta-batch B: time per
    iteration, per model-task against 1 x 1, and the operations of an iteration."""
    shapes = [(k, 1) for k in args.models or [1]] + [(1, b) for b in args.meta_batch or [] if b > 1]
    if (1, 1) not in shapes:
        shapes.insert(0, (1, 1))
    backend = "graph" if args.device == "cuda" else "func"
    results = {shape: run_in_subprocess(argv, "lanes", "--case-models", shape[0], "--case-tasks", shape[1])
               for shape in shapes}
    one = results[(1, 1)]["seconds"]
    print(f"several models (K) or tasks (B) an iteration, {backend}; per model-task: time / (K B); throughput: "
          f"model-tasks a second against K = B = 1")
    ops_column = f" {'ops':>8}" if args.count_ops else ""
    print(f"{'K':>3} {'B':>3} {'time':>10} {'per model-task':>15} {'throughput':>11} {'peak memory':>12}{ops_column}")
    for (k, b), r in results.items():
        per = r["seconds"] / (k * b)
        ops = f" {r.get('ops', '-'):>8}" if args.count_ops else ""
        print(f"{k:>3} {b:>3} {r['seconds'] * 1e3:>8.1f}ms {per * 1e3:>13.1f}ms {one / per:>10.2f}x "
              f"{r['peak_mib']:>9.0f}MiB{ops}")


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    set_threads(args.threads)
    if args.case:
        return run_case(args)
    OmniSampler(args.data_root, download=not args.no_download)  # data errors here, once, not per case
    print(f"device: {device_name(args.device)}, {torch.get_num_threads()} threads, torch {torch.__version__}, "
          f"network {args.rln}/{args.nm}/{args.mask}, meta-test {args.classes} classes")
    if args.models or args.meta_batch:
        return compare_lanes(args, argv)
    cases = [c for c in CASES if (c != "iteration-graph" or args.device == "cuda") and c != "lanes"
             and (args.only is None or c.startswith(args.only))]
    results = {case: run_in_subprocess(argv, case) for case in cases}
    baseline = {"iteration": results.get("iteration-higher"), "meta-test": results.get("meta-test-original")}
    ops_column = f" {'ops':>8}" if args.count_ops else ""
    print(f"{'case':<18} {'time':>10} {'vs higherANML':>14} {'peak memory':>12}{ops_column}")
    for case, r in results.items():
        ratio = baseline[case.rsplit("-", 1)[0]]["seconds"] / r["seconds"]
        ops = f" {r.get('ops', '-'):>8}" if args.count_ops else ""
        print(f"{case:<18} {r['seconds'] * 1e3:>8.1f}ms {ratio:>13.1f}x {r['peak_mib']:>9.0f}MiB{ops}")
    for case, r in results.items():
        if "top_ops" in r:
            print(f"most frequent ops, {case}: " + ", ".join(f"{name} {n}" for name, n in r["top_ops"]))


if __name__ == "__main__":
    run_cli(main)
