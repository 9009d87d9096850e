"""Streaming LDA and the Normal-Gamma Gaussian classes (fastpath/generative_heads.py): each equal to
its batch computation written in numpy, after every image, in any order; their flags, refused
elsewhere; an eval_omni.py run of each that harness.results reads."""
import math

import numpy as np
import pytest
import torch
from scipy.special import gammaln

import eval_omni
from conftest import assert_one_error, synthetic_feature_runs
from fastpath.generative_heads import NormalGammaClasses, StreamingLDA, gaussian_fit, slda_fit
from harness.cli import run_cli
from harness.config import EvalConfig
from harness.results import protocol, read_results, row_label
from protocol import ConfigError

SHIPPED = "trained_anmls/256_112_2304_ANML-21678.pth"


def synthetic_runs(n_runs=2, n_classes=6, dim=5, seed=0):
    """Classes with their own scales per dimension, where LDA's shared covariance and the Gaussian heads'
    per-class variances differ."""
    return synthetic_feature_runs(n_runs, n_classes, dim, seed, class_scales=True)


def split(bank, run, n, which):
    """The run's first n classes' `which` images by numpy, class-major, and their positions 0..n-1."""
    idx = run.train_idx if which == "train" else run.test_idx
    x = np.concatenate([bank[c, idx[i]] for i, c in enumerate(run.classes[:n])])
    return x, np.repeat(np.arange(n), idx.shape[1])


# ----------------------------------------------------------------------------- numpy's batch computations


def numpy_lda(x, y, n, eps):
    """Class means, the pooled within-class covariance (divided by the images), and the discriminant
    scores' W, b with Lambda = ((1 - eps) Sigma + eps I)^-1."""
    means = np.stack([x[y == c].mean(0) for c in range(n)])
    centred = x - means[y]
    sigma = centred.T @ centred / len(x)
    lam = np.linalg.inv((1 - eps) * sigma + eps * np.eye(x.shape[1]))
    W = lam @ means.T
    return means, sigma, W, -0.5 * np.einsum("cd,dc->c", means, W)


def numpy_normal_gamma(x, alpha0, beta0, kappa0):
    """The Normal-Gamma posterior (mu0 = 0) of one class's images x [n, D] in closed form."""
    n, mean = len(x), x.mean(0)
    kappa = kappa0 + n
    beta = beta0 + 0.5 * ((x - mean) ** 2).sum(0) + kappa0 * n * mean ** 2 / (2 * kappa)
    return kappa, n * mean / kappa, alpha0 + n / 2, beta


def numpy_gaussian_scores(x, y, n, test, prior, prediction):
    """log p(test row | class) for the first n classes: Student-t per dimension (bayes) or the Gaussian
    at the posterior's joint mode (map), summed over dimensions, by scipy's formulas."""
    out = np.zeros((len(test), n))
    for c in range(n):
        kappa, mu, alpha, beta = numpy_normal_gamma(x[y == c], *prior)
        if prediction == "bayes":
            nu, s2 = 2 * alpha, beta * (kappa + 1) / (alpha * kappa)
            z = (test - mu) ** 2 / (nu * s2)
            out[:, c] = (gammaln((nu + 1) / 2) - gammaln(nu / 2) - 0.5 * np.log(nu * math.pi * s2)
                         - (nu + 1) / 2 * np.log1p(z)).sum(1)
        else:
            var = beta / (alpha - 0.5)
            out[:, c] = (-0.5 * np.log(2 * math.pi * var) - (test - mu) ** 2 / (2 * var)).sum(1)
    return out


def accuracy(scores, labels):
    return (scores.argmax(1) == labels).mean()


# ----------------------------------------------------------------------------- streaming LDA


def test_slda_equals_batch_lda_by_numpy():
    bank, features, runs = synthetic_runs()
    counts, shrinkages = [2, 4, 6], [1e-4, 0.1, 0.5]
    scores = slda_fit(features, runs, shrinkages, counts)
    assert scores["test"].shape == (3, 3, 2)
    for r, run in enumerate(runs):
        for k, n in enumerate(counts):
            x, y = split(bank, run, n, "train")
            for l, eps in enumerate(shrinkages):
                _, _, W, b = numpy_lda(x, y, n, eps)
                for which in ("train", "test"):
                    rows, labels = split(bank, run, n, which)
                    assert scores[which][k, l, r] == accuracy(rows @ W + b, labels)
    assert 0.2 < scores["test"].mean() < 0.99  # neither trivial nor broken: the classes overlap


def test_slda_streaming_equals_batch_after_every_image_in_any_order():
    """Means and covariance after each image equal numpy's of the images seen (a class-major order and
    a shuffled one); the shuffled order ends with the same state and the same predictions."""
    rng = np.random.default_rng(1)
    x, y = rng.normal(size=(4 * 15, 6)) * rng.uniform(0.2, 3, size=6), np.repeat(np.arange(4), 15)
    states = []
    for order in (np.arange(len(x)), rng.permutation(len(x))):
        lda = StreamingLDA(4, 6)
        for t in range(len(x)):
            lda.learn(torch.as_tensor(x[order[t:t + 1]]), torch.as_tensor(y[order[t:t + 1]]))
            seen_x, seen_y = x[order[:t + 1]], y[order[:t + 1]]
            present = np.unique(seen_y)
            means = np.stack([seen_x[seen_y == c].mean(0) for c in present])
            centred = seen_x - means[np.searchsorted(present, seen_y)]
            np.testing.assert_allclose(lda.means[present].numpy(), means, rtol=1e-12, atol=1e-12)
            np.testing.assert_allclose(lda.covariance.numpy(), centred.T @ centred / (t + 1), rtol=1e-10, atol=1e-12)
        states.append(lda)
    a, b = states
    torch.testing.assert_close(a.covariance, b.covariance, rtol=1e-12, atol=1e-12)
    queries = torch.as_tensor(rng.normal(size=(50, 6)))
    for eps in (1e-4, 0.3):
        assert torch.equal(a.predict(queries, eps, 4), b.predict(queries, eps, 4))


def test_slda_a_block_learns_as_its_images_one_at_a_time():
    rng = np.random.default_rng(2)
    x, y = torch.as_tensor(rng.normal(size=(30, 4))), torch.as_tensor(rng.integers(0, 3, size=30))
    one, block = StreamingLDA(3, 4), StreamingLDA(3, 4)
    for t in range(30):
        one.learn(x[t:t + 1], y[t:t + 1])
    block.learn(x, y)
    torch.testing.assert_close(one.means, block.means, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(one.covariance, block.covariance, rtol=1e-12, atol=1e-12)


# ----------------------------------------------------------------------------- the Gaussian classes


@pytest.mark.parametrize("prediction", ["bayes", "map"])
def test_gaussian_equals_the_normal_gamma_posterior_by_numpy(prediction):
    bank, features, runs = synthetic_runs()
    counts, priors = [2, 4, 6], [(1.0, 1.0, 0.0), (10.0, 3.0, 0.0), (2.0, 0.5, 1.5)]
    scores = gaussian_fit(features, runs, priors, counts, prediction=prediction)
    for r, run in enumerate(runs):
        for k, n in enumerate(counts):
            x, y = split(bank, run, n, "train")
            for l, prior in enumerate(priors):
                for which in ("train", "test"):
                    rows, labels = split(bank, run, n, which)
                    expected = accuracy(numpy_gaussian_scores(x, y, n, rows, prior, prediction), labels)
                    assert scores[which][k, l, r] == expected
    assert 0.2 < scores["test"].mean() < 0.99


@pytest.mark.parametrize("prior", [(1.0, 1.0, 0.0), (3.0, 0.2, 2.0)])
def test_gaussian_conjugate_update_equals_the_posterior_after_every_image_in_any_order(prior):
    rng = np.random.default_rng(3)
    x, y = rng.normal(size=(3 * 15, 5)) + 2, np.repeat(np.arange(3), 15)
    final = []
    for order in (np.arange(len(x)), rng.permutation(len(x))):
        g = NormalGammaClasses(3, 5, *prior)
        for t in range(len(x)):
            g.learn(torch.as_tensor(x[order[t:t + 1]]), torch.as_tensor(y[order[t:t + 1]]))
            c = y[order[t]]
            kappa, mu, alpha, beta = numpy_normal_gamma(x[order[:t + 1]][y[order[:t + 1]] == c], *prior)
            assert g.kappa[c].item() == pytest.approx(kappa) and g.alpha[c].item() == pytest.approx(alpha)
            np.testing.assert_allclose(g.mu[c].numpy(), mu, rtol=1e-12, atol=1e-12)
            np.testing.assert_allclose(g.beta[c].numpy(), beta, rtol=1e-12, atol=1e-12)
        final.append(g)
    queries = torch.as_tensor(rng.normal(size=(40, 5)) + 2)
    for prediction in ("bayes", "map"):
        assert torch.equal(final[0].predict(queries, 3, prediction), final[1].predict(queries, 3, prediction))


def test_the_student_t_scores_are_chunked_as_one():
    """The posterior predictive computed a few rows at a time equals it computed at once."""
    import fastpath.generative_heads as heads
    rng = np.random.default_rng(4)
    g = NormalGammaClasses(3, 4, 2.0, 1.0)
    g.learn(torch.as_tensor(rng.normal(size=(12, 4))), torch.as_tensor(np.repeat(np.arange(3), 4)))
    queries = torch.as_tensor(rng.normal(size=(9, 4)))
    whole = g.log_predictive(queries, 3)
    old, heads.ROW_ELEMENTS = heads.ROW_ELEMENTS, 24  # two rows a chunk
    try:
        torch.testing.assert_close(g.log_predictive(queries, 3), whole, rtol=0, atol=0)
    finally:
        heads.ROW_ELEMENTS = old


# ----------------------------------------------------------------------------- flags


@pytest.mark.parametrize("argv, expected", [
    (["--method", "slda", "-l", "0.001"], r"--lr is the Adam learning rate of seq and iid: --method slda learns no "
                                          r"rate \(it takes --shrinkage\)"),
    (["--method", "gaussian", "-l", "0.001"], r"--method gaussian learns no rate \(it takes --prior\)"),
    (["--shrinkage", "0.1"], r"--shrinkage is for --method slda, not seq"),
    (["--method", "ncm", "--shrinkage", "0.1"], r"--shrinkage is for --method slda, not ncm"),
    (["--method", "slda", "--prior", "1,1"], r"--prior is for --method gaussian, not slda"),
    (["--method", "lstsq", "--prediction", "map"], r"--prediction is for --method gaussian, not lstsq"),
    (["--method", "gaussian", "--ridge", "1"], r"--ridge is for --method lstsq, not gaussian"),
    (["--method", "slda", "--distance", "cosine"], r"--distance is for --method ncm, not slda"),
    (["--method", "slda", "--shrinkage", "1.5"], r"--shrinkage must be in \(0, 1\], got 1.5"),
    (["--method", "slda", "--shrinkage", "0"], r"argument --shrinkage"),
    (["--method", "gaussian", "--prior", "1"], r"--prior takes ALPHA,BETA\[,KAPPA\] .*got '1'"),
    (["--method", "gaussian", "--prior", "0,1"], r"--prior takes ALPHA,BETA"),
    (["--method", "gaussian", "--prior", "1,1", "1,1,0"], r"--prior takes distinct priors, got 1,1 1,1"),
    (["--method", "gaussian", "--prediction", "mode"], r"argument --prediction: invalid choice"),
    (["--method", "slda", "--shrinkage", "0.1", "--selection-runs", "2"], r"give several with --shrinkage"),
    (["--method", "gaussian", "--no-freeze"], r"--no-freeze .* not gaussian, which learns on frozen"),
])
def test_bad_flags_are_one_error_line(argv, expected, capsys):
    with pytest.raises(SystemExit) as done:
        run_cli(lambda: eval_omni.main(["-m", "missing.pth", *argv]))
    assert done.value.code == 2
    assert_one_error(capsys.readouterr().err, expected)


def test_the_grids_and_their_defaults():
    slda = EvalConfig(model="m.pth", method="slda")
    assert slda.grid == (1e-4,) and slda.hyperparameter == "shrinkage"
    assert len(EvalConfig(model="m.pth", method="slda", selection_runs=2).grid) > 1
    gaussian = EvalConfig(model="m.pth", method="gaussian", priors=("10,1.0", "2,3,0.5", "1,1,0"))
    assert gaussian.grid == ("10,1", "2,3,0.5", "1,1") and gaussian.hyperparameter == "prior"
    assert EvalConfig(model="m.pth", method="gaussian").grid == ("1,1",)
    assert len(EvalConfig(model="m.pth", method="gaussian", selection_runs=2).grid) > 1
    with pytest.raises(ConfigError, match="--prediction"):
        EvalConfig(model="m.pth", method="gaussian", prediction="mode")


# ----------------------------------------------------------------------------- end to end


@pytest.mark.parametrize("flags", [["--method", "slda"], ["--method", "gaussian"],
                                   ["--method", "gaussian", "--prediction", "map"]])
def test_eval_omni_writes_a_report_that_results_reads(flags, omniglot_root, tmp_path, capsys):
    out = tmp_path / "out.json"
    eval_omni.main(["-m", SHIPPED, "-c", "2", "4", "-r", "1", "--selection-runs", "1", *flags, "--data-root",
                    str(omniglot_root), "--no-download", "--threads", "1", "--json", str(out)])
    report = read_results(out)
    assert report["method"] == flags[1] and [row["classes"] for row in report["rows"]] == [2, 4]
    assert report["hyperparameter"] == {"slda": "shrinkage", "gaussian": "prior"}[flags[1]]
    assert len(report["grid"]) > 1 and report["rows"][1]["chosen_on_selection_runs"]["test_mean"] > 0.5
    label = row_label("ANML", report)
    assert label == {"slda": "ANML + SLDA", "gaussian": "ANML + Gaussian (Bayes)"}[flags[1]] or \
        (flags[-1] == "map" and label == "ANML + Gaussian (MAP)")
    assert protocol(report) in label
    assert "Chosen" in capsys.readouterr().out
