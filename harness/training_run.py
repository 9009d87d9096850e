"""What keeps a training run safe, as one object its loop uses (`TrainingRuns`):

    with TrainingRuns([config]) as run:       # locks the run's folder, checks how it may start
        run.announce("meta-training ...", "for 30000 its", "on cpu ...")  # resumed: `resuming ... from`
        ...build the model, optimizer and data...
        run.restore([model], [opt], [data], total)    # a resume loads its state here
        for it in run.iterations():           # stops cleanly on a signal or the time limit; a long CPU
                                              # run says, after a few steps, how long the rest takes
            loss, acc = ...one step...
            run.log(it, [loss], [acc])        # the CSV log and the progress line
            run.save(it)                      # higherANML's checkpoints and the resumable ones
    models, stopped, lasts = run.outcome()

- one process writes a run's files (`RunLock`, from before the data is loaded until it ends);
- a new run never starts over another run's files, and a resume uses the run's own settings;
- a resumable checkpoint at every milestone, every `--save-minutes`, and on Ctrl-C, SIGTERM, SIGHUP
  or the time limit (`StopSignal`); the previous one is deleted only once the new one is complete;
- a NaN or infinite loss or weight stops the run before anything bad is saved;
- a CSV log of every step, appended across resumes (`TrainingLog`).

Several runs may train in one loop (`train_omni.py --seeds`): each keeps its own folder, lock, files
and resumable checkpoints, exactly as if it ran alone.
"""
import contextlib
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch
from tqdm import tqdm

from harness.atomic import WriteError
from harness.checkpoints import (Diverged, apply_training_state, check_finite_parameters, checkpoint_path,
                                 cpu_state_dict, prune_resumables, readable_checkpoint, restore_torch_rng,
                                 save_atomic, save_training_state)
from harness.cli import notice
from harness.runtime import progress_bar
from harness.run_lock import RunLock, StopSignal
from harness.run_start import (aligned_starts, check_out_dir, clean_out_dir, group_members, how_to_continue, last_good,
                               missing_folders, remove_stillborn_run, set_aside_interrupted_first_save,
                               set_aside_stillborn_run, starting_state)
from harness.training_log import TrainingLog

LOG_EVERY = 10  # steps between log flushes (each checks the losses for NaN)
SAVE_EVERY = 1000  # steps between higherANML's checkpoints of meta-training (and of ASB's episodes)
TIMED_STEPS = 5  # steps timed, after the first, to estimate how long the rest of a run takes
LONG_RUN_SECONDS = 3600  # a CPU run estimated longer than this says so, and how to stop and resume it
PAPER_NETWORK = (256, 112, 2304)  # --rln --nm --mask of the paper: on a CPU, always worth that word


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


def long_cpu_run(config, seconds_left):
    """Whether a run should say how long it takes: on the CPU, with the paper's network or over
    LONG_RUN_SECONDS still to go; not with --time-limit (which already says when it stops)."""
    if config.device != "cpu" or config.time_limit is not None:
        return False
    return (config.rln, config.nm, config.mask) == PAPER_NETWORK or seconds_left > LONG_RUN_SECONDS


def duration(seconds):
    """A time to go, as a person says it: `40 s`, `12 minutes`, `5.8 hours`."""
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 90 * 60:
        return f"{seconds / 60:.0f} minutes"
    return f"{seconds / 3600:.1f} hours"


def time_left_line(seconds_per_step, steps_left, unit):
    """The one line a long run prints after its first steps: how long the rest takes, and how to
    stop and continue it."""
    return (f"about {duration(seconds_per_step * steps_left)} for the {steps_left} {unit}s left "
            f"({seconds_per_step:.2f}s each on the CPU): Ctrl-C stops cleanly with a resumable checkpoint, "
            f"the same command with --resume latest continues it, --time-limit SECONDS stops it by itself")


class TrainingRuns:
    """The runs of `configs` (one, or several that train together), kept safe while a loop trains them.

    `writer=False`: a process that trains the runs beside the one that writes their files (a torchrun
    rank other than 0) reads them but writes nothing. `restarted`: torchrun restarted this process
    after a failure: each run continues from its newest resumable checkpoint, or starts again.
    Leaving the `with` block on an error raises ValueError for a run that may not start, Diverged for
    a non-finite loss or weight, WriteError for a file that could not be written: each names the last
    good resumable checkpoint and the command that continues."""

    def __init__(self, configs, quiet=False, writer=True, restarted=False):
        self.configs, self.quiet, self.writer, self.restarted = list(configs), quiet, writer, restarted
        self.kind = self.configs[0].kind
        self.stopped, self.models = None, []

    # ------------------------------------------------------------------------- the start

    def __enter__(self):
        """Lock the runs' folders, clean what killed processes left, and check how each may start."""
        configs, writer = self.configs, self.writer
        self.new_folders = {f for c in configs if writer for f in missing_folders(Path(c.out_dir))}
        self.locks = contextlib.ExitStack()
        try:
            for c in configs if writer else ():
                check_out_dir(Path(c.out_dir))
                lock = self.locks.enter_context(RunLock(c.out_dir, c.name, c.kind))
                clean_out_dir(Path(c.out_dir))
                if lock.stale_pid is not None:
                    remove_stillborn_run(c, f"pid {lock.stale_pid} (it ended)")
            if writer and set_aside_interrupted_first_save(configs):
                self.configs = configs = [replace(c, resume=None) for c in configs]  # they start again, together
            fresh_check = writer and not self.restarted
            self.starts = aligned_starts(configs, [starting_state(c, check_fresh=fresh_check, restarted=self.restarted)
                                                   for c in configs])
        except BaseException:
            self._release()
            raise
        self.fresh = [c for c, (state, _) in zip(configs, self.starts) if state is None] if writer else []
        return self

    def resumes_from(self):
        """The first step a resumed run trains (the steps before it are done), or None for a new run."""
        states = [state for state, _ in self.starts if state is not None]
        return states[0]["iteration"] + 1 if states else None

    def announce(self, what, length, details):
        """The run's first line: `{what} {length} {details}`, or for a resumed run
        `resuming {what} from {unit} {first} (of {total}) {details}`."""
        first, config = self.resumes_from(), self.configs[0]
        start = (f"{what} {length}" if first is None else
                 f"resuming {what} from {config.unit} {first} (of {config.total_steps})")
        print(f"{start} {details}", flush=True)

    def bar_label(self):
        """What the progress bar counts: `ANML 4_3_36`, `pretrain 4_3_36`, `ANML 4_3_36, 4 runs`."""
        config, runs = self.configs[0], len(self.configs)
        return f"{self.kind} {config.name}" + (f", {runs} runs" if runs > 1 else "")

    def restore(self, models, optimizers, rng_holders, total, milestone=None, report=progress_line,
                header="iteration: outer loss | outer accuracy (seconds)", unit="iteration", agree=None):
        """Give the runs' models, optimizers and rng holders (each one's `.rng`, a numpy Generator, is
        saved and restored with its run; its `.generator`, where it has one, is the run's torch
        generator, else the global one), and load a resumed run's state into them. Returns the first
        step to train. `total`: steps of the whole run; `milestone`: step -> the index of the checkpoint
        to write after it, or None (default `milestones(total)`); `report`: (step, losses, accuracies,
        seconds) -> a line to print, or None; `agree`: a stop requested here -> stop everywhere (the
        processes of one run agree), or None."""
        self.models, self.optimizers, self.holders = list(models), list(optimizers), list(rng_holders)
        self.total, self.milestone = total, milestone or milestones(total)
        self.report, self.header, self.unit, self.agree = report, header, unit, agree
        firsts, elapsed, self.rngs = [], [], []
        for model, optimizer, holder, (state, path) in zip(models, optimizers, rng_holders, self.starts):
            first, seconds, rng = 0, 0.0, None
            if state is not None:
                first, seconds, rng = apply_training_state(state, path, model, optimizer, holder)
            firsts.append(first), elapsed.append(seconds), self.rngs.append(rng)
        if len(set(firsts)) > 1:
            shown = ", ".join(f"{c.out_dir} after {first}" for c, first in zip(self.configs, firsts))
            raise ValueError(f"runs that train together must continue from the same {unit}, not {shown}: "
                             f"continue them one at a time")
        self.first, self.elapsed = firsts[0], max(elapsed)
        self.lasts = [checkpoint_path(c.out_dir, c.name, self.milestone(total - 1), kind=self.kind)
                      for c in self.configs]
        if self.first == total:  # resumed at its end: only its last checkpoint may be missing or damaged
            for model, last in zip(models, self.lasts):
                if self.writer and not readable_checkpoint(last):
                    save_atomic(cpu_state_dict(model), last)
            notice(f"nothing to train: the run has already trained its {total} {unit}s")
        return self.first

    # ------------------------------------------------------------------------- the loop

    def iterations(self):
        """The steps still to train, with a progress bar; ends early, after the step in flight has been
        saved, on Ctrl-C, SIGTERM, SIGHUP or the time limit. Call it once the step is ready to run (its
        CUDA graph recorded): the runs' torch random states are restored here."""
        if self.first == self.total:
            return
        for holder, rng in zip(self.holders, self.rngs):
            restore_torch_rng(rng, getattr(holder, "generator", None))
        self.logs = [TrainingLog(Path(c.out_dir) / f"{c.name}_{c.log_name}.csv", self.first)
                     for c in self.configs] if self.writer else []
        start = time.perf_counter()
        self.clock = lambda: time.perf_counter() - start
        self.last_save = 0.0
        with StopSignal(self.configs[0].time_limit, self.clock) as self.stop:
            tqdm.write(self.header)  # once the signals stop the run cleanly
            for it in progress_bar(range(self.first, self.total), initial=self.first, total=self.total,
                                   disable=self.quiet, desc=self.bar_label(), unit=self.unit):
                yield it
                if self.stopped is not None:
                    return
                self._time_the_first_steps(it)
        for log in self.logs:
            log.flush()

    def _time_the_first_steps(self, it):
        """After step `it`: time TIMED_STEPS steps after the first (which warms up), then, once, say how
        long the rest takes where that is long (`long_cpu_run`)."""
        if it == self.first:
            self.timed_from = self.clock()
        elif it == self.first + TIMED_STEPS:
            per_step = (self.clock() - self.timed_from) / TIMED_STEPS
            left = self.total - it - 1
            if self.writer and long_cpu_run(self.configs[0], per_step * left):
                tqdm.write(time_left_line(per_step, left, self.unit))

    def log(self, it, losses, accuracies):
        """Add step `it`'s loss and accuracy of each run to its CSV log, and print the progress line."""
        seconds = self.elapsed + self.clock()
        for log, loss, acc in zip(self.logs, losses, accuracies):
            log.add(it, loss, acc, seconds)
            if it % LOG_EVERY == 0:
                log.flush()  # raises Diverged on a non-finite loss
        line = self.report(it, losses, accuracies, seconds)
        if line is not None:
            for log in self.logs:
                log.flush()
            tqdm.write(line)

    def save(self, it):
        """After step `it`: higherANML's checkpoint at a milestone, and a resumable checkpoint with it,
        every --save-minutes and when a stop was requested (which then ends `iterations`)."""
        config = self.configs[0]
        index = self.milestone(it)
        timed = config.save_minutes is not None and self.clock() - self.last_save >= config.save_minutes * 60
        stopping = self.stop.requested() if self.agree is None else self.agree(self.stop.requested())
        if self.writer and (index is not None or timed or stopping):
            self._save_all(it, index)
            self.last_save = self.clock()
        if stopping and it < self.total - 1:
            self.stopped = self.stop.reason or "another process stopped"
            interrupted = not self.stopped.startswith("time limit")  # on stderr, as the exit 130 that follows
            tqdm.write(f"stopped after {self.unit} {it} ({self.stopped}): continue with the same command and "
                       f"--resume latest", file=sys.stderr if interrupted else sys.stdout)

    def _save_all(self, it, index):
        group = group_members(self.configs) if len(self.configs) > 1 else None  # recorded with each save
        saved = []
        for c, log, model, optimizer, holder in zip(self.configs, self.logs, self.models, self.optimizers,
                                                    self.holders):
            log.flush()
            if index is not None:
                check_finite_parameters(model, it)
                save_atomic(cpu_state_dict(model), checkpoint_path(c.out_dir, c.name, index, kind=self.kind))
            saved.append(save_training_state(c.out_dir, c.name, it, model, optimizer, holder.rng,
                                             self.elapsed + self.clock(), {**c.as_dict(), "trained_with": group},
                                             self.kind, torch_rng_state(holder), prune=False))
        for c, path in zip(self.configs, saved):  # once every run has its new one: a kill cannot split them
            prune_resumables(c.out_dir, c.name, self.kind, keep=path)

    def outcome(self):
        """(the models, why the runs stopped early or None, the path of each run's last checkpoint)."""
        return self.models, self.stopped, self.lasts

    # ------------------------------------------------------------------------- the end

    def __exit__(self, kind, error, traceback):
        try:
            if error is not None:
                self._fail(error)
        finally:
            self._release()

    def _fail(self, error):
        """Say what the runs' folders hold after `error`: a diverged run's log is kept (set aside where
        nothing can be continued); what a run wrote before its first resumable checkpoint is removed."""
        configs = self.configs
        if isinstance(error, Diverged):
            aside = [folder for c in self.fresh if (folder := set_aside_stillborn_run(c, "diverged"))]
            rates = configs[0].diverged_rates
            advice = (f"its files are in {', '.join(map(str, aside))}/: the same command with a smaller {rates} "
                      f"starts again there" if aside else f"a smaller {rates} is a new run: another --out-dir")
            raise Diverged(f"{error}; {last_good(configs)}; {advice}") from error
        who, many = "this process, which stopped with an error,", len(self.fresh) > 3
        removed = [c for c in self.fresh if remove_stillborn_run(c, who, quiet=many)]
        if many and removed:
            notice(f"removed the files of {len(removed)} runs ({removed[0].out_dir}, ...), written by {who} "
                   f"before their first resumable checkpoints")
        if isinstance(error, OSError):  # a checkpoint or the log could not be written (WriteError, a full disk)
            raise WriteError(f"{error}; {last_good(configs)}: free some space (or fix the folder), then "
                             f"{how_to_continue(configs)}") from error

    def _release(self):
        self.locks.close()
        for folder in sorted(self.new_folders, key=lambda f: len(f.parts), reverse=True):  # deepest first
            if folder.is_dir() and not any(folder.iterdir()):  # a run refused before it wrote anything
                folder.rmdir()


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
