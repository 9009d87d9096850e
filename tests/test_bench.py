"""bench.py as a user runs it: a smoke test on a tiny network (no timing assertions), and its
operation counter."""
import re

import pytest
import torch

from bench import count_ops
from conftest import run, script_env

ROW = r"^(\S+)\s+([\d.]+)ms\s+([\d.]+)x\s+\d+MiB\s+(\d+|-)$"


def test_bench_prints_every_case_with_ratios_and_op_counts(omniglot_root):
    proc = run("bench.py", "--rln", 4, "--nm", 3, "--mask", 36, "--iters", 1, "--classes", 3, "-d", "cpu",
               "--count-ops", "--data-root", omniglot_root, env=script_env())
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.startswith("device: ")
    assert re.search(r"^case\s+time\s+vs seed style\s+peak memory\s+ops$", proc.stdout, re.M)
    rows = {case: (float(ms), float(ratio), ops) for case, ms, ratio, ops in re.findall(ROW, proc.stdout, re.M)}
    assert set(rows) == {"iteration-higher", "iteration-func", "meta-test-seed", "meta-test-fast"}
    for case, (ms, ratio, _) in rows.items():  # each ratio is its comparison's seed-style time over its own
        baseline = rows["iteration-higher" if case.startswith("iteration") else "meta-test-seed"][0]
        assert ratio == pytest.approx(baseline / ms, abs=0.051 + 0.0005 * baseline / ms)
    assert rows["meta-test-seed"][2] == rows["meta-test-fast"][2] == "-"
    higher_ops, func_ops = int(rows["iteration-higher"][2]), int(rows["iteration-func"][2])
    assert 0 < func_ops < higher_ops
    assert re.search(r"^most frequent ops, iteration-func: \w+ \d+", proc.stdout, re.M)


def test_count_ops_counts_operations_not_views():
    a, b = torch.ones(3), torch.ones(3)
    result, counts = count_ops(lambda: torch.add(a, b).view(3, 1).T.sum())
    assert torch.equal(result, torch.tensor(6.0))
    assert counts == {"add": 1, "sum": 1}  # the view and the transpose launch nothing
    x = torch.ones(3, requires_grad=True)
    _, counts = count_ops(lambda: (x * 2).sum().backward())
    assert counts["mul"] >= 2 and counts["sum"] == 1  # the backward's operations are counted too


def test_bench_bad_input_is_one_clear_error(tmp_path):
    proc = run("bench.py", "--mask", 35, "--rln", 4, "--data-root", tmp_path, "--no-download", env=script_env())
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    errors = [line for line in proc.stderr.splitlines() if "error:" in line]
    assert len(errors) == 1 and "--mask must be 36" in errors[0], proc.stderr
    missing = run("bench.py", "--rln", 4, "--nm", 3, "--mask", 36, "--data-root", tmp_path, "--no-download",
                  env=script_env())
    assert missing.returncode == 2 and "Traceback" not in missing.stderr
    errors = [line for line in missing.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Omniglot not found" in errors[0], missing.stderr
