"""eval_omni.py's result files (--json): the one reader every script uses, which checks a file and
says in one line what is wrong with it, and the reading of a row that every table and picture shows.

A file holds, per class count (`rows`), every grid value's per-run accuracies (`per_value`), and
three readings of them: the value chosen on the selection runs (`chosen_on_selection_runs`), one
value for all rows chosen the same way (`one_value_for_all_rows`), and each row's best value on the
reported runs themselves (`best_on_reported_runs`, higherANML's protocol). Plain Python."""
import json
import math
from pathlib import Path

FORMAT = 2
READING_KEYS = ("chosen_on_selection_runs", "one_value_for_all_rows", "best_on_reported_runs")
STATS = ("test_mean", "test_std", "train_mean", "train_std")
HEADS = {"ncm": "NCM", "slda": "SLDA", "gaussian": "Gaussian"}  # the learners on features that take no steps


class ResultsError(ValueError):
    """A results file that cannot be read; the message names it and what is wrong."""


def read_results(path):
    """The checked report of an eval_omni.py --json file, in the current format."""
    path = Path(path)
    try:
        report = json.loads(path.read_text())
    except FileNotFoundError:
        raise ResultsError(f"results file not found: {path} (make it with eval_omni.py --json)") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ResultsError(f"cannot read {path}: {e}") from None
    except json.JSONDecodeError as e:
        raise ResultsError(f"{path} is not JSON ({e})") from None
    try:
        return checked(report)
    except ResultsError as e:
        raise ResultsError(f"{path} is not an eval_omni.py --json report: {e}") from None


def checked(report):
    """`report` if every row has a class count and a reported reading with finite statistics."""
    if not isinstance(report, dict):
        raise ResultsError(f"it holds {type(report).__name__}, not an object")
    if report.get("partial"):
        raise ResultsError("it is the partial report of an interrupted evaluation (its finished runs are under "
                           "rows[].per_value): run the evaluation again for a whole one")
    rows = report.get("rows")
    if not isinstance(rows, list) or not rows:
        raise ResultsError("it has no rows")
    for i, row in enumerate(rows):
        if not isinstance(row, dict):
            raise ResultsError(f"row {i} is not an object")
        classes = row.get("classes")
        if not isinstance(classes, int) or isinstance(classes, bool) or classes < 1:
            raise ResultsError(f"row {i} has no class count")
        reading = row.get(reading_key(report))
        if not isinstance(reading, dict):
            raise ResultsError(f"the row of {classes} classes has no {reading_key(report)!r}")
        for stat in STATS:
            value = reading.get(stat)
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
                raise ResultsError(f"the row of {classes} classes has no finite {stat!r} (got {value!r})")
    return report


def choose(report, selection=None):
    """The grid's choices from test accuracies [K, L, R] of the reported and the selection runs: each
    row's best on the selection runs, one value for all rows (the best mean over rows there), and
    higherANML's protocol, each row's best on the reported runs themselves. Ties go to the first
    value of the grid. Without selection runs, the first two are None."""
    chosen = one_for_all = None
    if selection is not None:
        chosen = selection.mean(2).argmax(1)  # [K]
        one_for_all = int(selection.mean(2).mean(0).argmax())
    return chosen, one_for_all, report.mean(2).argmax(1)


def reading_key(report):
    """Which reading a table shows: the value chosen on selection runs where there were any, else
    the best on the reported runs."""
    return "chosen_on_selection_runs" if report.get("selection_runs") else "best_on_reported_runs"


def reported(report):
    """[(classes, reading)] of the reading a table shows (see `reading_key`), row by row."""
    key = reading_key(report)
    return [(row["classes"], row[key]) for row in report["rows"]]


def chosen_value(report, classes):
    """The grid value (lr or ridge) that `reported` shows at `classes`, or None without that row."""
    hyper = report.get("hyperparameter", "lr")
    return next((reading.get(hyper) for n, reading in reported(report) if n == classes), None)


def protocol(report):
    """How the report's network learned at meta-test, in words: the last layer on frozen features
    (seq, iid), every parameter (seq, iid with no_freeze), a closed-form last layer (lstsq), the
    nearest class mean (ncm), streaming LDA (slda) or a Gaussian per class, predicting by the posterior
    predictive or the MAP (gaussian). Reports without the keys are seq on frozen features."""
    method = report.get("method", "seq")
    if method == "lstsq":
        return "closed-form last layer"
    if method in HEADS:
        prediction = (report.get("config") or {}).get("prediction") or "bayes"
        return HEADS[method] + (f" ({'MAP' if prediction == 'map' else 'Bayes'})" if method == "gaussian" else "")
    learns = "all parameters learn" if report.get("no_freeze") else "last layer on frozen features"
    return learns if method == "seq" else f"i.i.d. oracle, {learns}"


def row_label(network, report):
    """A line's or column's name: the network and its protocol ("pretrained, all parameters learn",
    "ANML + NCM", "ANML + SLDA")."""
    return f"{network} + {protocol(report)}" if report.get("method") in HEADS else f"{network}, {protocol(report)}"
