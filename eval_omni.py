"""Meta-test a trained ANML on Omniglot's evaluation classes (higherANML's `eval_omni.py`).

    python eval_omni.py -m trained_anmls/256_112_2304_ANML-21678.pth -c 10 -l 0.00085 -r 10
    python eval_omni.py -m ... -c 600 -l 0.001 0.0008 0.0005 --json results.json   # an lr sweep
    python eval_omni.py -m ... -c 10 600 --method lstsq --ridge 0.1 1 10 --selection-runs 10
    python eval_omni.py -m ... -c 10 600 --method ncm --selection-runs 10   # nearest class mean
    python eval_omni.py -m ... -c 10 100 -l 0.0003 0.0001 --no-freeze      # every parameter learns
    python eval_omni.py -m runs/seed*/256_112_2304_ANML-29999.pth -c 600   # across meta-training seeds

Every run learns `--classes` new classes in sequence (a fresh last layer over the frozen RLN and
NM, one Adam step per training image), then is tested on each class's held-out images. `--method
iid` shuffles the classes' images together (the oracle), `--method lstsq` solves the last layer
in closed form (ridge least squares), `--method ncm` predicts the nearest class mean of the
features; all on the same runs. `--no-freeze` gives every parameter to Adam (seq and iid: the
original ANML code's baseline, the whole network run on every image). Several checkpoints (-m a b c, say
one per meta-training seed) are each evaluated on the same runs, then each row is reported as the
mean of the models' accuracies +- their std across models.
"""
import argparse
import hashlib
import json
import sys
import time
from dataclasses import replace
from pathlib import Path

from harness.quiet_start import quiet_start

if __name__ == "__main__":
    quiet_start()  # a Ctrl-C or SIGTERM while torch loads: one line, exit 130

import numpy as np  # noqa: E402
import torch  # noqa: E402

from harness.atomic import check_output, remove_stale_temporaries, write_atomic
from harness.checkpoints import load_model
from harness.cli import (add_session_args, as_typed, build_config, interrupted_by_signals, non_negative_int, positive_float,
                 positive_int, run_cli)
from harness.config import DISTANCES, METHODS, PREDICTIONS, EvalConfig
from protocol import IMAGES_PER_CLASS, NUM_EVALUATION
from datasets import OmniSampler
from model import image_size
from harness.results import FORMAT, choose, reading_key
from meta_test import empty_results, meta_test, run_seeds
from harness.runtime import (Ranks, device_name, join_processes, leave_processes, resolve_device, set_threads, sha256_of,
                     torchrun_ranks, versions)


def parse_args(argv=None):
    """The command line as a checked EvalConfig (a bad value: one `error:` line, exit 2)."""
    parser = argparse.ArgumentParser(prog=Path(__file__).name, description=__doc__.splitlines()[0])
    parser.add_argument("-m", "--model", dest="models", required=True, nargs="+", metavar="MODEL",
                        help="checkpoint (.pth state_dict) to evaluate; several (one per meta-training seed) are "
                             "each evaluated on the same runs, then summarised across them")
    parser.add_argument("-c", "--classes", type=int, nargs="+", default=[10],
                        help=f"new classes to learn, 1..{NUM_EVALUATION} (%(default)s); several counts are "
                             f"scored along one sequence per run (the first N classes of it)")
    parser.add_argument("--method", choices=METHODS, default="seq",
                        help="how the last layer learns: seq (higherANML's: one Adam step per image, class after "
                             "class), iid (the same images and steps, the classes shuffled together), lstsq "
                             "(ridge least squares in closed form, argmax over the classes learned), ncm (the "
                             "nearest class mean of the features, among the classes learned), slda (streaming "
                             "LDA), gaussian (a Gaussian per class, Normal-Gamma prior) (%(default)s)")
    parser.add_argument("-l", "--lr", dest="lrs", metavar="LR", type=positive_float, nargs="+",
                        help="test-train Adam learning rate(s) for seq and iid (0.001); several are compared on "
                             "the same runs")
    parser.add_argument("--ridge", dest="ridges", metavar="RIDGE", type=positive_float, nargs="+",
                        help="ridge regulariser(s) lambda for lstsq (1.0); several are compared and chosen as --lr")
    parser.add_argument("--distance", dest="distances", choices=DISTANCES, nargs="+",
                        help="ncm's distance(s) to the class means, compared and chosen as --lr (both with "
                             "--selection-runs, else euclidean)")
    parser.add_argument("--shrinkage", dest="shrinkages", metavar="EPS", type=positive_float, nargs="+",
                        help="slda's covariance shrinkage(s) eps in (0, 1]: ((1 - eps) Sigma + eps I)^-1, compared "
                             "and chosen as --lr (1e-4 0.01 0.1 0.5 with --selection-runs, else 1e-4)")
    parser.add_argument("--prior", dest="priors", metavar="A,B[,K]", nargs="+",
                        help="gaussian's Normal-Gamma prior(s) alpha0,beta0[,kappa0] (kappa0 0 if left out), "
                             "compared and chosen as --lr (1,1 1,0.1 10,1 100,10 with --selection-runs, else 1,1)")
    parser.add_argument("--prediction", choices=PREDICTIONS,
                        help="gaussian's prediction: bayes (the posterior predictive, Student-t per dimension) "
                             "or map (the Gaussian at the posterior's mode) (bayes)")
    parser.add_argument("--no-freeze", action="store_true",
                        help="seq and iid: Adam over every parameter (RLN, NM and fc), the whole network run on "
                             "every image, as the original ANML code's --no_freeze (default: the last layer alone "
                             "on frozen features)")
    parser.add_argument("--lanes", type=positive_int, default=1,
                        help="with --no-freeze (seq): how many (run, learning rate) pairs learn at once, as lanes of "
                             "one step (the same steps; %(default)s: one after another; on a GPU, all of them)")
    parser.add_argument("--epochs-iid", type=positive_int,
                        help="for iid: passes over the shuffled images, each a new shuffle (1: as many steps as seq)")
    parser.add_argument("-r", "--runs", type=positive_int, default=10,
                        help="repeats, each with new classes (%(default)s)")
    parser.add_argument("--selection-runs", type=non_negative_int, default=0,
                        help="separate runs (other seeds) on which each row's learning rate is chosen, then "
                             "reported on the --runs runs, which play no part in the choice (%(default)s: "
                             "higherANML's protocol, the best rate on the reported runs)")
    parser.add_argument("-t", "--train-examples", type=int, default=15,
                        help=f"training images per class, 1..{IMAGES_PER_CLASS - 1} "
                             f"(%(default)s; the rest are test images)")
    parser.add_argument("--seed", type=non_negative_int, default=0,
                        help="run r draws its classes, splits and last-layer init from (seed, r) (%(default)s)")
    parser.add_argument("--original-loop", action="store_true",
                        help="higherANML's full-network loop instead of the (equivalent) frozen-feature fast path")
    parser.add_argument("--json", metavar="FILE",
                        help="write every run's accuracies and the settings to FILE: a regular file (replaced "
                             "atomically) or a new one; a symbolic link is written through to its target; anything "
                             "else is refused. An interrupted evaluation writes its finished runs to FILE.partial.json "
                             "(FILE's name with .partial before its suffix) and leaves FILE as it was; a complete one "
                             "replaces FILE and removes that partial file")
    add_session_args(parser)
    args = parser.parse_args(argv)
    return build_config(parser, EvalConfig, args, classes=tuple(args.classes), model=args.models[0],
                        models=tuple(args.models) if len(args.models) > 1 else None,
                        lrs=args.lrs and tuple(args.lrs), ridges=args.ridges and tuple(args.ridges),
                        distances=args.distances and tuple(args.distances),
                        shrinkages=args.shrinkages and tuple(args.shrinkages), priors=args.priors and tuple(args.priors),
                        device=resolve_device(parser, args.device))


def shown(value):
    """A grid value as the output shows it: a number by %g (0.001, 1e-05), a distance by its name."""
    return value if isinstance(value, str) else f"{value:g}"


def summary_lines(classes, value, test, train, several, hyper="lr"):
    """higherANML's two lines (mean and std over runs), with ` lr {lr}` appended when sweeping
    (` ridge {lambda}` for lstsq, ` distance {name}` for ncm)."""
    tail = f" {hyper} {shown(value)}" if several else ""
    return [f"Classes {classes} Accuracy {test.mean():.2f} (std {test.std():.2f}){tail}",
            f"Classes {classes} Train accuracy {train.mean():.2f} (std {train.std():.2f}){tail}"]


def partial_path(path):
    """Where an interrupted evaluation's report goes, beside the --json file and never over it:
    `same.json` -> `same.partial.json` (`out` -> `out.partial`)."""
    path = Path(path)
    return path.with_name(f"{path.stem}.partial{path.suffix}")


def check_outputs(config):
    """Fail now, in one line, not after a long evaluation, if the --json file or its partial file could
    not be written or is not a regular file (or a new path); and remove the temporary files that writers
    of them killed mid-write left beside them."""
    if not config.json:
        return
    for path in (Path(config.json), partial_path(config.json)):
        target = check_output(path, "--json")
        remove_stale_temporaries(target.parent, target.name)


def check_distinct(paths, models):
    """-m a b: refuse the same weights given twice (one file twice, or a checkpoint and the resumable
    one it was saved with): counted twice, they would shrink the std across models."""
    seen = {}
    for path, model in zip(paths, models):
        digest = weights_digest(model)
        if digest in seen:
            raise ValueError(f"-m: {seen[digest]} and {path} hold the same weights: give each model once")
        seen[digest] = path


def weights_digest(model):
    """SHA-256 of a model's parameters and buffers, in order."""
    digest = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def stats(test, train, value=None, hyper="lr"):
    """Mean and std over runs of one grid value's per-run accuracies, with the runs themselves; of an
    interrupted evaluation, the finished runs only, and which they are."""
    out = {} if value is None else {hyper: value}
    done = np.isfinite(test)
    if not done.all():
        out["finished_runs"] = np.flatnonzero(done).tolist()
        test, train = test[done], train[done]
    mean_std = lambda a: (float(a.mean()), float(a.std())) if len(a) else (None, None)
    (test_mean, test_std), (train_mean, train_std) = mean_std(test), mean_std(train)
    return {**out, "test": test.tolist(), "train": train.tolist(), "test_mean": test_mean, "test_std": test_std,
            "train_mean": train_mean, "train_std": train_std}


def build_report(config, argv, report, selection, model_sha256, seconds, partial=False):
    """Everything needed to compare or reproduce the evaluation, for --json; `partial`: of an
    interrupted evaluation, with the finished runs and no choices."""
    selection_test = None if selection is None else selection["test"]
    chosen, one_for_all, best = (None, None, None) if partial else choose(report["test"], selection_test)
    grid, hyper = config.grid, config.hyperparameter
    rows = []
    for k, n in enumerate(config.classes):
        pick = lambda l: stats(report["test"][k, l], report["train"][k, l], grid[l], hyper)
        rows.append({
            "classes": n,
            "per_value": [{hyper: value, "report": stats(report["test"][k, l], report["train"][k, l]),
                           "selection": None if selection is None else
                           stats(selection["test"][k, l], selection["train"][k, l])}
                          for l, value in enumerate(grid)],
            "chosen_on_selection_runs": None if chosen is None else pick(chosen[k]),
            "one_value_for_all_rows": None if one_for_all is None else pick(one_for_all),
            "best_on_reported_runs": None if best is None else pick(best[k]),
        })
    return {
        "format": FORMAT, **({"partial": True} if partial else {}),
        "command": as_typed("eval_omni.py", argv, paths=("-m", "--model", "--json"),
                            dropped=("--data-root", "--no-download")),
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "model": config.model, "model_sha256": model_sha256,
        "device": config.device, "device_name": device_name(config.device), "threads": torch.get_num_threads(),
        "versions": versions(),
        "method": config.method, "hyperparameter": hyper, "grid": list(grid),  # per_value entries hold `hyper`
        **({"epochs_iid": config.iid_epochs} if config.method == "iid" else {}),
        "no_freeze": config.no_freeze,  # True: every parameter learned; False: the last layer on frozen features
        "classes": list(config.classes), "train_examples": config.train_examples,
        "runs": config.runs, "selection_runs": config.selection_runs, "seed": config.seed,
        "report_run_seeds": run_seeds(config.seed, config.runs),  # SeedSequence entropies
        "selection_run_seeds": run_seeds(config.seed, config.selection_runs, selection=True),
        "fast": not (config.original_loop or config.no_freeze), "seconds": round(seconds, 3),
        "one_value_for_all_rows": None if one_for_all is None else grid[one_for_all],
        "config": config.as_dict(),
        "rows": rows,
    }


def split_runs(results, runs):
    """Results [K, L, runs + selection runs] -> (the reported runs', the selection runs' or None)."""
    accuracies = {k: results[k] for k in ("test", "train")}
    report = {k: v[..., :runs] for k, v in accuracies.items()}
    selection = {k: v[..., runs:] for k, v in accuracies.items()} if results["test"].shape[2] > runs else None
    return report, selection


def warn_non_finite(config, results):
    """A notice for each learning rate at which a last layer (with --no-freeze, the network) became NaN
    or infinite: its accuracies (near 0) say nothing about the network."""
    what = "the network" if config.no_freeze else "the last layer"
    for l, value in enumerate(config.grid):
        bad = results["non_finite"][l]
        if bad.any():
            print(f"notice: at {config.hyperparameter} {shown(value)} {what} became NaN or infinite in {bad.sum()} "
                  f"of {len(bad)} runs: its accuracies mean nothing (the rate is far too large)", file=sys.stderr)


def write_report(path, report):
    """The --json file, written atomically; a failure names it."""
    try:
        write_atomic(path, lambda tmp: tmp.write_text(json.dumps(report, indent=1) + "\n"))
    except OSError as e:
        raise OSError(f"could not write --json {path}: {e.strerror or e}") from None


def write_finished_report(path, report):
    """The complete --json file, then no partial file of an earlier interrupted evaluation beside it."""
    write_report(path, report)
    partial_path(path).unlink(missing_ok=True)


def write_partial_report(path, report):
    """An interrupted evaluation's report, beside the --json file (which keeps a finished report)."""
    partial = partial_path(path)
    write_report(partial, report)
    kept = f"; {path} is left as it was" if Path(path).exists() else ""
    print(f"the runs finished before the interruption are in {partial} (marked partial){kept}", file=sys.stderr)


def best_caveat(config):
    """What the `Best lr` line adds without selection runs: the rate is chosen on the very runs it
    reports, which flatters it, and --selection-runs chooses on others (with them, the `Chosen` line
    that follows is the honest reading)."""
    if config.selection_runs:
        return ""
    return " on these same runs (optimistic; --selection-runs N chooses on other runs)"


def print_results(config, report, selection):
    """higherANML's lines per class count and grid value, the best value's line, and with selection
    runs the chosen value's line and a closing table."""
    grid, hyper = config.grid, config.hyperparameter
    several = len(grid) > 1
    chosen, one_for_all, best = choose(report["test"], None if selection is None else selection["test"])
    for k, n in enumerate(config.classes):
        for l, value in enumerate(grid):
            print("\n".join(summary_lines(n, value, report["test"][k, l], report["train"][k, l], several, hyper)))
        if several:
            test = report["test"][k, best[k]]
            print(f"Best {hyper} {shown(grid[best[k]])}{best_caveat(config)}: Classes {n} Accuracy {test.mean():.2f} "
                  f"(std {test.std():.2f})")
        if chosen is not None:
            test, train = report["test"][k, chosen[k]], report["train"][k, chosen[k]]
            print(f"Chosen {hyper} {shown(grid[chosen[k]])} on {config.selection_runs} selection runs: Classes {n} "
                  f"Accuracy {test.mean():.2f} (std {test.std():.2f}) Train accuracy {train.mean():.2f}")
    if chosen is not None:
        what = {"lr": "rates", "ridge": "regularisers"}.get(hyper, hyper + "s")
        learns = ", every parameter learning" if config.no_freeze else ""
        print(f"\n{config.runs} reported runs per row ({config.method}{learns}); {what} chosen on "
              f"{config.selection_runs} other runs")
        print(f"{'classes':>7}  {'chosen ' + hyper:>12}  {'test':>11}  {'train':>11}  "
              f"{'fixed ' + hyper + ' ' + shown(grid[one_for_all]):>18}  {'best on the same runs':>27}")
        fmt = lambda a: f"{a.mean():.3f}±{a.std():.3f}"
        for k, n in enumerate(config.classes):
            c, b = chosen[k], best[k]
            print(f"{n:>7}  {shown(grid[c]):>12}  {fmt(report['test'][k, c]):>11}  {fmt(report['train'][k, c]):>11}  "
                  f"{fmt(report['test'][k, one_for_all]):>18}  "
                  f"{fmt(report['test'][k, b]) + f' {hyper} ' + shown(grid[b]):>27}")


def evaluate(config, argv, sampler, model, finished=(), ranks=Ranks()):
    """Meta-test one checkpoint (`config.model`); returns its report (as --json writes it). On an
    interruption, writes the --json of what is finished (with the `finished` reports of the models
    evaluated before this one) and re-raises. Under torchrun (`ranks`) the processes share the runs
    out; process 0 prints and writes."""
    model_sha256 = sha256_of(config.model)
    results = empty_results(config)
    start = time.perf_counter()
    writer = ranks.rank == 0
    try:
        with interrupted_by_signals():
            meta_test(config, sampler, model, progress=writer, results=results, ranks=ranks)
    except KeyboardInterrupt:
        if config.json and writer:  # keep what was finished
            report, selection = split_runs(results, config.runs)
            partial = build_report(config, argv, report, selection, model_sha256, time.perf_counter() - start,
                                   partial=True)
            write_partial_report(config.json, partial if not finished else
                                 {"format": FORMAT, "partial": True, "per_model": [*finished, partial]})
        raise
    seconds = time.perf_counter() - start
    report, selection = split_runs(results, config.runs)
    if writer:
        warn_non_finite(config, results)
        if config.models:
            print(f"Model {config.model}")
        print_results(config, report, selection)
    return build_report(config, argv, report, selection, model_sha256, seconds)


def across_models(config, reports):
    """Each row's reading across the models' reports: the mean of their mean accuracies, and the std
    of those means across models (each model's own reading: its chosen value, or its best)."""
    key = reading_key(reports[0])
    rows = []
    for k, n in enumerate(config.classes):
        readings = [r["rows"][k][key] for r in reports]
        test = np.array([r["test_mean"] for r in readings])
        train = np.array([r["train_mean"] for r in readings])
        across = {"models": len(reports), "test": test.tolist(), "train": train.tolist(),
                  "test_mean": float(test.mean()), "test_std": float(test.std()),
                  "train_mean": float(train.mean()), "train_std": float(train.std()),
                  "std_over_runs_mean": float(np.mean([r["test_std"] for r in readings]))}
        rows.append({"classes": n, key: across})
    return rows


def print_across_models(config, rows, key):
    print(f"\nAcross {len(config.models)} models ({'chosen' if key.startswith('chosen') else 'best'} "
          f"{config.hyperparameter} of each; std across models)")
    for row in rows:
        r = row[key]
        print(f"Classes {row['classes']} Accuracy {r['test_mean']:.3f} (std {r['test_std']:.3f} across models) "
              f"Train accuracy {r['train_mean']:.3f} (std {r['train_std']:.3f})")


def main(argv=None):
    """Check the outputs, load the models and the data, meta-test each model on the same runs, then
    (several models) the reading across them. Under torchrun the processes share the runs out."""
    argv = sys.argv[1:] if argv is None else list(argv)
    config = parse_args(argv)
    check_outputs(config)
    set_threads(config.threads)
    ranks = torchrun_ranks()
    join_processes(ranks, config.device)
    try:
        paths, models, sampler = load_models(config)
        reports = []
        for path, model in zip(paths, models):
            reports.append(evaluate(replace(config, model=path), argv, sampler, model, finished=reports, ranks=ranks))
        if ranks.rank == 0:
            report_all(config, paths, reports)
    finally:
        leave_processes()


def load_models(config):
    """(paths, models, the sampler of their image size): every checkpoint loaded and checked before the
    data loads."""
    paths = config.models or (config.model,)
    models = [load_model(path, config.device) for path in paths]  # a bad checkpoint fails before the data loads
    check_distinct(paths, models)
    sizes = {image_size(model) for model in models}
    if len(sizes) > 1:
        raise ValueError("-m: the models read images of different sizes (ANML's 28x28, OML's 84x84): evaluate "
                         "them separately")
    sampler = OmniSampler(config.data_root, download=config.download, seed=config.seed, im_size=sizes.pop())
    return paths, models, sampler


def report_all(config, paths, reports):
    """The --json of one model's report; of several, their reading across models, printed, and all of them."""
    if not config.models:
        if config.json:
            write_finished_report(config.json, reports[0])
        return
    key = reading_key(reports[0])
    rows = across_models(config, reports)
    print_across_models(config, rows, key)
    if config.json:
        common = {k: v for k, v in reports[0].items() if k not in ("rows", "model", "model_sha256")}
        write_finished_report(config.json, {**common,
                                            "models": list(paths), "across_models": True,
                                            "seconds": round(sum(r["seconds"] for r in reports), 3),
                                            "rows": rows, "per_model": reports})


if __name__ == "__main__":
    run_cli(main)
