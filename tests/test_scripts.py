"""End-to-end tests of train_omni.py and eval_omni.py: real subprocesses on the shared Omniglot copy.

Tiny networks (RLN 4, NM 3, mask 36) and few classes keep this file fast; the Omniglot preprocessing
is paid once, through $HIGHERANML_CACHE (set by conftest's session `cache_dir` fixture)."""
import hashlib
import json
import re
import shutil
import signal
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import matplotlib.pyplot as plt
import numpy as np
import pytest
import torch

from checkpoints import newest_resumable, read_training_state
from conftest import REPO, command, run, script_env
from model import ANML

TINY = ["--rln", "4", "--nm", "3", "--mask", "36"]
NUMBER = r"(\d+\.\d\d)"
ACCURACY = rf"Classes (\d+) Accuracy {NUMBER} \(std {NUMBER}\)"
TRAIN_ACCURACY = rf"Classes (\d+) Train accuracy {NUMBER} \(std {NUMBER}\)"


def train(root, out_dir, *args):
    return run("train_omni.py", *TINY, "--epochs", 3, "-d", "cpu", "--data-root", root, "--out-dir", out_dir, *args)


def evaluate(root, model, *args):
    return run("eval_omni.py", "-m", model, "-d", "cpu", "--data-root", root, *args)


def load_checkpoint(path):
    model = ANML(4, 3, 36)
    model.load_state_dict(torch.load(path, weights_only=True), strict=True)
    return model.state_dict()


def assert_ok(proc):
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr


# ----------------------------------------------------------------------------- train_omni.py

@pytest.fixture(scope="module")
def trained(tmp_path_factory, omniglot_root):
    """(process, out_dir) of a tiny 3-iteration meta-training with --seed 1 (the default backend)."""
    out = tmp_path_factory.mktemp("anml_seed1")
    return train(omniglot_root, out, "--seed", 1), out


@pytest.fixture(scope="module")
def checkpoint(trained):
    return trained[1] / "4_3_36_ANML-2.pth"


def test_train_writes_loadable_checkpoints(trained):
    proc, out = trained
    assert_ok(proc)
    assert re.search(r"^meta-training ANML 4_3_36 for 3 its on cpu", proc.stdout, re.M)
    assert re.search(r"^0: \d+\.\d{3} \| [01]\.\d{3} \(\d+\.\d+s\)$", proc.stdout, re.M), proc.stdout
    assert "done: " in proc.stdout
    checkpoints = sorted(p.name for p in out.glob("*.pth"))
    assert checkpoints == ["4_3_36_ANML-0.pth", "4_3_36_ANML-2.pth"]
    for name in checkpoints:
        load_checkpoint(out / name)


def test_same_seed_same_checkpoints(trained, omniglot_root, tmp_path):
    assert_ok(train(omniglot_root, tmp_path / "again", "--seed", 1))
    assert_ok(train(omniglot_root, tmp_path / "other", "--seed", 2))
    for name in ("4_3_36_ANML-0.pth", "4_3_36_ANML-2.pth"):
        first, second = load_checkpoint(trained[1] / name), load_checkpoint(tmp_path / "again" / name)
        assert all(torch.equal(first[k], second[k]) for k in first), name
        different = load_checkpoint(tmp_path / "other" / name)
        assert not all(torch.equal(first[k], different[k]) for k in first), name


def test_higher_backend_agrees(trained, omniglot_root, tmp_path):
    proc = train(omniglot_root, tmp_path, "--seed", 1, "--backend", "higher")
    assert_ok(proc)
    assert "backend higher" in proc.stdout
    for name in ("4_3_36_ANML-0.pth", "4_3_36_ANML-2.pth"):
        ref, seed_style = load_checkpoint(trained[1] / name), load_checkpoint(tmp_path / name)
        # Conv biases feeding an InstanceNorm get an exactly-zero gradient from 'func' but float noise from
        # 'higher', which Adam scales up to ~lr-sized steps (harmless: they do not change the output).
        for k in ref:
            if not k.endswith("conv.bias"):
                torch.testing.assert_close(seed_style[k], ref[k], atol=5e-4, rtol=0, msg=k)


def test_time_limit_then_resume_equals_one_run(trained, omniglot_root, tmp_path):
    stopped = train(omniglot_root, tmp_path, "--seed", 1, "--time-limit", 1e-3)  # stops after iteration 0
    assert_ok(stopped)
    assert "time limit reached" in stopped.stdout and not (tmp_path / "4_3_36_ANML-2.pth").exists()
    resumed = train(omniglot_root, tmp_path, "--seed", 1, "--resume", "latest")
    assert_ok(resumed)
    first, second = load_checkpoint(trained[1] / "4_3_36_ANML-2.pth"), load_checkpoint(tmp_path / "4_3_36_ANML-2.pth")
    assert all(torch.equal(first[k], second[k]) for k in first)


def test_ctrl_c_exits_130_without_traceback(omniglot_root, tmp_path):
    # As from a terminal: SIGINT handled by default even where pytest itself runs in the background
    # of a non-interactive shell (which starts its children with SIGINT ignored).
    proc = subprocess.Popen(command("train_omni.py", *TINY, "--epochs", 100000, "-d", "cpu",
                                    "--data-root", omniglot_root, "--out-dir", tmp_path),
                            cwd=REPO, env=script_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    assert proc.stdout.readline().startswith("meta-training")  # inside the script's error handling now
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130 and "interrupted" in err and "Traceback" not in err, err


# ----------------------------------------------------------------------------- eval_omni.py

def accuracies(line, pattern, classes):
    match = re.fullmatch(pattern, line)
    assert match, line
    assert int(match[1]) == classes
    mean, std = float(match[2]), float(match[3])
    assert 0 <= mean <= 1 and 0 <= std <= 1
    return mean, std


@pytest.fixture(scope="module")
def one_lr(omniglot_root, checkpoint):
    return evaluate(omniglot_root, checkpoint, "-c", 5, "-r", 2)


def test_eval_prints_the_seeds_two_lines(one_lr):
    assert_ok(one_lr)
    lines = one_lr.stdout.splitlines()
    assert len(lines) == 2, one_lr.stdout
    accuracies(lines[0], ACCURACY, 5)
    accuracies(lines[1], TRAIN_ACCURACY, 5)


def test_eval_lr_sweep_and_json(one_lr, omniglot_root, checkpoint, tmp_path):
    out = tmp_path / "sub" / "results.json"
    proc = evaluate(omniglot_root, checkpoint, "-c", 5, "-r", 2, "--lr", 0.001, 0.0005, "--json", out)
    assert_ok(proc)
    lines = proc.stdout.splitlines()
    assert len(lines) == 5, proc.stdout
    means = {}
    for i, lr in enumerate(["0.001", "0.0005"]):
        means[lr] = accuracies(lines[2 * i].removesuffix(f" lr {lr}"), ACCURACY, 5)
        accuracies(lines[2 * i + 1].removesuffix(f" lr {lr}"), TRAIN_ACCURACY, 5)
    # Run r draws the same classes and initialisation for every lr: the first lr repeats the one-lr run.
    assert lines[:2] == [f"{line} lr 0.001" for line in one_lr.stdout.splitlines()]
    best = re.fullmatch(rf"Best lr (\S+): {ACCURACY}", lines[4])
    assert best and best[1] in means and int(best[2]) == 5, lines[4]

    report = json.loads(out.read_text())
    assert report["model_sha256"] == hashlib.sha256(checkpoint.read_bytes()).hexdigest()
    assert (report["classes"], report["runs"], report["seed"], report["device"]) == ([5], 2, 0, "cpu")
    assert report["report_run_seeds"] == [[0, 0], [0, 1]] and report["selection_run_seeds"] == []
    assert "eval_omni.py" in report["command"] and "--json" in report["command"]
    (row,) = report["rows"]
    assert [r["lr"] for r in row["per_lr"]] == [0.001, 0.0005]
    for r in row["per_lr"]:
        assert r["selection"] is None
        r = r["report"]
        assert len(r["test"]) == len(r["train"]) == 2
        assert all(0 <= a <= 1 for a in r["test"] + r["train"])
        assert r["test_mean"] == pytest.approx(np.mean(r["test"]))
    best_mean = max(np.mean(r["report"]["test"]) for r in row["per_lr"])
    assert float(best[3]) == pytest.approx(best_mean, abs=0.005)
    assert row["best_on_reported_runs"]["test_mean"] == best_mean
    assert row["chosen_on_selection_runs"] is None and row["fixed_lr"] is None


def test_eval_chooses_rates_on_selection_runs(omniglot_root, checkpoint, tmp_path):
    """Several class counts and selection runs: each row's rate is the best on the selection runs,
    the reported numbers come from the other runs, and each row equals a run with that count alone."""
    out = tmp_path / "table.json"
    lrs = [0.03, 0.01, 0.003]
    proc = evaluate(omniglot_root, checkpoint, "-c", 6, 2, "-r", 2, "--selection-runs", 2, "-l", *lrs, "--json", out)
    assert_ok(proc)
    report = json.loads(out.read_text())
    assert report["classes"] == [2, 6] and report["selection_run_seeds"] == [[0, 0, 1], [0, 1, 1]]
    for row in report["rows"]:
        selection_means = [r["selection"]["test_mean"] for r in row["per_lr"]]
        chosen = row["chosen_on_selection_runs"]
        assert chosen["lr"] == lrs[int(np.argmax(selection_means))]
        assert chosen["test"] == row["per_lr"][lrs.index(chosen["lr"])]["report"]["test"]
        assert row["fixed_lr"]["lr"] == report["fixed_lr"]
    fixed_means = [np.mean([row["per_lr"][l]["selection"]["test_mean"] for row in report["rows"]]) for l in range(3)]
    assert report["fixed_lr"] == lrs[int(np.argmax(fixed_means))]
    assert proc.stdout.count("Chosen lr") == 2 and "rates chosen on 2 other runs" in proc.stdout
    alone = evaluate(omniglot_root, checkpoint, "-c", 2, "-r", 2, "-l", *lrs)
    assert_ok(alone)
    assert [l for l in alone.stdout.splitlines() if l.startswith("Classes")] == \
        [l for l in proc.stdout.splitlines() if l.startswith("Classes 2 ")]


def test_plot_results_draws_both_pictures(omniglot_root, trained, tmp_path):
    """plot_results.py on a real (small) eval_omni.py --json file and a real training log."""
    out = tmp_path / "table.json"
    assert_ok(evaluate(omniglot_root, trained[1] / "4_3_36_ANML-2.pth", "-c", 2, 3, "-r", 2,
                       "--selection-runs", 1, "-l", 0.03, 0.01, "--json", out))
    proc = run("plot_results.py", "--results", out, "--log", trained[1] / "4_3_36_train_log.csv",
               "--out-dir", tmp_path / "figures", "--smooth", 2)
    assert_ok(proc)
    for name in ("evaluation_results.png", "training_curve.png"):
        image = plt.imread(tmp_path / "figures" / name)
        assert image.shape[0] > 300 and image.shape[1] > 600 and image.std() > 0.01  # drawn, not blank
    missing = run("plot_results.py", "--results", tmp_path / "none.json")
    assert missing.returncode == 2 and missing.stderr.strip().splitlines() == [
        f"error: results file not found: {tmp_path / 'none.json'} (make it with eval_omni.py --json)"]


def test_seed_loop_matches_fast_path(omniglot_root, checkpoint, tmp_path):
    """The seed's full-network loop and the frozen-feature path give the same accuracies (lr large
    enough that the tiny net learns something, so the comparison is not 0 == 0)."""
    reports = []
    for flags in ([], ["--seed-loop"]):
        out = tmp_path / f"{len(flags)}.json"
        proc = evaluate(omniglot_root, checkpoint, "-c", 3, "-r", 2, "-l", 0.03, "--seed", 7, "--json", out, *flags)
        assert_ok(proc)
        reports.append(json.loads(out.read_text()))
    fast, loop = (r["rows"][0]["per_lr"][0]["report"] for r in reports)
    assert [r["fast"] for r in reports] == [True, False]
    assert max(fast["test"]) > 0
    np.testing.assert_allclose(loop["test"], fast["test"], atol=1e-6)
    np.testing.assert_allclose(loop["train"], fast["train"], atol=1e-6)


# ----------------------------------------------------------------------------- bad input

NO_CUDA = torch.cuda.is_available()  # the "-d cuda without CUDA" cases only make sense without it
# Cheap argument errors also get an empty data root: they must be reported before any data is read.
CHEAP = ["--data-root", "{empty}", "--no-download"]
NOT_READ = ["-m", "{tmp}/missing.pth"]  # a model path the cheap cases must not get as far as reading
BAD_INPUTS = {  # id: (script, argv, text expected on stderr, skip)
    "model-missing": ("eval_omni.py", NOT_READ, "model file not found", False),
    "model-not-a-checkpoint": ("eval_omni.py", ["-m", "{text}"], "not a PyTorch checkpoint", False),
    "model-wrong-shapes": ("eval_omni.py", ["-m", "{reshaped}"], "does not fit the ANML architecture", False),
    "model-missing-keys": ("eval_omni.py", ["-m", "{missing_keys}"], "does not fit the ANML architecture", False),
    "classes-0": ("eval_omni.py", [*NOT_READ, "-c", "0", *CHEAP], "--classes must be in 1..659", False),
    "classes-660": ("eval_omni.py", [*NOT_READ, "-c", "660", *CHEAP], "--classes must be in 1..659", False),
    "train-examples-0": ("eval_omni.py", [*NOT_READ, "-t", "0", *CHEAP], "--train-examples must be in 1..19", False),
    "train-examples-20": ("eval_omni.py", [*NOT_READ, "-t", "20", *CHEAP], "--train-examples must be in 1..19", False),
    "eval-lr-0": ("eval_omni.py", [*NOT_READ, "-l", "0.001", "0", *CHEAP], "argument -l/--lr", False),
    "eval-lr-negative": ("eval_omni.py", [*NOT_READ, "-l", "-0.001", *CHEAP], "argument -l/--lr", False),
    "runs-0": ("eval_omni.py", [*NOT_READ, "-r", "0", *CHEAP], "argument -r/--runs", False),
    "selection-one-lr": ("eval_omni.py", [*NOT_READ, "--selection-runs", "3", *CHEAP], "give several with --lr", False),
    "classes-one-bad": ("eval_omni.py", [*NOT_READ, "-c", "10", "700", *CHEAP], "--classes must be in 1..659", False),
    "eval-cuda": ("eval_omni.py", [*NOT_READ, "-d", "cuda", *CHEAP], "CUDA is not available", NO_CUDA),
    "eval-no-data": ("eval_omni.py", ["-m", "{model}", *CHEAP], "Omniglot not found in", False),
    "eval-corrupt-zip": ("eval_omni.py", ["-m", "{model}", "--data-root", "{corrupt}"], "not a readable zip", False),
    "mask-not-9x-rln": ("train_omni.py", [*TINY[:4], "--mask", "35", *CHEAP], "--mask must be 36", False),
    "epochs-0": ("train_omni.py", ["--epochs", "0", *CHEAP], "argument --epochs", False),
    "inner-lr-0": ("train_omni.py", ["--inner-lr", "0", *CHEAP], "argument --inner-lr", False),
    "outer-lr-negative": ("train_omni.py", ["--outer-lr", "-1e-3", *CHEAP], "argument --outer-lr", False),
    "train-cuda": ("train_omni.py", ["-d", "cuda", *CHEAP], "CUDA is not available", NO_CUDA),
    "train-no-data": ("train_omni.py", [*TINY, *CHEAP], "Omniglot not found in", False),
    "time-limit-0": ("train_omni.py", ["--time-limit", "0", *CHEAP], "argument --time-limit", False),
    "resume-nothing": ("train_omni.py", [*TINY, "--data-root", "{omniglot}", "--out-dir", "{tmp}/no_run",
                                         "--resume", "latest"], "--resume latest: no", False),
    "train-corrupt-zip": ("train_omni.py", [*TINY, "--data-root", "{corrupt}"], "not a readable zip", False),
    # issue 9: output paths are checked before any data is read (the data root here is empty)
    "json-is-a-folder": ("eval_omni.py", ["-m", "{model}", "--json", "{tmp}", *CHEAP], "is a folder", False),
    "json-in-proc": ("eval_omni.py", ["-m", "{model}", "--json", "/proc/anml.json", *CHEAP],
                     "cannot write --json /proc/anml.json", False),
    "out-dir-is-a-file": ("train_omni.py", [*TINY, "--out-dir", "{text}", *CHEAP], "is not a folder", False),
    "out-dir-in-proc": ("train_omni.py", [*TINY, "--out-dir", "/proc/anml", *CHEAP], "cannot write to --out-dir",
                        False),
    "save-minutes-0": ("train_omni.py", ["--save-minutes", "0", *CHEAP], "argument --save-minutes", False),
    "model-nan": ("eval_omni.py", ["-m", "{nan}"], "holds non-finite weights", False),
    "failed-download": ("train_omni.py", [*TINY, "--data-root", "{tmp}/download"], "could not download", False),
    # issue 10: the meta-test methods' own flags
    "lr-with-lstsq": ("eval_omni.py", [*NOT_READ, "--method", "lstsq", "-l", "0.01", *CHEAP], "takes --ridge", False),
    "ridge-with-seq": ("eval_omni.py", [*NOT_READ, "--ridge", "1", *CHEAP], "--ridge is for --method lstsq", False),
    "ridge-0": ("eval_omni.py", [*NOT_READ, "--method", "lstsq", "--ridge", "0", *CHEAP], "argument --ridge", False),
    "epochs-iid-with-seq": ("eval_omni.py", [*NOT_READ, "--epochs-iid", "2", *CHEAP], "--epochs-iid is for --method iid", False),
    "epochs-iid-0": ("eval_omni.py", [*NOT_READ, "--method", "iid", "--epochs-iid", "0", *CHEAP], "argument --epochs-iid", False),
    "seed-loop-iid": ("eval_omni.py", [*NOT_READ, "--method", "iid", "--seed-loop", *CHEAP], "only runs --method seq", False),
    "method-unknown": ("eval_omni.py", [*NOT_READ, "--method", "knn", *CHEAP], "argument --method", False),
    "first-order-higher": ("train_omni.py", [*TINY, "--first-order", "--backend", "higher", *CHEAP], "not by higher", False),
    "pretrain-batch-0": ("pretrain_omni.py", ["--batch-size", "0", *CHEAP], "argument --batch-size", False),
    "pretrain-mask": ("pretrain_omni.py", [*TINY[:4], "--mask", "35", *CHEAP], "--mask must be 36", False),
    "pretrain-lr-0": ("pretrain_omni.py", ["--lr", "0", *CHEAP], "argument --lr", False),
    "pretrain-no-data": ("pretrain_omni.py", [*TINY, *CHEAP], "Omniglot not found in", False),
    "pretrain-resume-nothing": ("pretrain_omni.py", [*TINY, "--data-root", "{omniglot}", "--out-dir", "{tmp}/no_pre",
                                                     "--resume", "latest"], "--resume latest: no 4_3_36_pretrain", False),
    "selection-one-ridge": ("eval_omni.py", [*NOT_READ, "--method", "lstsq", "--selection-runs", "2", *CHEAP],
                            "give several with --ridge", False),
}


def bad_input_files(tmp, omniglot_root):
    """The files the cases name: a text file, two broken state_dicts, a valid tiny one, an empty
    data root and one whose background zip is truncated."""
    (tmp / "empty").mkdir()
    (tmp / "corrupt").mkdir()
    data = (omniglot_root / "images_background.zip").read_bytes()
    (tmp / "corrupt" / "images_background.zip").write_bytes(data[:len(data) // 2])
    shutil.copy(omniglot_root / "images_evaluation.zip", tmp / "corrupt")
    (tmp / "text.pth").write_text("not a checkpoint\n")
    torch.save(ANML(4, 3, 36).state_dict(), tmp / "model.pth")
    reshaped = ANML(8, 3, 72).state_dict()
    reshaped["fc.weight"] = reshaped["fc.weight"].reshape(2000, 36)
    torch.save(reshaped, tmp / "reshaped.pth")
    missing_keys = ANML(4, 3, 36).state_dict()
    del missing_keys["nm.fc.bias"]
    torch.save(missing_keys, tmp / "missing_keys.pth")
    nan = ANML(4, 3, 36).state_dict()
    nan["rln.convBlock1.conv.weight"][0] = float("nan")
    torch.save(nan, tmp / "nan.pth")
    files = {name: tmp / f"{name}.pth" for name in ("text", "model", "reshaped", "missing_keys", "nan")}
    return {"tmp": tmp, "omniglot": omniglot_root, "empty": tmp / "empty", "corrupt": tmp / "corrupt", **files}


@pytest.fixture(scope="module")
def bad_runs(tmp_path_factory, omniglot_root):
    """Every bad-input case run once, two processes at a time (each mostly pays ~2 s of imports)."""
    files = bad_input_files(tmp_path_factory.mktemp("bad_input"), omniglot_root)
    # Nothing listens on port 9 of localhost: the download fails at once, without the network.
    env = script_env(OMNIGLOT_BASE_URL="http://127.0.0.1:9")

    def run_case(case):
        script, argv, _, _ = case
        return run(script, *[a.format(**files) for a in argv], env=env)

    cases = {k: c for k, c in BAD_INPUTS.items() if not c[3]}
    with ThreadPoolExecutor(max_workers=2) as pool:
        return dict(zip(cases, pool.map(run_case, cases.values())))


@pytest.mark.parametrize("case", [pytest.param(k, marks=pytest.mark.skipif(c[3], reason="CUDA is available"))
                                  for k, c in BAD_INPUTS.items()])
def test_bad_input_is_one_clear_error(bad_runs, case):
    proc, expected = bad_runs[case], BAD_INPUTS[case][2]
    assert proc.returncode == 2, (proc.returncode, proc.stderr)
    assert "Traceback" not in proc.stderr, proc.stderr
    errors = [line for line in proc.stderr.splitlines() if re.match(r"(\S+\.py: )?error: ", line)]
    assert len(errors) == 1 and expected in errors[0], proc.stderr  # one line says what is wrong


# ----------------------------------------------------------------------------- issue 9: never lose or mix a run

def assert_one_error(proc, expected):
    """Exit 2, no traceback, and exactly one `error:` line, which says `expected`."""
    assert proc.returncode == 2, (proc.returncode, proc.stderr)
    assert "Traceback" not in proc.stderr, proc.stderr
    errors = [line for line in proc.stderr.splitlines() if re.match(r"(\S+\.py: )?error: ", line)]
    assert len(errors) == 1 and re.search(expected, errors[0]), proc.stderr
    return errors[0]


def test_a_second_run_in_the_folder_is_refused_while_the_first_runs(omniglot_root, tmp_path):
    """Case 1: run A holds the folder; run B (another seed) gets one error line naming A's pid, and
    after A is stopped, B still may not start over A's unfinished run."""
    first = subprocess.Popen(command("train_omni.py", *TINY, "--epochs", 100000, "-d", "cpu", "--seed", 7,
                                     "--data-root", omniglot_root, "--out-dir", tmp_path),
                             cwd=REPO, env=script_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert first.stdout.readline().startswith("meta-training")  # the lock is held from before this line
        second = train(omniglot_root, tmp_path, "--seed", 8)
        assert_one_error(second, rf"in use by another run of 4_3_36 \(pid {first.pid}, lock ")
    finally:
        first.send_signal(signal.SIGTERM)
        _, err = first.communicate(timeout=120)
    assert first.returncode == 130, err
    log = (tmp_path / "4_3_36_train_log.csv").read_text()
    assert_one_error(train(omniglot_root, tmp_path, "--seed", 8), "already holds a run of 4_3_36 .*--seed 7")
    assert (tmp_path / "4_3_36_train_log.csv").read_text() == log and not (tmp_path / ".4_3_36.lock").exists()


def test_resume_with_other_flags_or_fewer_epochs_is_refused(trained, omniglot_root, tmp_path):
    """Cases 4 and 5, as the script reports them: one line, exit 2, nothing written."""
    shutil.copytree(trained[1], tmp_path, dirs_exist_ok=True)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    error = assert_one_error(train(omniglot_root, tmp_path, "--resume", "latest", "--seed", 99, "--outer-lr", 0.5),
                             r"was trained with --outer-lr 0.001 --seed 1, not --outer-lr 0.5 --seed 99")
    assert "another --out-dir" in error
    assert_one_error(run("train_omni.py", *TINY, "--epochs", 2, "-d", "cpu", "--data-root", omniglot_root,
                         "--out-dir", tmp_path, "--resume", "latest"), r"more than --epochs 2: nothing to train")
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before


def test_a_diverging_run_is_an_error(omniglot_root, tmp_path):
    """Case 3: --outer-lr 1e9 ends with one error line and exit 2, not "done"; nothing saved holds NaN."""
    proc = run("train_omni.py", *TINY, "--epochs", 30, "-d", "cpu", "--data-root", omniglot_root,
               "--out-dir", tmp_path, "--outer-lr", 1e9)
    assert_one_error(proc, r"training diverged: .* the last good resumable checkpoint is .*_resume.pt")
    assert "done" not in proc.stdout
    for path in tmp_path.glob("*.pth"):
        assert_ok(evaluate(omniglot_root, path, "-c", 2, "-r", 1))  # eval_omni refuses NaN (BAD_INPUTS)


@pytest.fixture
def small_disk(tmp_path):
    """A 900 KiB tmpfs (root only; skipped where it cannot be mounted): room for one tiny run's
    first checkpoints, not for a second resumable checkpoint beside the first."""
    disk = tmp_path / "disk"
    disk.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=900k", "tmpfs", disk], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here (needs root)")
    try:
        yield disk
    finally:
        subprocess.run(["umount", disk], check=True)


def test_a_full_disk_is_one_error_and_the_run_resumes(trained, omniglot_root, small_disk):
    """Case 2 on a real full disk: one error line, exit 2, the last good resumable checkpoint kept,
    no temporary file left; with room again, --resume latest ends where a straight run does."""
    proc = train(omniglot_root, small_disk, "--seed", 1)
    assert_one_error(proc, r"could not write .*4_3_36_ANML-2_resume.pt: .*; the last good resumable checkpoint "
                           r"is .*4_3_36_ANML-0_resume.pt: free some space")
    assert sorted(p.name for p in small_disk.glob("*_resume.pt")) == ["4_3_36_ANML-0_resume.pt"]
    assert not list(small_disk.glob(".*.tmp"))
    subprocess.run(["mount", "-o", "remount,size=4m", small_disk], check=True)
    assert_ok(train(omniglot_root, small_disk, "--seed", 1, "--resume", "latest"))
    straight = load_checkpoint(trained[1] / "4_3_36_ANML-2.pth")
    resumed = load_checkpoint(small_disk / "4_3_36_ANML-2.pth")
    assert all(torch.equal(straight[k], resumed[k]) for k in straight)


# ----------------------------------------------------------------------------- eval_omni.py --method (issue 10)

def test_eval_methods_share_runs_and_layout(omniglot_root, checkpoint, tmp_path):
    """seq, iid and lstsq on the same runs: the same seeds and JSON layout with a "method" key; lstsq
    chooses its ridge on the selection runs as seq chooses its rate; iid repeats exactly."""
    reports = {}
    flags = {"seq": ["-l", 0.03, 0.01], "iid": ["--method", "iid", "-l", 0.03, 0.01, "--epochs-iid", 2],
             "lstsq": ["--method", "lstsq", "--ridge", 0.01, 1, 100]}
    for method, extra in flags.items():
        out = tmp_path / f"{method}.json"
        proc = evaluate(omniglot_root, checkpoint, "-c", 2, 4, "-r", 2, "--selection-runs", 2, *extra, "--json", out)
        assert_ok(proc)
        reports[method] = json.loads(out.read_text())
        assert reports[method]["method"] == method
    assert reports["iid"]["epochs_iid"] == 2 and "epochs_iid" not in reports["seq"]
    assert reports["lstsq"]["hyperparameter"] == "ridge" and reports["lstsq"]["ridges"] == [0.01, 1, 100]
    assert "Chosen ridge" in proc.stdout and "Best ridge" in proc.stdout
    for key in ("report_run_seeds", "selection_run_seeds", "classes", "train_examples"):
        assert reports["seq"][key] == reports["iid"][key] == reports["lstsq"][key], key
    for row in reports["lstsq"]["rows"]:
        selection_means = [r["selection"]["test_mean"] for r in row["per_lr"]]
        chosen = row["chosen_on_selection_runs"]
        assert chosen["ridge"] == [0.01, 1, 100][int(np.argmax(selection_means))]
        assert set(chosen) == set(reports["seq"]["rows"][0]["chosen_on_selection_runs"]) - {"lr"} | {"ridge"}
    again = tmp_path / "again.json"
    assert_ok(evaluate(omniglot_root, checkpoint, "-c", 2, 4, "-r", 2, "--selection-runs", 2, *flags["iid"],
                       "--json", again))
    assert json.loads(again.read_text())["rows"] == reports["iid"]["rows"]
    seq_tests = [r["report"]["test"] for row in reports["seq"]["rows"] for r in row["per_lr"]]
    iid_tests = [r["report"]["test"] for row in reports["iid"]["rows"] for r in row["per_lr"]]
    assert seq_tests != iid_tests


# ----------------------------------------------------------------------------- pretrain_omni.py (issue 10)

def pretrain(root, out_dir, *args):
    return run("pretrain_omni.py", *TINY, "-d", "cpu", "--data-root", root, "--out-dir", out_dir, *args)


def test_pretrain_resumes_exactly_and_evaluates(omniglot_root, tmp_path):
    """2 epochs of 19 steps straight, and stopped after the first step then resumed, give the same
    checkpoints and log; the checkpoint is the seed's format and eval_omni.py meta-tests it."""
    flags = ["--epochs", 2, "--batch-size", 1024, "--lr", 0.01]
    straight = pretrain(omniglot_root, tmp_path / "straight", *flags)
    assert_ok(straight)
    assert "pretraining 4_3_36 for 2 epochs of batch 1024" in straight.stdout
    final = tmp_path / "straight" / "4_3_36_pretrain-1.pth"
    assert f"done: {final}" in straight.stdout
    stopped = pretrain(omniglot_root, tmp_path / "resumed", *flags, "--time-limit", 1e-3)
    assert_ok(stopped)
    assert "time limit reached" in stopped.stdout and not (tmp_path / "resumed" / final.name).exists()
    assert_ok(pretrain(omniglot_root, tmp_path / "resumed", *flags, "--resume", "latest"))
    for epoch in (0, 1):
        a = load_checkpoint(tmp_path / "straight" / f"4_3_36_pretrain-{epoch}.pth")
        b = load_checkpoint(tmp_path / "resumed" / f"4_3_36_pretrain-{epoch}.pth")
        assert all(torch.equal(a[k], b[k]) for k in a), epoch
    logs = [(tmp_path / d / "4_3_36_pretrain_log.csv").read_text().splitlines() for d in ("straight", "resumed")]
    assert len(logs[0]) == 1 + 2 * 19
    assert [l.split(",")[:3] for l in logs[0]] == [l.split(",")[:3] for l in logs[1]]
    losses = [float(l.split(",")[1]) for l in logs[0][1:]]
    assert np.mean(losses[-5:]) < np.mean(losses[:5])  # it learns
    proc = evaluate(omniglot_root, final, "-c", 3, "-r", 1, "-l", 0.01)
    assert_ok(proc)
    accuracies(proc.stdout.splitlines()[0], ACCURACY, 3)


def test_pretrain_init_only_is_the_training_start(omniglot_root, tmp_path):
    """--init-only writes the network as torch.manual_seed(seed) initialises it (where train_omni.py
    starts too), without reading the data; --lobotomize changes the training."""
    proc = run("pretrain_omni.py", *TINY, "--init-only", "--seed", 1, "--out-dir", tmp_path,
               "--data-root", tmp_path / "nothing", "--no-download")
    assert_ok(proc)
    init = load_checkpoint(tmp_path / "4_3_36_init.pth")
    torch.manual_seed(1)
    expected = ANML(4, 3, 36).state_dict()
    assert all(torch.equal(init[k], expected[k]) for k in init)
    flags = ["--epochs", 1, "--batch-size", 4096]
    assert_ok(pretrain(omniglot_root, tmp_path / "plain", *flags))
    assert_ok(pretrain(omniglot_root, tmp_path / "lobo", *flags, "--lobotomize"))
    plain, lobo = (load_checkpoint(tmp_path / d / "4_3_36_pretrain-0.pth") for d in ("plain", "lobo"))
    assert not torch.equal(plain["fc.weight"], lobo["fc.weight"])


# ----------------------------------------------------------------------------- train_omni.py --first-order (issue 10)

def test_first_order_training_is_recorded_and_differs(trained, omniglot_root, tmp_path):
    proc = train(omniglot_root, tmp_path, "--seed", 1, "--first-order")
    assert_ok(proc)
    assert "first-order" in proc.stdout.splitlines()[0]
    recorded = lambda d: read_training_state(newest_resumable(d, "4_3_36"))["config"]["first_order"]
    assert recorded(tmp_path) is True and recorded(trained[1]) is False
    assert load_checkpoint(tmp_path / "4_3_36_ANML-0.pth")  # the names are unchanged
    first, second = load_checkpoint(tmp_path / "4_3_36_ANML-2.pth"), load_checkpoint(trained[1] / "4_3_36_ANML-2.pth")
    assert not torch.equal(first["rln.convBlock1.conv.weight"], second["rln.convBlock1.conv.weight"])


# ----------------------------------------------------------------------------- comparisons (issue 10)

def test_make_comparisons_at_tiny_scale(omniglot_root, checkpoint, tmp_path):
    """results/make_comparisons.sh end to end with a tiny network: pretraining, the init checkpoint,
    six evaluations on the same runs, and the picture (or the note that matplotlib is missing)."""
    env = script_env(PY=sys.executable, DEVICE="cpu", ANML=str(checkpoint), SIZES=" ".join(TINY), NAME="4_3_36",
                     EPOCHS="1", PRETRAIN_DIR=str(tmp_path / "pre"), OUT=str(tmp_path / "out"), RUNS="1", SEL="2",
                     CLASSES="2 4", LRS="0.03 0.01", RIDGES="1 10")
    proc = subprocess.run(["bash", "results/make_comparisons.sh", "--data-root", str(omniglot_root)], cwd=REPO,
                          env=env, capture_output=True, text=True, timeout=900)
    assert_ok(proc)
    labels = ["anml_seq", "anml_iid", "anml_lstsq", "pretrain_seq", "pretrain_lstsq", "random_seq"]
    reports = {label: json.loads((tmp_path / "out" / f"{label}.json").read_text()) for label in labels}
    assert [r["method"] for r in reports.values()] == ["seq", "iid", "lstsq", "seq", "lstsq", "seq"]
    assert reports["pretrain_seq"]["model"].endswith("4_3_36_pretrain-0.pth")
    assert reports["random_seq"]["model"].endswith("4_3_36_init.pth")
    assert len({json.dumps(r["report_run_seeds"]) for r in reports.values()}) == 1
    assert all([row["classes"] for row in r["rows"]] == [2, 4] for r in reports.values())
    picture = tmp_path / "out" / "comparisons.png"
    assert picture.is_file() or "matplotlib is not installed" in proc.stdout
    again = subprocess.run(["bash", "results/make_comparisons.sh", "--data-root", str(omniglot_root)], cwd=REPO,
                           env=env, capture_output=True, text=True, timeout=900)
    assert_ok(again)
    assert "pretraining" not in again.stdout  # the finished pretraining is reused ...
    assert again.stdout.count(": done (") == 6  # ... and so are the evaluations


def test_plot_comparisons_reads_the_reports(tmp_path):
    import plot_comparisons
    row = lambda n, chosen: {"classes": n, "chosen_on_selection_runs": chosen,
                             "best_on_reported_runs": {"test_mean": 0.5, "test_std": 0.1}}
    (tmp_path / "a_seq.json").write_text(json.dumps({"rows": [row(10, {"test_mean": 0.9, "test_std": 0.05}),
                                                              row(50, {"test_mean": 0.7, "test_std": 0.02})]}))
    (tmp_path / "b_lstsq.json").write_text(json.dumps({"rows": [row(10, None)]}))
    (tmp_path / "bad.json").write_text("{}")
    curves = plot_comparisons.load_curves([tmp_path / "a_seq.json", tmp_path / "b_lstsq.json"])
    assert curves["a_seq"] == ([10, 50], [0.9, 0.7], [0.05, 0.02], "chosen_on_selection_runs")
    assert curves["b_lstsq"] == ([10], [0.5], [0.1], "best_on_reported_runs")
    with pytest.raises(ValueError, match="not an eval_omni.py --json report"):
        plot_comparisons.load_curves([tmp_path / "bad.json"])
    pytest.importorskip("matplotlib", reason="matplotlib is not installed (the lead adds it)")
    plot_comparisons.plot_comparisons(curves, tmp_path / "c.png")
    assert (tmp_path / "c.png").stat().st_size > 1000
