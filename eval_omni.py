"""Meta-test a trained ANML on Omniglot's evaluation classes (the seed's `eval_omni.py`).

    python eval_omni.py -m trained_anmls/256_112_2304_ANML-29999.pth -c 10 -l 0.00085 -r 10
    python eval_omni.py -m ... -c 600 -l 0.001 0.0008 0.0005 --json results.json   # an lr sweep

Every run learns `--classes` new classes in sequence (a fresh last layer over the frozen RLN and
NM, one Adam step per training image), then is tested on each class's held-out images.
"""
import argparse
import hashlib
import json
import os
import platform
import shlex
import sys
import time
from pathlib import Path

import numpy as np
import torch

import anml
from datasets import NUM_EVALUATION, OmniSampler
from datasets.omniglot import IMAGES_PER_CLASS
from train_omni import add_common_args, check_device, non_negative_int, positive_float, positive_int, run_cli


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-m", "--model", required=True, help="checkpoint (.pth state_dict) to evaluate")
    parser.add_argument("-c", "--classes", type=int, default=10,
                        help=f"new classes to learn, 1..{NUM_EVALUATION} (%(default)s)")
    parser.add_argument("-l", "--lr", type=positive_float, nargs="+", default=[1e-3],
                        help="test-train Adam learning rate(s) (0.001); several are compared on the same runs")
    parser.add_argument("-r", "--runs", type=positive_int, default=10,
                        help="repeats, each with new classes (%(default)s)")
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
    if not 1 <= args.classes <= NUM_EVALUATION:
        parser.error(f"--classes must be in 1..{NUM_EVALUATION} (Omniglot's evaluation classes), got {args.classes}")
    if not 1 <= args.train_examples <= IMAGES_PER_CLASS - 1:
        parser.error(f"--train-examples must be in 1..{IMAGES_PER_CLASS - 1} (each class has "
                     f"{IMAGES_PER_CLASS} images, one at least is kept for testing), got {args.train_examples}")
    check_device(parser, args.device)
    return args


def sha256_of(path):
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def device_name(device):
    """The GPU's name, or the CPU's model name where Linux tells it."""
    if torch.device(device).type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine() or "cpu"


def summary_lines(classes, lr, test, train, several):
    """The seed's two lines (mean and std over runs), with ` lr {lr}` appended when sweeping."""
    tail = f" lr {lr:g}" if several else ""
    return [f"Classes {classes} Accuracy {test.mean():.2f} (std {test.std():.2f}){tail}",
            f"Classes {classes} Train accuracy {train.mean():.2f} (std {train.std():.2f}){tail}"]


def write_json_atomic(obj, path):
    """json.dump beside path, then rename it into place (anml.write_atomic)."""
    anml.write_atomic(path, lambda tmp: tmp.write_text(json.dumps(obj, indent=1) + "\n"))


def check_writable(path):
    """Fail now, not after a long evaluation, if the --json file cannot be written."""
    folder = Path(path).parent
    folder.mkdir(parents=True, exist_ok=True)
    if not os.access(folder, os.W_OK):
        raise ValueError(f"cannot write --json {path}: folder {folder} is not writable")


def report(args, argv, results, model_sha256, seconds):
    """Everything needed to compare or reproduce the evaluation, for --json."""
    return {
        "command": shlex.join([sys.executable, sys.argv[0]] + argv),
        "model": str(args.model), "model_sha256": model_sha256,
        "device": args.device, "device_name": device_name(args.device), "torch": torch.__version__,
        "classes": args.classes, "train_examples": args.train_examples, "runs": args.runs,
        "seed": args.seed, "run_seeds": [[args.seed, r] for r in range(args.runs)],  # SeedSequence entropy
        "fast": not args.seed_loop, "seconds": round(seconds, 3),
        "results": [lr_result(lr, results["test"][l], results["train"][l]) for l, lr in enumerate(args.lr)],
    }


def lr_result(lr, test, train):
    """One learning rate's per-run accuracies [R] and their mean and std, as the printed lines."""
    return {"lr": lr, "test": test.tolist(), "train": train.tolist(),
            "test_mean": float(test.mean()), "test_std": float(test.std()),
            "train_mean": float(train.mean()), "train_std": float(train.std())}


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    if args.json:
        check_writable(args.json)
    anml.load_model(args.model)  # fail on a bad checkpoint before the data is loaded
    model_sha256 = sha256_of(args.model)
    sampler = OmniSampler(args.data_root, download=not args.no_download, seed=args.seed)
    start = time.perf_counter()
    results = anml.meta_test(args.model, sampler, num_classes=args.classes, train_examples=args.train_examples,
                             lrs=args.lr, runs=args.runs, device=args.device, seed=args.seed,
                             fast=not args.seed_loop, progress=True)
    seconds = time.perf_counter() - start
    several = len(args.lr) > 1
    for l, lr in enumerate(args.lr):
        print("\n".join(summary_lines(args.classes, lr, results["test"][l], results["train"][l], several)))
    if several:
        best = int(np.argmax(results["test"].mean(1)))
        test = results["test"][best]
        print(f"Best lr {args.lr[best]:g}: Classes {args.classes} Accuracy {test.mean():.2f} (std {test.std():.2f})")
    if args.json:
        write_json_atomic(report(args, argv, results, model_sha256, seconds), args.json)


if __name__ == "__main__":
    run_cli(main)
