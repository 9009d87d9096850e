"""Checkpoints and the state of a run: exact resume, and the shipped model."""
import numpy as np
import torch

import anml


def test_half_then_resume_equals_one_run(sampler, tmp_path):
    """N iterations straight = N/2, then a resume for the other N/2: bit-identical on the CPU,
    and the CSV log holds the same losses and accuracies, each iteration once."""
    def run(out_dir, its, resume=None):
        sampler.rng = np.random.default_rng(1)  # what OmniSampler(seed=1) starts from
        return anml.train(4, 3, 36, its=its, sampler=sampler, out_dir=out_dir, seed=1, quiet=True,
                          resume=resume)

    _, stopped = run(tmp_path / "straight", 4)
    assert stopped is None
    run(tmp_path / "split", 2)
    run(tmp_path / "split", 4, resume="latest")
    load = lambda d: torch.load(d / "4_3_36_ANML-3.pth", weights_only=True)
    straight, split = load(tmp_path / "straight"), load(tmp_path / "split")
    assert all(torch.equal(straight[k], split[k]) for k in straight)
    logs = [np.loadtxt(d / "4_3_36_train_log.csv", delimiter=",", skiprows=1)
            for d in (tmp_path / "straight", tmp_path / "split")]
    np.testing.assert_array_equal(logs[0][:, :3], logs[1][:, :3])
    assert logs[0][:, 0].tolist() == [0, 1, 2, 3]
    assert [p.name for p in (tmp_path / "split").glob("*_resume.pt")] == ["4_3_36_ANML-3_resume.pt"]
