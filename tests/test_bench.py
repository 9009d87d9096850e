"""bench.py as a user runs it: a smoke test on a tiny network (no timing assertions), and its
operation counter."""
import re

import torch

from bench import count_ops
from test_scripts import run, script_env


def test_bench_prints_every_case_with_ratios_and_op_counts(omniglot_root):
    proc = run("bench.py", "--rln", 4, "--nm", 3, "--mask", 36, "--iters", 1, "--classes", 3, "-d", "cpu",
               "--count-ops", "--data-root", omniglot_root, env=script_env())
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.startswith("device: ")
    assert re.search(r"^case\s+time\s+vs seed style\s+peak memory\s+ops$", proc.stdout, re.M)
    rows = {case: (ratio, ops) for case, ratio, ops in
            re.findall(r"^(\S+)\s+[\d.]+ms\s+([\d.]+)x\s+\d+MiB\s+(\d+|-)$", proc.stdout, re.M)}
    assert set(rows) == {"iteration-higher", "iteration-func", "meta-test-seed", "meta-test-fast"}
    assert rows["iteration-higher"][0] == rows["meta-test-seed"][0] == "1.0"
    assert rows["meta-test-seed"][1] == rows["meta-test-fast"][1] == "-"
    higher_ops, func_ops = int(rows["iteration-higher"][1]), int(rows["iteration-func"][1])
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
