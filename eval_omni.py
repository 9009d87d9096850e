"""Meta-test a trained ANML on Omniglot's evaluation classes (the seed's `eval_omni.py`).

    python eval_omni.py -m trained_anmls/256_112_2304_ANML-29999.pth -c 10 -l 0.00085 -r 10
    python eval_omni.py -m ... -c 600 -l 0.001 0.0008 0.0005 --json results.json   # an lr sweep
    python eval_omni.py -m ... -c 10 600 --method lstsq --ridge 0.1 1 10 --selection-runs 10

Every run learns `--classes` new classes in sequence (a fresh last layer over the frozen RLN and
NM, one Adam step per training image), then is tested on each class's held-out images. `--method
iid` shuffles the classes' images together (the oracle), `--method lstsq` solves the last layer
in closed form (ridge least squares); both on the same runs.
"""
import argparse
import json
import shlex
import sys
import time
from pathlib import Path

import torch

import anml
from datasets import NUM_EVALUATION, OmniSampler
from datasets.omniglot import IMAGES_PER_CLASS
from atomic import probe_writable, write_atomic
from cli import (add_common_args, check_device, device_name, non_negative_int, positive_float, positive_int, run_cli,
                 sha256_of, versions)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-m", "--model", required=True, help="checkpoint (.pth state_dict) to evaluate")
    parser.add_argument("-c", "--classes", type=int, nargs="+", default=[10],
                        help=f"new classes to learn, 1..{NUM_EVALUATION} (%(default)s); several counts are "
                             f"scored along one sequence per run (the first N classes of it)")
    parser.add_argument("--method", choices=anml.METHODS, default="seq",
                        help="how the last layer learns: seq (the seed's: one Adam step per image, class after "
                             "class), iid (the same images and steps, the classes shuffled together), lstsq "
                             "(ridge least squares in closed form, argmax over the classes learned) (%(default)s)")
    parser.add_argument("-l", "--lr", type=positive_float, nargs="+",
                        help="test-train Adam learning rate(s) for seq and iid (0.001); several are compared on "
                             "the same runs")
    parser.add_argument("--ridge", type=positive_float, nargs="+",
                        help="ridge regulariser(s) lambda for lstsq (1.0); several are compared and chosen as --lr")
    parser.add_argument("--epochs-iid", type=positive_int,
                        help="for iid: passes over the shuffled images, each a new shuffle (1: as many steps as seq)")
    parser.add_argument("-r", "--runs", type=positive_int, default=10,
                        help="repeats, each with new classes (%(default)s)")
    parser.add_argument("--selection-runs", type=non_negative_int, default=0,
                        help="separate runs (other seeds) on which each row's learning rate is chosen, then "
                             "reported on the --runs runs, which play no part in the choice (%(default)s: "
                             "the seed's protocol, the best rate on the reported runs)")
    parser.add_argument("-t", "--train-examples", type=int, default=15,
                        help=f"training images per class, 1..{IMAGES_PER_CLASS - 1} "
                             f"(%(default)s; the rest are test images)")
    parser.add_argument("--seed", type=non_negative_int, default=0,
                        help="run r draws its classes, splits and last-layer init from (seed, r) (%(default)s)")
    parser.add_argument("--seed-loop", action="store_true",
                        help="the seed's full-network loop instead of the (equivalent) frozen-feature fast path")
    parser.add_argument("--json", metavar="FILE", help="write every run's accuracies and the settings to FILE")
    add_common_args(parser)
    args = parser.parse_args(argv)
    for n in args.classes:
        if not 1 <= n <= NUM_EVALUATION:
            parser.error(f"--classes must be in 1..{NUM_EVALUATION} (Omniglot's evaluation classes), got {n}")
    check_method_flags(parser, args)
    if args.selection_runs and len(args.grid) < 2:
        parser.error(f"--selection-runs chooses among {'regularisers' if args.hyper == 'ridge' else 'learning rates'}: "
                     f"give several with --{args.hyper}")
    args.classes = anml.class_counts(args.classes)
    if not 1 <= args.train_examples <= IMAGES_PER_CLASS - 1:
        parser.error(f"--train-examples must be in 1..{IMAGES_PER_CLASS - 1} (each class has "
                     f"{IMAGES_PER_CLASS} images, one at least is kept for testing), got {args.train_examples}")
    check_device(parser, args.device)
    return args


def check_method_flags(parser, args):
    """Each method's own flags, refused with another method; sets args.grid (the values to choose
    among: learning rates, or ridge regularisers for lstsq) and args.hyper (their name)."""
    lstsq = args.method == "lstsq"
    if lstsq and args.lr:
        parser.error("--lr is the Adam learning rate of seq and iid: --method lstsq takes --ridge")
    if not lstsq and args.ridge:
        parser.error(f"--ridge is for --method lstsq (--method {args.method} takes --lr)")
    if args.epochs_iid and args.method != "iid":
        parser.error(f"--epochs-iid is for --method iid, not {args.method}")
    if args.seed_loop and args.method != "seq":
        parser.error("--seed-loop is the seed's sequential loop: it only runs --method seq")
    args.lr, args.ridge, args.epochs_iid = args.lr or [1e-3], args.ridge or [1.0], args.epochs_iid or 1
    args.grid, args.hyper = (args.ridge, "ridge") if lstsq else (args.lr, "lr")


def summary_lines(classes, lr, test, train, several, hyper="lr"):
    """The seed's two lines (mean and std over runs), with ` lr {lr}` appended when sweeping
    (` ridge {lambda}` for lstsq)."""
    tail = f" {hyper} {lr:g}" if several else ""
    return [f"Classes {classes} Accuracy {test.mean():.2f} (std {test.std():.2f}){tail}",
            f"Classes {classes} Train accuracy {train.mean():.2f} (std {train.std():.2f}){tail}"]


def write_json_atomic(obj, path):
    """json.dump beside path, then rename it into place (atomic.write_atomic)."""
    write_atomic(path, lambda tmp: tmp.write_text(json.dumps(obj, indent=1) + "\n"))


def check_writable(path):
    """Fail now, not after a long evaluation, if the --json file cannot be written: a folder
    given as the file, or a folder where no file can be created (read-only, /proc)."""
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"--json {path} is a folder: give a file name")
    try:
        probe_writable(path.parent)
    except OSError as e:
        raise ValueError(f"cannot write --json {path}: {e.strerror or e}") from None


def stats(test, train, lr=None, hyper="lr"):
    """Mean and std over runs of one learning rate's per-run accuracies, with the runs themselves."""
    out = {} if lr is None else {hyper: lr}
    return {**out, "test": test.tolist(), "train": train.tolist(),
            "test_mean": float(test.mean()), "test_std": float(test.std()),
            "train_mean": float(train.mean()), "train_std": float(train.std())}


def choose_lrs(report, selection):
    """Learning-rate choices from accuracies [K, L, R]: each row's best on the selection runs, one
    rate for all rows (best mean over rows on the selection runs), and the seed's protocol (each
    row's best on the reported runs themselves). Ties go to the first rate in --lr order."""
    chosen = fixed = None
    if selection is not None:
        chosen = selection["test"].mean(2).argmax(1)  # [K]
        fixed = int(selection["test"].mean(2).mean(0).argmax())
    return chosen, fixed, report["test"].mean(2).argmax(1)


def build_report(args, argv, report, selection, model_sha256, seconds):
    """Everything needed to compare or reproduce the evaluation, for --json."""
    chosen, fixed, best = choose_lrs(report, selection)
    rows = []
    for k, n in enumerate(args.classes):
        pick = lambda l: stats(report["test"][k, l], report["train"][k, l], args.grid[l], args.hyper)
        rows.append({
            "classes": n,
            "per_lr": [{args.hyper: lr, "report": stats(report["test"][k, l], report["train"][k, l]),
                        "selection": None if selection is None else
                        stats(selection["test"][k, l], selection["train"][k, l])}
                       for l, lr in enumerate(args.grid)],
            "chosen_on_selection_runs": None if chosen is None else pick(chosen[k]),
            "fixed_lr": None if fixed is None else pick(fixed),
            "best_on_reported_runs": pick(best[k]),
        })
    return {
        "command": shlex.join([sys.executable, sys.argv[0]] + argv),
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "model": str(args.model), "model_sha256": model_sha256,
        "device": args.device, "device_name": device_name(args.device), "threads": torch.get_num_threads(),
        "versions": versions(),
        "method": args.method, "hyperparameter": args.hyper,  # per_lr entries and choices hold it
        **({"ridges": args.ridge} if args.hyper == "ridge" else {"lrs": args.lr}),
        **({"epochs_iid": args.epochs_iid} if args.method == "iid" else {}),
        "classes": args.classes, "train_examples": args.train_examples,
        "runs": args.runs, "selection_runs": args.selection_runs, "seed": args.seed,
        "report_run_seeds": anml.run_seeds(args.seed, args.runs),  # SeedSequence entropies
        "selection_run_seeds": anml.run_seeds(args.seed, args.selection_runs, selection=True),
        "fast": not args.seed_loop, "seconds": round(seconds, 3),
        "fixed_lr": None if fixed is None else args.grid[fixed],
        "rows": rows,
    }


def split_runs(results, runs):
    """Results [K, L, runs + selection runs] -> (the reported runs', the selection runs' or None)."""
    report = {k: v[..., :runs] for k, v in results.items()}
    selection = {k: v[..., runs:] for k, v in results.items()} if results["test"].shape[2] > runs else None
    return report, selection


def print_results(args, report, selection):
    """The seed's lines per class count and rate, the best rate's line, and with selection runs
    the chosen rate's line and a closing table."""
    grid, hyper = args.grid, args.hyper
    several = len(grid) > 1
    chosen, fixed, best = choose_lrs(report, selection)
    for k, n in enumerate(args.classes):
        for l, lr in enumerate(grid):
            print("\n".join(summary_lines(n, lr, report["test"][k, l], report["train"][k, l], several, hyper)))
        if several:
            test = report["test"][k, best[k]]
            print(f"Best {hyper} {grid[best[k]]:g}: Classes {n} Accuracy {test.mean():.2f} (std {test.std():.2f})")
        if chosen is not None:
            test, train = report["test"][k, chosen[k]], report["train"][k, chosen[k]]
            print(f"Chosen {hyper} {grid[chosen[k]]:g} on {args.selection_runs} selection runs: Classes {n} "
                  f"Accuracy {test.mean():.2f} (std {test.std():.2f}) Train accuracy {train.mean():.2f}")
    if chosen is not None:
        what = "regularisers" if hyper == "ridge" else "rates"
        print(f"\n{args.runs} reported runs per row ({args.method}); {what} chosen on {args.selection_runs} other runs")
        print(f"{'classes':>7}  {'chosen ' + hyper:>12}  {'test':>11}  {'train':>11}  "
              f"{'fixed ' + hyper + ' ' + format(grid[fixed], 'g'):>18}  {'best on the same runs':>27}")
        fmt = lambda a: f"{a.mean():.3f}±{a.std():.3f}"
        for k, n in enumerate(args.classes):
            c, b = chosen[k], best[k]
            print(f"{n:>7}  {grid[c]:>12g}  {fmt(report['test'][k, c]):>11}  {fmt(report['train'][k, c]):>11}  "
                  f"{fmt(report['test'][k, fixed]):>18}  {fmt(report['test'][k, b]) + f' {hyper} ' + format(grid[b], 'g'):>27}")


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    if args.json:
        check_writable(args.json)
    model = anml.load_model(args.model, args.device)  # fails on a bad checkpoint before the data is loaded
    model_sha256 = sha256_of(args.model)
    sampler = OmniSampler(args.data_root, download=not args.no_download, seed=args.seed)
    seeds = anml.run_seeds(args.seed, args.runs) + anml.run_seeds(args.seed, args.selection_runs, selection=True)
    start = time.perf_counter()
    results = anml.meta_test(model, sampler, num_classes=args.classes, train_examples=args.train_examples,
                             lrs=args.lr, runs=seeds, device=args.device, fast=not args.seed_loop, progress=True,
                             method=args.method, epochs_iid=args.epochs_iid, ridges=args.ridge)
    seconds = time.perf_counter() - start
    report, selection = split_runs(results, args.runs)
    print_results(args, report, selection)
    if args.json:
        write_json_atomic(build_report(args, argv, report, selection, model_sha256, seconds), args.json)


if __name__ == "__main__":
    run_cli(main)
