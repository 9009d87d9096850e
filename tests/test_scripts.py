"""The scripts as a user runs them. Real processes where only a process shows it (exit codes, signals,
output, a resume across processes, the shell script); the scripts' `main` in-process otherwise, on
the shared Omniglot copy with tiny networks (RLN 4, NM 3, mask 36)."""
import hashlib
import json
import re
import signal
import subprocess
import sys
import time

import matplotlib.pyplot as plt
import numpy as np
import pytest
import torch

import bench
import eval_omni
import plot_comparisons
import plot_results
from conftest import (REPO, TINY_FLAGS, assert_ok, assert_one_error, command, run, same_weights, script_env,
                      weights)
from harness.results import chosen_value, read_results

NUMBER = r"(\d+\.\d\d)"
ACCURACY = rf"Classes (\d+) Accuracy {NUMBER} \(std {NUMBER}\)"
TRAIN_ACCURACY = rf"Classes (\d+) Train accuracy {NUMBER} \(std {NUMBER}\)"


def train(root, out_dir, *args):
    return run("train_omni.py", *TINY_FLAGS, "--epochs", 3, "-d", "cpu", "--data-root", root, "--out-dir", out_dir,
               *args)


def evaluate_in_process(root, capsys, *args):
    """eval_omni.py's output, run in this process (its `main`), and what it printed."""
    eval_omni.main([str(a) for a in ("-d", "cpu", "--data-root", root, *args)])
    return capsys.readouterr().out


# ----------------------------------------------------------------------------- train_omni.py

@pytest.fixture(scope="module")
def trained(tmp_path_factory, omniglot_root):
    """(process, out_dir) of a tiny 3-iteration meta-training with --seed 1."""
    out = tmp_path_factory.mktemp("anml_seed1")
    return train(omniglot_root, out, "--seed", 1), out


@pytest.fixture(scope="module")
def checkpoint(trained):
    return trained[1] / "4_3_36_ANML-2.pth"


def test_train_prints_its_progress_and_writes_checkpoints(trained):
    proc, out = trained
    assert_ok(proc)
    lines = proc.stdout.splitlines()
    assert re.fullmatch(r"meta-training ANML 4_3_36 for 3 its on cpu \(backend func, seed 1, 1 thread\) -> .*/",
                        lines[0]), lines[0]
    assert lines[1] == "iteration: outer loss | outer accuracy (seconds)"
    assert re.fullmatch(r"0: \d+\.\d{3} \| [01]\.\d{3} \(\d+\.\ds\)", lines[2]), lines[2]
    assert lines[-1] == f"done: {out / '4_3_36_ANML-2.pth'}"
    assert sorted(p.name for p in out.glob("*.pth")) == ["4_3_36_ANML-0.pth", "4_3_36_ANML-2.pth"]
    assert sorted(p.name for p in out.iterdir()) == ["4_3_36_ANML-0.pth", "4_3_36_ANML-2.pth",
                                                     "4_3_36_ANML-2_resume.pt", "4_3_36_train_log.csv"]


def test_time_limit_then_resume_across_processes_equals_one_run(trained, omniglot_root, tmp_path):
    stopped = train(omniglot_root, tmp_path, "--seed", 1, "--time-limit", 1e-3)  # stops after iteration 0
    assert_ok(stopped)
    assert stopped.stdout.splitlines()[-1] == \
        "stopped after iteration 0 (time limit of 0.001s): continue with the same command and --resume latest"
    assert (stopped.stdout + stopped.stderr).count("--resume latest") == 1  # said once
    assert not (tmp_path / "4_3_36_ANML-2.pth").exists()
    assert_ok(train(omniglot_root, tmp_path, "--seed", 1, "--resume", "latest"))
    assert same_weights(weights(trained[1] / "4_3_36_ANML-2.pth"), weights(tmp_path / "4_3_36_ANML-2.pth"))


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGHUP])
def test_ctrl_c_or_a_closed_terminal_stops_cleanly_with_exit_130(sig, omniglot_root, tmp_path):
    """As from a terminal (SIGINT handled by default even where pytest runs with it ignored): the run
    stops after the iteration in flight with a resumable checkpoint, exit 130, no traceback."""
    proc = subprocess.Popen(command("train_omni.py", *TINY_FLAGS, "--epochs", 100000, "-d", "cpu",
                                    "--data-root", omniglot_root, "--out-dir", tmp_path),
                            cwd=REPO, env=script_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    assert proc.stdout.readline().startswith("meta-training")  # the lock is held and the signals handled now
    assert proc.stdout.readline().startswith("iteration:")
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130 and "Traceback" not in err, err
    said = [line for line in (out + err).splitlines() if "--resume latest" in line]  # one line, on stderr
    assert len(said) == 1 and re.fullmatch(rf"stopped after iteration \d+ \({signal.Signals(sig).name}\): continue "
                                           rf"with the same command and --resume latest", said[0]) and said[0] in err
    assert len(list(tmp_path.glob("4_3_36_ANML-*_resume.pt"))) == 1


def test_a_run_killed_before_it_could_resume_does_not_block_its_folder(omniglot_root, tmp_path):
    """kill -9 of an i.i.d. pretraining in its first epoch (its log written, no resumable checkpoint
    yet, the lock file left behind): the next start in that folder removes what it left, says so in
    a notice, and trains."""
    args = [*TINY_FLAGS, "--epochs", 1, "-d", "cpu", "--data-root", omniglot_root, "--out-dir", tmp_path]
    proc = subprocess.Popen(command("pretrain_omni.py", *args, "--batch-size", 8, "--save-minutes", 60), cwd=REPO,
                            env=script_env(), stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    log = tmp_path / "4_3_36_pretrain_log.csv"
    deadline = time.monotonic() + 120
    while not (log.is_file() and len(log.read_text().splitlines()) > 11) and time.monotonic() < deadline:
        time.sleep(0.05)
    proc.kill()
    proc.wait(timeout=30)
    assert log.is_file() and not list(tmp_path.glob("*_resume.pt"))
    again = run("pretrain_omni.py", *args, "--batch-size", 4096)
    assert_ok(again)
    assert re.search(rf"notice: taking over the lock .* of pid {proc.pid}", again.stderr)
    assert re.search(rf"notice: removed 4_3_36_pretrain_log.csv from {tmp_path}, written by pid {proc.pid} \(it ended\)",
                     again.stderr)
    assert (tmp_path / "4_3_36_pretrain-0.pth").is_file()


def test_a_script_error_is_one_line_and_exit_2(tmp_path):
    """End to end through the interpreter: missing data, and a download that fails (nothing listens
    on port 9 of localhost) with what to do instead."""
    proc = train(tmp_path / "no_data", tmp_path / "run")
    assert proc.returncode == 2
    assert_one_error(proc.stderr, rf"--data-root {tmp_path / 'no_data'} does not exist \(nothing was created")
    env = script_env(OMNIGLOT_BASE_URL="http://127.0.0.1:9", XDG_CACHE_HOME=str(tmp_path / "cache"),
                     HIGHERANML_CACHE=str(tmp_path / "cache"))  # no remembered data root
    env.pop("OMNIGLOT_ROOT", None)
    proc = run("eval_omni.py", "-m", "trained_anmls/256_112_2304_ANML-21678.pth", env=env)
    assert proc.returncode == 2
    assert_one_error(proc.stderr, r"could not download http://127\.0\.0\.1:9/images_background\.zip .*make demo "
                                  r"DATA=\"--data-root DIR\"")


# ----------------------------------------------------------------------------- eval_omni.py

def accuracies(line, pattern, classes):
    match = re.fullmatch(pattern, line)
    assert match and int(match[1]) == classes, line
    return float(match[2]), float(match[3])


def test_eval_prints_higheranmls_two_lines_and_writes_the_json(omniglot_root, checkpoint, tmp_path):
    out = tmp_path / "sub" / "results.json"
    proc = run("eval_omni.py", "-m", checkpoint, "-c", 5, "-r", 2, "-d", "cpu", "--data-root", omniglot_root,
               "--no-download", "--json", out)
    assert_ok(proc)
    lines = proc.stdout.splitlines()
    assert len(lines) == 2, proc.stdout
    test_mean, _ = accuracies(lines[0], ACCURACY, 5)
    accuracies(lines[1], TRAIN_ACCURACY, 5)
    report = json.loads(out.read_text())
    assert report["model_sha256"] == hashlib.sha256(checkpoint.read_bytes()).hexdigest()
    assert report["command"] == f"python eval_omni.py -m {checkpoint.name} -c 5 -r 2 -d cpu --json results.json"
    assert report["config"]["classes"] == [5] and report["config"]["data_root"] == str(omniglot_root)
    (row,) = report["rows"]
    assert row["per_value"][0]["report"]["test_mean"] == pytest.approx(test_mean, abs=0.005)


def test_eval_lr_sweep_and_selection_runs(omniglot_root, checkpoint, tmp_path, capsys):
    """Several class counts, rates and selection runs, in-process: each row's rate is the best on the
    selection runs, the reported numbers come from the other runs, and a row equals a run with that
    count alone; one rate repeats the sweep's own line."""
    out = tmp_path / "table.json"
    lrs = [0.03, 0.01, 0.003]
    text = evaluate_in_process(omniglot_root, capsys, "-m", checkpoint, "-c", 6, 2, "-r", 2, "--selection-runs", 2,
                               "-l", *lrs, "--json", out)
    report = json.loads(out.read_text())
    assert report["classes"] == [2, 6] and report["selection_run_seeds"] == [[0, 0, 1], [0, 1, 1]]
    assert report["hyperparameter"] == "lr" and report["grid"] == lrs
    for row in report["rows"]:
        selection_means = [r["selection"]["test_mean"] for r in row["per_value"]]
        chosen = row["chosen_on_selection_runs"]
        assert chosen["lr"] == lrs[int(np.argmax(selection_means))]
        assert chosen["test"] == row["per_value"][lrs.index(chosen["lr"])]["report"]["test"]
        report_means = [r["report"]["test_mean"] for r in row["per_value"]]
        assert row["best_on_reported_runs"]["lr"] == lrs[int(np.argmax(report_means))]
        assert row["one_value_for_all_rows"]["lr"] == report["one_value_for_all_rows"]
    means = [np.mean([row["per_value"][l]["selection"]["test_mean"] for row in report["rows"]]) for l in range(3)]
    assert report["one_value_for_all_rows"] == lrs[int(np.argmax(means))]
    assert text.count("Chosen lr") == 2 and "rates chosen on 2 other runs" in text
    assert re.search(rf"^Best lr (\S+): {ACCURACY}$", text, re.M)
    alone = evaluate_in_process(omniglot_root, capsys, "-m", checkpoint, "-c", 2, "-r", 2, "-l", *lrs)
    assert [line for line in alone.splitlines() if line.startswith("Classes")] == \
        [line for line in text.splitlines() if line.startswith("Classes 2 ")]
    one = evaluate_in_process(omniglot_root, capsys, "-m", checkpoint, "-c", 2, "-r", 2, "-l", 0.01)
    assert one.splitlines() == [line.removesuffix(" lr 0.01") for line in alone.splitlines()
                                if line.endswith(" lr 0.01")]


def test_eval_methods_share_runs_and_layout(omniglot_root, checkpoint, tmp_path, capsys):
    """seq, iid, lstsq, ncm and seq with every parameter learning, on the same runs: the same seeds and
    JSON layout with "method" and "no_freeze" keys, which results.py reads; lstsq chooses its ridge and
    ncm its distance on the selection runs as seq chooses its rate; iid repeats exactly."""
    reports, texts = {}, {}
    flags = {"seq": ["-l", 0.03, 0.01], "iid": ["--method", "iid", "-l", 0.03, 0.01, "--epochs-iid", 2],
             "lstsq": ["--method", "lstsq", "--ridge", 0.01, 1, 100], "ncm": ["--method", "ncm"],
             "seq_no_freeze": ["-l", 0.03, 0.01, "--no-freeze"]}
    for label, extra in flags.items():
        out = tmp_path / f"{label}.json"
        texts[label] = evaluate_in_process(omniglot_root, capsys, "-m", checkpoint, "-c", 2, 4, "-r", 2,
                                           "--selection-runs", 2, *extra, "--json", out)
        reports[label] = read_results(out)
    assert [r["method"] for r in reports.values()] == ["seq", "iid", "lstsq", "ncm", "seq"]
    assert [r["no_freeze"] for r in reports.values()] == [False] * 4 + [True]
    assert reports["seq_no_freeze"]["config"]["no_freeze"] and not reports["seq_no_freeze"]["fast"]
    assert "Chosen ridge" in texts["lstsq"] and "Best ridge" in texts["lstsq"]
    assert reports["iid"]["epochs_iid"] == 2 and "epochs_iid" not in reports["seq"]
    assert reports["lstsq"]["hyperparameter"] == "ridge" and reports["lstsq"]["grid"] == [0.01, 1, 100]
    assert reports["ncm"]["hyperparameter"] == "distance" and reports["ncm"]["grid"] == ["euclidean", "cosine"]
    assert re.search(rf"^{ACCURACY} distance cosine$", texts["ncm"], re.M)
    assert re.search(r"^Chosen distance (euclidean|cosine) on 2 selection runs: Classes 4 ", texts["ncm"], re.M)
    assert "every parameter learning" in texts["seq_no_freeze"]
    for key in ("report_run_seeds", "selection_run_seeds", "classes", "train_examples"):
        assert len({json.dumps(r[key]) for r in reports.values()}) == 1, key
    for label, hyper, grid in (("lstsq", "ridge", [0.01, 1, 100]), ("ncm", "distance", ["euclidean", "cosine"])):
        for row in reports[label]["rows"]:
            selection_means = [r["selection"]["test_mean"] for r in row["per_value"]]
            assert row["chosen_on_selection_runs"][hyper] == grid[int(np.argmax(selection_means))]
            assert chosen_value(reports[label], row["classes"]) == row["chosen_on_selection_runs"][hyper]
    again = tmp_path / "again.json"
    evaluate_in_process(omniglot_root, capsys, "-m", checkpoint, "-c", 2, 4, "-r", 2, "--selection-runs", 2,
                        *flags["iid"], "--json", again)
    assert json.loads(again.read_text())["rows"] == reports["iid"]["rows"]
    tests = {label: [r["report"]["test"] for row in reports[label]["rows"] for r in row["per_value"]]
             for label in ("seq", "iid", "seq_no_freeze")}
    assert tests["seq"] != tests["iid"] and tests["seq"] != tests["seq_no_freeze"]
    assert "lr" not in reports["ncm"]["rows"][0]["chosen_on_selection_runs"]


def test_an_interrupted_evaluation_keeps_its_finished_runs(omniglot_root, checkpoint, tmp_path, capsys, monkeypatch):
    """SIGTERM in the middle of the runs (here after two of the four run-rate pairs): exit 130, and
    the partial file beside --json holds the finished runs, marked partial, which the plotting scripts
    refuse in one line."""
    import os
    import meta_test
    from harness.cli import run_cli
    real, calls = meta_test.sequential_fit, []

    def fit_then_terminate(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            os.kill(os.getpid(), signal.SIGTERM)
        return real(*args, **kwargs)
    monkeypatch.setattr(meta_test, "sequential_fit", fit_then_terminate)
    out, partial = tmp_path / "report.json", tmp_path / "report.partial.json"
    with pytest.raises(SystemExit) as done:
        run_cli(lambda: evaluate_in_process(omniglot_root, capsys, "-m", checkpoint, "-c", 3, "-r", 2, "-l", 0.03,
                                            0.01, "--json", out))
    assert done.value.code == 130
    assert f"are in {partial} (marked partial)\n" in capsys.readouterr().err and not out.exists()
    report = json.loads(partial.read_text())
    assert report["partial"] is True and report["rows"][0]["best_on_reported_runs"] is None
    first, second = report["rows"][0]["per_value"]
    assert first["report"]["finished_runs"] == [0] and len(first["report"]["test"]) == 1
    assert second["report"]["finished_runs"] == [0] and second["report"]["test_mean"] is not None
    with pytest.raises(ValueError, match="partial report of an interrupted evaluation"):
        plot_comparisons.load_curves([partial])


def test_a_rate_that_blows_the_last_layer_up_is_named(omniglot_root, checkpoint, capsys):
    eval_omni.main(["-d", "cpu", "--data-root", str(omniglot_root), "-m", str(checkpoint), "-c", "3", "-r", "2",
                    "-l", "1e300", "0.01"])
    err = capsys.readouterr().err
    assert "notice: at lr 1e+300 the last layer became NaN or infinite in 2 of 2 runs" in err
    assert "at lr 0.01" not in err


# ----------------------------------------------------------------------------- pretrain_omni.py

def test_pretrain_end_to_end_and_its_checkpoint_evaluates(omniglot_root, tmp_path, capsys):
    """One epoch of the real background set: the announcement, the header, one line an epoch, done;
    the checkpoint is higherANML's format, and eval_omni.py meta-tests it. --init-only writes the
    network as torch.manual_seed(seed) makes it, without reading any data."""
    proc = run("pretrain_omni.py", *TINY_FLAGS, "--epochs", 1, "--batch-size", 4096, "--lr", 0.01, "-d", "cpu",
               "--data-root", omniglot_root, "--out-dir", tmp_path)
    assert_ok(proc)
    lines = proc.stdout.splitlines()
    assert lines[0].startswith("pretraining 4_3_36 for 1 epochs of batch 4096 on cpu (lr 0.01, seed 1, 1 thread)")
    assert lines[1] == "epoch: loss | accuracy (seconds)"
    assert re.fullmatch(r"epoch 0: loss \d+\.\d{3} \| accuracy \d\.\d{3} \(\d+\.\ds\)", lines[2]), lines[2]
    assert lines[3] == f"done: {tmp_path / '4_3_36_pretrain-0.pth'}"
    text = evaluate_in_process(omniglot_root, capsys, "-m", tmp_path / "4_3_36_pretrain-0.pth", "-c", 3, "-r", 1)
    accuracies(text.splitlines()[0], ACCURACY, 3)
    init = run("pretrain_omni.py", *TINY_FLAGS, "--init-only", "--seed", 1, "--out-dir", tmp_path,
               "--data-root", tmp_path / "nothing", "--no-download")
    assert_ok(init)
    torch.manual_seed(1)
    from model import ANML
    assert same_weights(weights(tmp_path / "4_3_36_init.pth"), ANML(4, 3, 36).state_dict())


# ----------------------------------------------------------------------------- pictures, benchmark, comparisons

def test_plot_results_draws_both_pictures(omniglot_root, trained, tmp_path, capsys):
    """plot_results.py on a real (small) eval_omni.py --json file and a real training log."""
    out = tmp_path / "table.json"
    evaluate_in_process(omniglot_root, capsys, "-m", trained[1] / "4_3_36_ANML-2.pth", "-c", 2, 3, "-r", 2,
                        "--selection-runs", 1, "-l", 0.03, 0.01, "--json", out)
    plot_results.main(["--results", str(out), "--log", str(trained[1] / "4_3_36_train_log.csv"), "--baselines",
                       "--out-dir", str(tmp_path / "figures"), "--smooth", "2"])
    assert capsys.readouterr().out.splitlines() == [f"wrote {tmp_path / 'figures' / name}" for name in
                                                    ("evaluation_results.png", "training_curve.png")]
    for name in ("evaluation_results.png", "training_curve.png"):
        image = plt.imread(tmp_path / "figures" / name)
        assert image.shape[0] > 300 and image.shape[1] > 600 and image.std() > 0.01  # drawn, not blank


def test_plot_results_reads_the_shipped_results_and_a_damaged_log(tmp_path, capsys):
    """The shipped JSONs (an older format) draw, the comparisons' as baselines; a garbage row in a log is
    left out of the curve instead of blanking the smoothed curve from that row on."""
    shipped = REPO / "results"
    plot_results.main(["--results", str(shipped / "omniglot_eval.json"), "--out-dir", str(tmp_path), "--log", "none",
                       "--baselines", str(shipped / "comparisons" / "pretrain_seq.json"),
                       str(shipped / "comparisons" / "random_seq.json")])
    assert (tmp_path / "evaluation_results.png").stat().st_size > 10_000
    log = tmp_path / "log.csv"
    rows = [f"{i},{5 - i / 100:.3f},{i / 300:.3f},{i}" for i in range(300)]
    rows[100] = "garbage,,,"
    rows[150] = "150,nan,0.5,150"
    log.write_text("iteration,loss,accuracy,seconds\n" + "\n".join(rows) + "\n")
    its, loss, _ = plot_results.read_log(log)
    assert len(its) == 299 and 100 not in its
    smooth = plot_results.moving_average(loss, 20)
    assert np.isfinite(smooth).all() and smooth[-1] == pytest.approx(np.mean(loss[-20:]))


def test_plot_comparisons_reads_the_reports(tmp_path, capsys):
    """Each file's curve, labelled by the network its name gives and by how it learned, which the file
    says (its method, and whether every parameter learned)."""
    row = lambda n, key, mean: {"classes": n, key: {"test_mean": mean, "test_std": 0.1, "train_mean": 1.0,
                                                    "train_std": 0.0}}
    chosen = [row(10, "chosen_on_selection_runs", 0.9), row(50, "chosen_on_selection_runs", 0.7)]
    files = {"a_seq": {"selection_runs": 2, "rows": chosen},
             "b_lstsq": {"selection_runs": 0, "method": "lstsq", "rows": [row(10, "best_on_reported_runs", 0.5)]},
             "pretrain_seq": {"selection_runs": 2, "method": "seq", "no_freeze": False, "rows": chosen},
             "pretrain_seq_no_freeze": {"selection_runs": 2, "method": "seq", "no_freeze": True, "rows": chosen},
             "pretrain_zap_iid_no_freeze": {"selection_runs": 2, "method": "iid", "no_freeze": True, "rows": chosen},
             "anml_ncm": {"selection_runs": 2, "method": "ncm", "rows": chosen}}
    for name, report in files.items():
        (tmp_path / f"{name}.json").write_text(json.dumps(report))
    curves = plot_comparisons.load_curves([tmp_path / f"{name}.json" for name in files])
    assert curves["a_seq"] == {"classes": [10, 50], "test": ([0.9, 0.7], [0.1, 0.1]), "train": ([1.0, 1.0], [0.0, 0.0]),
                               "key": "chosen_on_selection_runs", "label": "a_seq, last layer on frozen features"}
    assert curves["b_lstsq"] == {"classes": [10], "test": ([0.5], [0.1]), "train": ([1.0], [0.0]),
                                 "key": "best_on_reported_runs", "label": "b_lstsq, closed-form last layer"}
    assert {name: c["label"] for name, c in curves.items() if name not in ("a_seq", "b_lstsq")} == {
        "pretrain_seq": "pretrained, last layer on frozen features",
        "pretrain_seq_no_freeze": "pretrained, all parameters learn",
        "pretrain_zap_iid_no_freeze": "pretrained with zapping, i.i.d. oracle, all parameters learn",
        "anml_ncm": "ANML + NCM"}
    plot_comparisons.main([str(tmp_path / "a_seq.json"), str(tmp_path / "b_lstsq.json"), "-o", str(tmp_path / "c")])
    assert capsys.readouterr().out == f"wrote {tmp_path / 'c.png'}: a_seq, b_lstsq\n"
    assert plt.imread(tmp_path / "c.png").std() > 0.01 and not list(tmp_path.glob(".*.tmp"))


def test_bench_prints_its_cases_with_ratios_and_op_counts(omniglot_root):
    row = r"^(\S+)\s+([\d.]+)ms\s+([\d.]+)x\s+\d+MiB\s+(\d+|-)$"
    proc = run("bench.py", *TINY_FLAGS, "--iters", 1, "-d", "cpu", "--only", "iteration", "--count-ops",
               "--data-root", omniglot_root)
    assert_ok(proc)
    assert proc.stdout.startswith("device: ")
    assert re.search(r"^case\s+time\s+vs higherANML\s+peak memory\s+ops$", proc.stdout, re.M)
    rows = {case: (float(ms), float(ratio), ops) for case, ms, ratio, ops in re.findall(row, proc.stdout, re.M)}
    assert set(rows) == {"iteration-higher", "iteration-func"}
    higher_ms = rows["iteration-higher"][0]
    for ms, ratio, _ in rows.values():  # each ratio is higherANML's time over its own, from unrounded times
        # the ratio is printed to 0.05 and each time to 0.05 ms, so higher_ms / ms is off by up to
        # ratio * (0.05 / higher_ms + 0.05 / ms) on top of the ratio's own rounding
        slack = 0.051 + 1.01 * higher_ms / ms * (0.05 / higher_ms + 0.05 / ms)
        assert ratio == pytest.approx(higher_ms / ms, abs=slack)
    assert 0 < int(rows["iteration-func"][2]) < int(rows["iteration-higher"][2])
    assert re.search(r"^most frequent ops, iteration-func: \w+ \d+", proc.stdout, re.M)


def test_bench_times_both_meta_tests(omniglot_root):
    args = bench.parse_args([*TINY_FLAGS, "--classes", "3", "-d", "cpu", "--data-root", str(omniglot_root)])
    assert bench.time_meta_test(args, fast=True) > 0 and bench.time_meta_test(args, fast=False) > 0


def test_count_ops_counts_operations_not_views():
    a, b = torch.ones(3), torch.ones(3)
    result, counts = bench.count_ops(lambda: torch.add(a, b).view(3, 1).T.sum())
    assert torch.equal(result, torch.tensor(6.0))
    assert counts == {"add": 1, "sum": 1}  # the view and the transpose launch nothing
    x = torch.ones(3, requires_grad=True)
    _, counts = bench.count_ops(lambda: (x * 2).sum().backward())
    assert counts["mul"] >= 2 and counts["sum"] == 1  # the backward's operations are counted too


def test_out_of_memory_is_one_line_and_exit_2(capsys):
    from harness.cli import run_cli

    def main():
        raise RuntimeError("[enforce fail at alloc_cpu.cpp:117] data. DefaultCPUAllocator: not enough memory: you "
                           "tried to allocate 1099511627776 bytes.")
    with pytest.raises(SystemExit) as exit_:
        run_cli(main)
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and err.startswith("error: out of memory (") and "--meta-batch" in err


def test_a_peer_process_that_died_is_one_line_and_exit_2(capsys):
    """Under torchrun, the processes left when one dies get a distributed error: one line saying what to run."""
    from harness.cli import run_cli

    for error in (torch.distributed.DistBackendError("NCCL communicator was aborted"),
                  RuntimeError("[../gloo/transport/tcp/pair.cc:553] Connection closed by peer [127.0.0.1]:27555. This "
                               "is typically caused by a remote worker crashing.")):  # gloo's, as torch 2.13 raises it
        def main():
            raise error
        with pytest.raises(SystemExit) as exit_:
            run_cli(main)
        err = capsys.readouterr().err
        assert exit_.value.code == 2 and len(err.splitlines()) == 1
        assert err.startswith("error: another process of this torchrun job stopped") and "--resume latest" in err


@pytest.mark.slow  # about 100 s of 26 processes: make gpu-check runs it, make test leaves it out
def test_make_comparisons_at_tiny_scale(omniglot_root, checkpoint, tmp_path):
    """results/make_comparisons.sh end to end with tiny networks: six trainings (i.i.d. with and without
    zapping, ASB with and without, first-order ANML, OML), the init checkpoint, seventeen evaluations on
    the same runs (ncm and every parameter learning, in lanes, among them), and the picture; run again, it keeps
    what is done."""
    env = script_env(PY=sys.executable, DEVICE="cpu", ANML=str(checkpoint), SIZES=" ".join(TINY_FLAGS), NAME="4_3_36",
                     EPOCHS="1", BATCH="4096", PRETRAIN_DIR=str(tmp_path / "pre"), OUT=str(tmp_path / "out"),
                     RUNS="1", SEL="2", CLASSES="2 4", LRS="0.03 0.01", RIDGES="1 10", ASB_EPISODES="2",
                     FO_EPOCHS="2", FO_DIR=str(tmp_path / "fo"), OML_SIZES="--rln 2", OML_NAME="2", OML_EPOCHS="2",
                     OML_DIR=str(tmp_path / "oml"), NF_LRS="0.01 0.001", NF_LANES="3")
    script = ["bash", "results/make_comparisons.sh", "--data-root", str(omniglot_root)]
    proc = subprocess.run(script, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert_ok(proc)
    labels = ["anml_seq", "anml_iid", "anml_lstsq", "pretrain_seq", "pretrain_lstsq", "random_seq", "anml_ncm",
              "pretrain_ncm", "random_ncm", "anml_first_order_seq", "pretrain_zap_seq", "asb_seq", "asb_zap_seq",
              "oml_seq", "pretrain_seq_no_freeze", "random_seq_no_freeze", "anml_seq_no_freeze", "anml_slda",
              "anml_gaussian"]
    reports = {label: json.loads((tmp_path / "out" / f"{label}.json").read_text()) for label in labels}
    assert [r["method"] for r in reports.values()] == \
        ["seq", "iid", "lstsq", "seq", "lstsq", "seq", "ncm", "ncm", "ncm"] + ["seq"] * 8 + ["slda", "gaussian"]
    assert [label for label, r in reports.items() if r["no_freeze"]] == labels[-5:-2]
    assert reports["random_ncm"]["grid"] == ["euclidean", "cosine"] and reports["anml_seq_no_freeze"]["grid"] == \
        [0.01, 0.001]
    assert {reports[label]["config"]["lanes"] for label in labels[-5:-2]} == {3}  # 6 runs and rates, 3 at a time
    assert reports["anml_gaussian"]["config"]["prediction"] == "map"
    assert reports["random_ncm"]["model"] == reports["random_seq_no_freeze"]["model"] == reports["random_seq"]["model"]
    assert reports["oml_seq"]["model"].endswith("oml/2_OML-1.pth")
    assert reports["pretrain_seq"]["model"].endswith("4_3_36_pretrain-0.pth")
    assert reports["random_seq"]["model"].endswith("4_3_36_init.pth")
    assert reports["anml_first_order_seq"]["model"].endswith("fo/4_3_36_ANML-1.pth")
    assert reports["pretrain_zap_seq"]["model"].endswith("iid_zap/4_3_36_pretrain-0.pth")
    assert reports["asb_zap_seq"]["model"].endswith("asb_zap/4_3_36_asb-1.pth")
    settings = [torch.load(tmp_path / "pre" / d / f"4_3_36_{k}-{i}_resume.pt")["config"]
                for d, k, i in (("iid_zap", "pretrain", 4), ("asb", "asb", 1), ("asb_zap", "asb", 1))]
    assert [(c["schedule"], c["zap"], c["open_gate"], c["conv_init"]) for c in settings] == \
        [("iid", True, False, "torch"), ("asb", False, True, "kaiming"), ("asb", True, True, "kaiming")]
    start = "pretraining 4_3_36 by alternating sequential and batch learning for 2 episodes on cpu (sequential SGD " \
            "0.1, batch Adam 0.001, seed 1{}, gate fixed open, kaiming convolutions, 1 thread)"
    assert start.format("") in proc.stdout and start.format(", zapping") in proc.stdout
    assert len({json.dumps(r["report_run_seeds"]) for r in reports.values()}) == 1
    assert all([row["classes"] for row in r["rows"]] == [2, 4] for r in reports.values())
    assert plt.imread(tmp_path / "out" / "comparisons.png").std() > 0.01
    partial = tmp_path / "out" / "asb_seq.json"  # as an evaluation stopped by Ctrl-C leaves it
    partial.write_text(json.dumps({**reports["asb_seq"], "partial": True}))
    again = subprocess.run(script, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert_ok(again)
    assert "training" not in again.stdout and again.stdout.count(": done (") == 18
    assert "== asb_seq\n" in again.stdout and "partial" not in json.loads(partial.read_text())


SLOW_TORCH_IMPORT = '''import importlib.abc, sys, time
class SlowTorch(importlib.abc.MetaPathFinder):
    """Says when torch starts to load, then loads it a minute late: a deterministic window for a signal."""
    def find_spec(self, name, path=None, target=None):
        if name == "torch":
            print("loading torch", file=sys.stderr, flush=True)
            time.sleep(60)
        return None
sys.meta_path.insert(0, SlowTorch())
'''


@pytest.mark.parametrize("script, sig", [("train_omni.py", signal.SIGINT), ("eval_omni.py", signal.SIGTERM),
                                         ("pretrain_omni.py", signal.SIGINT), ("tools/gate_stats.py", signal.SIGTERM)])
def test_a_signal_while_torch_loads_is_one_line_and_exit_130(script, sig, tmp_path):
    """Ctrl-C or SIGTERM in a script's first second, while it imports torch (made slow here by a
    sitecustomize on PYTHONPATH that delays the import): `interrupted`, exit 130, no traceback."""
    (tmp_path / "sitecustomize.py").write_text(SLOW_TORCH_IMPORT)
    args = {"eval_omni.py": ["-m", "model.pth"], "tools/gate_stats.py": ["model.pth"]}.get(script, [])
    proc = subprocess.Popen(command(script, *args), cwd=REPO, env=script_env(PYTHONPATH=str(tmp_path)),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    assert proc.stderr.readline() == "loading torch\n"
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 130 and "Traceback" not in err, err
    assert err.strip() == "interrupted"


def test_a_diverged_asb_pretraining_names_its_rates(omniglot_root, tmp_path, capsys):
    """--schedule asb --seq-lr 1e30 diverges at once: the advice names --seq-lr (and --lr), not --lr alone."""
    import pretrain_omni
    from harness.cli import run_cli
    with pytest.raises(SystemExit) as done:
        run_cli(lambda: pretrain_omni.main([*TINY_FLAGS, "-d", "cpu", "--threads", "1", "--schedule", "asb", "--seq-lr",
                                            "1e30", "--episodes", "2", "--data-root", str(omniglot_root),
                                            "--out-dir", str(tmp_path)]))
    err = capsys.readouterr().err
    assert done.value.code == 2
    assert_one_error(err, r"training diverged: .*diverged/: the same command with a smaller --seq-lr or --lr starts "
                          r"again there$")


# ----------------------------------------------------------------------------- what the scripts say

def stderr_bytes(script, *args):
    """(stdout as text, stderr as text) of a script whose stderr is a pipe, read as bytes: no newline
    translation hides a carriage return."""
    proc = subprocess.run(command(script, *args), cwd=REPO, env=script_env(), capture_output=True, timeout=600)
    assert proc.returncode == 0 and b"\r" not in proc.stderr, proc.stderr  # no carriage-return frames
    return proc.stdout.decode(), proc.stderr.decode()


def test_progress_bars_are_plain_named_lines_when_stderr_is_not_a_terminal(omniglot_root, checkpoint, tmp_path):
    """stderr to a pipe: no carriage-return frames, a few plain lines naming what each bar counts
    (the run, the class count, the runs and rates); and several rates without --selection-runs say
    that the best one is chosen on the very runs it reports."""
    _, err = stderr_bytes("train_omni.py", *TINY_FLAGS, "--epochs", 3, "-d", "cpu", "--data-root", omniglot_root,
                          "--no-download", "--out-dir", tmp_path)
    assert "ANML 4_3_36: 0% (0/3 iterations)\n" in err and "ANML 4_3_36: 100% (3/3 iterations" in err, err
    out, err = stderr_bytes("eval_omni.py", "-m", checkpoint, "-c", 5, "-r", 2, "-l", 0.03, 0.01, "-d", "cpu",
                            "--data-root", omniglot_root, "--no-download")
    assert re.search(r"^features: 100% \((\d+)/\1 images", err, re.M), err
    assert "test-train (5 classes, 2 reported runs x 2 rates): 100% (300/300 steps" in err, err
    assert re.search(rf"^Best lr (\S+) on these same runs \(optimistic; --selection-runs N chooses on other runs\): "
                     rf"{ACCURACY}$", out, re.M), out


def test_progress_bars_name_the_model_they_evaluate(omniglot_root, trained, capsys):
    """-m a b: the features and the test-train of each model are named by its place among them."""
    out = trained[1]
    eval_omni.main([str(a) for a in ("-d", "cpu", "--data-root", omniglot_root, "-m", out / "4_3_36_ANML-0.pth",
                                     out / "4_3_36_ANML-2.pth", "-c", 3, "-r", 1, "--selection-runs", 1, "-l", 0.03,
                                     0.01)])
    err = capsys.readouterr().err
    for k in (1, 2):
        assert f"features (model {k} of 2): 100%" in err, err
        assert f"test-train (3 classes, 1 reported + 1 selection runs x 2 rates, model {k} of 2): 100%" in err, err


def test_a_stopped_run_is_not_reported_again_at_the_end(capsys):
    """The run said after which step it stopped and how to continue (one line): report_end adds nothing,
    and an interruption exits 130."""
    from harness.cli import report_end
    report_end("time limit of 1s", [])
    with pytest.raises(SystemExit) as done:
        report_end("SIGINT", [])
    assert done.value.code == 130 and capsys.readouterr() == ("", "")
