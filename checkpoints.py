"""Checkpoint files and the state of a training run: the seed's bare state_dict, the resumable
checkpoint (model, Adam, iteration, RNG states), the CSV log, and the stop signal."""
import signal
import threading
from pathlib import Path

import torch

from atomic import write_atomic
from model import ANML, sizes_from_state_dict


def run_name(rln, nm, mask):
    """The network's name in every file of a run: `{rln}_{nm}_{mask}`, as the seed writes it."""
    return f"{rln}_{nm}_{mask}"


def checkpoint_path(out_dir, name, it, resumable=False, kind="ANML"):
    """`{out_dir}/{name}_ANML-{it}.pth` (the seed's bare state_dict), or its resumable companion
    `..._ANML-{it}_resume.pt`; `it="*"` gives the glob pattern of either. `kind` replaces "ANML"
    for other trainings of the same network (pretrain_omni.py writes `_pretrain-`)."""
    return Path(out_dir) / f"{name}_{kind}-{it}{'_resume.pt' if resumable else '.pth'}"


def save_atomic(obj, path):
    """torch.save, atomically (see write_atomic)."""
    write_atomic(path, lambda tmp: torch.save(obj, tmp))

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
    try:
        model = ANML(*sizes_from_state_dict(state))
        model.load_state_dict(state, strict=True)
    except (ValueError, RuntimeError) as e:
        reason = " ".join(str(e).split())[:500]
        raise ValueError(f"{path} does not fit the ANML architecture: {reason}") from None
    return model.to(device)

def find_resumable(resume, out_dir, name, kind="ANML"):
    """The resumable checkpoint to continue from: a path, or "latest" (newest in `out_dir`)."""
    if resume != "latest":
        return Path(resume)
    iteration = lambda p: int(p.name.rsplit("-", 1)[1].removesuffix("_resume.pt"))
    pattern = checkpoint_path(out_dir, name, "*", resumable=True, kind=kind)
    found = sorted(pattern.parent.glob(pattern.name), key=iteration)
    if not found:
        raise ValueError(f"--resume latest: no {name}_{kind}-*_resume.pt in {out_dir}")
    return found[-1]

def save_training_state(out_dir, name, it, model, outer_opt, sampler, elapsed, kind="ANML"):
    """Everything needed to continue after iteration `it` exactly; older ones are removed."""
    state = {"model": cpu_state_dict(model), "outer_opt": outer_opt.state_dict(), "iteration": it,
             "elapsed": elapsed, "rng": {"numpy": sampler.rng.bit_generator.state,
                                         "torch": torch.get_rng_state(),
                                         "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}}
    path = checkpoint_path(out_dir, name, it, resumable=True, kind=kind)
    save_atomic(state, path)
    for old in path.parent.glob(checkpoint_path(out_dir, name, "*", resumable=True, kind=kind).name):
        if old != path:
            old.unlink(missing_ok=True)

def load_training_state(path, model, outer_opt, sampler):
    """Load a resumable checkpoint into the model, Adam and sampler; returns
    (first iteration to run, seconds trained so far, torch RNG states to restore)."""
    if not Path(path).is_file():
        raise ValueError(f"resumable checkpoint not found: {path}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
        model.load_state_dict(state["model"])
        outer_opt.load_state_dict(state["outer_opt"])
        sampler.rng.bit_generator.state = state["rng"]["numpy"]
    except Exception as e:
        raise ValueError(f"{path} is not a resumable checkpoint of this network ({type(e).__name__}: "
                         f"{str(e).strip().splitlines()[0] if str(e).strip() else ''})") from None
    return state["iteration"] + 1, state["elapsed"], state["rng"]

def restore_torch_rng(rng):
    if rng is None:
        return
    torch.set_rng_state(rng["torch"])
    if rng["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])

class TrainingLog:
    """CSV of every iteration (iteration, loss, accuracy, seconds), appended across resumes.

    Values stay on the device until `flush`, so logging costs no synchronisation per iteration."""

    def __init__(self, path, first):
        self.path, self.rows = Path(path), []
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if first == 0 or not self.path.exists():
            self.path.write_text("iteration,loss,accuracy,seconds\n")
        else:  # drop rows past the resumed iteration (written after the last resumable checkpoint)
            lines = self.path.read_text().splitlines()
            keep = [lines[0]] + [l for l in lines[1:] if int(l.split(",")[0]) < first]
            self.path.write_text("\n".join(keep) + "\n")

    def add(self, it, loss, acc, seconds):
        as_tensor = lambda v: v.detach().clone() if torch.is_tensor(v) else torch.tensor(v)
        self.rows.append((it, as_tensor(loss), as_tensor(acc), seconds))

    def flush(self):
        if not self.rows:
            return
        values = torch.stack([torch.stack([l.float().cpu(), a.float().cpu()]) for _, l, a, _ in self.rows]).tolist()
        with self.path.open("a") as f:
            for (it, _, _, sec), (loss, acc) in zip(self.rows, values):
                f.write(f"{it},{loss:.6f},{acc:.6f},{sec:.3f}\n")
        self.rows = []

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
