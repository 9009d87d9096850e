"""Plot meta-test accuracy against the number of classes, one line per eval_omni.py --json file: test
accuracy beside train accuracy, as the ANML paper draws them.

    python plot_comparisons.py results/comparisons/*.json -o results/comparisons/comparisons.png

Each file is one method on one network, named {network}_{method}...json as make_comparisons.sh names
them: the line is labelled by the network (from the name) and by how it learned at meta-test (from
the file: "pretrained, all parameters learn", "ANML + NCM"). A row's point is the test accuracy on
the reported runs at the learning rate (ridge, distance) chosen on the selection runs, or, without
selection runs, the best on the reported runs (marked "best on same runs" in the legend); the right
panel gives the same runs' accuracy on the images they learned from; the error bars are the standard
deviation over runs.
"""
import argparse
from pathlib import Path

from harness.quiet_start import quiet_start

if __name__ == "__main__":
    quiet_start()  # a Ctrl-C or SIGTERM while torch loads: one line, exit 130

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402

from harness.atomic import check_output, write_atomic  # noqa: E402
from harness.cli import run_cli  # noqa: E402
from harness.results import read_results, reading_key, reported, row_label  # noqa: E402

# The networks of make_comparisons.sh's file names, {prefix}_{method}...: the longest prefix names it.
NETWORKS = {"anml": "ANML", "anml_first_order": "first-order ANML", "pretrain": "pretrained",
            "pretrain_zap": "pretrained with zapping", "asb": "ASB", "asb_zap": "ASB with zapping",
            "asb_zap_gated": "ASB with zapping, NM gate learned", "oml": "OML",
            "random": "random"}


def network_of(stem):
    """The network that a file's name (without .json) names: NETWORKS's longest matching prefix, else
    the name itself."""
    prefixes = [p for p in NETWORKS if stem == p or stem.startswith(p + "_")]
    return NETWORKS[max(prefixes, key=len)] if prefixes else stem


def curve(report, network):
    """{classes, test and train mean and std, which reading, legend label} of one checked eval_omni.py
    report of `network`."""
    rows = reported(report)
    column = lambda key: [r[key] for _, r in rows]
    return {"classes": [n for n, _ in rows], "test": (column("test_mean"), column("test_std")),
            "train": (column("train_mean"), column("train_std")), "key": reading_key(report),
            "label": row_label(network, report)}


def load_curves(paths):
    """{file name without .json: curve} from --json files."""
    return {Path(path).stem: curve(read_results(path), network_of(Path(path).stem)) for path in paths}


def picture_path(out):
    """The picture's file: `out`, with .png added when it has no suffix; refused when empty or a folder."""
    if not str(out).strip():
        raise ValueError("-o must name a file")
    path = Path(out)
    if path.is_dir():
        raise ValueError(f"-o {out} is a folder: give a file name")
    return path if path.suffix else path.with_name(path.name + ".png")


def plot_comparisons(curves, out, title="Omniglot meta-test: accuracy against classes learned"):
    """One picture: test accuracy (left) and train accuracy (right) against classes learned (log
    scale), one line per method, a shared legend below; written atomically to `out`."""
    fig, axes = plt.subplots(1, 2, figsize=(12, 6.5), sharex=True)
    for ax in axes:  # up to twenty lines, each its own colour
        ax.set_prop_cycle(color=plt.cm.tab20.colors[::2] + plt.cm.tab20.colors[1::2])
    for c in curves.values():
        note = "" if c["key"] == "chosen_on_selection_runs" else " (best on same runs)"
        for ax, which in zip(axes, ("test", "train")):
            mean, std = c[which]
            ax.errorbar(c["classes"], mean, yerr=std, marker="o", markersize=4, capsize=3,
                        label=c["label"] + note if which == "test" else None)
    ticks = sorted({n for c in curves.values() for n in c["classes"]})
    for ax, which in zip(axes, ("test", "train")):
        ax.set_xscale("log")
        ax.set_xticks(ticks, [str(n) for n in ticks])
        ax.minorticks_off()
        ax.set_xlabel("classes learned")
        ax.set_ylabel(f"meta-test {which} accuracy")
        ax.set_ylim(0, 1)
        ax.grid(True, alpha=0.3)
    axes[0].set_title("held-out images of the classes learned")
    axes[1].set_title("the images learned from")
    fig.suptitle(title)
    fig.legend(loc="lower center", ncol=3, fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0.04 + 0.035 * ((len(curves) + 2) // 3), 1, 0.97))
    try:
        write_atomic(out, lambda tmp: fig.savefig(tmp, format="png", dpi=150))
    finally:
        plt.close(fig)


def main(argv=None):
    parser = argparse.ArgumentParser(prog=Path(__file__).name, description=__doc__.splitlines()[0])
    parser.add_argument("reports", nargs="+", help="eval_omni.py --json files, one line each")
    parser.add_argument("-o", "--out", default="comparisons.png",
                        help="picture to write (%(default)s): a regular file or a new one; a symbolic link is "
                             "written through to its target, anything else refused")
    args = parser.parse_args(argv)
    out = picture_path(args.out)
    check_output(out, "-o")  # a regular file or a new path (a link: its target), before any work
    curves = load_curves(args.reports)
    plot_comparisons(curves, out)
    print(f"wrote {out}: {', '.join(curves)}")


if __name__ == "__main__":
    run_cli(main)
