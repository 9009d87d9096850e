"""The CSV log of a training run: every step's loss and accuracy, appended across resumes."""
import math
from pathlib import Path

import torch

from harness.atomic import write_atomic
from harness.checkpoints import Diverged
from harness.cli import notice

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

