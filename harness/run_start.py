"""How a training run may start: a new run never over another run's files, a resume only with the
run's own settings, what a killed run left removed or set aside, runs trained together aligned on
one iteration; and, after a failure, which checkpoint is good and the command that continues."""
import os
from dataclasses import fields, replace
from pathlib import Path

from harness.atomic import probe_writable, remove_stale_temporaries
from harness.checkpoints import (check_finite, checkpoints_in, find_resumable, newest_resumable,
                                 read_training_state)
from harness.cli import notice
from harness.config import FLAGS, MAY_CHANGE_ON_RESUME


def missing_folders(folder):
    """`folder` and its parents that do not exist yet (a run makes them)."""
    missing = []
    for f in [folder, *folder.parents]:
        if f.exists():
            break
        missing.append(f)
    return missing


def remove_stillborn_run(config, who, quiet=False):
    """Remove what a run wrote before its first resumable checkpoint (its log, an early checkpoint):
    nothing there can be continued, and left there it would block every later start in its folder.
    Returns the files removed (with a notice, unless `quiet`)."""
    if newest_resumable(config.out_dir, config.name, config.kind) is not None:
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
    found = [checkpoints_in(c.out_dir, c.name, resumable=True, kind=c.kind) for c in configs]
    if all(found) or not any(found):
        return False
    group, typed = sorted(group_members(configs)), sorted(str(c.out_dir) for c in configs)
    for c, resumables in zip(configs, found):
        if len(resumables) > 1:
            return False
        if resumables:
            stored = read_training_state(next(iter(resumables.values())), c.kind).get("config") or {}
            if sorted(stored.get("trained_with") or []) not in (group, typed):  # typed: as older runs recorded it
                return False
    for c, resumables in zip(configs, found):
        if resumables:
            aside = set_aside_stillborn_run(c, "interrupted_first_save", check=False)
            notice(f"moved the files of {c.out_dir} to {aside}/: the runs trained together were stopped "
                   f"while they wrote their first resumable checkpoints, so they start again")
    return True


def set_aside_stillborn_run(config, folder_name, check=True):
    """Move the run's files into `{out_dir}/{folder_name}/` (kept for the user to read, and no longer
    blocking a new start there); returns that folder, or None where there was nothing to move or
    (`check`) the run has a resumable checkpoint, which a resume continues."""
    if check and newest_resumable(config.out_dir, config.name, config.kind) is not None:
        return None
    files = run_files(config)
    if not files:
        return None
    aside = Path(config.out_dir) / folder_name
    aside.mkdir(exist_ok=True)
    for path in files:
        path.replace(aside / path.name)
    return aside


def group_members(configs):
    """Who trains together, as each run records it: the runs' folders relative to the folder that
    holds them all (`seed1`, `seed2`), so that the record does not depend on how that folder is
    spelled, nor on where it has moved."""
    folders = [Path(c.out_dir).resolve() for c in configs]
    parent = Path(os.path.commonpath(folders))
    return [str(f.relative_to(parent)) for f in folders]


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
            earlier = checkpoints_in(c.out_dir, c.name, resumable=True, kind=c.kind).get(target)
            if earlier is not None:
                state, path = starting_state(replace(c, resume=str(earlier)))
        aligned.append((state, path))
    return aligned


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
    if resume is None and restarted and newest_resumable(config.out_dir, config.name, config.kind) is not None:
        resume = "latest"
    if resume is None:
        if check_fresh:
            check_fresh_start(config)
        return None, None
    path = find_resumable(resume, config.out_dir, config.name, config.kind)
    state = read_training_state(path, config.kind)
    check_finite(state["model"], path)
    check_settings(state.get("config"), config, path)
    done, total = state["iteration"] + 1, config.total_steps
    if done > total:
        unit = config.unit
        steps = "" if config.unit in ("iteration", "episode") else f" ({total} {unit}s)"
        flag = config.length_flag
        raise ValueError(f"{path} has already trained {done} {unit}s, more than {flag} {config.length}{steps}: "
                         f"nothing to train (give {flag} {config.epochs_for(done)} or more to continue it)")
    return state, path


def run_files(config):
    """The files of `config`'s kind of run and network in its out_dir: checkpoints, resumable
    checkpoints and the log, whichever run wrote them."""
    out_dir, name, kind = config.out_dir, config.name, config.kind
    files = [*checkpoints_in(out_dir, name, kind=kind).values(),
             *checkpoints_in(out_dir, name, resumable=True, kind=kind).values()]
    log = Path(out_dir) / f"{name}_{config.log_name}.csv"
    return files + ([log] if log.is_file() else [])


def check_fresh_start(config):
    """A run started without --resume must not overwrite or mix with another run's files in its
    out_dir: it may only repeat a finished run with the very same settings (the same files)."""
    out_dir, name = config.out_dir, config.name
    path = newest_resumable(out_dir, name, config.kind)
    if path is None:
        files = run_files(config)
        if files:
            shown = ", ".join(p.name for p in files[:3]) + (", ..." if len(files) > 3 else "")
            raise ValueError(f"{out_dir} already holds files of another {config.kind} run of {name} ({shown}): a new "
                             f"run there would overwrite or mix with them; start it in another --out-dir")
        return
    state = read_training_state(path, config.kind)
    stored, last = state.get("config"), state["iteration"]
    if same_settings(stored, config) and last + 1 >= config.total_steps:
        notice(f"{out_dir} holds a finished run of {name} with the same settings: running it again, "
               f"overwriting its files")
        return
    shown = f" ({format_settings(stored, [k for k in config.run_settings() if k in stored])})" \
        if isinstance(stored, dict) else ""
    raise ValueError(f"{out_dir} already holds a run of {name}{shown}, resumable after {config.unit} {last}: "
                     f"continue it with --resume latest, or start a new run in another --out-dir")


def same_settings(stored, config):
    return isinstance(stored, dict) and all(stored.get(k) == v for k, v in config.run_settings().items())


def format_settings(settings, keys):
    """Settings as flags are typed: `--seed 1`, a switch as `--first-order` or `--first-order off`, which
    reads right wherever a message puts it ("trained with --zap off, not --zap")."""
    show = lambda k: (FLAGS[k] if settings[k] else f"{FLAGS[k]} off") if isinstance(settings[k], bool) \
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


def how_to_continue(configs):
    """The command that continues the runs from where they are now: --resume latest where each has a
    resumable checkpoint, else the same command again (a run stopped before its first one restarts)."""
    if all(newest_resumable(c.out_dir, c.name, c.kind) is not None for c in configs):
        return "continue with the same command and --resume latest"
    return "run the same command again, without --resume (the run starts again)"


def last_good(configs):
    paths = [newest_resumable(c.out_dir, c.name, c.kind) for c in configs]
    if all(p is None for p in paths):
        return "no resumable checkpoint was written"
    shown = ", ".join(str(p) for p in paths if p is not None)
    return f"the last good resumable checkpoint{'s are' if len(configs) > 1 else ' is'} {shown}"

