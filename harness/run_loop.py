"""The run loop that meta-training and pretraining share, and the rules that keep a run safe:

- one process writes a run's files (`RunLock`, from before the data is loaded until it ends);
- a new run never starts over another run's files, and a resume uses the run's own settings;
- a resumable checkpoint at every milestone, every `--save-minutes`, and on Ctrl-C, SIGTERM, SIGHUP
  or the time limit (`StopSignal`); the previous one is deleted only once the new one is complete;
- a NaN or infinite loss or weight stops the run before anything bad is saved;
- a CSV log of every step, appended across resumes (`TrainingLog`).

A kind of training gives the loop its steps as a `Steps` (anml.train, pretrain_omni.pretrain). Several
runs may train in one loop (`train_omni.py --seeds`): each keeps its own folder, lock, files and
resumable checkpoints, exactly as if it ran alone.
"""
import contextlib
import fcntl
import math
import os
import signal
import threading
import time
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Callable

import torch
from tqdm import tqdm

from harness.atomic import WriteError, probe_writable, remove_stale_temporaries, write_atomic
from harness.checkpoints import (Diverged, apply_training_state, check_finite, check_finite_parameters, checkpoint_path,
                         checkpoints_in, cpu_state_dict, find_resumable, newest_resumable, read_training_state,
                         readable_checkpoint, restore_torch_rng, prune_resumables, save_atomic, save_training_state)
from harness.cli import notice
from harness.config import FLAGS, MAY_CHANGE_ON_RESUME

LOG_EVERY = 10  # steps between log flushes (each checks the losses for NaN)


SAVE_EVERY = 1000  # steps between higherANML's checkpoints of meta-training (and of ASB's episodes)


def milestones(total):
    """step -> the index of higherANML's checkpoint to write after it (every SAVE_EVERY and the last
    of `total`), or None."""
    return lambda it: it if it % SAVE_EVERY == 0 or it == total - 1 else None


def threads_note(device):
    """", N threads" on the CPU (the announcement of a run), else nothing."""
    n = torch.get_num_threads()
    return f", {n} thread{'s' if n > 1 else ''}" if device == "cpu" else ""


def progress_line(it, losses, accuracies, seconds):
    """higherANML's progress line, `it: loss | accuracy (seconds)`, every LOG_EVERY steps, with one
    loss and accuracy per run (several runs train together with --seeds); else None."""
    if it % LOG_EVERY:
        return None
    show = lambda values: " ".join(f"{float(v):.3f}" for v in values)
    return f"{it}: {show(losses)} | {show(accuracies)} ({seconds:.1f}s)"


@dataclass
class Steps:
    """One kind of training, as the run loop drives it: one model, optimizer and rng holder per run
    (several runs may train in one loop), and a step that gives one loss and accuracy per run."""
    models: list
    optimizers: list
    rng_holders: list  # each one's `.rng` (a numpy Generator) is saved and restored with its run; its
    # `.generator`, where it has one, is the run's torch generator (else the global one)
    total: int  # steps of the whole run
    make_step: Callable  # () -> step(i) -> (losses, accuracies), one each per run; called once the resumable state is loaded
    milestone: Callable  # i -> the index of the checkpoint to write after step i, or None
    report: Callable  # (i, losses, accuracies, seconds) -> a line to print, or None
    header: str  # printed above the reported lines
    unit: str = "iteration"
    agree: Callable = None  # stop requested here -> stop everywhere (the ranks of one run agree), or None

    def runs(self):
        """[(model, optimizer, rng_holder)] of each run."""
        return list(zip(self.models, self.optimizers, self.rng_holders))


def run(configs, build, quiet=False, writer=True, restarted=False):
    """Train the runs of `configs` (a list: one run, or several that train together) to their end,
    each in its out_dir: `build()` gives the `Steps` (after the locks are taken, so it may load the
    data). Returns (the models, why the runs stopped early or None, the path of each run's last
    checkpoint). Raises ValueError for a run that may not start, Diverged for a non-finite loss or
    weight, WriteError for a file that could not be written: each names the last good resumable
    checkpoint, which a later `--resume latest` continues.

    `writer=False`: a process that trains the runs beside the one that writes their files (a
    torchrun rank other than 0) reads them but writes nothing. `restarted`: torchrun restarted this
    process after a failure: each run continues from its newest resumable checkpoint, or starts again."""
    configs = list(configs)
    new_folders = {f for c in configs if writer for f in missing_folders(Path(c.out_dir))}
    try:
        return run_in_folders(configs, build, quiet, writer, restarted)
    finally:
        for folder in sorted(new_folders, key=lambda f: len(f.parts), reverse=True):  # deepest first
            if folder.is_dir() and not any(folder.iterdir()):  # a run refused before it wrote anything
                folder.rmdir()


def missing_folders(folder):
    """`folder` and its parents that do not exist yet (a run makes them)."""
    missing = []
    for f in [folder, *folder.parents]:
        if f.exists():
            break
        missing.append(f)
    return missing


def run_in_folders(configs, build, quiet, writer, restarted):
    """`run` itself: the locks, the starts checked and aligned, the loop, the clean-up of a stillborn run."""
    with contextlib.ExitStack() as locks:
        for c in configs if writer else ():
            check_out_dir(Path(c.out_dir))
            lock = locks.enter_context(RunLock(c.out_dir, c.name, c.KIND))
            clean_out_dir(Path(c.out_dir))
            if lock.stale_pid is not None:
                remove_stillborn_run(c, f"pid {lock.stale_pid} (it ended)")
        if writer and set_aside_interrupted_first_save(configs):
            configs = [replace(c, resume=None) for c in configs]  # they start again, together
        starts = aligned_starts(configs, [starting_state(c, check_fresh=writer and not restarted, restarted=restarted)
                                          for c in configs])
        fresh = [c for c, (state, _) in zip(configs, starts) if state is None] if writer else []
        steps = build()  # nothing is written before it: its errors (missing data) pass as they are
        try:
            return run_locked(configs, steps, starts, quiet, writer)
        except Diverged as e:  # its log shows where: kept
            raise Diverged(f"{e}; {last_good(configs)} ({configs[0].DIVERGED_ADVICE})") from e
        except BaseException as e:
            who, many = "this process, which stopped with an error,", len(fresh) > 3
            removed = [c for c in fresh if remove_stillborn_run(c, who, quiet=many)]
            if many and removed:
                notice(f"removed the files of {len(removed)} runs ({removed[0].out_dir}, ...), written by {who} "
                       f"before their first resumable checkpoints")
            if isinstance(e, OSError):  # a checkpoint or the log could not be written (WriteError, a full disk)
                raise WriteError(f"{e}; {last_good(configs)}: free some space (or fix the folder), then "
                                 f"continue with --resume latest") from e
            raise


def remove_stillborn_run(config, who, quiet=False):
    """Remove what a run wrote before its first resumable checkpoint (its log, an early checkpoint):
    nothing there can be continued, and left there it would block every later start in its folder.
    Returns the files removed (with a notice, unless `quiet`)."""
    if newest_resumable(config.out_dir, config.name, config.KIND) is not None:
        return []
    files = run_files(config)
    for path in files:
        path.unlink(missing_ok=True)
    if files and not quiet:
        notice(f"removed {', '.join(p.name for p in files)} from {config.out_dir}, written by {who} before the "
               f"run's first resumable checkpoint")
    return files


def set_aside_interrupted_first_save(configs):
    """Runs that train together and were stopped while they wrote their first resumable checkpoints
    (some have it, the others none): no iteration can be continued by all, so they start again. The
    checkpoints of those that saved are moved, not deleted, into `{out_dir}/interrupted_first_save/`.
    Only where each such checkpoint is the run's one and records this very group (`trained_with`).
    Returns whether it set any aside."""
    if len(configs) < 2:
        return False
    found = [checkpoints_in(c.out_dir, c.name, resumable=True, kind=c.KIND) for c in configs]
    if all(found) or not any(found):
        return False
    group = sorted(str(c.out_dir) for c in configs)
    for c, resumables in zip(configs, found):
        if len(resumables) > 1:
            return False
        if resumables:
            stored = read_training_state(next(iter(resumables.values())), c.KIND).get("config") or {}
            if sorted(stored.get("trained_with") or []) != group:
                return False
    for c, resumables in zip(configs, found):
        if resumables:
            aside = Path(c.out_dir) / "interrupted_first_save"
            aside.mkdir(exist_ok=True)
            files = run_files(c)
            for path in files:
                path.replace(aside / path.name)
            notice(f"moved {', '.join(p.name for p in files)} to {aside}/: the runs trained together were stopped "
                   f"while they wrote their first resumable checkpoints, so they start again")
    return True


def aligned_starts(configs, starts):
    """Runs that train together continue from one iteration: where a stop came between their saves,
    the ones saved further go back to the newest iteration that every run can resume (each keeps its
    previous resumable checkpoint until all have written the new one)."""
    if len(configs) < 2 or any(state is None for state, _ in starts):
        return starts
    target = min(state["iteration"] for state, _ in starts)
    aligned = []
    for c, (state, path) in zip(configs, starts):
        if state["iteration"] != target:
            earlier = checkpoints_in(c.out_dir, c.name, resumable=True, kind=c.KIND).get(target)
            if earlier is not None:
                state, path = starting_state(replace(c, resume=str(earlier)))
        aligned.append((state, path))
    return aligned


def run_locked(configs, steps, starts, quiet, writer=True):
    """The loop of `run`, once the runs' files are locked and their starts are checked."""
    runs, kind = steps.runs(), configs[0].KIND
    firsts, elapsed, rngs = [], [], []
    for (model, optimizer, holder), (state, path) in zip(runs, starts):
        first, seconds, rng = 0, 0.0, None
        if state is not None:
            first, seconds, rng = apply_training_state(state, path, model, optimizer, holder)
        firsts.append(first), elapsed.append(seconds), rngs.append(rng)
    if len(set(firsts)) > 1:
        shown = ", ".join(f"{c.out_dir} after {first}" for c, first in zip(configs, firsts))
        raise ValueError(f"runs that train together must continue from the same {steps.unit}, not {shown}: "
                         f"continue them one at a time")
    first, elapsed = firsts[0], max(elapsed)
    group = [str(c.out_dir) for c in configs] if len(configs) > 1 else None  # recorded with each save
    lasts = [checkpoint_path(c.out_dir, c.name, steps.milestone(steps.total - 1), kind=kind) for c in configs]
    models = [model for model, _, _ in runs]
    if first == steps.total:  # resumed at its end: only its last checkpoint may be missing or damaged
        for model, last in zip(models, lasts):
            if writer and not readable_checkpoint(last):
                save_atomic(cpu_state_dict(model), last)
        notice(f"nothing to train: the run has already trained its {steps.total} {steps.unit}s")
        return models, None, lasts
    step = steps.make_step()
    for (_, _, holder), rng in zip(runs, rngs):  # after make_step, whose CUDA graph warm-up draws from the CUDA generator
        restore_torch_rng(rng, getattr(holder, "generator", None))
    logs = [TrainingLog(Path(c.out_dir) / f"{c.name}_{c.LOG}.csv", first) for c in configs] if writer else []
    start = time.perf_counter()
    clock = lambda: time.perf_counter() - start
    last_save = 0.0
    with StopSignal(configs[0].time_limit, clock) as stop:
        tqdm.write(steps.header)  # once the signals stop the run cleanly
        for i in tqdm(range(first, steps.total), initial=first, total=steps.total, disable=quiet, desc=kind,
                      unit=steps.unit):
            losses, accuracies = step(i)
            seconds = elapsed + clock()
            for log, l, a in zip(logs, losses, accuracies):
                log.add(i, l, a, seconds)
                if i % LOG_EVERY == 0:
                    log.flush()  # raises Diverged on a non-finite loss
            line = steps.report(i, losses, accuracies, seconds)
            if line is not None:
                for log in logs:
                    log.flush()
                tqdm.write(line)
            index = steps.milestone(i)
            timed = configs[0].save_minutes is not None and clock() - last_save >= configs[0].save_minutes * 60
            stopping = stop.requested() if steps.agree is None else steps.agree(stop.requested())
            if writer and (index is not None or timed or stopping):
                saved = []
                for c, log, (model, optimizer, holder) in zip(configs, logs, runs):
                    log.flush()
                    if index is not None:
                        check_finite_parameters(model, i)
                        save_atomic(cpu_state_dict(model), checkpoint_path(c.out_dir, c.name, index, kind=kind))
                    saved.append(save_training_state(c.out_dir, c.name, i, model, optimizer, holder.rng,
                                                     elapsed + clock(), {**c.as_dict(), "trained_with": group},
                                                     kind, torch_rng_state(holder), prune=False))
                for c, path in zip(configs, saved):  # once every run has its new one: a kill cannot split them
                    prune_resumables(c.out_dir, c.name, kind, keep=path)
                last_save = clock()
            if stopping and i < steps.total - 1:
                tqdm.write(f"stopped after {steps.unit} {i} ({stop.reason or 'another process stopped'}); "
                           f"continue with --resume latest")
                return models, stop.reason or "another process stopped", lasts
    for log in logs:
        log.flush()
    return models, None, lasts


def torch_rng_state(holder):
    """The torch random state a run saves: its own generator's where it has one (`batched.py`),
    in the place a single run keeps the global one's; None: the global generators'."""
    generator = getattr(holder, "generator", None)
    if generator is None:
        return None
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []
    if generator.device.type == "cpu":
        return {"torch": generator.get_state(), "cuda": cuda}
    cuda[generator.device.index or 0] = generator.get_state()
    return {"torch": torch.get_rng_state(), "cuda": cuda}


# ----------------------------------------------------------------------------- starting a run


def check_out_dir(out_dir):
    """Fail now, with one line, if checkpoints cannot be written to `out_dir`."""
    if Path(out_dir).exists() and not Path(out_dir).is_dir():
        raise ValueError(f"--out-dir {out_dir} is not a folder")
    try:
        probe_writable(out_dir)
    except OSError as e:
        raise ValueError(f"cannot write to --out-dir {out_dir}: {e.strerror or e}") from None


def clean_out_dir(out_dir):
    """Remove the temporary files that killed processes left in `out_dir`, with a notice."""
    for tmp in remove_stale_temporaries(out_dir):
        notice(f"removed {tmp}, left by a process that no longer runs")


def starting_state(config, check_fresh=True, restarted=False):
    """(the resumable checkpoint's dict, its path) to continue from, checked against `config`,
    or (None, None) for a new run (which must not overwrite another run's files, if `check_fresh`).
    A `restarted` process continues from the newest resumable checkpoint, if there is one."""
    resume = config.resume
    if resume is None and restarted and newest_resumable(config.out_dir, config.name, config.KIND) is not None:
        resume = "latest"
    if resume is None:
        if check_fresh:
            check_fresh_start(config)
        return None, None
    path = find_resumable(resume, config.out_dir, config.name, config.KIND)
    state = read_training_state(path, config.KIND)
    check_finite(state["model"], path)
    check_settings(state.get("config"), config, path)
    done, total = state["iteration"] + 1, config.total_steps
    if done > total:
        unit = config.UNIT
        steps = "" if config.UNIT in ("iteration", "episode") else f" ({total} {unit}s)"
        flag = config.LENGTH_FLAG
        raise ValueError(f"{path} has already trained {done} {unit}s, more than {flag} {config.length}{steps}: "
                         f"nothing to train (give {flag} {config.epochs_for(done)} or more to continue it)")
    return state, path


def run_files(config):
    """The files of `config`'s kind of run and network in its out_dir: checkpoints, resumable
    checkpoints and the log, whichever run wrote them."""
    out_dir, name, kind = config.out_dir, config.name, config.KIND
    files = [*checkpoints_in(out_dir, name, kind=kind).values(),
             *checkpoints_in(out_dir, name, resumable=True, kind=kind).values()]
    log = Path(out_dir) / f"{name}_{config.LOG}.csv"
    return files + ([log] if log.is_file() else [])


def check_fresh_start(config):
    """A run started without --resume must not overwrite or mix with another run's files in its
    out_dir: it may only repeat a finished run with the very same settings (the same files)."""
    out_dir, name = config.out_dir, config.name
    path = newest_resumable(out_dir, name, config.KIND)
    if path is None:
        files = run_files(config)
        if files:
            shown = ", ".join(p.name for p in files[:3]) + (", ..." if len(files) > 3 else "")
            raise ValueError(f"{out_dir} already holds files of another {config.KIND} run of {name} ({shown}): a new "
                             f"run there would overwrite or mix with them; start it in another --out-dir")
        return
    state = read_training_state(path, config.KIND)
    stored, last = state.get("config"), state["iteration"]
    if same_settings(stored, config) and last + 1 >= config.total_steps:
        notice(f"{out_dir} holds a finished run of {name} with the same settings: running it again, "
               f"overwriting its files")
        return
    shown = f" ({format_settings(stored, [k for k in config.run_settings() if k in stored])})" \
        if isinstance(stored, dict) else ""
    raise ValueError(f"{out_dir} already holds a run of {name}{shown}, resumable after {config.UNIT} {last}: "
                     f"continue it with --resume latest, or start a new run in another --out-dir")


def same_settings(stored, config):
    return isinstance(stored, dict) and all(stored.get(k) == v for k, v in config.run_settings().items())


def format_settings(settings, keys):
    """Settings as flags are typed: `--seed 1`, a switch by its presence (`--first-order` / `no --first-order`)."""
    show = lambda k: (FLAGS[k] if settings[k] else f"no {FLAGS[k]}") if isinstance(settings[k], bool) \
        else f"{FLAGS[k]} {settings[k]}"
    return " ".join(show(k) for k in keys)


def check_settings(stored, config, path):
    """Refuse to continue a run with settings other than its own (--epochs may grow), or one whose
    checkpoint records no settings to check."""
    current = config.run_settings()
    keys = [k for k in current if k not in MAY_CHANGE_ON_RESUME]
    if not isinstance(stored, dict):
        raise ValueError(f"--resume: {path} records no settings, so it cannot be checked against "
                         f"{format_settings(current, keys)}: start a new run in another --out-dir")
    # a setting that the run's checkpoint does not record did not exist yet: the run had its default
    defaults = {f.name: f.default for f in fields(config)}
    stored = {**{k: defaults[k] for k in keys if k not in stored and k in defaults}, **stored}
    changed = [k for k in keys if k in stored and stored[k] != current[k]]
    if changed:
        raise ValueError(f"--resume: {path} was trained with {format_settings(stored, changed)}, not "
                         f"{format_settings(current, changed)}: pass its flags to continue it, or start a new run "
                         f"with these flags in another --out-dir")


def last_good(configs):
    paths = [newest_resumable(c.out_dir, c.name, c.KIND) for c in configs]
    if all(p is None for p in paths):
        return "no resumable checkpoint was written"
    shown = ", ".join(str(p) for p in paths if p is not None)
    return f"the last good resumable checkpoint{'s are' if len(configs) > 1 else ' is'} {shown}"


# ----------------------------------------------------------------------------- the log


HEADER = "iteration,loss,accuracy,seconds"


def log_row_iteration(line):
    """The iteration of a complete CSV log row, or None for a blank, partial or unreadable line."""
    fields = line.split(",")
    try:
        values = [float(f) for f in fields]
    except ValueError:
        return None
    if len(values) != 4 or not math.isfinite(values[0]) or values[0] < 0 or values[0] != int(values[0]):
        return None
    return int(values[0])


class TrainingLog:
    """CSV of every step (iteration, loss, accuracy, seconds), appended across resumes.

    Values stay on the device until `flush`, so logging costs no synchronisation per step; `flush`
    raises Diverged after writing a non-finite loss."""

    def __init__(self, path, first):
        self.path, self.rows = Path(path), []
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if first > 0 and not self.path.exists():
            notice(f"the training log {self.path} is missing: starting a new one at iteration {first}")
        if first == 0 or not self.path.exists():
            write_atomic(self.path, lambda tmp: tmp.write_text(HEADER + "\n"))
        else:  # drop rows past the resumed iteration (written after the last resumable checkpoint)
            rows = [line for line in self.path.read_text(errors="replace").splitlines()[1:]
                    if (it := log_row_iteration(line)) is not None and it < first]
            write_atomic(self.path, lambda tmp: tmp.write_text("\n".join([HEADER] + rows) + "\n"))

    def add(self, it, loss, acc, seconds):
        as_tensor = lambda v: v.detach().clone() if torch.is_tensor(v) else torch.tensor(v)
        self.rows.append((it, as_tensor(loss), as_tensor(acc), seconds))

    def flush(self):
        """Append the pending rows; raise Diverged if a loss among them is NaN or infinite."""
        if not self.rows:
            return
        values = torch.stack([torch.stack([l.float().cpu(), a.float().cpu()]) for _, l, a, _ in self.rows]).tolist()
        with self.path.open("a") as f:
            for (it, _, _, sec), (loss, acc) in zip(self.rows, values):
                f.write(f"{it},{loss:.6f},{acc:.6f},{sec:.3f}\n")
        diverged = [(it, loss) for (it, *_), (loss, _) in zip(self.rows, values) if not math.isfinite(loss)]
        self.rows = []
        if diverged:
            raise Diverged(f"training diverged: the loss is {diverged[0][1]} at iteration {diverged[0][0]}")


# ----------------------------------------------------------------------------- one process per run, clean stops


class RunLock:
    """`{out_dir}/.{name}.lock` (`.{name}_{kind}.lock` for a kind other than ANML), holding the pid of
    the one process that writes the run's files there. The lock is an flock, so the kernel frees it
    when that process dies however it dies; a lock file left by a dead process is taken over with a
    notice. Re-entrant within a process (a script takes it before loading the data, the loop again)."""

    held = {}  # lock path -> [file descriptor, depth], for this process

    def __init__(self, out_dir, name, kind="ANML"):
        self.out_dir, self.name = Path(out_dir), name
        self.stale_pid = None  # the pid of a process that died holding the lock, once taken over
        self.path = self.out_dir / (f".{name}.lock" if kind == "ANML" else f".{name}_{kind}.lock")

    def __enter__(self):
        key = str(self.path.absolute())
        if key in RunLock.held:
            RunLock.held[key][1] += 1
        else:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            RunLock.held[key] = [self._acquire(), 1]
        return self

    def __exit__(self, *exc):
        key = str(self.path.absolute())
        RunLock.held[key][1] -= 1
        if RunLock.held[key][1] == 0:
            fd, _ = RunLock.held.pop(key)
            self.path.unlink(missing_ok=True)  # before the unlock: a waiting process then retries
            os.close(fd)

    def _acquire(self):
        for _ in range(100):
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = self._pid_in(fd)
                os.close(fd)
                raise ValueError(f"{self.out_dir} is in use by another run of {self.name} (pid {holder}, lock "
                                 f"{self.path}): wait for it to end, stop it, or use another --out-dir") from None
            if self._still_linked(fd):
                self._take_over(fd)
                return fd
            os.close(fd)  # the holder removed the file as we opened it: retry on the new one
        raise ValueError(f"could not lock {self.path}")

    def _still_linked(self, fd):
        try:
            return os.stat(self.path).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            return False

    def _take_over(self, fd):
        stale = self._pid_in(fd)
        if stale is not None and stale != os.getpid():
            notice(f"taking over the lock {self.path} of pid {stale}, which no longer holds it (it ended "
                   f"without removing it)")
            self.stale_pid = stale
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)

    @staticmethod
    def _pid_in(fd):
        text = os.pread(fd, 64, 0).decode(errors="replace").strip()
        return int(text) if text.isdigit() else None


class StopSignal:
    """Turns SIGINT, SIGTERM, SIGHUP (a closed terminal) and a time limit into a request to stop
    after the current step; a second Ctrl-C stops at once."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)

    def __init__(self, time_limit, clock):
        self.time_limit, self.clock, self.reason, self.old = time_limit, clock, None, {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for sig in self.SIGNALS:
                self.old[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc):
        for sig, handler in self.old.items():
            signal.signal(sig, handler)

    def _handle(self, signum, frame):
        if self.reason is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.reason = signal.Signals(signum).name

    def requested(self):
        if self.reason is None and self.time_limit is not None and self.clock() >= self.time_limit:
            self.reason = f"time limit of {self.time_limit:g}s"
        return self.reason is not None
