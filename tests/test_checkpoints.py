"""Checkpoints and the state of a run: exact resume, and the shipped model."""
import numpy as np
import torch

import anml


def test_half_then_resume_equals_one_run(sampler, tmp_path):
    """N iterations straight = N/2, then a resume for the other N/2: bit-identical on the CPU,
    and the CSV log holds the same losses and accuracies, each iteration once."""
    def run(out_dir, its, resume=None):
        sampler.rng = np.random.default_rng(1)  # what OmniSampler(seed=1) starts from
        return anml.train(4, 3, 36, its=its, sampler=sampler, out_dir=out_dir, seed=1, quiet=True,
                          resume=resume)

    _, stopped = run(tmp_path / "straight", 4)
    assert stopped is None
    run(tmp_path / "split", 2)
    run(tmp_path / "split", 4, resume="latest")
    load = lambda d: torch.load(d / "4_3_36_ANML-3.pth", weights_only=True)
    straight, split = load(tmp_path / "straight"), load(tmp_path / "split")
    assert all(torch.equal(straight[k], split[k]) for k in straight)
    logs = [np.loadtxt(d / "4_3_36_train_log.csv", delimiter=",", skiprows=1)
            for d in (tmp_path / "straight", tmp_path / "split")]
    np.testing.assert_array_equal(logs[0][:, :3], logs[1][:, :3])
    assert logs[0][:, 0].tolist() == [0, 1, 2, 3]
    assert [p.name for p in (tmp_path / "split").glob("*_resume.pt")] == ["4_3_36_ANML-3_resume.pt"]


# ----------------------------------------------------------------------------- issue 9: never lose or mix a run

import hashlib
import io
import os
import subprocess
import sys

import pytest

import checkpoints
from atomic import WriteError
from checkpoints import Diverged, TrainingLog, save_atomic

NAME = "4_3_36"


def run_tiny(sampler, out_dir, its, seed=1, **kw):
    """A tiny training run, its sampler at the state OmniSampler(seed=seed) starts from."""
    sampler.rng = np.random.default_rng(seed)
    kw.setdefault("quiet", True)
    return anml.train(4, 3, 36, its=its, sampler=sampler, out_dir=out_dir, seed=seed, **kw)


def weights(path):
    return torch.load(path, weights_only=True)


def same_weights(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def resumables(out_dir):
    return sorted(p.name for p in out_dir.glob("*_resume.pt"))


def dead_pid():
    """The pid of a process that has ended (and been reaped)."""
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


def straight(sampler, tmp_path, its):
    """The last checkpoint of an uninterrupted run of `its` iterations (seed 1)."""
    run_tiny(sampler, tmp_path / "straight", its)
    return weights(tmp_path / "straight" / f"{NAME}_ANML-{its - 1}.pth")


# Case 1: two runs in one folder.

def test_a_locked_folder_is_refused_naming_the_holder(sampler, tmp_path):
    lock = tmp_path / f".{NAME}.lock"
    holder = subprocess.Popen([sys.executable, "-c", f"import fcntl, os, time; fd = os.open({str(lock)!r}, os.O_RDWR | "
                               f"os.O_CREAT); os.write(fd, str(os.getpid()).encode()); fcntl.flock(fd, fcntl.LOCK_EX); "
                               f"print('locked', flush=True); time.sleep(60)"], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "locked\n"
        with pytest.raises(ValueError, match=rf"in use by another run of {NAME} \(pid {holder.pid}, lock "):
            run_tiny(sampler, tmp_path, 2)
    finally:
        holder.kill()
        holder.wait()
    assert not list(tmp_path.glob("*.pth"))


def test_a_stale_lock_is_taken_over_with_a_notice(sampler, tmp_path, capsys):
    (tmp_path / f".{NAME}.lock").write_text(f"{dead_pid()}\n")
    run_tiny(sampler, tmp_path, 1)
    assert "notice: taking over the lock" in capsys.readouterr().err
    assert not (tmp_path / f".{NAME}.lock").exists()  # released at the end


def test_a_new_run_does_not_overwrite_an_unfinished_one(sampler, tmp_path):
    """Run A (seed 7) stopped after iteration 0; run B (seed 8) in the same folder is refused and
    leaves A's files alone, so that A's resume gives what A alone would have."""
    _, stopped = run_tiny(sampler, tmp_path / "a", 3, seed=7, time_limit=1e-9)
    assert stopped is not None
    log = (tmp_path / "a" / f"{NAME}_train_log.csv").read_text()
    with pytest.raises(ValueError, match=r"already holds a run of 4_3_36 \(.*--seed 7.*\), resumable after "
                                         r"iteration 0: continue it with --resume latest"):
        run_tiny(sampler, tmp_path / "a", 5, seed=8)
    assert resumables(tmp_path / "a") == [f"{NAME}_ANML-0_resume.pt"]
    assert (tmp_path / "a" / f"{NAME}_train_log.csv").read_text() == log
    run_tiny(sampler, tmp_path / "a", 3, seed=7, resume="latest")
    run_tiny(sampler, tmp_path / "alone", 3, seed=7)
    last = f"{NAME}_ANML-2.pth"
    assert same_weights(weights(tmp_path / "a" / last), weights(tmp_path / "alone" / last))


def test_a_finished_run_may_be_repeated_with_the_same_flags(sampler, tmp_path, capsys):
    run_tiny(sampler, tmp_path, 2)
    run_tiny(sampler, tmp_path, 2)
    assert "finished run of 4_3_36 with the same flags" in capsys.readouterr().err
    with pytest.raises(ValueError, match="already holds a run"):
        run_tiny(sampler, tmp_path, 2, outer_lr=0.5)


# Case 2: a failed write (a full disk) ends the run and keeps the last good resumable checkpoint.

def test_a_failed_checkpoint_write_keeps_the_last_good_one(sampler, tmp_path, monkeypatch):
    real_save = torch.save

    def full_disk(obj, f):  # what torch.save does when the disk fills: half a file, then RuntimeError
        if isinstance(obj, dict) and obj.get("iteration") == 2:
            buffer = io.BytesIO()
            real_save(obj, buffer)
            f.write(buffer.getvalue()[:buffer.tell() // 2])
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 320 vs 192")
        return real_save(obj, f)

    monkeypatch.setattr(checkpoints.torch, "save", full_disk)
    with pytest.raises(WriteError, match=r"could not write .*ANML-2_resume.pt: RuntimeError: \[enforce fail.*; the "
                                         r"last good resumable checkpoint is .*ANML-0_resume.pt: free some space"):
        run_tiny(sampler, tmp_path / "split", 4, save_every=2)
    monkeypatch.setattr(checkpoints.torch, "save", real_save)
    assert resumables(tmp_path / "split") == [f"{NAME}_ANML-0_resume.pt"]
    assert not list((tmp_path / "split").glob(".*.tmp"))
    run_tiny(sampler, tmp_path / "split", 4, save_every=2, resume="latest")
    assert same_weights(weights(tmp_path / "split" / f"{NAME}_ANML-3.pth"), straight(sampler, tmp_path, 4))


# Case 3: NaN.

def test_a_diverging_run_stops_before_saving_nan(sampler, tmp_path):
    with pytest.raises(Diverged, match="training diverged.*last good resumable checkpoint is"):
        run_tiny(sampler, tmp_path, 30, outer_lr=1e9, save_every=5)
    saved = list(tmp_path.glob("*.pth")) + list(tmp_path.glob("*_resume.pt"))
    assert saved and resumables(tmp_path)
    for path in saved:
        state = weights(path)
        state = state.get("model", state)
        assert all(torch.isfinite(v).all() for v in state.values()), path
    assert "nan" in (tmp_path / f"{NAME}_train_log.csv").read_text()


def test_a_nan_loss_is_caught_when_the_log_is_written(tmp_path):
    log = TrainingLog(tmp_path / "log.csv", 0)
    log.add(0, torch.tensor(1.5), torch.tensor(0.5), 0.1)
    log.add(1, torch.tensor(float("nan")), torch.tensor(0.0), 0.2)
    with pytest.raises(Diverged, match="the loss is nan at iteration 1"):
        log.flush()


def test_nan_checkpoints_are_refused(sampler, tmp_path):
    run_tiny(sampler, tmp_path, 1)
    state = weights(tmp_path / f"{NAME}_ANML-0_resume.pt")
    state["model"]["fc.weight"][0, 0] = float("nan")
    torch.save(state, tmp_path / f"{NAME}_ANML-0_resume.pt")
    with pytest.raises(Diverged, match=r"non-finite weights \(NaN or inf in fc.weight\)") as error:
        run_tiny(sampler, tmp_path, 3, resume="latest")
    assert "last good" not in str(error.value)  # that file is not good
    torch.save(state["model"], tmp_path / "nan.pth")
    with pytest.raises(ValueError, match="nan.pth holds non-finite weights"):
        anml.load_model(tmp_path / "nan.pth")


# Case 4: resume with other flags.

def test_resume_refuses_other_flags_but_not_more_epochs(sampler, tmp_path):
    run_tiny(sampler, tmp_path, 2)
    with pytest.raises(ValueError, match=r"was trained with --outer-lr 0.001 --seed 1, not --outer-lr 0.5 --seed 99: "
                                         r"pass its flags .* another --out-dir"):
        run_tiny(sampler, tmp_path, 3, seed=99, outer_lr=0.5, resume="latest")
    with pytest.raises(ValueError, match=r"--backend auto, not --backend higher"):
        sampler.rng = np.random.default_rng(1)
        anml.train(4, 3, 36, its=3, sampler=sampler, out_dir=tmp_path, backend="higher", quiet=True, resume="latest")
    assert resumables(tmp_path) == [f"{NAME}_ANML-1_resume.pt"]


def test_an_older_checkpoint_without_flags_resumes_with_a_notice(sampler, tmp_path, capsys):
    run_tiny(sampler, tmp_path / "split", 2)
    path = tmp_path / "split" / f"{NAME}_ANML-1_resume.pt"
    state = weights(path)
    del state["config"]
    torch.save(state, path)
    run_tiny(sampler, tmp_path / "split", 4, resume="latest")
    assert "records no flags (written by an older version)" in capsys.readouterr().err
    assert same_weights(weights(tmp_path / "split" / f"{NAME}_ANML-3.pth"), straight(sampler, tmp_path, 4))


# Case 5: nothing left to train.

def test_resume_past_epochs_is_refused(sampler, tmp_path):
    run_tiny(sampler, tmp_path, 3)
    with pytest.raises(ValueError, match=r"already trained 3 iterations, more than --epochs 2: nothing to train "
                                         r"\(give --epochs 3 or more"):
        run_tiny(sampler, tmp_path, 2, resume="latest")


def test_resume_at_epochs_writes_the_last_checkpoint_it_names(sampler, tmp_path, capsys):
    """A run of 5 stopped after iteration 1, resumed with --epochs 2: nothing to train, and the
    checkpoint of iteration 1 ("done: ..._ANML-1.pth") is written from the resumable one."""
    run_tiny(sampler, tmp_path, 5, time_limit=1e-9)
    run_tiny(sampler, tmp_path, 5, resume="latest", time_limit=1e-9)
    assert resumables(tmp_path) == [f"{NAME}_ANML-1_resume.pt"] and not (tmp_path / f"{NAME}_ANML-1.pth").exists()
    _, stopped = run_tiny(sampler, tmp_path, 2, resume="latest")
    assert stopped is None and "nothing to train" in capsys.readouterr().err
    assert same_weights(weights(tmp_path / f"{NAME}_ANML-1.pth"), straight(sampler, tmp_path, 2))


# Case 6: the log, leftovers, bytes, saving on a clock.

def test_resume_tolerates_a_blank_or_partial_log_line(sampler, tmp_path):
    run_tiny(sampler, tmp_path / "split", 2)
    log = tmp_path / "split" / f"{NAME}_train_log.csv"
    log.write_text(log.read_text() + "2,0.51\n\n")
    run_tiny(sampler, tmp_path / "split", 4, resume="latest")
    run_tiny(sampler, tmp_path / "straight", 4)
    assert log.read_text().splitlines()[:1] == ["iteration,loss,accuracy,seconds"]
    rows = lambda p: [l.split(",")[:3] for l in p.read_text().splitlines()[1:]]
    assert rows(log) == rows(tmp_path / "straight" / f"{NAME}_train_log.csv")


def test_a_missing_log_is_reported_and_started_again(sampler, tmp_path, capsys):
    run_tiny(sampler, tmp_path, 2)
    (tmp_path / f"{NAME}_train_log.csv").unlink()
    run_tiny(sampler, tmp_path, 3, resume="latest")
    assert "training log" in capsys.readouterr().err
    assert (tmp_path / f"{NAME}_train_log.csv").read_text().splitlines()[1].startswith("2,")


def test_temporaries_of_dead_processes_are_removed(sampler, tmp_path):
    dead = tmp_path / f".{NAME}_ANML-0_resume.pt.{dead_pid()}.tmp"
    alive = tmp_path / f".{NAME}_ANML-0_resume.pt.{os.getppid()}.tmp"
    other = tmp_path / ".notes.tmp"
    for path in (dead, alive, other):
        path.write_bytes(b"partial")
    run_tiny(sampler, tmp_path, 1)
    assert not dead.exists() and alive.exists() and other.exists()


def test_checkpoint_bytes_depend_only_on_the_weights(tmp_path):
    state = {"w": torch.arange(12.0).reshape(3, 4), "b": torch.ones(3)}
    save_atomic(state, tmp_path / "a" / "4_3_36_ANML-0.pth")
    save_atomic(state, tmp_path / "b" / "other_name.pth")
    digest = lambda p: hashlib.sha256(p.read_bytes()).hexdigest()
    assert digest(tmp_path / "a" / "4_3_36_ANML-0.pth") == digest(tmp_path / "b" / "other_name.pth")


def test_resumable_checkpoints_are_also_saved_on_a_clock(sampler, tmp_path, monkeypatch):
    saved = []
    real = anml.save_training_state
    monkeypatch.setattr(anml, "save_training_state", lambda out_dir, name, it, *a: (saved.append(it),
                                                                                     real(out_dir, name, it, *a))[1])
    run_tiny(sampler, tmp_path / "often", 4, save_minutes=1e-9)
    assert saved == [0, 1, 2, 3]
    saved.clear()
    run_tiny(sampler, tmp_path / "default", 4)
    assert saved == [0, 3]
