"""Several models in one process (`--seeds`), a meta-batch (`--meta-batch`), and torchrun sharing
them out over processes (gloo on the CPU), run as a user runs them."""
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

import plot_results
import train_omni
from model import seeded_network
from conftest import REPO, TINY_FLAGS, assert_ok, run, same_weights, script_env
from harness.results import read_results, reported
from harness.runtime import Ranks

NAME = "4_3_36"
# One process of pytest-xdist runs these one after the other (make test: --dist loadgroup): two
# torchrun jobs at once on two cores starve each other's processes.
pytestmark = pytest.mark.xdist_group("torchrun")


def flags(root, out_dir, epochs, *args):
    return [*TINY_FLAGS, "--epochs", epochs, "-d", "cpu", "--data-root", root, "--no-download", "--out-dir", out_dir,
            *args]


def torchrun(*args, processes=2, restarts=0, script="train_omni.py"):
    """`torchrun --nproc_per_node N {script} ...` on this machine, as a subprocess's command."""
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(processes), "--max-restarts",
            str(restarts), "--master-port", str(free_port()), script, *map(str, args)]


def free_port():
    """A TCP port that nothing listens on now, for torchrun's rendezvous."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def final(out_dir, epochs):
    return torch.load(out_dir / f"{NAME}_ANML-{epochs - 1}.pth")


# Float32 rounding may flip the sign of a gradient that is almost zero (a class the softmax all but
# ignores), and Adam's first steps move such a weight by about the learning rate either way: runs
# that agree up to rounding agree within two steps (tests/test_batched.py proves them equal in float64).
TWO_ADAM_STEPS = 2.1e-3


def assert_equal_up_to_float32(a, b):
    """Stacked models against single runs, in float32: the grouped convolution sums in another order,
    so rounding (1e-7 of a value) separates them, and Adam, which divides each gradient by its running
    scale, turns that into a few 1e-5 on most weights (measured after 12 iterations: the median
    1e-8) and, where a gradient is almost exactly zero and its sign flips, into up to two steps of
    the learning rate on a handful of weights (measured: 4 of 38,584, 1.9e-3). A run given another
    run's draws differs on nearly every weight and by percents in its loss: at most 0.1% of the
    weights beyond a tenth of one Adam step tells the two apart."""
    diffs = torch.cat([(a[k] - b[k]).abs().flatten() for k in a])
    assert diffs.max() < TWO_ADAM_STEPS
    assert (diffs > 1e-4).float().mean() < 1e-3, f"{int((diffs > 1e-4).sum())} of {diffs.numel()} weights differ"


def losses(out_dir):
    return [float(line.split(",")[1]) for line in (out_dir / f"{NAME}_train_log.csv").read_text().splitlines()[1:]]


def max_difference(a, b):
    return max((a[k] - b[k]).abs().max().item() for k in a)


@pytest.fixture(scope="module")
def single_runs(omniglot_root, tmp_path_factory):
    """--seed 3 and --seed 5, 12 iterations each, one process each."""
    out = tmp_path_factory.mktemp("single")
    for seed in (3, 5):
        assert_ok(run("train_omni.py", *flags(omniglot_root, out / f"seed{seed}", 12, "--seed", seed)))
    return out


@pytest.mark.parametrize("order", [(3, 5), (5, 3)])
def test_seeds_in_one_process_write_each_seeds_run(omniglot_root, single_runs, tmp_path, order):
    """--seeds 3 5 and --seeds 5 3: two runs in seed3/ and seed5/, each with a single run's files,
    equal to the single runs after 12 iterations up to float32 rounding (assert_equal_up_to_float32),
    whatever its place in the list; each continues alone, as the single run it is."""
    proc = run("train_omni.py", *flags(omniglot_root, tmp_path, 12, "--seeds", *order))
    assert_ok(proc)
    done = ", ".join(f"{tmp_path}/seed{s}/{NAME}_ANML-11.pth" for s in sorted(order))  # one order, however given
    assert f"done: {done}" in proc.stdout
    for seed in order:
        files = sorted(p.name for p in (tmp_path / f"seed{seed}").iterdir())
        assert files == sorted(p.name for p in (single_runs / f"seed{seed}").iterdir())
        assert_equal_up_to_float32(final(tmp_path / f"seed{seed}", 12), final(single_runs / f"seed{seed}", 12))
        # after a flipped Adam step (above) the later losses differ by up to ~1e-3 of themselves (measured:
        # 5e-4 for seed 7 of --seeds 7 4 5); another run's draws move them by percents
        assert losses(tmp_path / f"seed{seed}") == pytest.approx(losses(single_runs / f"seed{seed}"), rel=2e-3)
    alone = run("train_omni.py", *flags(omniglot_root, tmp_path / "seed5", 14, "--seed", 5, "--resume", "latest"))
    assert_ok(alone)
    assert "done:" in alone.stdout


def test_torchrun_shares_the_seeds_out(omniglot_root, single_runs, tmp_path):
    """Two processes, one seed each: each writes exactly the single run's checkpoints."""
    proc = subprocess.run(torchrun(*flags(omniglot_root, tmp_path, 12, "--seeds", 3, 5)), cwd=REPO,
                          env=script_env(), capture_output=True, text=True, timeout=300)
    assert_ok(proc)
    for seed in (3, 5):
        assert same_weights(final(tmp_path / f"seed{seed}", 12), final(single_runs / f"seed{seed}", 12))


def test_torchrun_meta_batch_equals_one_process(omniglot_root, tmp_path):
    """--meta-batch 4 shared by two processes (two tasks each, gradients all-reduced) takes the step
    one process takes with all four tasks; only process 0 writes files."""
    one, two = tmp_path / "one", tmp_path / "two"
    assert_ok(run("train_omni.py", *flags(omniglot_root, one, 2, "--seed", 2, "--meta-batch", 4)))
    proc = subprocess.run(torchrun(*flags(omniglot_root, two, 2, "--seed", 2, "--meta-batch", 4)), cwd=REPO,
                          env=script_env(), capture_output=True, text=True, timeout=300)
    assert_ok(proc)
    assert "process 1 of 2" in proc.stdout
    start, a, b = seeded_network(4, 3, 36, 2).state_dict(), final(one, 2), final(two, 2)
    assert max_difference(a, start) > 1e-3
    assert max_difference(a, b) < TWO_ADAM_STEPS
    assert losses(one) == pytest.approx(losses(two), rel=1e-5)
    assert sorted(p.name for p in one.iterdir()) == sorted(p.name for p in two.iterdir())


def test_a_killed_process_is_restarted_and_resumes(omniglot_root, single_runs, tmp_path):
    """kill -9 of process 1 mid-run: torchrun (--max-restarts 1) stops process 0 (it saves), restarts
    both, each resumes its seed from its last resumable checkpoint, and the runs end exactly as
    the uninterrupted single runs."""
    epochs = 40
    args = flags(omniglot_root, tmp_path, epochs, "--seeds", 3, 5, "--save-minutes", 0.001)
    proc = subprocess.Popen(torchrun(*args, restarts=1), cwd=REPO, env=script_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        lock = tmp_path / "seed5" / f".{NAME}.lock"
        deadline = time.time() + 120
        while not list((tmp_path / "seed5").glob("*-1[0-9]_resume.pt")) and time.time() < deadline:
            time.sleep(0.05)
        pid = int(lock.read_text())
        os.kill(pid, signal.SIGKILL)
        out, err = proc.communicate(timeout=300)
    finally:  # never leave torchrun or its workers behind
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 0, err[-3000:]
    assert err.count("meta-training ANML") + out.count("meta-training ANML") >= 4  # two processes, twice
    reference = {s: run("train_omni.py", *flags(omniglot_root, tmp_path / f"ref{s}", epochs, "--seed", s))
                 for s in (3, 5)}
    for seed in (3, 5):
        assert_ok(reference[seed])
        assert same_weights(final(tmp_path / f"seed{seed}", epochs), final(tmp_path / f"ref{seed}", epochs))
        iterations = [int(line.split(",")[0]) for line in
                      (tmp_path / f"seed{seed}" / f"{NAME}_train_log.csv").read_text().splitlines()[1:]]
        assert iterations == list(range(epochs))


@pytest.mark.parametrize("world, args, expected", [
    (3, ["--seeds", "1", "2"], r"3 processes for 2 runs \(seeds x rates\)"),
    (3, ["--outer-lr", "0.1", "0.2"], r"3 processes for 2 runs"),
    (2, ["--meta-batch", "3"], r"multiple of 2 \(got 3\)"),
    (2, [], r"multiple of 2 \(got 1\)"),
])
def test_torchrun_process_counts_that_cannot_share_are_refused(world, args, expected, capsys):
    parser = train_omni.argparse.ArgumentParser(prog="train_omni.py")
    config, _ = train_omni.parse_args([*TINY_FLAGS, *args, "-d", "cpu"])
    with pytest.raises(SystemExit) as e:
        train_omni.check_processes(parser, config, Ranks(world=world))
    assert e.value.code == 2
    assert re.search(expected, capsys.readouterr().err)


@pytest.mark.parametrize("args, expected", [
    (["--seeds", "1", "1"], r"--seeds must differ"),
    (["--seeds", "1", "--seed", "2"], r"not allowed with argument"),
    (["--meta-batch", "0"], r"argument --meta-batch"),
    (["--seeds", "1", "2", "--backend", "higher"], r"not on higher"),
])
def test_seed_and_meta_batch_errors_are_one_line(args, expected, capsys):
    with pytest.raises(SystemExit) as e:
        train_omni.parse_args([*TINY_FLAGS, *args, "-d", "cpu"])
    assert e.value.code == 2
    assert re.search(expected, capsys.readouterr().err)


# ----------------------------------------------------------------------------- evaluation


def eval_args(root, models, json_path, *args):
    return ["-m", *models, "-c", 5, 10, "-r", 3, "--lr", 0.001, 0.003, "--selection-runs", 2, "-d", "cpu",
            "--data-root", root, "--no-download", "--json", json_path, *args]


def test_torchrun_shares_the_evaluation_runs_with_identical_results(omniglot_root, single_runs, tmp_path):
    """Two processes meta-test runs 0, 2, 4 and 1, 3; process 0 prints and writes exactly what one
    process does (each run depends on its own seed alone)."""
    model = single_runs / "seed3" / f"{NAME}_ANML-11.pth"
    one = run("eval_omni.py", *eval_args(omniglot_root, [model], tmp_path / "one.json"))
    assert_ok(one)
    two = subprocess.run(torchrun(*eval_args(omniglot_root, [model], tmp_path / "two.json"), script="eval_omni.py"),
                         cwd=REPO, env=script_env(), capture_output=True, text=True, timeout=300)
    assert_ok(two)
    assert two.stdout == one.stdout, (one.stdout, two.stdout, two.stderr[-2000:])
    a, b = (json.loads((tmp_path / f"{n}.json").read_text()) for n in ("one", "two"))
    assert a["rows"] == b["rows"]
    assert len(a["rows"][0]["per_value"][0]["report"]["test"]) == 3


def test_eval_of_several_models_reports_across_them(omniglot_root, single_runs, tmp_path):
    """-m a b: each model on the same runs, then per row the mean of the models' accuracies and their
    std across models; the JSON holds both, results.py reads it and the plot says what its bars are."""
    models = [single_runs / f"seed{s}" / f"{NAME}_ANML-11.pth" for s in (3, 5)]
    proc = run("eval_omni.py", *eval_args(omniglot_root, models, tmp_path / "across.json"))
    assert_ok(proc)
    assert proc.stdout.count("Model ") == 2 and "Across 2 models (chosen lr of each; std across models)" in proc.stdout
    report = read_results(tmp_path / "across.json")
    assert report["across_models"] and report["models"] == [str(m) for m in models]
    for k, (classes, reading) in enumerate(reported(report)):
        means = [r["rows"][k]["chosen_on_selection_runs"]["test_mean"] for r in report["per_model"]]
        assert reading["test"] == means
        assert reading["test_mean"] == pytest.approx(np.mean(means))
        assert reading["test_std"] == pytest.approx(np.std(means))
        line = f"Classes {classes} Accuracy {np.mean(means):.3f} (std {np.std(means):.3f} across models)"
        assert line in proc.stdout
    assert "bars: std across models" in plot_results.bars_note(report)
