"""The run loop's promises, for meta-training (anml.train) and pretraining (pretrain_omni.pretrain)
alike: one process per run, no run overwritten or mixed, a resume only with the run's own settings
and exactly where it stopped, saves that never make things worse, a NaN stop, a log that survives."""
import hashlib
import io
import os
import re
import subprocess
import sys

import numpy as np
import pytest
import torch

import anml
from harness import checkpoints
import pretrain_omni
from harness.atomic import WriteError
from harness.checkpoints import Diverged, checkpoint_path, newest_resumable, read_training_state, save_atomic
from harness.config import MetaTrainConfig, PretrainConfig
from conftest import TINY, same_weights, weights
from harness.training_log import TrainingLog, log_row_iteration

NAME = "4_3_36"
KINDS = ["ANML", "pretrain", "asb"]
STEPWISE = ("ANML", "asb")  # a checkpoint index per step (iteration, episode); pretraining's is per epoch
LOG = {"ANML": f"{NAME}_train_log.csv", "pretrain": f"{NAME}_pretrain_log.csv", "asb": f"{NAME}_asb_log.csv"}
PRETRAIN_CLASSES, PRETRAIN_BATCH = 100, 400  # pretraining here: 2,000 images, 5 steps an epoch


class FewClasses:
    """The sampler's first PRETRAIN_CLASSES background classes: an epoch of pretraining in a second."""

    def __init__(self, sampler):
        self.background, self.rng = sampler.background[:PRETRAIN_CLASSES], sampler.rng


@pytest.fixture(autouse=True)
def few_background_classes(monkeypatch):
    """Pretraining's epoch (config.PretrainConfig) counts the images of FewClasses."""
    from harness import config
    monkeypatch.setattr(config, "NUM_BACKGROUND", PRETRAIN_CLASSES)


def config_of(kind, out_dir, steps, seed=1, **kw):
    """A tiny run of `steps` iterations (ANML), epochs of 5 steps (pretrain) or episodes (asb, zapping)
    in `out_dir`."""
    if kind == "ANML":
        return MetaTrainConfig(**TINY, epochs=steps, seed=seed, out_dir=str(out_dir), **kw)
    lr = kw.pop("outer_lr", 1e-3)
    if kind == "asb":
        return PretrainConfig(**TINY, schedule="asb", episodes=steps, seed=seed, out_dir=str(out_dir), lr=lr,
                              **{"zap": True, **kw})
    return PretrainConfig(**TINY, epochs=steps, seed=seed, out_dir=str(out_dir), batch_size=PRETRAIN_BATCH, lr=lr, **kw)


def run_tiny(kind, sampler, out_dir, steps, seed=1, **kw):
    """Train a tiny run, its sampler at the state OmniSampler(seed=seed) starts from."""
    sampler.rng = np.random.default_rng(seed)
    config = config_of(kind, out_dir, steps, seed, **kw)
    if kind == "ANML":
        return anml.train(config, sampler, quiet=True)
    return pretrain_omni.pretrain(config, sampler if kind == "asb" else FewClasses(sampler), quiet=True)


def last_checkpoint(kind, out_dir, steps):
    return checkpoint_path(out_dir, NAME, steps - 1, kind=kind)


def resumables(out_dir):
    return sorted(p.name for p in out_dir.glob("*_resume.pt"))


def dead_pid():
    """The pid of a process that has ended (and been reaped)."""
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


def straight(kind, sampler, tmp_path, steps):
    """The last checkpoint of an uninterrupted run (seed 1)."""
    run_tiny(kind, sampler, tmp_path / "straight", steps)
    return weights(last_checkpoint(kind, tmp_path / "straight", steps))


# ----------------------------------------------------------------------------- exact resume

@pytest.mark.parametrize("kind", KINDS)
def test_stopped_then_resumed_equals_one_run(kind, sampler, tmp_path):
    """Stopped by the time limit after its first step, then resumed: the same checkpoints and log
    (losses and accuracies) as a run straight through, each step once in the log."""
    steps = 4 if kind == "ANML" else 2
    _, stopped, _ = run_tiny(kind, sampler, tmp_path / "split", steps, time_limit=1e-9)
    assert stopped.startswith("time limit")
    assert resumables(tmp_path / "split") == [f"{NAME}_{kind}-0_resume.pt"]
    _, stopped, [last] = run_tiny(kind, sampler, tmp_path / "split", steps, resume="latest")
    assert stopped is None and last == last_checkpoint(kind, tmp_path / "split", steps)
    assert same_weights(weights(last), straight(kind, sampler, tmp_path, steps))
    logs = [np.loadtxt(d / LOG[kind], delimiter=",", skiprows=1) for d in (tmp_path / "straight", tmp_path / "split")]
    np.testing.assert_array_equal(logs[0][:, :3], logs[1][:, :3])
    assert logs[0][:, 0].tolist() == list(range(len(logs[0])))


# ----------------------------------------------------------------------------- one run per folder

@pytest.mark.parametrize("kind", KINDS)
def test_a_locked_folder_is_refused_naming_the_holder(kind, sampler, tmp_path):
    lock = tmp_path / (f".{NAME}.lock" if kind == "ANML" else f".{NAME}_{kind}.lock")
    holder = subprocess.Popen([sys.executable, "-c", f"import fcntl, os, time; fd = os.open({str(lock)!r}, os.O_RDWR | "
                               f"os.O_CREAT); os.write(fd, str(os.getpid()).encode()); fcntl.flock(fd, fcntl.LOCK_EX); "
                               f"print('locked', flush=True); time.sleep(60)"], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "locked\n"
        with pytest.raises(ValueError, match=rf"in use by another run of {NAME} \(pid {holder.pid}, lock "):
            run_tiny(kind, sampler, tmp_path, 1)
    finally:
        holder.kill()
        holder.wait()
    assert not list(tmp_path.glob("*.pth")) and not list(tmp_path.glob("*.csv"))


def test_a_stale_lock_is_taken_over_with_a_notice(sampler, tmp_path, capsys):
    (tmp_path / f".{NAME}.lock").write_text(f"{dead_pid()}\n")
    run_tiny("ANML", sampler, tmp_path, 1)
    assert "notice: taking over the lock" in capsys.readouterr().err
    assert not (tmp_path / f".{NAME}.lock").exists()  # released at the end


# ----------------------------------------------------------------------------- no run overwritten or mixed

@pytest.mark.parametrize("kind", KINDS)
def test_a_new_run_does_not_overwrite_an_unfinished_one(kind, sampler, tmp_path):
    """Run A (seed 7) stopped after its first step; run B (seed 8) in the same folder is refused and
    leaves A's files alone, so that A's resume gives what A alone gives."""
    _, stopped, _ = run_tiny(kind, sampler, tmp_path / "a", 2, seed=7, time_limit=1e-9)
    assert stopped is not None
    before = {p.name: p.read_bytes() for p in (tmp_path / "a").iterdir()}
    with pytest.raises(ValueError, match=rf"already holds a run of {NAME} \(.*--seed 7.*\), resumable after "
                                         rf"(iteration|step|episode) 0: continue it with --resume latest"):
        run_tiny(kind, sampler, tmp_path / "a", 3, seed=8)
    assert {p.name: p.read_bytes() for p in (tmp_path / "a").iterdir()} == before
    run_tiny(kind, sampler, tmp_path / "a", 2, seed=7, resume="latest")
    run_tiny(kind, sampler, tmp_path / "alone", 2, seed=7)
    assert same_weights(weights(last_checkpoint(kind, tmp_path / "a", 2)),
                        weights(last_checkpoint(kind, tmp_path / "alone", 2)))


@pytest.mark.parametrize("kind", KINDS)
def test_a_folder_with_another_runs_files_but_no_resumable_one_is_refused(kind, sampler, tmp_path):
    """A finished run whose resumable checkpoint is gone (as the shipped model's folder): a new run
    there would overwrite its log and mix its checkpoints with the old ones, so it is refused."""
    run_tiny(kind, sampler, tmp_path, 1)
    for path in tmp_path.glob("*_resume.pt"):
        path.unlink()
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    with pytest.raises(ValueError, match=rf"{tmp_path} already holds files of another {kind} run of {NAME} "
                                         rf"\(.*\): a new run there would overwrite or mix with them"):
        run_tiny(kind, sampler, tmp_path, 2)
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before


def test_a_finished_run_may_be_repeated_with_the_same_settings(sampler, tmp_path, capsys):
    run_tiny("ANML", sampler, tmp_path, 2)
    run_tiny("ANML", sampler, tmp_path, 2)
    assert "finished run of 4_3_36 with the same settings" in capsys.readouterr().err
    with pytest.raises(ValueError, match="already holds a run"):
        run_tiny("ANML", sampler, tmp_path, 2, outer_lr=0.5)


def test_meta_training_and_pretraining_share_a_folder_without_touching_each_other(sampler, tmp_path):
    run_tiny("ANML", sampler, tmp_path, 1)
    run_tiny("pretrain", sampler, tmp_path, 1)
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        f"{NAME}_ANML-0.pth", f"{NAME}_ANML-0_resume.pt", f"{NAME}_pretrain-0.pth", f"{NAME}_pretrain-4_resume.pt",
        LOG["pretrain"], LOG["ANML"]]


# ----------------------------------------------------------------------------- resume with the run's own settings

@pytest.mark.parametrize("kind", KINDS)
def test_resume_refuses_other_settings_but_not_more_epochs(kind, sampler, tmp_path):
    run_tiny(kind, sampler, tmp_path, 1)
    flag = "--outer-lr 0.001" if kind == "ANML" else "--lr 0.001"
    with pytest.raises(ValueError, match=rf"was trained with {flag} --seed 1, not {flag.replace('0.001', '0.5')} "
                                         rf"--seed 99: pass its flags .* another --out-dir"):
        run_tiny(kind, sampler, tmp_path, 2, seed=99, outer_lr=0.5, resume="latest")
    if kind == "ANML":
        with pytest.raises(ValueError, match=r"--backend auto, not --backend higher"):
            run_tiny(kind, sampler, tmp_path, 2, backend="higher", resume="latest")
        with pytest.raises(ValueError, match=r"was trained with --first-order off, not --first-order"):
            run_tiny(kind, sampler, tmp_path, 2, first_order=True, resume="latest")
    elif kind == "asb":
        with pytest.raises(ValueError, match=r"was trained with --zap --seq-lr 0.1, not --zap off --seq-lr 0.2"):
            run_tiny(kind, sampler, tmp_path, 2, zap=False, seq_lr=0.2, resume="latest")
        with pytest.raises(ValueError, match=r"was trained with --open-gate off, not --open-gate"):
            run_tiny(kind, sampler, tmp_path, 2, open_gate=True, resume="latest")
        with pytest.raises(ValueError, match=r"was trained with --conv-init torch, not --conv-init kaiming"):
            run_tiny(kind, sampler, tmp_path, 2, conv_init="kaiming", resume="latest")
    else:
        with pytest.raises(ValueError, match=r"was trained with --batch-size 400, not --batch-size 200"):
            pretrain_omni.pretrain(PretrainConfig(**TINY, epochs=2, batch_size=200, out_dir=str(tmp_path),
                                                  resume="latest"), FewClasses(sampler), quiet=True)
        with pytest.raises(ValueError, match=r"was trained with --lobotomize off, not --lobotomize"):
            run_tiny(kind, sampler, tmp_path, 2, lobotomize=True, resume="latest")
    before = resumables(tmp_path)
    run_tiny(kind, sampler, tmp_path, 2, resume="latest")  # more epochs: allowed
    assert resumables(tmp_path) != before


@pytest.mark.parametrize("kind", ["asb", "pretrain"])
def test_flags_a_run_does_not_read_do_not_block_its_resume(kind, sampler, tmp_path):
    """ASB reads no --batch-size, the i.i.d. schedule no --seq-lr (OML's --nm and
    --mask: tests/test_oml.py): a resume that gives them other values continues the run."""
    run_tiny(kind, sampler, tmp_path / "split", 1, time_limit=1e-9)
    ignored = dict(batch_size=64) if kind == "asb" else dict(seq_lr=0.5)
    _, stopped, _ = run_tiny(kind, sampler, tmp_path / "split", 2, resume="latest", **ignored)
    assert stopped is None


@pytest.mark.parametrize("kind", KINDS)
def test_a_checkpoint_without_settings_is_refused_in_one_line(kind, sampler, tmp_path):
    run_tiny(kind, sampler, tmp_path / "split", 1)
    path = newest_resumable(tmp_path / "split", NAME, kind)
    state = torch.load(path, weights_only=True)
    del state["config"], state["kind"]
    torch.save(state, path)
    with pytest.raises(ValueError, match="records no settings, so it cannot be checked"):
        run_tiny(kind, sampler, tmp_path / "split", 2, resume="latest")


def test_a_setting_the_checkpoint_does_not_record_is_its_default(sampler, tmp_path):
    """A run saved before a setting existed (here ASB's --open-gate) ran with what is now its default:
    it resumes without the flag, and is refused with it."""
    run_tiny("asb", sampler, tmp_path / "split", 1)
    path = newest_resumable(tmp_path / "split", NAME, "asb")
    state = torch.load(path, weights_only=True)
    del state["config"]["open_gate"]
    torch.save(state, path)
    with pytest.raises(ValueError, match=r"was trained with --open-gate off, not --open-gate"):
        run_tiny("asb", sampler, tmp_path / "split", 2, open_gate=True, resume="latest")
    run_tiny("asb", sampler, tmp_path / "split", 2, resume="latest")


def test_a_checkpoint_of_the_previous_format_resumes_exactly(sampler, tmp_path):
    """The previous version recorded the nine run settings as its whole `config` and no `kind`: such
    a checkpoint resumes, its settings are checked, and the run ends where a straight one does."""
    run_tiny("ANML", sampler, tmp_path / "split", 1)
    path = newest_resumable(tmp_path / "split", NAME)
    state = torch.load(path, weights_only=True)
    state["config"] = {k: state["config"][k] for k in MetaTrainConfig.RUN_KEYS}
    del state["kind"]
    torch.save(state, path)
    with pytest.raises(ValueError, match="was trained with --seed 1, not --seed 2"):
        run_tiny("ANML", sampler, tmp_path / "split", 2, seed=2, resume="latest")
    run_tiny("ANML", sampler, tmp_path / "split", 2, resume="latest")
    assert same_weights(weights(tmp_path / "split" / f"{NAME}_ANML-1.pth"), straight("ANML", sampler, tmp_path, 2))


def test_resume_past_epochs_is_refused_and_at_epochs_writes_the_last_checkpoint(sampler, tmp_path, capsys):
    """A run of 5 stopped after iteration 1, resumed with --epochs 2: nothing to train, and the
    checkpoint of iteration 1 ("done: ..._ANML-1.pth") is written from the resumable one; with
    --epochs 1 it is an error (a run cannot go back)."""
    run_tiny("ANML", sampler, tmp_path, 5, time_limit=1e-9)
    run_tiny("ANML", sampler, tmp_path, 5, resume="latest", time_limit=1e-9)
    assert resumables(tmp_path) == [f"{NAME}_ANML-1_resume.pt"] and not (tmp_path / f"{NAME}_ANML-1.pth").exists()
    with pytest.raises(ValueError, match=r"already trained 2 iterations, more than --epochs 1: nothing to train "
                                         r"\(give --epochs 2 or more"):
        run_tiny("ANML", sampler, tmp_path, 1, resume="latest")
    _, stopped, [last] = run_tiny("ANML", sampler, tmp_path, 2, resume="latest")
    assert stopped is None and last == tmp_path / f"{NAME}_ANML-1.pth"
    assert "nothing to train" in capsys.readouterr().err
    assert same_weights(weights(last), straight("ANML", sampler, tmp_path, 2))


def test_resume_at_the_end_rewrites_a_damaged_last_checkpoint(sampler, tmp_path, capsys):
    run_tiny("ANML", sampler, tmp_path, 2)
    last = tmp_path / f"{NAME}_ANML-1.pth"
    good = last.read_bytes()
    last.write_bytes(b"")
    _, stopped, [done] = run_tiny("ANML", sampler, tmp_path, 2, resume="latest")
    assert stopped is None and done == last and last.read_bytes() == good
    assert "nothing to train" in capsys.readouterr().err


def test_pretraining_past_its_epochs_is_refused_in_epochs(sampler, tmp_path):
    run_tiny("pretrain", sampler, tmp_path, 2)
    with pytest.raises(ValueError, match=r"already trained 10 steps, more than --epochs 1 \(5 steps\): nothing to "
                                         r"train \(give --epochs 2 or more"):
        run_tiny("pretrain", sampler, tmp_path, 1, resume="latest")


def test_resume_refuses_another_kinds_damaged_or_stray_files(sampler, tmp_path):
    run_tiny("pretrain", sampler, tmp_path / "pre", 1)
    pre = newest_resumable(tmp_path / "pre", NAME, "pretrain")
    with pytest.raises(ValueError, match=r"is a resumable checkpoint of pretrain_omni\.py, not of train_omni\.py"):
        run_tiny("ANML", sampler, tmp_path / "pre", 2, resume=str(pre))
    run_tiny("ANML", sampler, tmp_path / "run", 2, time_limit=1e-9)
    path = newest_resumable(tmp_path / "run", NAME)
    for damage, message in [(dict(iteration=-1), r"its iteration is -1"), (dict(iteration="3"), r"its iteration is '3'"),
                            (dict(rng={"numpy": {"state": 1}, "torch": torch.zeros(3, dtype=torch.uint8), "cuda": []}),
                             r"its random-number state does not load")]:
        state = torch.load(path, weights_only=True)
        state.update(damage)
        torch.save(state, tmp_path / "damaged_resume.pt")
        with pytest.raises(ValueError, match=rf"damaged_resume\.pt is damaged \({message}"):
            read_training_state(tmp_path / "damaged_resume.pt")


def test_a_copy_beside_the_resumable_checkpoint_is_left_alone(sampler, tmp_path):
    """Names are matched exactly: `..._ANML-0_backup_resume.pt` is neither resumed nor deleted."""
    run_tiny("ANML", sampler, tmp_path, 3, time_limit=1e-9)
    backup = tmp_path / f"{NAME}_ANML-0_backup_resume.pt"
    backup.write_bytes((tmp_path / f"{NAME}_ANML-0_resume.pt").read_bytes())
    run_tiny("ANML", sampler, tmp_path, 3, resume=str(tmp_path / f"{NAME}_ANML-0_resume.pt"))
    assert backup.is_file() and resumables(tmp_path) == sorted([backup.name, f"{NAME}_ANML-2_resume.pt"])
    run_tiny("ANML", sampler, tmp_path, 4, resume="latest")
    assert same_weights(weights(tmp_path / f"{NAME}_ANML-3.pth"), straight("ANML", sampler, tmp_path, 4))


# ----------------------------------------------------------------------------- saving never makes things worse

@pytest.mark.parametrize("kind", KINDS)
def test_a_failed_checkpoint_write_keeps_the_last_good_one(kind, sampler, tmp_path, monkeypatch):
    real_save = torch.save

    def full_disk(obj, f):  # what torch.save does when the disk fills: half a file, then RuntimeError
        if isinstance(obj, dict) and obj.get("iteration", 0) > 4:
            buffer = io.BytesIO()
            real_save(obj, buffer)
            f.write(buffer.getvalue()[:buffer.tell() // 2])
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 320 vs 192")
        return real_save(obj, f)

    monkeypatch.setattr(checkpoints.torch, "save", full_disk)
    stepwise = kind in STEPWISE
    steps = 6 if stepwise else 2
    first = f"{NAME}_{kind}-4_resume.pt"  # ANML and asb save at every step here, pretraining after each epoch
    with pytest.raises(WriteError, match=rf"could not write .*_resume\.pt: RuntimeError: \[enforce fail.*; the last "
                                         rf"good resumable checkpoint is .*{first}: free some space"):
        run_tiny(kind, sampler, tmp_path / "split", steps, save_minutes=1e-9 if stepwise else 5)
    monkeypatch.setattr(checkpoints.torch, "save", real_save)
    assert resumables(tmp_path / "split") == [first] and not list((tmp_path / "split").glob(".*.tmp"))
    run_tiny(kind, sampler, tmp_path / "split", steps, resume="latest")
    assert same_weights(weights(last_checkpoint(kind, tmp_path / "split", steps)),
                        straight(kind, sampler, tmp_path, steps))


def test_temporaries_of_dead_processes_are_removed(sampler, tmp_path):
    dead = tmp_path / f".{NAME}_ANML-0_resume.pt.{dead_pid()}.tmp"
    alive = tmp_path / f".{NAME}_ANML-0_resume.pt.{os.getppid()}.tmp"
    other = tmp_path / ".notes.tmp"
    for path in (dead, alive, other):
        path.write_bytes(b"partial")
    run_tiny("pretrain", sampler, tmp_path, 1)
    assert not dead.exists() and alive.exists() and other.exists()


def test_checkpoint_bytes_depend_only_on_the_weights(tmp_path):
    state = {"w": torch.arange(12.0).reshape(3, 4), "b": torch.ones(3)}
    save_atomic(state, tmp_path / "a" / "4_3_36_ANML-0.pth")
    save_atomic(state, tmp_path / "b" / "other_name.pth")
    digest = lambda p: hashlib.sha256(p.read_bytes()).hexdigest()
    assert digest(tmp_path / "a" / "4_3_36_ANML-0.pth") == digest(tmp_path / "b" / "other_name.pth")


@pytest.mark.parametrize("kind", KINDS)
def test_resumable_checkpoints_are_also_saved_on_a_clock(kind, sampler, tmp_path, monkeypatch):
    from harness import training_run
    saved = []
    real = training_run.save_training_state
    monkeypatch.setattr(training_run, "save_training_state", lambda out_dir, name, it, *a, **k: (
        saved.append(it), real(out_dir, name, it, *a, **k))[1])
    stepwise = kind in STEPWISE
    steps = 4 if stepwise else 1
    run_tiny(kind, sampler, tmp_path / "often", steps, save_minutes=1e-9)
    assert saved == list(range(steps if stepwise else 5))
    saved.clear()
    run_tiny(kind, sampler, tmp_path / "default", steps)
    assert saved == ([0, 3] if stepwise else [4])


# ----------------------------------------------------------------------------- NaN stops the run

@pytest.mark.parametrize("kind", KINDS)
def test_a_diverging_run_stops_before_saving_nan(kind, sampler, tmp_path):
    steps = 30 if kind == "ANML" else 3
    with pytest.raises(Diverged, match=r"training diverged.*last good resumable checkpoint is|no resumable"):
        run_tiny(kind, sampler, tmp_path, steps, outer_lr=1e9 if kind == "ANML" else 1e30)
    for path in list(tmp_path.glob("**/*.pth")) + list(tmp_path.glob("**/*_resume.pt")):
        assert all(torch.isfinite(v).all() for v in weights(path).values()), path
    kept = tmp_path / LOG[kind] if newest_resumable(tmp_path, NAME, kind) else tmp_path / "diverged" / LOG[kind]
    assert "nan" in kept.read_text()
    assert not list(tmp_path.glob(f"**/{NAME}_{kind}-{steps - 1}.pth"))


def test_a_run_that_diverges_before_its_first_resumable_checkpoint_leaves_its_folder_free(sampler, tmp_path):
    """ASB's sequential steps at --seq-lr 1e30 diverge in the first episode: the log that shows it is
    moved to diverged/, and the same command with a sane rate then starts in that folder."""
    with pytest.raises(Diverged, match=r"no resumable checkpoint was written; its files are in .*diverged/: the same "
                                        r"command with a smaller --seq-lr or --lr starts again there"):
        run_tiny("asb", sampler, tmp_path, 2, seq_lr=1e30)
    assert "nan" in (tmp_path / "diverged" / LOG["asb"]).read_text()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["diverged"]
    _, stopped, [last] = run_tiny("asb", sampler, tmp_path, 2)
    assert stopped is None and last.is_file()


def test_runs_trained_together_stop_together_when_one_diverges(sampler, tmp_path):
    """--outer-lr 1e9 0.001: the first run diverges; both stop before anything non-finite is saved,
    and the message names each run's last good resumable checkpoint."""
    config = MetaTrainConfig(**TINY, epochs=30, outer_lrs=(1e9, 1e-3), out_dir=str(tmp_path), save_minutes=1e-9)
    sampler.rng = np.random.default_rng(1)
    with pytest.raises(Diverged, match=r"training diverged.*last good resumable checkpoints are .*seed1_outer-lr0\.001"
                                       r"/.*_resume\.pt, .*seed1_outer-lr1e\+09/.*_resume\.pt"):
        anml.train(config, sampler, quiet=True)
    folders = sorted(p.name for p in tmp_path.iterdir())
    assert folders == ["seed1_outer-lr0.001", "seed1_outer-lr1e+09"]
    for path in list(tmp_path.glob("*/*.pth")) + list(tmp_path.glob("*/*_resume.pt")):
        assert all(torch.isfinite(v).all() for v in weights(path).values()), path
    assert "nan" in (tmp_path / "seed1_outer-lr1e+09" / LOG["ANML"]).read_text()


def test_a_nan_loss_is_caught_when_the_log_is_written(tmp_path):
    log = TrainingLog(tmp_path / "log.csv", 0)
    log.add(0, torch.tensor(1.5), torch.tensor(0.5), 0.1)
    log.add(1, torch.tensor(float("nan")), torch.tensor(0.0), 0.2)
    with pytest.raises(Diverged, match="the loss is nan at iteration 1"):
        log.flush()


def test_nan_checkpoints_are_refused(sampler, tmp_path):
    run_tiny("ANML", sampler, tmp_path, 1)
    state = torch.load(tmp_path / f"{NAME}_ANML-0_resume.pt", weights_only=True)
    state["model"]["fc.weight"][0, 0] = float("nan")
    torch.save(state, tmp_path / f"{NAME}_ANML-0_resume.pt")
    with pytest.raises(Diverged, match=r"non-finite weights \(NaN or inf in fc.weight\)") as error:
        run_tiny("ANML", sampler, tmp_path, 3, resume="latest")
    assert "last good" not in str(error.value)  # that file is not good


# ----------------------------------------------------------------------------- the log survives

@pytest.mark.parametrize("garbage", ["2,0.51\n\n", "inf,0.5,0.5,1\n", "nan,0.5,0.5,1\n", "1e400,1,1,1\n", "-1,1,1,1\n",
                                     "x,y\n", "\x00\x00\n"])
def test_resume_tolerates_a_damaged_log_line(garbage, sampler, tmp_path):
    run_tiny("ANML", sampler, tmp_path / "split", 2)
    log = tmp_path / "split" / LOG["ANML"]
    log.write_text(log.read_text() + garbage)
    run_tiny("ANML", sampler, tmp_path / "split", 4, resume="latest")
    run_tiny("ANML", sampler, tmp_path / "straight", 4)
    assert log.read_text().splitlines()[:1] == ["iteration,loss,accuracy,seconds"]
    rows = lambda p: [line.split(",")[:3] for line in p.read_text().splitlines()[1:]]
    assert rows(log) == rows(tmp_path / "straight" / LOG["ANML"])


def test_log_rows_are_read_strictly():
    assert log_row_iteration("3,0.5,0.25,1.0") == 3
    for line in ("3,0.5,0.25", "", "3.5,1,1,1", "inf,1,1,1", "nan,1,1,1", "-2,1,1,1", "a,b,c,d"):
        assert log_row_iteration(line) is None, line


def test_a_missing_log_is_reported_and_started_again(sampler, tmp_path, capsys):
    run_tiny("ANML", sampler, tmp_path, 2)
    (tmp_path / LOG["ANML"]).unlink()
    run_tiny("ANML", sampler, tmp_path, 3, resume="latest")
    assert "training log" in capsys.readouterr().err
    assert (tmp_path / LOG["ANML"]).read_text().splitlines()[1].startswith("2,")


# ----------------------------------------------------------------------------- nothing lost, nothing blocked


def test_a_run_that_fails_before_it_can_resume_leaves_nothing_that_blocks(sampler, tmp_path, monkeypatch, capsys):
    """An i.i.d. pretraining that runs out of memory in its first epoch (its log written, no resumable
    checkpoint yet) removes what it wrote, says so, and the same command then starts in that folder."""
    real, calls = pretrain_omni.train_step, []

    def failing(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 1 bytes")
        return real(*args, **kwargs)
    monkeypatch.setattr(pretrain_omni, "train_step", failing)
    with pytest.raises(RuntimeError, match="can't allocate memory"):
        run_tiny("pretrain", sampler, tmp_path, 1)
    assert "removed 4_3_36_pretrain_log.csv" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []
    monkeypatch.setattr(pretrain_omni, "train_step", real)
    _, stopped, [last] = run_tiny("pretrain", sampler, tmp_path, 1)
    assert stopped is None and last.is_file()


def test_a_refused_resume_leaves_no_empty_folder(sampler, tmp_path):
    with pytest.raises(ValueError, match="no 4_3_36_ANML-\\*_resume.pt"):
        run_tiny("ANML", sampler, tmp_path / "new", 2, resume="latest")
    assert not (tmp_path / "new").exists()
    seeds = MetaTrainConfig(**TINY, epochs=2, seeds=(1, 2), out_dir=str(tmp_path / "a" / "b"), resume="latest")
    with pytest.raises(ValueError, match="no 4_3_36_ANML-\\*_resume.pt"):
        anml.train(seeds, sampler, quiet=True)
    assert list(tmp_path.iterdir()) == []


def test_runs_stopped_between_their_saves_continue_together_exactly(sampler, tmp_path, monkeypatch):
    """--seeds 1 2 stopped (a kill) after seed 1 saved iteration 1 and before seed 2 did: each keeps
    its iteration-0 checkpoint until both have the new one, so --resume latest continues both from
    iteration 0 and they end as two uninterrupted runs."""
    from harness import training_run
    config = lambda out, **kw: MetaTrainConfig(**TINY, epochs=3, seeds=(1, 2), out_dir=str(out), save_minutes=1e-9,
                                               **kw)
    sampler.rng = np.random.default_rng(0)
    anml.train(config(tmp_path / "straight"), sampler, quiet=True)
    real = training_run.save_training_state

    def killed(out_dir, name, it, *args, **kwargs):
        if it == 1 and str(out_dir).endswith("seed2"):
            raise SystemExit("killed")  # as a kill -9 there would: nothing after it runs
        return real(out_dir, name, it, *args, **kwargs)
    monkeypatch.setattr(training_run, "save_training_state", killed)
    with pytest.raises(SystemExit):
        anml.train(config(tmp_path / "split"), sampler, quiet=True)
    assert resumables(tmp_path / "split" / "seed1") == [f"{NAME}_ANML-0_resume.pt", f"{NAME}_ANML-1_resume.pt"]
    assert resumables(tmp_path / "split" / "seed2") == [f"{NAME}_ANML-0_resume.pt"]
    monkeypatch.setattr(training_run, "save_training_state", real)
    _, stopped, lasts = anml.train(config(tmp_path / "split", resume="latest"), sampler, quiet=True)
    assert stopped is None
    for seed, last in zip((1, 2), lasts):
        assert same_weights(weights(last), weights(tmp_path / "straight" / f"seed{seed}" / last.name))
        log = np.loadtxt(tmp_path / "split" / f"seed{seed}" / LOG["ANML"], delimiter=",", skiprows=1)
        assert log[:, 0].tolist() == [0, 1, 2]


def test_checkpoints_of_runs_trained_together_hold_only_their_own_model(sampler, tmp_path):
    """--seeds 1 2: each model is a view of one stack; its files hold its own tensors only, as large as a
    run's alone, and their bytes depend on their content alone (saved again, the same bytes)."""
    anml.train(MetaTrainConfig(**TINY, epochs=2, seeds=(1, 2), out_dir=str(tmp_path / "two")), sampler, quiet=True)
    run_tiny("ANML", sampler, tmp_path / "one", 2)
    files = sorted((tmp_path / "two" / "seed2").glob(f"{NAME}_ANML-*"))
    assert [p.name for p in files] == [f"{NAME}_ANML-0.pth", f"{NAME}_ANML-1.pth", f"{NAME}_ANML-1_resume.pt"]
    for path in files:
        content = torch.load(path, weights_only=True)
        for tensor in tensors_in(content):
            assert tensor.untyped_storage().nbytes() == tensor.numel() * tensor.element_size(), path.name
        if path.suffix == ".pth":
            assert path.stat().st_size == (tmp_path / "one" / path.name).stat().st_size, path.name
            again = io.BytesIO()
            torch.save(content, again)
            assert again.getvalue() == path.read_bytes(), path.name


def tensors_in(obj):
    """Every tensor in nested dicts, lists and tuples."""
    if torch.is_tensor(obj):
        return [obj]
    values = obj.values() if isinstance(obj, dict) else obj if isinstance(obj, (list, tuple)) else []
    return [t for v in values for t in tensors_in(v)]


@pytest.mark.parametrize("spelling", ["relative", "moved"])
def test_runs_stopped_in_their_first_save_continue_whatever_their_folder_is_called(spelling, sampler, tmp_path,
                                                                                     monkeypatch):
    """--seeds 1 2 --out-dir ../w/s5 killed between the seeds' first saves, then continued with the folder
    spelled another way (or after moving it): both --resume latest and the plain command start again."""
    from harness import training_run
    real = training_run.save_training_state

    def killed(out_dir, name, it, *args, **kwargs):
        if str(out_dir).endswith("seed2"):
            raise SystemExit("killed")
        return real(out_dir, name, it, *args, **kwargs)
    (tmp_path / "w").mkdir()
    monkeypatch.chdir(tmp_path / "w")
    typed = os.path.join("..", "w", "s5")
    config = lambda out, **kw: MetaTrainConfig(**TINY, epochs=2, seeds=(1, 2), out_dir=str(out), **kw)
    monkeypatch.setattr(training_run, "save_training_state", killed)
    with pytest.raises(SystemExit):
        anml.train(config(typed), sampler, quiet=True)
    monkeypatch.setattr(training_run, "save_training_state", real)
    folder = tmp_path / "w" / "s5"
    if spelling == "moved":
        folder = folder.rename(tmp_path / "elsewhere")
    for resume in ("latest", None):
        _, stopped, lasts = anml.train(config(folder, resume=resume), sampler, quiet=True)
        assert stopped is None and all(last.is_file() for last in lasts)


def test_the_advice_after_a_failed_first_save_is_the_command_that_works(sampler, tmp_path, monkeypatch):
    """A full disk at the first resumable checkpoint: no resumable checkpoint exists, so the advice is
    the same command without --resume, which then works (--resume latest says the same)."""
    from harness import training_run

    def full(*args, **kwargs):
        raise WriteError("could not write the checkpoint: No space left on device")
    monkeypatch.setattr(training_run, "save_training_state", full)
    with pytest.raises(WriteError, match="run the same command again, without --resume") as failed:
        run_tiny("ANML", sampler, tmp_path, 2)
    assert "--resume latest" not in str(failed.value)
    monkeypatch.setattr(training_run, "save_training_state", checkpoints.save_training_state)
    with pytest.raises(ValueError, match="run the same command without --resume"):
        run_tiny("ANML", sampler, tmp_path, 2, resume="latest")
    _, stopped, [last] = run_tiny("ANML", sampler, tmp_path, 2)
    assert stopped is None and last.is_file()


def test_runs_stopped_in_their_first_save_start_again_together(sampler, tmp_path, monkeypatch, capsys):
    """--seeds 1 2 stopped after seed 1 wrote its first resumable checkpoint and before seed 2 did: no
    iteration can be continued by both, so --resume latest sets seed 1's files aside (moved, not
    deleted), starts both again, and they end as two uninterrupted runs."""
    from harness import training_run
    config = lambda out, **kw: MetaTrainConfig(**TINY, epochs=2, seeds=(1, 2), out_dir=str(out), **kw)
    anml.train(config(tmp_path / "straight"), sampler, quiet=True)
    real = training_run.save_training_state

    def killed(out_dir, name, it, *args, **kwargs):
        if str(out_dir).endswith("seed2"):
            raise SystemExit("killed")
        return real(out_dir, name, it, *args, **kwargs)
    monkeypatch.setattr(training_run, "save_training_state", killed)
    with pytest.raises(SystemExit):
        anml.train(config(tmp_path / "split"), sampler, quiet=True)
    assert resumables(tmp_path / "split" / "seed1") and not resumables(tmp_path / "split" / "seed2")
    monkeypatch.setattr(training_run, "save_training_state", real)
    _, stopped, lasts = anml.train(config(tmp_path / "split", resume="latest"), sampler, quiet=True)
    assert stopped is None and "so they start again" in capsys.readouterr().err
    assert (tmp_path / "split" / "seed1" / "interrupted_first_save" / f"{NAME}_ANML-0_resume.pt").is_file()
    for seed, last in zip((1, 2), lasts):
        assert same_weights(weights(last), weights(tmp_path / "straight" / f"seed{seed}" / last.name))


# ----------------------------------------------------------------------------- what a run says

@pytest.mark.parametrize("kind", KINDS)
def test_a_resumed_run_says_so_and_from_which_step(kind, sampler, tmp_path, capsys):
    """A new run's first line names the backend that runs (func on the CPU, not auto); a resumed run's
    says that it resumes, and from which step of how many."""
    steps = 3
    run_tiny(kind, sampler, tmp_path, steps, time_limit=1e-9)  # stops after step 0
    first = capsys.readouterr().out.splitlines()[0]
    assert first.startswith("meta-training ANML 4_3_36 for 3 its on cpu (backend func," if kind == "ANML" else
                            "pretraining 4_3_36 "), first
    run_tiny(kind, sampler, tmp_path, steps, resume="latest")
    first = capsys.readouterr().out.splitlines()[0]
    total = steps * PRETRAIN_CLASSES * 20 // PRETRAIN_BATCH if kind == "pretrain" else steps
    unit = {"ANML": "iteration", "pretrain": "step", "asb": "episode"}[kind]
    what = "meta-training ANML 4_3_36" if kind == "ANML" else "pretraining 4_3_36"
    assert first.startswith(f"resuming {what}") and f" from {unit} 1 (of {total}) on cpu (" in first, first


def test_a_long_cpu_run_says_once_how_long_it_takes_and_how_to_stop_it(sampler, tmp_path, monkeypatch, capsys):
    """After its first steps, a CPU run estimated long says, in one line and once, about how long the
    rest takes and how to stop and continue it; a short run, or one with --time-limit, does not."""
    from harness import training_run
    run_tiny("ANML", sampler, tmp_path / "short", 8)
    assert "Ctrl-C" not in capsys.readouterr().out
    monkeypatch.setattr(training_run, "LONG_RUN_SECONDS", 0)  # any run is long
    run_tiny("ANML", sampler, tmp_path / "limited", 8, time_limit=1e6)
    assert "Ctrl-C" not in capsys.readouterr().out
    run_tiny("ANML", sampler, tmp_path / "long", 12)
    said = [line for line in capsys.readouterr().out.splitlines() if "Ctrl-C" in line]
    assert len(said) == 1 and re.fullmatch(
        r"about \d+ s for the 6 iterations left \(\d+\.\d\ds each on the CPU\): Ctrl-C stops cleanly with a resumable "
        r"checkpoint, the same command with --resume latest continues it, --time-limit SECONDS stops it by itself",
        said[0]), said
    assert [training_run.duration(s) for s in (40, 720, 5.8 * 3600)] == ["40 s", "12 minutes", "5.8 hours"]


def test_a_resume_from_a_file_that_is_no_checkpoint_names_what_it_is(sampler, tmp_path):
    """--resume given the training log (or a checkpoint cut short): one line saying what the file is,
    never PyTorch's advice about weights_only."""
    run_tiny("ANML", sampler, tmp_path, 1)
    cut = tmp_path / "cut_resume.pt"
    resumable = next(tmp_path.glob("*_resume.pt"))
    cut.write_bytes(resumable.read_bytes()[:4000])
    for path, what in ((tmp_path / LOG["ANML"], "a CSV file .*a training log"), (cut, "a truncated or damaged")):
        with pytest.raises(ValueError, match=f"is not a resumable checkpoint.*{what}") as refused:
            run_tiny("ANML", sampler, tmp_path, 2, resume=str(path))
        assert "weights_only" not in str(refused.value) and "\n" not in str(refused.value)
