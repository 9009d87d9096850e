"""Learners that cannot forget, on the frozen features: each keeps per-class statistics (and LDA one
shared covariance) updated one image at a time, exactly what the batch computation gives, whatever
the order of the images. Run on the same runs as ncm (`gather_sequence`), scored after the first N
classes for each count N, predicting among the N classes learned. float64.

- `slda`: streaming linear discriminant analysis (Hayes & Kanan 2020, "Lifelong Machine Learning
  with Deep Streaming Linear Discriminant Analysis", CVPR Workshops), `StreamingLDA`;
- `gaussian`: a diagonal Gaussian per class under a Normal-Gamma prior, predicting with the posterior
  predictive or the MAP (GeMCL: Banayeeanzade et al. 2021, "Generative vs. Discriminative:
  Rethinking the Meta-Continual Learning", NeurIPS), `NormalGammaClasses`."""
import math

import numpy as np
import torch
from fastpath.frozen_features import gather_sequence, hit_rate, position_labels
from harness.runtime import progress_bar

ROW_ELEMENTS = 1 << 22  # (row, class, dimension) elements per chunk of the Student-t scores (32 MB)


class StreamingLDA:
    """Class means and one shared covariance, learned one image at a time.

    Image x of class c, its n_c images seen before and mean mu_c: the pooled within-class scatter S
    grows by n_c / (n_c + 1) (x - mu_c)(x - mu_c)^T, then mu_c moves by (x - mu_c) / (n_c + 1)
    (Welford's update, exact: after any images S is the batch sum of (x - mu_class)(x - mu_class)^T,
    in any order). Sigma = S / (images seen), the maximum-likelihood pooled covariance. Hayes & Kanan's
    code weights the update by the count of all images instead of the class's (an approximation
    that depends on the order); this is the exact statistic. The rank-one terms of the images learned
    in one call are added as one matrix product (the same sum), the means move image by image."""

    def __init__(self, num_classes, dim, device="cpu"):
        self.means = torch.zeros(num_classes, dim, dtype=torch.float64, device=device)
        self.counts = [0] * num_classes
        self.scatter = torch.zeros(dim, dim, dtype=torch.float64, device=device)
        self.seen = 0

    def learn(self, x, y):
        """Learn the images x [n, D] of classes y [n] (positions 0..C-1), one after another."""
        x = x.to(self.means)
        deltas, weights = torch.empty_like(x), []
        for t, c in enumerate(y.tolist()):
            n_c = self.counts[c]
            deltas[t] = x[t] - self.means[c]
            weights.append(n_c / (n_c + 1))
            self.means[c] += deltas[t] / (n_c + 1)
            self.counts[c] = n_c + 1
        weights = torch.tensor(weights, dtype=x.dtype, device=x.device)
        self.scatter.addmm_((deltas * weights[:, None]).T, deltas)
        self.seen += len(x)

    @property
    def covariance(self):
        return self.scatter / max(self.seen, 1)

    def discriminants(self, shrinkage, n):
        """(W [D, n], b [n]) of the first n classes: score_c(x) = mu_c^T Lambda x - mu_c^T Lambda mu_c / 2
        = (x W + b)_c, with Lambda = ((1 - eps) Sigma + eps I)^-1, eps = `shrinkage` (the form of
        Hayes & Kanan's code; no class prior)."""
        means = self.means[:n]
        shrunk = (1 - shrinkage) * self.covariance
        shrunk.diagonal().add_(shrinkage)
        chol, info = torch.linalg.cholesky_ex(shrunk)
        W = torch.cholesky_solve(means.T, chol) if not info else torch.linalg.pinv(shrunk, hermitian=True) @ means.T
        return W, -0.5 * (means * W.T).sum(1)

    def predict(self, x, shrinkage, n):
        """The class (0..n-1) of the highest discriminant score of each row of x [rows, D]."""
        W, b = self.discriminants(shrinkage, n)
        return (x.to(W) @ W + b).argmax(1)


class NormalGammaClasses:
    """A diagonal Gaussian per class, mean mu and precision lambda per dimension, under the prior
    lambda ~ Gamma(alpha0, beta0), mu | lambda ~ Normal(mu0, 1 / (kappa0 lambda)), mu0 = 0.

    Conjugate update per image x of class c: beta += kappa (x - mu)^2 / (2 (kappa + 1)), mu += (x - mu)
    / (kappa + 1), kappa += 1, alpha += 1/2 (after n images: kappa0 + n, the posterior mean
    (kappa0 mu0 + n mean) / (kappa0 + n), alpha0 + n/2, beta0 + the scatter / 2 + kappa0 n (mean - mu0)^2
    / (2 (kappa0 + n))). kappa0 = 0, GeMCL's prior, has no prior on the mean: mu is the class mean,
    and mu0 plays no part."""

    def __init__(self, num_classes, dim, alpha0, beta0, kappa0=0.0, device="cpu"):
        options = dict(dtype=torch.float64, device=device)
        self.kappa = torch.full((num_classes,), float(kappa0), **options)
        self.alpha = torch.full((num_classes,), float(alpha0), **options)
        self.mu = torch.zeros(num_classes, dim, **options)  # mu0 = 0
        self.beta = torch.full((num_classes, dim), float(beta0), **options)

    def learn(self, x, y):
        """Learn the images x [n, D] of classes y [n] (positions 0..C-1), one after another."""
        x = x.to(self.mu)
        for t, c in enumerate(y.tolist()):
            kappa, delta = self.kappa[c], x[t] - self.mu[c]
            self.beta[c] += kappa / (2 * (kappa + 1)) * delta.square()
            self.mu[c] += delta / (kappa + 1)
            self.kappa[c] = kappa + 1
            self.alpha[c] += 0.5

    def log_predictive(self, x, n):
        """log p(x | the images seen) under each of the first n classes, [rows, n]: per dimension the
        posterior predictive Student-t, 2 alpha degrees of freedom, location mu, squared scale
        beta (kappa + 1) / (alpha kappa), its log-densities summed over the dimensions."""
        mu, nu = self.mu[:n], 2 * self.alpha[:n]
        scale2 = self.beta[:n] * ((self.kappa[:n] + 1) / (self.alpha[:n] * self.kappa[:n]))[:, None]
        D = mu.shape[1]
        const = D * (torch.lgamma((nu + 1) / 2) - torch.lgamma(nu / 2) - 0.5 * torch.log(nu * math.pi)) - \
            0.5 * scale2.log().sum(1)
        inverse, x = 1 / (nu[:, None] * scale2), x.to(mu)
        out = torch.empty(len(x), n, dtype=mu.dtype, device=mu.device)
        rows = max(1, ROW_ELEMENTS // (n * D))
        for i in range(0, len(x), rows):
            terms = (x[i:i + rows, None] - mu).square_().mul_(inverse).log1p_()
            out[i:i + rows] = const - (nu + 1) / 2 * terms.sum(2)
        return out

    def log_map(self, x, n):
        """log N(x | mu, 1 / lambda) under each of the first n classes, [rows, n], at the posterior's
        joint mode: mu, lambda = (alpha - 1/2) / beta per dimension."""
        mu, lam = self.mu[:n], (self.alpha[:n, None] - 0.5) / self.beta[:n]
        x = x.to(mu)
        squares = x.square() @ lam.T - 2 * x @ (lam * mu).T + (lam * mu.square()).sum(1)
        return 0.5 * (lam.log().sum(1) - squares - mu.shape[1] * math.log(2 * math.pi))

    def predict(self, x, n, prediction="bayes"):
        """The most likely class (0..n-1) of each row of x: by the posterior predictive ("bayes") or
        the MAP Gaussian ("map")."""
        return (self.log_predictive(x, n) if prediction == "bayes" else self.log_map(x, n)).argmax(1)


def fit_in_sequence(features, runs, counts, heads, progress, scores, desc):
    """Each run's sequence learned one image at a time, scored after the first N classes for each
    count N on those classes' training and test images (as `ncm_fit`). heads(classes, dim, device) ->
    (learners, predictors): every learner learns every image; predictors[l](x, n) predicts among the
    first n classes for grid value l. Returns accuracies [K, L, R], filled into `scores`. `progress`:
    True or the progress bar's name (default `desc`)."""
    n_train, n_test = runs[0].train_idx.shape[1], runs[0].test_idx.shape[1]
    label = progress if isinstance(progress, str) else desc
    for r in progress_bar(range(len(runs)), disable=not progress, desc=label, unit="run"):
        train_x, _, test_x, _ = (a.double() for a in gather_sequence(features, runs[r]))
        device = train_x.device
        labels = position_labels(counts[-1], n_train, device)
        learners, predictors = heads(counts[-1], train_x.shape[1], device)
        done = 0
        for k, n in enumerate(counts):
            for learner in learners:
                learner.learn(train_x[done:n * n_train], labels[done:n * n_train])
            done = n * n_train
            rows = torch.cat([train_x[:done], test_x[:n * n_test]])
            truth = torch.cat([labels[:done], position_labels(n, n_test, device)])
            for l, predict in enumerate(predictors):
                hits = predict(rows, n) == truth
                scores["train"][k, l, r] = hit_rate(hits[:done])
                scores["test"][k, l, r] = hit_rate(hits[done:])
    return scores


def empty_scores(counts, grid, runs):
    """Accuracies {"test", "train": [K, L, R]}, NaN until computed."""
    shape = (len(counts), len(grid), len(runs))
    return {"test": np.full(shape, np.nan), "train": np.full(shape, np.nan)}


def slda_fit(features, runs, shrinkages, counts, progress=False, scores=None):
    """Streaming LDA on the frozen features (`StreamingLDA`), one learner per run scored at every
    shrinkage eps of `shrinkages`. Returns accuracies [K, L, R] (L = shrinkages)."""
    def heads(classes, dim, device):
        lda = StreamingLDA(classes, dim, device)
        return [lda], [lambda x, n, eps=eps: lda.predict(x, eps, n) for eps in shrinkages]
    scores = scores or empty_scores(counts, shrinkages, runs)
    return fit_in_sequence(features, runs, counts, heads, progress, scores, "slda")


def gaussian_fit(features, runs, priors, counts, progress=False, scores=None, prediction="bayes"):
    """The Normal-Gamma Gaussian classes on the frozen features (`NormalGammaClasses`), one learner per
    prior (alpha0, beta0, kappa0) of `priors`, predicting by `prediction` ("bayes": the posterior
    predictive; "map"). Returns accuracies [K, L, R] (L = priors)."""
    def heads(classes, dim, device):
        learners = [NormalGammaClasses(classes, dim, *prior, device=device) for prior in priors]
        return learners, [lambda x, n, g=g: g.predict(x, n, prediction) for g in learners]
    scores = scores or empty_scores(counts, priors, runs)
    return fit_in_sequence(features, runs, counts, heads, progress, scores, f"gaussian ({prediction})")
