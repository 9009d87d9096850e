"""Plot meta-test accuracy against the number of classes, one line per eval_omni.py --json file.

    python plot_comparisons.py results/comparisons/*.json -o results/comparisons/comparisons.png

Each file is one method on one network (its name, without .json, labels the line). A row's point is
the test accuracy on the reported runs at the learning rate (or ridge) chosen on the selection runs,
or, without selection runs, the best on the reported runs (marked "best on same runs" in the legend);
the error bars are the standard deviation over runs. Needs matplotlib (not in requirements.txt).
"""
import argparse
import json
from pathlib import Path

from cli import run_cli


def curve(report):
    """(classes, mean test accuracy, std, how the rate was chosen) of one eval_omni.py report."""
    rows = report["rows"]
    key = "chosen_on_selection_runs" if rows and rows[0]["chosen_on_selection_runs"] else "best_on_reported_runs"
    return ([row["classes"] for row in rows], [row[key]["test_mean"] for row in rows],
            [row[key]["test_std"] for row in rows], key)


def load_curves(paths):
    """{label: curve} from --json files; the label is the file's name without .json."""
    curves = {}
    for path in map(Path, paths):
        try:
            report = json.loads(path.read_text())
            curves[path.stem] = curve(report)
        except (OSError, ValueError, KeyError, TypeError, IndexError) as e:
            raise ValueError(f"{path} is not an eval_omni.py --json report ({type(e).__name__}: {e})") from None
    return curves


def plot_comparisons(curves, out, title="Omniglot meta-test: accuracy against classes learned"):
    """One picture, one line per method (log-scale classes), written to `out`."""
    try:
        import matplotlib
    except ImportError:
        raise ValueError("plot_comparisons.py needs matplotlib: pip install matplotlib") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for label, (classes, mean, std, key) in curves.items():
        note = "" if key == "chosen_on_selection_runs" else " (best on same runs)"
        ax.errorbar(classes, mean, yerr=std, marker="o", capsize=3, label=label + note)
    ax.set_xscale("log")
    ticks = sorted({n for classes, *_ in curves.values() for n in classes})
    ax.set_xticks(ticks, [str(n) for n in ticks])
    ax.minorticks_off()
    ax.set_xlabel("classes learned")
    ax.set_ylabel("test accuracy")
    ax.set_ylim(0, 1)
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=150)
    plt.close(fig)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("reports", nargs="+", help="eval_omni.py --json files, one line each")
    parser.add_argument("-o", "--out", default="comparisons.png", help="picture to write (%(default)s)")
    args = parser.parse_args(argv)
    curves = load_curves(args.reports)
    plot_comparisons(curves, args.out)
    print(f"wrote {args.out}: {', '.join(curves)}")


if __name__ == "__main__":
    run_cli(main)
