"""Shared pytest fixtures: the real Omniglot copy, a per-session cache and a seeded OmniSampler."""
import os
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


@pytest.fixture(scope="session")
def omniglot_root():
    """The Omniglot data root: $OMNIGLOT_ROOT, else ../shared/omniglot beside the repository."""
    root = Path(os.environ.get("OMNIGLOT_ROOT") or REPO.parent / "shared" / "omniglot")
    if not (root / "images_background.zip").is_file() or not (root / "images_evaluation.zip").is_file():
        pytest.fail(f"Omniglot not found in {root}: set OMNIGLOT_ROOT to a folder holding "
                    f"images_background.zip and images_evaluation.zip")
    return root


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
