"""ANML against its baselines in a few minutes on a CPU (`make demo`, `make demo-train`).

    python demo.py            # the shipped ANML, pretrained and random networks at 10 and 100 classes
    python demo.py --train    # meta-train a small ANML now, then compare it with its initialisation

Each network is meta-tested as eval_omni.py does (N new Omniglot classes learned one image at a time,
15 images each, then tested on their 5 held-out images), on the same runs: run r draws its classes,
splits and last-layer initialisation from (0, r), as eval_omni.py's reported run r. Each network
learns at the rate chosen for it on separate selection runs: for the shipped networks, the rates that
results/comparisons/*.json chose per row; for --train, chosen here from a small grid on as many
selection runs as reported runs. The table prints the rate.
"""
import argparse
import dataclasses
import sys
from pathlib import Path

from harness.quiet_start import quiet_start

if __name__ == "__main__":
    quiet_start()  # a Ctrl-C or SIGTERM while torch loads: one line, exit 130

import anml
from meta_test import meta_test
from harness.checkpoints import load_model, newest_resumable
from harness.cli import add_session_args, build_config, positive_int, run_cli
from harness.config import EvalConfig, MetaTrainConfig
from datasets import OmniSampler
from fastpath.frozen_features import FeatureBank
from model import seeded_network
from harness.results import choose, chosen_value, read_results
from harness.runtime import resolve_device, set_threads

SHIPPED = {"ANML (meta-trained)": ("trained_anmls/256_112_2304_ANML-21678.pth", "anml_seq"),
           "pretrained (i.i.d.)": ("trained_anmls/256_112_2304_pretrain-5.pth", "pretrain_seq"),
           "random init": (None, "random_seq")}
COMPARISONS = Path(__file__).resolve().parent / "results" / "comparisons"
HIGHERANML = {10: 0.90, 100: 0.85}  # higherANML's README table (test accuracy)
PAPER_600 = 0.638  # the ANML paper's 600-class test accuracy (Beaulieu et al. 2020, Sec. 4.1)
# The small ANML of --train: its outer accuracy climbs well above 20/84 (predicting the episode's class
# for every image) in a minute and a half on two CPU cores (docs/demo.md).
SMALL = dict(rln=32, nm=16, mask=288, epochs=350, outer_lr=0.01)
SMALL_GRID = (0.01, 0.003, 0.001)  # the meta-test rates --train chooses among


def parse_args(argv=None):
    parser = argparse.ArgumentParser(prog=Path(__file__).name, description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=positive_int, nargs=2, default=[5, 1], metavar=("R10", "R100"),
                        help="runs at 10 and at 100 classes (%(default)s; --train: 10 classes only, R10 runs)")
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
    """{column: (model, {classes: rates to choose among})} of the shipped ANML, pretrained and random
    networks, each with the rate that results/comparisons chose for it at 10 and at 100 classes."""
    networks = {}
    for column, (path, comparison) in SHIPPED.items():
        report = read_results(COMPARISONS / f"{comparison}.json")
        rates = {n: (chosen_value(report, n),) for n in (10, 100)}
        if path is None:  # where train_omni.py and pretrain_omni.py start with --seed 1
            model = seeded_network(256, 112, 2304, seed=1)
        else:
            model = load_model(Path(__file__).resolve().parent / path)
        networks[column] = (model, rates)
    return networks


def trained_networks(config, sampler):
    """{column: (model, {10: rates to choose among})} of a small ANML meta-trained now (or earlier:
    a run of it in --out-dir is continued, and only evaluated once it is finished) and of its
    initialisation (where the training started)."""
    if newest_resumable(config.out_dir, config.name):
        config = dataclasses.replace(config, resume="latest")
    [model], stopped, _ = anml.train(config, sampler)
    if stopped is not None:
        raise ValueError(f"the demo's training stopped early ({stopped}): run it again to continue it")
    init = seeded_network(config.rln, config.nm, config.mask, config.seed)
    return {f"ANML {config.name}, trained": (model, {10: SMALL_GRID}),
            "its initialisation": (init, {10: SMALL_GRID})}


def meta_test_row(model, sampler, features, classes, runs, rates, device):
    """(test accuracy of `runs` reported runs at `classes` classes, the rate): the one rate given,
    or the best of several on as many selection runs."""
    config = EvalConfig(model="in memory", classes=(classes,), lrs=tuple(rates), runs=runs, device=device,
                        selection_runs=runs if len(rates) > 1 else 0)
    test = meta_test(config, sampler, model, progress=True, features=features)["test"]  # [1, L, R]
    report, selection = test[..., :runs], (test[..., runs:] if len(rates) > 1 else None)
    chosen, _, _ = choose(report, selection)
    best = 0 if chosen is None else int(chosen[0])
    return report[0, best], rates[best]


def cell(accuracies, rate):
    spread = f" ± {accuracies.std():.2f}" if len(accuracies) > 1 else "       "
    return f"{accuracies.mean():.2f}{spread} ({rate:g})"


def print_table(columns, scores, rows, train):
    """The table: one row per class count, a column per network, then higherANML's and the paper's."""
    width = max(24, *(len(c) + 2 for c in columns))
    reference = "" if train else f"{'higherANML':>12}{'ANML paper':>12}"
    print(f"\ntest accuracy, mean ± std over runs (learning rate)\n{'classes':>7}{'runs':>6}  "
          + "".join(f"{c:<{width}}" for c in columns) + reference)
    for classes, n_runs in rows:
        line = f"{classes:>7}{n_runs:>6}  " + "".join(f"{cell(*scores[c][classes]):<{width}}" for c in columns)
        print(line + ("" if train else f"{HIGHERANML[classes]:>12.2f}{'-':>12}"))
    print("chance (a guess among the classes learned): " + ", ".join(f"{1 / n:.2f} at {n} classes" for n, _ in rows))
    if not train:
        print(f"The ANML paper states a number at 600 classes only ({PAPER_600:.3f}); its other counts are drawn "
              f"as curves.\nThese rows are the first of results/comparisons' 10 reported runs, at the rates its "
              f"selection runs chose\n(a grid up to 0.003). The README's 0.954 at 10 classes is the main table's: "
              f"10 runs at 0.002,\nthe largest rate of its grid.")


def main(argv=None):
    args = parse_args(argv)
    set_threads(args.threads)
    sampler = OmniSampler(args.data_root, download=not args.no_download)
    networks = trained_networks(args.config, sampler) if args.train else shipped_networks()
    rows = [(10, args.runs[0])] if args.train else list(zip((10, 100), args.runs))
    scores = {}
    for column, (model, rates) in networks.items():
        print(f"{column}:", file=sys.stderr, flush=True)
        model = model.to(args.device).requires_grad_(False)
        features = FeatureBank(model, sampler.evaluation, progress=True)
        scores[column] = {classes: meta_test_row(model, sampler, features, classes, runs, rates[classes], args.device)
                          for classes, runs in rows}
    print_table(list(networks), scores, rows, args.train)


if __name__ == "__main__":
    run_cli(main)
