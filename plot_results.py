"""Draw the results: meta-test accuracy against the number of classes, and the training curve.

    python plot_results.py                 # results/omniglot_eval.json + the shipped model's training log
    python plot_results.py --results R.json --log RUN/256_112_2304_train_log.csv --out-dir figures

Writes `evaluation_results.png` (test accuracy with its std over runs, train accuracy, and higherANML's
README table for comparison) and `training_curve.png` (outer loss and accuracy, smoothed).
"""
import argparse
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from atomic import write_atomic  # noqa: E402
from cli import positive_int, run_cli  # noqa: E402
from results import read_results, reported  # noqa: E402

# higherANML's README table (test accuracy), drawn as the comparison series.
HIGHERANML_TABLE = {10: 0.90, 50: 0.89, 75: 0.86, 100: 0.85, 200: 0.80, 300: 0.76, 400: 0.72, 600: 0.65}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(prog=Path(__file__).name, description=__doc__.splitlines()[0])
    parser.add_argument("--results", default="results/omniglot_eval.json",
                        help="eval_omni.py --json output (%(default)s)")
    parser.add_argument("--log", default="trained_anmls/256_112_2304_train_log.csv",
                        help="train_omni.py's CSV log (%(default)s); 'none' to skip the training curve")
    parser.add_argument("--out-dir", default="results", help="where the PNGs go (%(default)s)")
    parser.add_argument("--smooth", type=positive_int, default=200,
                        help="moving-average window of the training curve, in iterations (%(default)s)")
    args = parser.parse_args(argv)
    if not args.out_dir.strip():
        parser.error("--out-dir must name a folder")
    return args


def plot_evaluation(report, path):
    """Test accuracy (error bars: std over runs), train accuracy and higherANML's table against classes."""
    rows = reported(report)
    classes = np.array([n for n, _ in rows])
    pick = lambda field: np.array([reading[field] for _, reading in rows])
    label = (f"test, rate chosen on {report['selection_runs']} selection runs" if report.get("selection_runs")
             else "test, best rate on the same runs")
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
    ax.errorbar(classes, pick("test_mean"), yerr=pick("test_std"), marker="o", capsize=3,
                label=f"{label} ({report.get('runs', '?')} runs)")
    ax.errorbar(classes, pick("train_mean"), yerr=pick("train_std"), marker="s", capsize=3, linestyle="--",
                label="train accuracy (same runs, after learning the N classes)")
    table = sorted(HIGHERANML_TABLE.items())
    ax.plot([n for n, _ in table], [a for _, a in table], marker="^", linestyle=":", color="grey",
            label="higherANML README's table (test)")
    ax.set_xlabel("number of classes learned in sequence")
    ax.set_ylabel("accuracy")
    ax.set_ylim(0, 1.02)
    ax.grid(alpha=0.3)
    ax.set_title(f"ANML meta-test on Omniglot, {Path(str(report.get('model', '?'))).name}", fontsize=10)
    ax.legend(fontsize=8, loc="lower left")
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
        write_atomic(path, lambda tmp: fig.savefig(tmp, format="png"))
    finally:
        plt.close(fig)
    print(f"wrote {path}")


def main(argv=None):
    args = parse_args(argv)
    out_dir = Path(args.out_dir)
    plot_evaluation(read_results(args.results), out_dir / "evaluation_results.png")
    if args.log != "none":
        plot_training(args.log, out_dir / "training_curve.png", args.smooth)


if __name__ == "__main__":
    run_cli(main)
