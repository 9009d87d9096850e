"""How open each network's NM gate is, on the first images of Omniglot's evaluation classes.

    python tools/gate_stats.py trained_anmls/256_112_2304_ANML-21678.pth trained_anmls/*/*.pth --data-root DIR

Prints, per checkpoint: the gate's mean over the images and features, the fraction of gate values
above 0.01, and the mean squared norm of the gated features that the last layer reads. An OML
checkpoint (`train_omni.py --arch oml`: no NM gate) is refused in one line, before the data loads.
"""
import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from harness.quiet_start import quiet_start  # noqa: E402

if __name__ == "__main__":
    quiet_start()  # a Ctrl-C or SIGTERM while torch loads: one line, exit 130

import torch  # noqa: E402

from datasets import OmniSampler  # noqa: E402
from harness.checkpoints import load_model  # noqa: E402
from harness.cli import run_cli  # noqa: E402
from model import OML  # noqa: E402


def gate_statistics(model, images):
    """(mean gate value, fraction of gate values above 0.01, mean squared norm of the gated features)."""
    with torch.no_grad():
        gate = model.nm(images)
        features = model.rln(images) * gate
    return gate.mean().item(), (gate > 0.01).float().mean().item(), features.pow(2).sum(1).mean().item()


def gated_model(path):
    """The ANML in checkpoint `path`; an OML checkpoint is refused in one line (its network has no NM gate)."""
    model = load_model(path)
    if isinstance(model, OML):
        raise ValueError(f"{path} holds OML's network, which has no NM gate to measure: give ANML checkpoints "
                         f"(train_omni.py's default --arch, pretrain_omni.py's)")
    return model


def first_images(sampler, classes=20, per_class=5):
    """The first `per_class` drawers of the first `classes` evaluation classes: [classes per_class, 1, 28, 28]."""
    return sampler.evaluation[:classes, :per_class].flatten(0, 1)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("models", nargs="+", metavar="MODEL")
    parser.add_argument("--data-root", metavar="DIR")
    args = parser.parse_args(argv)
    models = [gated_model(path) for path in args.models]  # every checkpoint checked before the data loads
    images = first_images(OmniSampler(args.data_root, download=args.data_root is None))
    print(f"{'gate mean':>10} {'> 0.01':>7} {'|features|^2':>13}  model ({len(images)} evaluation images)")
    for path, model in zip(args.models, models):
        mean, open_fraction, norm = gate_statistics(model, images)
        print(f"{mean:10.4f} {open_fraction:7.3f} {norm:13.1f}  {path}")


if __name__ == "__main__":
    run_cli(main)
