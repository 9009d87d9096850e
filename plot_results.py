"""Draw the results: meta-test accuracy against the number of classes, and the training curve.

    python plot_results.py                 # results/omniglot_eval.json + the shipped model's training log
    python plot_results.py --results R.json --log RUN/256_112_2304_train_log.csv --out-dir figures

Writes `evaluation_results.png` (test accuracy with its std over runs, train accuracy, and the seed
README's table for comparison) and `training_curve.png` (outer loss and accuracy, smoothed).
"""
import argparse
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from atomic import write_atomic  # noqa: E402
from cli import positive_int, run_cli  # noqa: E402

# The seed README's evaluation table (test accuracy), drawn as the comparison series.
SEED_TABLE = {10: 0.90, 50: 0.89, 75: 0.86, 100: 0.85, 200: 0.80, 300: 0.76, 400: 0.72, 600: 0.65}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--results", default="results/omniglot_eval.json",
                        help="eval_omni.py --json output (%(default)s)")
    parser.add_argument("--log", default="trained_anmls/256_112_2304_train_log.csv",
                        help="train_omni.py's CSV log (%(default)s); 'none' to skip the training curve")
    parser.add_argument("--out-dir", default="results", help="where the PNGs go (%(default)s)")
    parser.add_argument("--smooth", type=positive_int, default=200,
                        help="moving-average window of the training curve, in iterations (%(default)s)")
    return parser.parse_args(argv)


def read_json(path):
    try:
        return json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise ValueError(f"results file not found: {path} (make it with eval_omni.py --json)") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not JSON ({e})") from None


def reported_series(report):
    """(classes, test mean, test std, train mean, train std, label) of the reported rate per row:
    the rate chosen on selection runs where there are any, else the best on the reported runs."""
    if "rows" not in report:
        raise ValueError("the results file has no 'rows': write it with this project's eval_omni.py --json")
    key = "chosen_on_selection_runs" if report.get("selection_runs") else "best_on_reported_runs"
    rows = [(r["classes"], r[key]) for r in report["rows"]]
    label = (f"test, rate chosen on {report['selection_runs']} selection runs" if key.startswith("chosen")
             else "test, best rate on the same runs")
    pick = lambda field: np.array([r[field] for _, r in rows])
    return (np.array([n for n, _ in rows]), pick("test_mean"), pick("test_std"), pick("train_mean"),
            pick("train_std"), label)


def plot_evaluation(report, path):
    """Test accuracy (error bars: std over runs), train accuracy and the seed's table against classes."""
    classes, test, test_std, train, train_std, label = reported_series(report)
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
    ax.errorbar(classes, test, yerr=test_std, marker="o", capsize=3, label=f"{label} ({report['runs']} runs)")
    ax.errorbar(classes, train, yerr=train_std, marker="s", capsize=3, linestyle="--",
                label="train accuracy (same runs, after learning the N classes)")
    seed = sorted(SEED_TABLE.items())
    ax.plot([n for n, _ in seed], [a for _, a in seed], marker="^", linestyle=":", color="grey",
            label="seed README's table (test)")
    ax.set_xlabel("number of classes learned in sequence")
    ax.set_ylabel("accuracy")
    ax.set_ylim(0, 1.02)
    ax.grid(alpha=0.3)
    ax.set_title(f"ANML meta-test on Omniglot, {Path(report['model']).name}", fontsize=10)
    ax.legend(fontsize=8, loc="lower left")
    save_figure(fig, path)


def read_log(path):
    """The CSV log as columns (iteration, loss, accuracy)."""
    try:
        data = np.genfromtxt(path, delimiter=",", names=True, invalid_raise=False)
    except OSError:
        raise ValueError(f"training log not found: {path}") from None
    if data.size == 0 or not {"iteration", "loss", "accuracy"} <= set(data.dtype.names or ()):
        raise ValueError(f"{path} is not a train_omni.py log (iteration,loss,accuracy,seconds)")
    data = np.atleast_1d(data)
    return data["iteration"], data["loss"], data["accuracy"]


def moving_average(values, window):
    """Mean over the last `window` values (fewer at the start), same length as `values`."""
    sums = np.cumsum(np.insert(values, 0, 0.0))
    counts = np.minimum(np.arange(1, len(values) + 1), window)
    return (sums[1:] - sums[np.arange(1, len(values) + 1) - counts]) / counts


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
    fig.tight_layout()
    write_atomic(path, lambda tmp: fig.savefig(tmp, format="png"))
    plt.close(fig)
    print(f"wrote {path}")


def main(argv=None):
    args = parse_args(argv)
    out_dir = Path(args.out_dir)
    plot_evaluation(read_json(args.results), out_dir / "evaluation_results.png")
    if args.log != "none":
        plot_training(args.log, out_dir / "training_curve.png", args.smooth)


if __name__ == "__main__":
    run_cli(main)
