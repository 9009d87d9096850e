"""Draw the results: meta-test accuracy against the number of classes, and the training curve.

    python plot_results.py                 # results/omniglot_eval.json + the shipped model's training log
    python plot_results.py --results R.json --log RUN/256_112_2304_train_log.csv --out-dir figures

Writes `evaluation_results.png` (test accuracy with its std over runs, train accuracy, higherANML's
README table and the ANML paper's number for comparison, and the baselines' test accuracy) and
`training_curve.png` (outer loss and accuracy, smoothed).
"""
import argparse
from pathlib import Path

from harness.quiet_start import quiet_start

if __name__ == "__main__":
    quiet_start()  # a Ctrl-C or SIGTERM while torch loads: one line, exit 130

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from harness.atomic import check_output, write_atomic  # noqa: E402
from harness.cli import positive_int, run_cli  # noqa: E402
from harness.results import read_results, reported  # noqa: E402

# higherANML's README table (test accuracy), and the ANML paper's one stated number (Sec. 4.1).
HIGHERANML_TABLE = {10: 0.90, 50: 0.89, 75: 0.86, 100: 0.85, 200: 0.80, 300: 0.76, 400: 0.72, 600: 0.65}
PAPER = {600: 0.638}
BASELINES = ["results/comparisons/pretrain_seq.json", "results/comparisons/random_seq.json"]


def parse_args(argv=None):
    parser = argparse.ArgumentParser(prog=Path(__file__).name, description=__doc__.splitlines()[0])
    parser.add_argument("--results", default="results/omniglot_eval.json",
                        help="eval_omni.py --json output (%(default)s)")
    parser.add_argument("--log", default="trained_anmls/256_112_2304_train_log.csv",
                        help="train_omni.py's CSV log (%(default)s); 'none' to skip the training curve")
    parser.add_argument("--baselines", nargs="*", default=BASELINES, metavar="JSON",
                        help="eval_omni.py --json files of other networks, drawn as thin lines (%(default)s)")
    parser.add_argument("--out-dir", default="results",
                        help="where the PNGs go (%(default)s); each a regular file or a new one (a symbolic "
                             "link is written through to its target, anything else refused)")
    parser.add_argument("--smooth", type=positive_int, default=200,
                        help="moving-average window of the training curve, in iterations (%(default)s)")
    args = parser.parse_args(argv)
    if not args.out_dir.strip():
        parser.error("--out-dir must name a folder")
    return args


def bars_note(report):
    """What a point and its bars are: the mean over runs and their std, or, across several models
    (meta-training seeds), the mean of the models' means and the std across models."""
    if report.get("across_models"):
        return (f"{len(report['models'])} models x {report.get('runs', '?')} runs a point; "
                f"bars: std across models (meta-training seeds)")
    return f"{report.get('runs', '?')} runs a point; bars: std over runs"


def plot_evaluation(report, path, baselines=()):
    """Test accuracy (error bars: std over runs), train accuracy, higherANML's table and the paper's
    number against classes; each of `baselines` ({label: report}) as a thin line of test accuracy."""
    rows = reported(report)
    classes = np.array([n for n, _ in rows])
    pick = lambda field: np.array([reading[field] for _, reading in rows])
    label = (f"rate chosen on {report['selection_runs']} selection runs" if report.get("selection_runs")
             else "best rate on the same runs")
    fig, ax = plt.subplots(figsize=(7, 5.6), dpi=120)
    ax.errorbar(classes, pick("test_mean"), yerr=pick("test_std"), marker="o", capsize=3,
                label=f"ANML, this project (test; {label})")
    ax.errorbar(classes, pick("train_mean"), yerr=pick("train_std"), marker="s", capsize=3, linestyle="--",
                label="ANML, this project (train accuracy)")
    table = sorted(HIGHERANML_TABLE.items())
    ax.plot([n for n, _ in table], [a for _, a in table], marker="^", linestyle=":", color="grey",
            label="higherANML README (test)")
    ax.plot(list(PAPER), list(PAPER.values()), marker="*", markersize=11, linestyle="none", color="black",
            label="ANML paper (test)")
    for (name, other), color in zip(baselines.items(), ("C2", "C3", "C4", "C5")):
        other_rows = reported(other)
        ax.errorbar([n for n, _ in other_rows], [r["test_mean"] for _, r in other_rows],
                    yerr=[r["test_std"] for _, r in other_rows], marker=".", capsize=2, linewidth=1, color=color,
                    label=f"{name} network (test, same protocol)")
    ax.text(0.99, 0.01, bars_note(report), transform=ax.transAxes, ha="right", va="bottom", fontsize=7, color="grey")
    ax.set_xlabel("number of classes learned in sequence")
    ax.set_ylabel("accuracy")
    ax.set_ylim(0, 1.02)
    ax.grid(alpha=0.3)
    shown = f"{len(report['models'])} models" if report.get("across_models") else \
        Path(str(report.get('model', '?'))).name
    ax.set_title(f"Meta-test on Omniglot, {shown}", fontsize=10)
    ax.legend(fontsize=7.5, loc="upper center", bbox_to_anchor=(0.5, -0.12), ncol=2, frameon=False)
    save_figure(fig, path)


def read_log(path):
    """The CSV log as columns (iteration, loss, accuracy); rows that do not parse are left out."""
    try:
        lines = Path(path).read_text(errors="replace").splitlines()
    except FileNotFoundError:
        raise ValueError(f"training log not found: {path}") from None
    except OSError as e:
        raise ValueError(f"cannot read the training log {path}: {e}") from None
    if not lines or not lines[0].startswith("iteration,loss,accuracy"):
        raise ValueError(f"{path} is not a train_omni.py log (its first line should be iteration,loss,accuracy,seconds)")
    rows = []
    for line in lines[1:]:
        try:
            it, loss, acc = (float(v) for v in line.split(",")[:3])
        except ValueError:
            continue
        if np.isfinite(it):
            rows.append((it, loss, acc))
    if not rows:
        raise ValueError(f"{path} has no rows to draw")
    return tuple(np.array(column) for column in zip(*rows))


def moving_average(values, window):
    """Mean of the finite values among the last `window` (fewer at the start), same length as `values`:
    a NaN or infinite value is left out of the means rather than spoiling every later one."""
    finite = np.isfinite(values)
    sums = np.cumsum(np.insert(np.where(finite, values, 0.0), 0, 0.0))
    counts = np.cumsum(np.insert(finite, 0, False).astype(float))
    ends = np.arange(1, len(values) + 1)
    starts = np.maximum(ends - window, 0)
    n = counts[ends] - counts[starts]
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(n > 0, (sums[ends] - sums[starts]) / np.maximum(n, 1), np.nan)


def plot_training(log_path, path, window):
    """Outer loss and outer accuracy against the meta-training iteration, smoothed."""
    its, loss, acc = read_log(log_path)
    fig, (left, right) = plt.subplots(1, 2, figsize=(9, 3.6), dpi=120)
    for ax, values, name in ((left, loss, "outer loss"), (right, acc, "outer accuracy")):
        ax.plot(its, values, color="lightgrey", linewidth=0.5, label="every iteration")
        ax.plot(its, moving_average(values, window), color="C0", label=f"mean of the last {window}")
        ax.set_xlabel("meta-training iteration")
        ax.set_ylabel(name)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    right.set_ylim(0, 1)
    fig.suptitle(f"ANML meta-training, {Path(log_path).name}", fontsize=10)
    save_figure(fig, path)


def save_figure(fig, path):
    """The picture as a PNG at `path`, written atomically (a full disk leaves the old picture)."""
    fig.tight_layout()
    try:
        write_atomic(path, lambda tmp: fig.savefig(tmp, format="png", bbox_inches="tight"))
    finally:
        plt.close(fig)
    print(f"wrote {path}")


def main(argv=None):
    args = parse_args(argv)
    out_dir = Path(args.out_dir)
    pictures = ["evaluation_results.png"] + (["training_curve.png"] if args.log != "none" else [])
    for name in pictures:  # regular files or new paths (a link: its target), before any work
        check_output(out_dir / name, "--out-dir")
    baselines = {Path(b).stem.removesuffix("_seq").replace("pretrain", "pretrained"): read_results(b)
                 for b in args.baselines}
    plot_evaluation(read_results(args.results), out_dir / "evaluation_results.png", baselines)
    if args.log != "none":
        plot_training(args.log, out_dir / "training_curve.png", args.smooth)


if __name__ == "__main__":
    run_cli(main)
