"""Checkpoint files and the state of a training run: the seed's bare state_dict, the resumable
checkpoint (model, Adam, iteration, RNG states, the run's flags), the CSV log, the lock that makes
a run the only writer of its files, and the stop signal."""
import fcntl
import math
import os
import signal
import sys
import threading
from pathlib import Path

import torch

from atomic import WriteError, one_line, probe_writable, remove_stale_temporaries, write_atomic
from model import ANML, sizes_from_state_dict

# The run's configuration as recorded in a resumable checkpoint, with the flag that sets each.
FLAGS = {"rln": "--rln", "nm": "--nm", "mask": "--mask", "inner_lr": "--inner-lr", "outer_lr": "--outer-lr",
         "seed": "--seed", "backend": "--backend", "first_order": "--first-order", "epochs": "--epochs"}
MAY_CHANGE_ON_RESUME = ("epochs",)  # a run may be continued further than first planned


class Diverged(ValueError):
    """The loss or the weights became NaN or infinite."""


def notice(message):
    """One `notice: ...` line on stderr: something the user should know, not an error."""
    print(f"notice: {message}", file=sys.stderr, flush=True)


def run_name(rln, nm, mask):
    """The network's name in every file of a run: `{rln}_{nm}_{mask}`, as the seed writes it."""
    return f"{rln}_{nm}_{mask}"


def checkpoint_path(out_dir, name, it, resumable=False, kind="ANML"):
    """`{out_dir}/{name}_ANML-{it}.pth` (the seed's bare state_dict), or its resumable companion
    `..._ANML-{it}_resume.pt`; `it="*"` gives the glob pattern of either. `kind` replaces "ANML"
    for other trainings of the same network (pretrain_omni.py writes `_pretrain-`)."""
    return Path(out_dir) / f"{name}_{kind}-{it}{'_resume.pt' if resumable else '.pth'}"


def save_atomic(obj, path):
    """torch.save, atomically (see write_atomic), flushed to the disk before the rename.

    Saved through a file object, so the archive's folder name is torch's fixed "archive", not the
    temporary file's name: the same content gives the same bytes. Any failure of the writer (torch
    raises RuntimeError on a full disk) becomes a WriteError; an older file at `path` is untouched."""
    def write(tmp):
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
    try:
        write_atomic(path, write)
    except Exception as e:
        raise WriteError(f"could not write {path}: {one_line(e)}") from e


def cpu_state_dict(model):
    """The seed's checkpoint: a bare state_dict, on the CPU so that it loads anywhere."""
    return {k: v.detach().cpu() for k, v in model.state_dict().items()}


def load_model(path, device="cpu"):
    """An ANML built from a checkpoint, its sizes read from the tensors' shapes.

    Raises ValueError with a one-line reason for a missing file, a file that is not a
    checkpoint, or a state_dict whose keys or shapes do not fit the architecture."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"model file not found: {path}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises many types for a file that is not a checkpoint
        raise ValueError(f"{path} is not a PyTorch checkpoint ({type(e).__name__})") from None
    if isinstance(state, dict) and "model" in state and isinstance(state["model"], dict):
        state = state["model"]  # a resumable training checkpoint
    if not isinstance(state, dict):
        raise ValueError(f"{path} does not hold a state_dict")
    check_finite(state, path)
    try:
        model = ANML(*sizes_from_state_dict(state))
        model.load_state_dict(state, strict=True)
    except (ValueError, RuntimeError) as e:
        reason = " ".join(str(e).split())[:500]
        raise ValueError(f"{path} does not fit the ANML architecture: {reason}") from None
    return model.to(device)


def non_finite(tensors):
    """The names of the floating-point tensors of a {name: tensor} dict holding a NaN or an infinity."""
    return [k for k, v in tensors.items()
            if torch.is_tensor(v) and v.is_floating_point() and not torch.isfinite(v).all()]


def check_finite(state, path):
    """Refuse a state_dict with NaN or infinite weights (a run that diverged)."""
    bad = non_finite(state)
    if bad:
        raise Diverged(f"{path} holds non-finite weights (NaN or inf in {', '.join(bad[:3])}"
                       f"{', ...' if len(bad) > 3 else ''}): it comes from a run that diverged")


def check_finite_parameters(model, it):
    """Raise Diverged if a parameter of `model` is NaN or infinite after iteration `it`."""
    bad = non_finite(dict(model.named_parameters()))
    if bad:
        raise Diverged(f"training diverged: non-finite weights after iteration {it} (in {', '.join(bad[:3])})")


def resumable_iteration(path):
    """The iteration in a `..._ANML-{it}_resume.pt` name."""
    return int(Path(path).name.rsplit("-", 1)[1].removesuffix("_resume.pt"))


def newest_resumable(out_dir, name, kind="ANML"):
    """The resumable checkpoint of run `name` in `out_dir` with the highest iteration, or None."""
    pattern = checkpoint_path(out_dir, name, "*", resumable=True, kind=kind)
    found = sorted(pattern.parent.glob(pattern.name), key=resumable_iteration)
    return found[-1] if found else None


def find_resumable(resume, out_dir, name, kind="ANML"):
    """The resumable checkpoint to continue from: a path, or "latest" (newest in `out_dir`)."""
    if resume != "latest":
        return Path(resume)
    found = newest_resumable(out_dir, name, kind)
    if found is None:
        raise ValueError(f"--resume latest: no {name}_{kind}-*_resume.pt in {out_dir}")
    return found


def run_config(rln, nm, mask, inner_lr, outer_lr, seed, backend, epochs, first_order=False):
    """The flags of a run, as its resumable checkpoints record them (`backend` as given)."""
    return {"rln": rln, "nm": nm, "mask": mask, "inner_lr": float(inner_lr), "outer_lr": float(outer_lr),
            "seed": seed, "backend": backend, "first_order": bool(first_order), "epochs": epochs}


def format_flags(config, keys):
    """Flags as typed: `--seed 1`, and a switch by its presence (`--first-order` / `no --first-order`)."""
    show = lambda k: (FLAGS[k] if config[k] else f"no {FLAGS[k]}") if isinstance(config[k], bool) \
        else f"{FLAGS[k]} {config[k]}"
    return " ".join(show(k) for k in keys)


def check_config(stored, config, path):
    """Refuse to continue a run with flags other than its own (--epochs may grow); a checkpoint
    that records none (an older version's) is accepted with a notice."""
    if stored is None:
        notice(f"{path} records no flags (written by an older version): continuing it without checking "
               f"that {format_flags(config, [k for k in config if k not in MAY_CHANGE_ON_RESUME])} are its own")
        return
    changed = [k for k in FLAGS if k not in MAY_CHANGE_ON_RESUME and k in stored and stored[k] != config[k]]
    if changed:
        raise ValueError(f"--resume: {path} was trained with {format_flags(stored, changed)}, not "
                         f"{format_flags(config, changed)}: pass its flags to continue it, or start a new run "
                         f"with these flags in another --out-dir")


def check_fresh_start(out_dir, name, config):
    """A run started without --resume must not overwrite another run's files in `out_dir`: it may
    only repeat a finished run with the very same flags (which gives the same files)."""
    path = newest_resumable(out_dir, name)
    if path is None:
        return
    state = read_training_state(path)
    stored, last = state.get("config"), state["iteration"]
    if stored == config and last + 1 >= config["epochs"]:
        notice(f"{out_dir} holds a finished run of {name} with the same flags: running it again, "
               f"overwriting its files")
        return
    flags = f" ({format_flags(stored, [k for k in FLAGS if k in stored])})" if stored else ""
    raise ValueError(f"{out_dir} already holds a run of {name}{flags}, resumable after iteration {last}: "
                     f"continue it with --resume latest, or start a new run in another --out-dir")


def save_training_state(out_dir, name, it, model, outer_opt, sampler, elapsed, config=None, kind="ANML"):
    """Everything needed to continue after iteration `it` exactly, with the run's flags; the
    older resumable checkpoints are removed only once this one is complete. Refuses (Diverged)
    to save non-finite weights. Returns the path written."""
    check_finite_parameters(model, it)
    state = {"model": cpu_state_dict(model), "outer_opt": outer_opt.state_dict(), "iteration": it,
             "elapsed": elapsed, "config": config,
             "rng": {"numpy": sampler.rng.bit_generator.state, "torch": torch.get_rng_state(),
                     "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}}
    path = checkpoint_path(out_dir, name, it, resumable=True, kind=kind)
    save_atomic(state, path)
    for old in path.parent.glob(checkpoint_path(out_dir, name, "*", resumable=True, kind=kind).name):
        if old != path:
            old.unlink(missing_ok=True)
    return path


def read_training_state(path):
    """The dict of a resumable checkpoint (ValueError with a one-line reason if it is not one)."""
    if not Path(path).is_file():
        raise ValueError(f"resumable checkpoint not found: {path}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ValueError(f"{path} is not a resumable checkpoint ({one_line(e)})") from None
    if not isinstance(state, dict) or not {"model", "outer_opt", "iteration", "elapsed", "rng"} <= state.keys():
        raise ValueError(f"{path} is not a resumable checkpoint (a bare state_dict? give a _resume.pt file)")
    return state


def apply_training_state(state, path, model, outer_opt, sampler):
    """Load a resumable checkpoint's dict into the model, Adam and sampler; returns
    (first iteration to run, seconds trained so far, torch RNG states to restore)."""
    check_finite(state["model"], path)
    try:
        model.load_state_dict(state["model"])
        outer_opt.load_state_dict(state["outer_opt"])
        sampler.rng.bit_generator.state = state["rng"]["numpy"]
    except Exception as e:
        raise ValueError(f"{path} is not a resumable checkpoint of this network ({one_line(e)})") from None
    return state["iteration"] + 1, state["elapsed"], state["rng"]


def load_training_state(path, model, outer_opt, sampler, config=None):
    """Load a resumable checkpoint into the model, Adam and sampler, after checking that it was
    trained with `config`'s flags (when given); returns (first iteration to run, seconds trained
    so far, torch RNG states to restore)."""
    state = read_training_state(path)
    if config is not None:
        check_config(state.get("config"), config, path)
    return apply_training_state(state, path, model, outer_opt, sampler)


def starting_state(resume, out_dir, name, config):
    """(the resumable checkpoint's dict, its path) to continue from, checked against `config`,
    or (None, None) for a new run (which must not overwrite another run in `out_dir`)."""
    if resume is None:
        check_fresh_start(out_dir, name, config)
        return None, None
    path = find_resumable(resume, out_dir, name)
    state = read_training_state(path)
    check_finite(state["model"], path)
    check_config(state.get("config"), config, path)
    done, its = state["iteration"] + 1, config["epochs"]
    if done > its:
        raise ValueError(f"{path} has already trained {done} iterations, more than --epochs {its}: nothing to "
                         f"train (give --epochs {done} or more to continue it)")
    return state, path


def last_good(out_dir, name):
    path = newest_resumable(out_dir, name)
    return "no resumable checkpoint was written" if path is None else \
        f"the last good resumable checkpoint is {path}"


def finished_already(model, out_dir, name, its):
    """A resumed run that already trained `its` iterations: nothing to train; its last
    checkpoint is written from the resumable one if it is missing (a run stopped there)."""
    path = checkpoint_path(out_dir, name, its - 1)
    if not path.is_file():
        save_atomic(cpu_state_dict(model), path)
    notice(f"nothing to train: the run has already trained its {its} iterations")
    return model


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


def restore_torch_rng(rng):
    """Set the torch RNG states of a resumable checkpoint (None: leave them)."""
    if rng is None:
        return
    torch.set_rng_state(rng["torch"])
    if rng["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])

HEADER = "iteration,loss,accuracy,seconds"


def log_row_iteration(line):
    """The iteration of a complete CSV log row, or None for a blank, partial or unreadable line."""
    fields = line.split(",")
    try:
        values = [float(f) for f in fields]
    except ValueError:
        return None
    return int(values[0]) if len(values) == 4 else None


class TrainingLog:
    """CSV of every iteration (iteration, loss, accuracy, seconds), appended across resumes.

    Values stay on the device until `flush`, so logging costs no synchronisation per iteration;
    `flush` raises Diverged after writing a non-finite loss."""

    def __init__(self, path, first):
        self.path, self.rows = Path(path), []
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if first > 0 and not self.path.exists():
            notice(f"the training log {self.path} is missing: starting a new one at iteration {first}")
        if first == 0 or not self.path.exists():
            write_atomic(self.path, lambda tmp: tmp.write_text(HEADER + "\n"))
        else:  # drop rows past the resumed iteration (written after the last resumable checkpoint)
            rows = [l for l in self.path.read_text().splitlines()[1:]
                    if log_row_iteration(l) is not None and log_row_iteration(l) < first]
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


class RunLock:
    """`{out_dir}/.{name}.lock`, holding the pid of the one process that writes run `name`'s files
    there. The lock is an flock, so the kernel frees it when that process dies however it dies;
    a lock file left by a dead process is taken over with a notice. Re-entrant within a process
    (the script takes it before loading the data, `anml.train` again)."""

    held = {}  # lock path -> [file descriptor, depth], for this process

    def __init__(self, out_dir, name):
        self.out_dir, self.name = Path(out_dir), name
        self.path = self.out_dir / f".{name}.lock"

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
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)

    @staticmethod
    def _pid_in(fd):
        text = os.pread(fd, 64, 0).decode(errors="replace").strip()
        return int(text) if text.isdigit() else None


class StopSignal:
    """Turns SIGINT/SIGTERM and a time limit into a request to stop after the current iteration."""

    def __init__(self, time_limit, clock):
        self.time_limit, self.clock, self.reason, self.old = time_limit, clock, None, {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self.old[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc):
        for sig, handler in self.old.items():
            signal.signal(sig, handler)

    def _handle(self, signum, frame):
        if self.reason is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl-C stops at once
        self.reason = signal.Signals(signum).name

    def requested(self):
        if self.reason is None and self.time_limit is not None and self.clock() >= self.time_limit:
            self.reason = f"time limit of {self.time_limit:g}s"
        return self.reason is not None
