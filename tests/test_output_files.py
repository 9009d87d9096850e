"""Every output path the scripts take (eval_omni.py --json, the plot scripts' pictures): a finished
report is never replaced by a partial one, only regular files or new paths are written (a symbolic
link through to its target), and a writer killed mid-write leaves nothing a later run keeps. Real
processes for signals and kill -9; the scripts' `main` in-process otherwise."""
import json
import os
import signal
import stat
import subprocess
import sys
import time

import pytest

import eval_omni
import plot_comparisons
import plot_results
from conftest import REPO, command, script_env
from harness.results import read_results


def evaluate_in_process(root, capsys, *args):
    """eval_omni.py's output, run in this process (its `main`), and what it printed."""
    eval_omni.main([str(a) for a in ("-d", "cpu", "--data-root", root, *args)])
    return capsys.readouterr().out



def wait_for(text, path, proc, timeout=300):
    """Wait until the file `path` (a process's stderr) holds `text`, or the process has ended."""
    deadline = time.monotonic() + timeout
    while text not in path.read_text() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert text in path.read_text(), path.read_text()[-2000:]


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_an_interrupted_evaluation_never_replaces_a_finished_report(sig, omniglot_root, small_checkpoint, tmp_path):
    """Ctrl-C or SIGTERM in the middle of the runs of an evaluation whose --json holds a finished
    report: exit 130, the report left byte for byte, the finished runs beside it in same.partial.json."""
    out, partial, err = tmp_path / "same.json", tmp_path / "same.partial.json", tmp_path / "stderr"
    finished = json.dumps({"format": 2, "rows": "a finished report"}) + "\n"
    out.write_text(finished)
    with open(err, "w") as stderr:
        proc = subprocess.Popen(command("eval_omni.py", "-m", small_checkpoint, "-c", 10, 200, "-r", 10,
                                        "--selection-runs", 10, "-l", 0.002, 0.001, 0.0005, "-d", "cpu", "--data-root",
                                        omniglot_root, "--no-download", "--json", out),
                                cwd=REPO, env=script_env(), stdout=subprocess.DEVNULL, stderr=stderr,
                                preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    wait_for("test-train (", err, proc)
    proc.send_signal(sig)
    assert proc.wait(timeout=120) == 130
    assert out.read_text() == finished
    assert json.loads(partial.read_text())["partial"] is True
    assert f"are in {partial} (marked partial); {out} is left as it was" in err.read_text()


def test_a_complete_evaluation_replaces_the_report_and_removes_the_partial_one(omniglot_root, small_checkpoint,
                                                                                  tmp_path, capsys):
    out, partial = tmp_path / "same.json", tmp_path / "same.partial.json"
    out.write_text("{}\n")
    partial.write_text(json.dumps({"partial": True}))
    evaluate_in_process(omniglot_root, capsys, "-m", small_checkpoint, "-c", 2, "-r", 1, "--json", out)
    assert read_results(out)["rows"][0]["classes"] == 2 and not partial.exists()


def not_a_regular_file(kind, path):
    """Make `path` a FIFO or a character device (the null device's numbers, made in a test folder)."""
    if kind == "FIFO":
        os.mkfifo(path)
    elif os.geteuid() == 0:
        os.mknod(path, stat.S_IFCHR | 0o666, os.makedev(1, 3))
    else:
        pytest.skip("making a device needs root")
    return path


@pytest.mark.parametrize("kind", ["FIFO", "character device"])
@pytest.mark.parametrize("which", ["same.json", "same.partial.json"])
def test_eval_refuses_a_json_that_is_not_a_regular_file_before_any_work(kind, which, omniglot_root, small_checkpoint,
                                                                         tmp_path, capsys):
    """--json (or the partial file beside it) a FIFO or a device: one line naming it, nothing run, the
    FIFO or device left as it was."""
    path = not_a_regular_file(kind, tmp_path / which)
    with pytest.raises(ValueError) as refused:
        evaluate_in_process(omniglot_root, capsys, "-m", small_checkpoint, "-c", 2, "-r", 1, "--json",
                            tmp_path / "same.json")
    assert str(refused.value) == f"--json {path} is a {kind}: outputs are written only to regular files or new paths"
    assert capsys.readouterr().out == "" and stat.S_ISFIFO(path.stat().st_mode) == (kind == "FIFO")
    assert os.listdir(tmp_path) == [which]


def test_eval_writes_through_a_symbolic_link(omniglot_root, small_checkpoint, tmp_path, capsys):
    """--json a link to a regular file: the file it points to holds the report, and the link stays."""
    target, link = tmp_path / "results" / "target.json", tmp_path / "link.json"
    target.parent.mkdir()
    target.write_text("{}\n")
    link.symlink_to(target)
    evaluate_in_process(omniglot_root, capsys, "-m", small_checkpoint, "-c", 2, "-r", 1, "--json", link)
    assert link.is_symlink() and read_results(target)["rows"][0]["classes"] == 2


def test_plot_scripts_refuse_a_picture_that_is_not_a_regular_file(tmp_path):
    fifo = not_a_regular_file("FIFO", tmp_path / "evaluation_results.png")
    with pytest.raises(ValueError, match=f"^-o {fifo} is a FIFO: outputs are written only to regular files"):
        plot_comparisons.main([str(REPO / "results" / "omniglot_eval.json"), "-o", str(fifo)])
    with pytest.raises(ValueError, match=f"^--out-dir {fifo} is a FIFO: outputs are written only to regular files"):
        plot_results.main(["--out-dir", str(tmp_path), "--log", "none", "--baselines"])
    assert stat.S_ISFIFO(fifo.stat().st_mode)


def test_a_later_evaluation_removes_the_temporary_a_killed_writer_left(omniglot_root, small_checkpoint, tmp_path,
                                                                       capsys):
    """A process killed (-9) while it writes the --json leaves its temporary file; the next evaluation
    writing that file removes it."""
    out = tmp_path / "same.json"
    writing = "import sys, time; from harness.atomic import write_atomic; write_atomic(sys.argv[1], lambda tmp: " \
              "(tmp.write_text('{'), print('writing', flush=True), time.sleep(600)))"
    writer = subprocess.Popen([sys.executable, "-c", writing, str(out)], cwd=REPO, stdout=subprocess.PIPE, text=True)
    assert writer.stdout.readline() == "writing\n"
    writer.kill()
    writer.wait()
    assert [p.name for p in tmp_path.iterdir()] == [f".same.json.{writer.pid}.tmp"]
    evaluate_in_process(omniglot_root, capsys, "-m", small_checkpoint, "-c", 2, "-r", 1, "--json", out)
    assert [p.name for p in tmp_path.iterdir()] == ["same.json"]
