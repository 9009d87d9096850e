"""Shared pytest fixtures: the real Omniglot copy, a per-session cache and a seeded OmniSampler."""
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def has_zips(root):
    return all((Path(root) / f"{split}.zip").is_file() for split in ("images_background", "images_evaluation"))


def find_omniglot():
    """A folder with the two Omniglot zips, found as the scripts find the data: $OMNIGLOT_ROOT,
    ../shared/omniglot beside the repository, the user cache (~/.cache/higherANML/omniglot); else
    downloaded into the user cache, unless $HIGHERANML_NO_DOWNLOAD is set. Raises DataError."""
    from datasets import DataError, download_omniglot
    from datasets.omniglot import resolve_data_root
    user_cache = resolve_data_root(None) if not os.environ.get("OMNIGLOT_ROOT") else None
    candidates = [os.environ.get("OMNIGLOT_ROOT"), REPO.parent / "shared" / "omniglot", user_cache]
    for root in filter(None, candidates):
        if has_zips(root):
            return Path(root)
    if os.environ.get("HIGHERANML_NO_DOWNLOAD"):
        raise DataError("HIGHERANML_NO_DOWNLOAD is set")
    if user_cache is None:
        raise DataError(f"OMNIGLOT_ROOT={os.environ['OMNIGLOT_ROOT']} does not hold the two zips")
    download_omniglot(user_cache)
    return user_cache


@pytest.fixture(scope="session")
def omniglot_root():
    """The Omniglot data root of the whole session; without data the session stops with one message."""
    from datasets import DataError
    try:
        return find_omniglot()
    except DataError as e:
        pytest.exit(f"The tests need Omniglot and none could be found or downloaded ({e}). Put "
                    f"images_background.zip and images_evaluation.zip in a folder and set OMNIGLOT_ROOT to it.",
                    returncode=4)


@pytest.fixture(scope="session", autouse=True)
def cache_dir(tmp_path_factory):
    """A fresh preprocessing cache for the session, also exported as $HIGHERANML_CACHE for subprocesses."""
    path = tmp_path_factory.mktemp("higheranml_cache")
    old = os.environ.get("HIGHERANML_CACHE")
    os.environ["HIGHERANML_CACHE"] = str(path)
    yield path
    if old is None:
        os.environ.pop("HIGHERANML_CACHE", None)
    else:
        os.environ["HIGHERANML_CACHE"] = old


@pytest.fixture(scope="session")
def sampler(omniglot_root, cache_dir):
    """OmniSampler(seed=0) on the real data; the one-time preprocessing is paid once per session."""
    from datasets import OmniSampler
    return OmniSampler(omniglot_root, seed=0, cache_dir=cache_dir)


INNER_LR = 0.1


def flat(model):
    """Every parameter of `model`, detached, in one vector."""
    return torch.cat([p.detach().flatten() for p in model.parameters()])


@pytest.fixture(scope="session")
def small_checkpoint(sampler, tmp_path_factory):
    """A small ANML meta-trained for a few iterations on real data (fast backend)."""
    import anml
    from checkpoints import save_atomic
    from model import ANML
    torch.manual_seed(0)
    model = ANML(8, 4, 72)
    inner_opt, outer_opt = anml.make_optimizers(model, INNER_LR, 1e-3)
    sampler.rng = np.random.default_rng(0)
    for _ in range(10):
        train_data, cls, (valid_ims, valid_labels) = sampler.sample_train()
        anml.meta_step(model, inner_opt, outer_opt, train_data, cls, valid_ims, valid_labels, "func")
    path = tmp_path_factory.mktemp("ckpt") / "8_4_72_ANML-9.pth"
    save_atomic(model.state_dict(), path)
    return path




def script_env(**extra):
    """The environment of a script run by a test: one thread (tiny nets gain nothing from two, and two
    threads per process on 2 shared cores stall)."""
    return {**os.environ, "OMP_NUM_THREADS": "1", **extra}


def command(script, *args):
    return [sys.executable, script, *map(str, args)]


def run(script, *args, env=None):
    """Run one of the project's scripts as a user would, from the repository's root."""
    return subprocess.run(command(script, *args), cwd=REPO, env=env or script_env(),
                          capture_output=True, text=True, timeout=600)
