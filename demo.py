"""ANML against its baselines in a few minutes on a CPU (`make demo`, `make demo-train`).

    python demo.py            # the shipped ANML, pretrained and random networks at 10 and 100 classes
    python demo.py --train    # meta-train a small ANML now, then the same table for it and its init

Each network is meta-tested as eval_omni.py does (N new Omniglot classes learned one image at a time,
15 images each, then tested on their 5 held-out images), on the same runs: run r draws its classes,
splits and last-layer initialisation from (0, r), as eval_omni.py's reported run r. Each network
learns at the rate chosen for it, per row, on separate selection runs (results/comparisons/*.json);
the table prints it.
"""
import argparse
import sys
from pathlib import Path

import torch

import anml
from checkpoints import load_model
from cli import add_session_args, build_config, positive_int, run_cli
from config import EvalConfig, MetaTrainConfig
from datasets import OmniSampler
from frozen_features import FeatureBank
from model import ANML
from results import chosen_value, read_results
from runtime import resolve_device, set_threads

SHIPPED = {"ANML (meta-trained)": ("trained_anmls/256_112_2304_ANML-21678.pth", "anml_seq"),
           "pretrained (i.i.d.)": ("trained_anmls/256_112_2304_pretrain-5.pth", "pretrain_seq"),
           "random init": (None, "random_seq")}
COMPARISONS = Path(__file__).resolve().parent / "results" / "comparisons"
HIGHERANML = {10: 0.90, 100: 0.85}  # higherANML's README table (test accuracy)
PAPER_600 = 0.638  # the ANML paper's 600-class test accuracy (Beaulieu et al. 2020, Sec. 4.1)
# The small ANML of --train: trains visibly in a minute and a half on two CPU cores (docs/demo.md).
SMALL = dict(rln=32, nm=16, mask=288, epochs=500, outer_lr=3e-3)
SMALL_RATES = (0.003, 0.001)  # the meta-test rates of --train, chosen on selection runs (docs/demo.md)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(prog=Path(__file__).name, description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=positive_int, nargs=2, default=[5, 1], metavar=("R10", "R100"),
                        help="runs at 10 and at 100 classes (%(default)s)")
    parser.add_argument("--train", action="store_true",
                        help="meta-train a small ANML first (into --out-dir), then compare it with its initialisation")
    parser.add_argument("--out-dir", default="runs/demo", help="where --train writes its run (%(default)s)")
    add_session_args(parser)
    args = parser.parse_args(argv)
    args.device = resolve_device(parser, args.device)
    if args.train:
        args.config = build_config(parser, MetaTrainConfig, args, **SMALL, save_minutes=None)
    return args


def shipped_networks():
    """{column: (model, {classes: rate})} of the shipped ANML, pretrained and random networks."""
    networks = {}
    for column, (path, comparison) in SHIPPED.items():
        report = read_results(COMPARISONS / f"{comparison}.json")
        rates = {n: chosen_value(report, n) for n in (10, 100)}
        if path is None:  # where train_omni.py and pretrain_omni.py start with --seed 1
            torch.manual_seed(1)
            model = ANML(256, 112, 2304)
        else:
            model = load_model(Path(__file__).resolve().parent / path)
        networks[column] = (model, rates)
    return networks


def trained_networks(config, sampler):
    """{column: (model, rates)} of a small ANML meta-trained now and its initialisation."""
    model, stopped, last = anml.train(config, sampler)
    if stopped is not None:
        raise ValueError(f"the demo's training stopped early ({stopped}): run it again to resume it")
    torch.manual_seed(config.seed)
    init = ANML(config.rln, config.nm, config.mask)
    rates = dict(zip((10, 100), SMALL_RATES))
    return {f"ANML {config.name} (meta-trained)": (load_model(last), rates),
            "its initialisation": (init, rates)}


def meta_test_row(model, sampler, features, classes, runs, rate, device):
    """Test accuracy of `runs` reported runs at `classes` classes and learning rate `rate`."""
    config = EvalConfig(model="in memory", classes=(classes,), lrs=(rate,), runs=runs, device=device)
    return anml.meta_test(config, sampler, model, progress=True, features=features)["test"][0, 0]


def cell(accuracies, rate):
    spread = f" ± {accuracies.std():.2f}" if len(accuracies) > 1 else "       "
    return f"{accuracies.mean():.2f}{spread} ({rate:g})"


def print_table(columns, scores, runs, train):
    """The table: one row per class count, a column per network, then higherANML's and the paper's."""
    width = max(24, *(len(c) + 2 for c in columns))
    reference = "" if train else f"{'higherANML':>12}{'ANML paper':>12}"
    print(f"\ntest accuracy, mean ± std over runs (learning rate)\n{'classes':>7}{'runs':>6}  "
          + "".join(f"{c:<{width}}" for c in columns) + reference)
    for classes, n_runs in zip((10, 100), runs):
        line = f"{classes:>7}{n_runs:>6}  " + "".join(f"{cell(*scores[c][classes]):<{width}}" for c in columns)
        print(line + ("" if train else f"{HIGHERANML[classes]:>12.2f}{'-':>12}"))
    print("chance (a guess among the classes learned): 0.10 at 10 classes, 0.01 at 100")
    if not train:
        print(f"The ANML paper gives a number at 600 classes only ({PAPER_600:.3f}); its other counts are drawn "
              f"as curves.\nThe README's Results table has 0.954 at 10 classes: 10 runs at the rate its own "
              f"selection runs chose\n(0.002, from a grid that stops there); these rows are the first runs of "
              f"results/comparisons.")


def main(argv=None):
    args = parse_args(argv)
    set_threads(args.threads)
    sampler = OmniSampler(args.data_root, download=not args.no_download)
    networks = trained_networks(args.config, sampler) if args.train else shipped_networks()
    scores = {}
    for column, (model, rates) in networks.items():
        print(f"{column}:", file=sys.stderr, flush=True)
        model = model.to(args.device).requires_grad_(False)
        features = FeatureBank(model, sampler.evaluation, progress=True)
        scores[column] = {classes: (meta_test_row(model, sampler, features, classes, runs, rates[classes],
                                                  args.device), rates[classes])
                          for classes, runs in zip((10, 100), args.runs)}
    print_table(list(networks), scores, args.runs, args.train)


if __name__ == "__main__":
    run_cli(main)
