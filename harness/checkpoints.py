"""Checkpoint files: their names, atomic save and load, and the resumable state of a run.

- `{out_dir}/{rln}_{nm}_{mask}_ANML-{it}.pth`: a bare state_dict, higherANML's format;
- `..._ANML-{it}_resume.pt`: what an exact resume needs (model, Adam, iteration, every RNG state and
  the run's configuration); `kind` "pretrain" names pretrain_omni.py's files the same way.
"""
import os
import pickle
import re
import zipfile
from pathlib import Path

import numpy as np
import torch

from harness.atomic import WriteError, one_line, write_atomic
from model import ANML, OML, oml_sizes, sizes_from_state_dict

RESUMABLE_KEYS = {"model", "outer_opt", "iteration", "elapsed", "rng"}


class Diverged(ValueError):
    """The loss or the weights became NaN or infinite."""


def checkpoint_path(out_dir, name, it, resumable=False, kind="ANML"):
    """`{out_dir}/{name}_{kind}-{it}.pth` (a bare state_dict), or its resumable companion
    `..._{kind}-{it}_resume.pt`."""
    return Path(out_dir) / f"{name}_{kind}-{it}{'_resume.pt' if resumable else '.pth'}"


def checkpoint_pattern(name, resumable=False, kind="ANML"):
    """A regular expression for the file names of `checkpoint_path`, the iteration as group 1:
    names are matched exactly, so a copy such as `..._ANML-39_backup_resume.pt` is not one of them."""
    suffix = r"_resume\.pt" if resumable else r"\.pth"
    return re.compile(rf"{re.escape(name)}_{re.escape(kind)}-(\d+){suffix}")


def checkpoints_in(out_dir, name, resumable=False, kind="ANML"):
    """{iteration: path} of the run's checkpoints (or resumable ones) in `out_dir`."""
    pattern, found = checkpoint_pattern(name, resumable, kind), {}
    if Path(out_dir).is_dir():
        for path in Path(out_dir).iterdir():
            match = pattern.fullmatch(path.name)
            if match:
                found[int(match[1])] = path
    return dict(sorted(found.items()))


def newest_resumable(out_dir, name, kind="ANML"):
    """The resumable checkpoint of run `name` in `out_dir` with the highest iteration, or None."""
    found = checkpoints_in(out_dir, name, resumable=True, kind=kind)
    return found[max(found)] if found else None


def find_resumable(resume, out_dir, name, kind="ANML"):
    """The resumable checkpoint to continue from: a path, or "latest" (the newest in `out_dir`)."""
    if resume != "latest":
        return Path(resume)
    found = newest_resumable(out_dir, name, kind)
    if found is None:
        raise ValueError(f"--resume latest: no {name}_{kind}-*_resume.pt in {out_dir} (a run stopped before its "
                         f"first resumable checkpoint, or none ran there): run the same command without --resume "
                         f"to start it")
    return found


def save_atomic(obj, path):
    """torch.save, atomically (see write_atomic), flushed to the disk before the rename.

    Saved through a file object, so the archive's folder name is torch's fixed "archive", not the
    temporary file's name: the same content gives the same bytes. Any failure of the writer (torch
    raises RuntimeError on a full disk) becomes a WriteError; an older file at `path` is untouched.
    Each tensor is saved with its own storage (`own_storage`), never the whole stack it is a view of."""
    obj = own_storage(obj)

    def write(tmp):
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
    try:
        write_atomic(path, write)
    except Exception as e:
        raise WriteError(f"could not write {path}: {one_line(e)}") from e


def own_storage(obj):
    """`obj` (nested dicts, lists and tuples of tensors) with every tensor that views a larger storage
    (a model of a stack trained together, `fastpath/batched.py`) copied into a storage of its own:
    torch.save writes whole storages, so a view would carry the other models' weights into the file."""
    if torch.is_tensor(obj):
        whole = obj.untyped_storage().nbytes() == obj.numel() * obj.element_size()
        return obj if whole and obj.storage_offset() == 0 and obj.is_contiguous() else obj.contiguous().clone()
    if isinstance(obj, dict):
        return {k: own_storage(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(own_storage(v) for v in obj)
    return obj


def cpu_state_dict(model):
    """higherANML's checkpoint: a bare state_dict, on the CPU so that it loads anywhere."""
    return {k: v.detach().cpu() for k, v in model.state_dict().items()}


def load_model(path, device="cpu"):
    """An ANML (or OML) built from a checkpoint, its sizes read from the tensors' shapes.

    Raises ValueError with a one-line reason naming the file and what it is: a folder, a missing
    file, one that is not a PyTorch checkpoint (empty, text, CSV, other bytes), a damaged one, or a
    state_dict whose keys or shapes do not fit the architecture."""
    path = Path(path)
    check_model_file(path)
    state = read_state_dict(path)
    check_finite(state, path)
    return build_model(state, path).to(device)


ZIP_MAGIC = b"PK\x03\x04"  # torch.save's format: a zip archive
PICKLE_MAGIC = b"\x80"  # torch.save's older format: a pickle (protocol 2 or later)
HIGHERANML_LAST = 29999  # higherANML's README names its model after its last iteration of 30,000


def check_model_file(path):
    """Refuse, in one line naming it, a path that is no checkpoint file: a folder, a missing file, or a
    file whose first bytes are not torch.save's (judged by its content, not its name)."""
    if path.is_dir():
        raise ValueError(f"{path} is a folder, not a model file (give a checkpoint in it, e.g. its *_ANML-*.pth)")
    if not path.is_file():
        hint = shipped_model_hint(path)
        raise ValueError(f"model file not found: {path}{f' ({hint})' if hint else ''}")
    what = not_a_checkpoint(path)
    if what:
        raise ValueError(f"{path} is not a PyTorch checkpoint but {what}: give a model file (a *_ANML-*.pth, "
                         f"or a *_resume.pt)")


def shipped_model_hint(path):
    """For a missing `{rln}_{nm}_{mask}_ANML-{it}.pth` in a trained_anmls/ folder (higherANML's names):
    which model is shipped there instead, and its iterations; else None."""
    match = re.fullmatch(r"(\d+_\d+_\d+)_ANML-(\d+)\.pth", path.name)
    if not match or path.parent.name != "trained_anmls" or not path.parent.is_dir():
        return None
    found = [(p.name.startswith(f"{match[1]}_"), int(m[1]), p) for p in path.parent.iterdir()
             if (m := re.fullmatch(r"\d+_\d+_\d+_ANML-(\d+)\.pth", p.name))]
    if not found:
        return None
    _, last, shipped = max(found)  # the same sizes first, then the most iterations
    here = f"the model shipped here is {shipped}, {last + 1:,} iterations"
    if int(match[2]) == HIGHERANML_LAST:
        return f"higherANML's name for its {HIGHERANML_LAST + 1:,}-iteration model; {here}"
    return here


def not_a_checkpoint(path):
    """What a file is when its content is not torch.save's (empty, CSV, text, other bytes), else None."""
    with open(path, "rb") as f:
        head = f.read(4096)
    if not head:
        return "an empty file (0 bytes)"
    if head.startswith((ZIP_MAGIC, PICKLE_MAGIC)):
        return None
    line = first_line_of_text(head)
    if line is None:
        return f"a binary file of another kind (it starts with {head[:8].hex(' ')})"
    if "," in line:
        log = ", a training log" if line.startswith("iteration,") else ""
        return f"a CSV file (header `{line[:80]}`{log})"
    return f"a text file (first line `{line[:80]}`)"


def first_line_of_text(head):
    """The first non-blank line of `head` (a file's first bytes) when they are UTF-8 text, else None."""
    for cut in range(4):  # the read may end inside a multi-byte character
        try:
            text = head[:len(head) - cut].decode("utf-8")
            break
        except UnicodeDecodeError:
            continue
    else:
        return None
    if "\x00" in text:
        return None
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return "".join(c if c.isprintable() else "?" for c in lines[0]) if lines else "(blank)"


def read_state_dict(path):
    """The state_dict in a checkpoint file (a resumable checkpoint's model); ValueError in one line
    naming the file when it does not load or holds something else."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises many types for a file that is not a checkpoint
        raise ValueError(f"{path} is {damage_of_checkpoint(path, e)}") from None
    if isinstance(state, dict) and isinstance(state.get("model"), dict):
        state = state["model"]  # a resumable training checkpoint
    if not isinstance(state, dict):
        raise ValueError(f"{path} holds a {type(state).__name__}, not a state_dict (a dict of tensors)")
    if not any(torch.is_tensor(v) for v in state.values()):
        raise ValueError(f"{path} holds a dict without tensors (keys {key_sample(state)}), not a state_dict")
    return state


def damage_of_checkpoint(path, error):
    """What a file that starts as a checkpoint but does not load is (for `read_state_dict`): a pickle
    of more than tensors, cut short, a zip of something else, or otherwise damaged."""
    if isinstance(error, pickle.UnpicklingError) and "weights only" in str(error).lower():
        return ("a PyTorch file that holds Python objects other than tensors (a whole pickled model?), not a "
                "state_dict: save the model's state_dict() instead")
    with open(path, "rb") as f:
        if not f.read(len(ZIP_MAGIC)).startswith(ZIP_MAGIC):
            return f"a damaged PyTorch checkpoint of torch's older format ({short_reason(error)})"
    try:
        with zipfile.ZipFile(path) as z:
            names = z.namelist()
    except (zipfile.BadZipFile, OSError):
        return ("a truncated or damaged PyTorch checkpoint (its zip archive does not read: the save or the copy "
                "did not finish?)")
    if not any(name.endswith("data.pkl") for name in names):
        return "a zip archive, not a PyTorch checkpoint (it holds no data.pkl)"
    return f"a damaged PyTorch checkpoint ({short_reason(error)})"


def short_reason(error):
    """The first sentence of PyTorch's error, on one line, without its advice about `weights_only`
    (which a user of these scripts cannot act on)."""
    first = one_line(error).split(". ")[0][:160]
    return "it does not load" if "weights_only" in first or "weights only" in first.lower() else first


def key_sample(state, count=3):
    """The first few keys of a dict, for a message."""
    keys = [str(k) for k in state]
    return ", ".join(keys[:count]) + (", ..." if len(keys) > count else "")


def build_model(state, path):
    """The network of a state_dict: OML's when it has OML's keys, else ANML's; ValueError in one line
    when it is neither or does not fit."""
    if "rln.0.weight" in state:
        arch = "OML"
    elif any(str(k).startswith(("rln.", "nm.")) for k in state):
        arch = "ANML"
    else:
        raise ValueError(f"{path} is a state_dict of another network (keys {key_sample(state)}), not of an ANML "
                         f"(rln.*, nm.*, fc.*) or an OML")
    try:
        model = OML(*oml_sizes(state)) if arch == "OML" else ANML(*sizes_from_state_dict(state))
        model.load_state_dict(state, strict=True)
    except (ValueError, RuntimeError, AttributeError, IndexError, KeyError) as e:
        reason = " ".join(str(e).split())[:500]
        raise ValueError(f"{path} does not fit the {arch} architecture: {reason}") from None
    return model


def readable_checkpoint(path):
    """Whether `path` holds a checkpoint that loads (not missing, empty or cut short)."""
    try:
        return isinstance(torch.load(path, map_location="cpu", weights_only=True), dict)
    except Exception:
        return False


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


def save_training_state(out_dir, name, it, model, optimizer, rng, elapsed, config, kind="ANML", torch_rng=None,
                        prune=True):
    """Everything needed to continue after iteration `it` exactly, with the run's configuration (a
    dict); the older resumable checkpoints of the run are removed only once this one is complete
    (`prune`; runs that train together prune once all of them have saved: `prune_resumables`).
    `torch_rng` ({"torch", "cuda"} states): the run's own, else the global generators'. Refuses
    (Diverged) to save non-finite weights. Returns the path written."""
    check_finite_parameters(model, it)
    torch_rng = torch_rng or {"torch": torch.get_rng_state(),
                              "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}
    state = {"model": cpu_state_dict(model), "outer_opt": optimizer.state_dict(), "iteration": it,
             "elapsed": elapsed, "config": config, "kind": kind,
             "rng": {"numpy": rng.bit_generator.state, **torch_rng}}
    path = checkpoint_path(out_dir, name, it, resumable=True, kind=kind)
    save_atomic(state, path)
    if prune:
        prune_resumables(out_dir, name, kind, keep=path)
    return path


def prune_resumables(out_dir, name, kind, keep):
    """Remove the run's resumable checkpoints other than `keep`."""
    for old in checkpoints_in(out_dir, name, resumable=True, kind=kind).values():
        if old != keep:
            old.unlink(missing_ok=True)


def read_training_state(path, kind="ANML"):
    """The dict of a resumable checkpoint of a `kind` run, checked (ValueError with a one-line
    reason if it is not one: a bare state_dict, another kind of run, a damaged file)."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"resumable checkpoint not found: {path}")
    what = not_a_checkpoint(path)
    if what:
        raise ValueError(f"{path} is not a resumable checkpoint but {what}: give a *_resume.pt file")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ValueError(f"{path} is not a resumable checkpoint: it is {damage_of_checkpoint(path, e)}") from None
    if not isinstance(state, dict) or not RESUMABLE_KEYS <= state.keys():
        raise ValueError(f"{path} is not a resumable checkpoint (a bare state_dict? give a _resume.pt file)")
    stored_kind = state.get("kind") or file_kind(path)
    if stored_kind is not None and stored_kind != kind:
        what = {"ANML": "train_omni.py", "pretrain": "pretrain_omni.py", "asb": "pretrain_omni.py --schedule asb",
                "OML": "train_omni.py --arch oml"}
        raise ValueError(f"{path} is a resumable checkpoint of {what.get(stored_kind, stored_kind)}, not of "
                         f"{what.get(kind, kind)}")
    problem = damage(state)
    if problem:
        raise ValueError(f"{path} is damaged ({problem}): resume from another resumable checkpoint")
    return state


def file_kind(path):
    """The kind in a `{name}_{kind}-{it}_resume.pt` file name, or None."""
    match = re.fullmatch(r".*_([A-Za-z]+)-\d+_resume\.pt", Path(path).name)
    return match[1] if match else None


def damage(state):
    """What is wrong with a resumable checkpoint's bookkeeping, or None."""
    it, elapsed, rng = state["iteration"], state["elapsed"], state["rng"]
    if not isinstance(it, int) or isinstance(it, bool) or it < 0:
        return f"its iteration is {it!r}"
    if not isinstance(elapsed, (int, float)) or not np.isfinite(elapsed) or elapsed < 0:
        return f"its elapsed time is {elapsed!r}"
    if not isinstance(state["model"], dict) or not isinstance(state["outer_opt"], dict):
        return "no model or optimizer state"
    if not isinstance(rng, dict) or not {"numpy", "torch", "cuda"} <= rng.keys():
        return "no random-number states"
    try:
        np.random.default_rng().bit_generator.state = rng["numpy"]
        torch.Generator().set_state(rng["torch"])
        for cuda_state in rng["cuda"]:
            if not (torch.is_tensor(cuda_state) and cuda_state.dtype == torch.uint8):
                raise TypeError("a CUDA state is not a byte tensor")
    except Exception as e:
        return f"its random-number state does not load: {one_line(e)}"
    return None


def apply_training_state(state, path, model, optimizer, rng_holder):
    """Load a resumable checkpoint's dict into the model, the optimizer and `rng_holder.rng`;
    returns (first iteration to run, seconds trained so far, torch RNG states to restore)."""
    check_finite(state["model"], path)
    try:
        model.load_state_dict(state["model"])
        load_optimizer_state(optimizer, state["outer_opt"])
        rng_holder.rng.bit_generator.state = state["rng"]["numpy"]
    except Exception as e:
        raise ValueError(f"{path} is not a resumable checkpoint of this network ({one_line(e)})") from None
    return state["iteration"] + 1, float(state["elapsed"]), state["rng"]


def load_optimizer_state(optimizer, state_dict):
    """optimizer.load_state_dict, keeping this run's `capturable` flag: a checkpoint records the flag
    of the device it was saved on (True for a CUDA graph), and a run resumed on another device needs
    its own (Adam refuses capturable state on the CPU, and a CUDA graph cannot read a step count
    from the host). The step counts move where that flag keeps them: the parameter's device, else
    the CPU, as torch's Adam makes them."""
    if not isinstance(optimizer, torch.optim.Optimizer):  # a MemberOptimizer keeps the stack's own flags
        optimizer.load_state_dict(state_dict)
        return
    flags = [group.get("capturable") for group in optimizer.param_groups]
    optimizer.load_state_dict(state_dict)
    for group, capturable in zip(optimizer.param_groups, flags):
        if capturable is None:
            continue
        group["capturable"] = capturable
        on_device = capturable or group.get("fused")
        for p in group["params"]:
            step = optimizer.state.get(p, {}).get("step")
            if torch.is_tensor(step):
                optimizer.state[p]["step"] = step.to(device=p.device if on_device else "cpu", dtype=torch.float32)


def restore_torch_rng(rng, generator=None):
    """Set the torch RNG states of a resumable checkpoint (None: leave them): into `generator`, a
    run's own (its device's state), else into the global generators."""
    if rng is None:
        return
    if generator is not None:
        on_cpu = generator.device.type == "cpu"
        state = rng["torch"] if on_cpu else (rng["cuda"][generator.device.index or 0] if rng["cuda"] else None)
        if state is not None:
            generator.set_state(state)
        return
    torch.set_rng_state(rng["torch"])
    if rng["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])
