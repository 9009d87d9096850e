"""Shared pytest fixtures: the real Omniglot copy, a per-session cache, a seeded OmniSampler, small
checkpoints, and running the project's scripts as a user does.

Without Omniglot the tests that need it are skipped, every other test runs, and the session fails at
the end with one message saying how to provide the data."""
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
torch.set_num_threads(1)  # tiny networks gain nothing from more, and idle threads spin on a shared machine

INNER_LR = 0.1
TINY = dict(rln=4, nm=3, mask=36)  # the smallest ANML: a meta-iteration in milliseconds
TINY_FLAGS = ["--rln", "4", "--nm", "3", "--mask", "36"]
MISSING_DATA = []  # why Omniglot could not be found, for each test skipped for want of it


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
        raise DataError("HIGHERANML_NO_DOWNLOAD is set, so nothing was downloaded")
    if user_cache is None:
        raise DataError(f"OMNIGLOT_ROOT={os.environ['OMNIGLOT_ROOT']} does not hold the two zips")
    download_omniglot(user_cache)
    return user_cache


@pytest.fixture(scope="session")
def omniglot_root():
    """The Omniglot data root of the whole session. Without data the test is skipped with the reason,
    and the session fails at its end with one message (pytest_terminal_summary)."""
    from datasets import DataError
    try:
        return find_omniglot()
    except DataError as e:
        pytest.skip(f"{NEEDS_OMNIGLOT}{e}")


NEEDS_OMNIGLOT = "needs Omniglot: "


def session_cache(yours=None):
    """A new cache folder for the session, so that nothing the tests do (a data root they remember,
    say) reaches a cache of yours; the preprocessed arrays of `yours` ($HIGHERANML_CACHE), if any,
    are linked into it, not decoded again."""
    import tempfile
    folder = Path(tempfile.mkdtemp(prefix="higheranml_cache_"))
    for arrays in Path(yours).glob("omniglot-*.npz") if yours else ():
        try:
            os.link(arrays, folder / arrays.name)
        except OSError:  # another file system: decoded again
            pass
    return str(folder)


def pytest_configure(config):
    """Before the tests (and the workers of pytest -n): one preprocessing cache for the session,
    filled once here, so that parallel workers do not each decode Omniglot."""
    config.addinivalue_line("markers", "slow: an end-to-end run of a script's many processes (make gpu-check runs "
                                       "it; make test leaves it out)")
    if hasattr(config, "workerinput"):
        return
    os.environ["HIGHERANML_CACHE"] = session_cache(os.environ.get("HIGHERANML_CACHE"))
    from datasets import DataError, load_omniglot
    try:
        load_omniglot(find_omniglot(), download=False)
    except DataError:
        pass  # the tests that need the data say so


def pytest_collection_modifyitems(items):
    """The torchrun tests first: they run one after the other in one process of pytest -n 2 (their
    xdist_group, about a minute and a half), so that the other process takes the rest meanwhile
    instead of waiting for them at the end."""
    grouped = lambda item: any(mark.args == ("torchrun",) for mark in item.iter_markers("xdist_group"))
    items.sort(key=lambda item: not grouped(item))  # stable: each part keeps its order


def pytest_runtest_logreport(report):
    if report.skipped and isinstance(report.longrepr, tuple) and NEEDS_OMNIGLOT in str(report.longrepr[2]):
        MISSING_DATA.append(str(report.longrepr[2]).split(NEEDS_OMNIGLOT, 1)[1])


def pytest_sessionfinish(session, exitstatus):
    if MISSING_DATA and exitstatus in (0, 5):
        session.exitstatus = 4


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    if MISSING_DATA:
        terminalreporter.write_line(
            f"FAILED: {len(MISSING_DATA)} tests need Omniglot and were skipped ({MISSING_DATA[0]}). Put "
            f"images_background.zip and images_evaluation.zip in a folder DIR and run again with OMNIGLOT_ROOT=DIR "
            f"(make test OMNIGLOT_ROOT=DIR).", red=True)


@pytest.fixture(scope="session", autouse=True)
def cache_dir():
    """The preprocessing cache of the session ($HIGHERANML_CACHE, which pytest_configure sets when it
    is not set), where the scripts the tests run find it too."""
    return Path(os.environ["HIGHERANML_CACHE"])


@pytest.fixture(scope="session")
def sampler(omniglot_root, cache_dir):
    """OmniSampler(seed=0) on the real data; the one-time preprocessing is paid once per session."""
    from datasets import OmniSampler
    return OmniSampler(omniglot_root, seed=0, cache_dir=cache_dir)


def flat(model):
    """Every parameter of `model`, detached, in one vector."""
    return torch.cat([p.detach().flatten() for p in model.parameters()])


def weights(path):
    """A checkpoint's tensors (a bare state_dict, or the model of a resumable one)."""
    state = torch.load(path, weights_only=True)
    return state["model"] if isinstance(state.get("model"), dict) else state


def same_weights(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture(scope="session")
def small_checkpoint(sampler, tmp_path_factory):
    """A small ANML meta-trained for a few iterations on real data (func backend)."""
    import anml
    from harness.checkpoints import save_atomic
    from model import ANML
    torch.manual_seed(0)
    model = ANML(8, 4, 72)
    outer_opt = anml.outer_optimizer(model, 1e-3)
    sampler.rng = np.random.default_rng(0)
    for _ in range(10):
        train_data, cls, (valid_ims, valid_labels) = sampler.sample_train()
        anml.meta_step(model, outer_opt, train_data, cls, valid_ims, valid_labels, INNER_LR, "func")
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


def error_lines(stderr):
    return [line for line in stderr.splitlines() if re.match(r"(\S+\.py: )?error: ", line)]


def assert_one_error(stderr, expected):
    """Exactly one `error:` line, no traceback, and the line matches `expected` (a regular expression)."""
    assert "Traceback" not in stderr, stderr
    errors = error_lines(stderr)
    assert len(errors) == 1 and re.search(expected, errors[0]), stderr
    return errors[0]


def assert_ok(proc):
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr


def synthetic_feature_runs(n_runs=2, n_classes=6, dim=5, seed=0, class_scales=False):
    """Features [C, 20, D] of overlapping Gaussian classes (so that some images are misclassified), with
    their own scales per dimension if `class_scales`, a stand-in for FeatureBank, and runs of all the
    classes in random orders with random splits: (the features by numpy, FeatureBank's stand-in, runs)."""
    from fastpath.frozen_features import MetaTestRun
    rng = np.random.default_rng(seed)
    scales = rng.uniform(0.3, 2.0, size=(n_classes, 1, dim)) if class_scales else 1.0
    bank = torch.as_tensor(rng.normal(size=(n_classes, 1, dim)) + 1.5 * scales * rng.normal(size=(n_classes, 20, dim)))
    features = lambda classes: bank[torch.as_tensor(np.asarray(classes))]
    runs = []
    for _ in range(n_runs):
        drawers = np.stack([rng.permutation(20) for _ in range(n_classes)])
        runs.append(MetaTestRun(rng.permutation(n_classes), drawers[:, :15], drawers[:, 15:]))
    return bank.numpy(), features, runs
