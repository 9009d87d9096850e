"""The meta-test: the frozen-feature path against the seed's loop, several class counts along one
sequence, and the batched grid of runs and learning rates against separate runs."""
import numpy as np
import torch

import anml
from checkpoints import load_model
from frozen_features import FeatureBank, MetaTestRun, sequential_fit


def test_fast_meta_test_equals_seed_loop(small_checkpoint, sampler):
    kwargs = dict(num_classes=8, train_examples=15, lrs=(1e-3, 3e-4), runs=2, seed=4, progress=False)
    fast = anml.meta_test(small_checkpoint, sampler, fast=True, **kwargs)
    slow = anml.meta_test(small_checkpoint, sampler, fast=False, **kwargs)
    np.testing.assert_array_equal(fast["test"], slow["test"])
    np.testing.assert_array_equal(fast["train"], slow["train"])
    assert fast["test"].shape == (1, 2, 2)  # [class counts, lrs, runs]
    assert fast["train"][0, 0].mean() > 0.05  # it learned: a guess among 1000 outputs scores 0.001


def test_several_class_counts_equal_separate_runs(small_checkpoint, sampler):
    """A run scored after the first 3, 6 and 8 classes of its sequence gives what separate runs with
    3, 6 and 8 classes give (fast path), and the seed's loop run separately for each count agrees."""
    kwargs = dict(train_examples=15, lrs=(1e-3, 3e-4), runs=2, seed=4, progress=False)
    nested = anml.meta_test(small_checkpoint, sampler, num_classes=[8, 3, 6], **kwargs)
    assert nested["test"].shape == (3, 2, 2)
    for k, n in enumerate([3, 6, 8]):
        alone = anml.meta_test(small_checkpoint, sampler, num_classes=n, **kwargs)
        np.testing.assert_array_equal(nested["test"][k], alone["test"][0])
        np.testing.assert_array_equal(nested["train"][k], alone["train"][0])
    loop = anml.meta_test(small_checkpoint, sampler, num_classes=[3, 6, 8], fast=False, **kwargs)
    np.testing.assert_array_equal(nested["test"], loop["test"])
    np.testing.assert_array_equal(nested["train"], loop["train"])
    assert not np.array_equal(nested["test"][0], nested["test"][2])  # 3 and 8 classes score differently


def test_test_train_fast_equals_seed_loop(small_checkpoint, sampler):
    accs = {}
    for fast in (True, False):
        sampler.rng = np.random.default_rng(9)
        accs[fast] = anml.test_train(small_checkpoint, sampler, num_classes=6, lr=1e-3, quiet=True,
                                     fast=fast, generator=torch.Generator().manual_seed(2))
    assert accs[True].shape == (6,)
    np.testing.assert_array_equal(accs[True], accs[False])


def test_vectorised_grid_equals_separate_runs(small_checkpoint, sampler):
    model = load_model(small_checkpoint)
    features = FeatureBank(model, sampler.evaluation)
    runs, inits = [], []
    for r in range(3):
        sampler.rng, generator = anml.run_generators(1, r)
        anml.reset_last_layer(model, generator)
        inits.append(model.fc.weight.detach().clone())
        runs.append(MetaTestRun(*sampler.sample_test_indices(5, 15)))
    lrs = [1e-3, 5e-4]
    grid = sequential_fit(features, runs, torch.stack(inits), model.fc.bias, lrs, counts=[2, 5])
    for r in range(3):
        for l, lr in enumerate(lrs):
            one = sequential_fit(features, [runs[r]], inits[r][None], model.fc.bias, [lr], counts=[2, 5])
            np.testing.assert_array_equal(one["test"][:, 0, 0], grid["test"][:, l, r])
            np.testing.assert_array_equal(one["train"][:, 0, 0], grid["train"][:, l, r])
    assert len({tuple(run.classes) for run in runs}) == 3
