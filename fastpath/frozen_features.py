"""The meta-test on frozen features: RLN and NM do not learn at meta-test time, so the features of
every image are computed once, and higherANML's sequence of one-image Adam steps runs on the last
layer alone (many runs and learning rates at once as one batch of last layers). The other learners
on the same features: the i.i.d. oracle, a closed-form last layer (lstsq) and the nearest class
mean (ncm). `meta_test.py` draws the runs and runs these learners on them."""
import numpy as np
import torch

from fastpath.batched import adam_for_models
from fastpath.cuda_graphs import ReplayedSteps
from harness.runtime import progress_bar


# Images per forward pass of the frozen nets: on the CPU a small batch's first-block activations stay
# in the cache (docs/speed.md); a GPU wants large batches.
CPU_FEATURE_BATCH = 20
GPU_FEATURE_BATCH = 2000


def hit_rate(hits):
    """Fraction of True along the last dimension of the boolean tensor `hits`, as numpy float64: the
    exact count over n, so every path that makes the same predictions reports the same bits (the last
    bit of a float32 mean depends on the reduction's path)."""
    return hits.sum(-1).cpu().numpy() / hits.shape[-1]


class MetaTestRun:
    """One run's sample: classes [N] and per class the drawers used to train [N, k] and test."""

    def __init__(self, classes, train_idx, test_idx):
        self.classes, self.train_idx, self.test_idx = map(np.asarray, (classes, train_idx, test_idx))


class FeatureBank:
    """RLN * NM features of evaluation images, computed once (both nets are frozen) on demand."""

    def __init__(self, model, images, batch_size=None, progress=False):
        self.model, self.images, self.progress = model, images, progress  # images [C, 20, 1, H, W]
        self.device = next(model.parameters()).device
        self.batch_size = batch_size or (CPU_FEATURE_BATCH if self.device.type == "cpu" else GPU_FEATURE_BATCH)
        self.done = torch.zeros(images.shape[0], dtype=torch.bool)
        self.features = None

    def compute(self, classes):
        """Compute the features of `classes` that are not computed yet (with a progress bar if asked)."""
        classes = torch.as_tensor(np.asarray(classes), dtype=torch.long)
        missing = torch.unique(classes[~self.done[classes]])
        per_class = self.images.shape[1]
        per_batch = max(1, self.batch_size // per_class)
        label = self.progress if isinstance(self.progress, str) else "features"  # `progress`: True or the bar's name
        with progress_bar(total=len(missing) * per_class, disable=not self.progress or not len(missing), desc=label,
                          unit="image", unit_scale=True) as bar:
            for chunk in (missing[i:i + per_batch] for i in range(0, len(missing), per_batch)):
                ims = self.images[chunk].flatten(0, 1).to(self.device)
                with torch.no_grad():
                    feats = self.model.features(ims).view(len(chunk), per_class, -1)
                if self.features is None:
                    self.features = torch.zeros(self.images.shape[0], *feats.shape[1:], dtype=feats.dtype,
                                                device=self.device)
                self.features[chunk.to(self.device)] = feats
                self.done[chunk] = True
                bar.update(len(ims))

    def __call__(self, classes):
        """Features [len(classes), 20, D] on the model's device."""
        self.compute(classes)
        classes = torch.as_tensor(np.asarray(classes), dtype=torch.long)
        return self.features[classes.to(self.device)]


def gather_sequence(features, run):
    """The run's training sequence and test set as feature rows and labels (class-major order)."""
    feats = features(run.classes)  # [N, 20, D]
    device = feats.device
    rows = torch.arange(len(run.classes), device=device)[:, None]
    labels = torch.as_tensor(run.classes, device=device)[:, None]
    train_idx = torch.as_tensor(run.train_idx, device=device)
    test_idx = torch.as_tensor(run.test_idx, device=device)
    return (feats[rows, train_idx].flatten(0, 1), labels.expand_as(train_idx).flatten(),
            feats[rows, test_idx].flatten(0, 1), labels.expand_as(test_idx).flatten())


def stack_sequences(features, runs):
    """Every run's training sequence and test set, stacked: train_x [R, T, D], train_y [R, T],
    test_x [R, S, D], test_y [R, S] (class-major, the classes in the runs' order)."""
    seqs = [gather_sequence(features, run) for run in runs]
    return tuple(torch.stack([s[i] for s in seqs]) for i in range(4))


class LastLayers:
    """R runs x L learning rates as one batch of R*L last layers (model i = (lr i // R, run i % R)),
    each starting from (`weights[r]`, `bias`) and taking one Adam step per image of its run's
    sequence `train_x[r]` in order: batched matmuls and one Adam, each model at its rate (`batched.adam_for_models`)."""

    def __init__(self, weights, bias, lrs, train_x, train_y, chunk):
        R, L = len(weights), len(lrs)
        weights, bias = weights.detach(), bias.detach()
        self.W = weights.repeat(L, 1, 1)
        self.b = bias.expand(L * R, *bias.shape).clone()
        self.W.grad, self.b.grad = torch.zeros_like(self.W), torch.zeros_like(self.b)
        on_cuda = self.W.device.type == "cuda"
        opt = adam_for_models([self.W, self.b], [lrs[i // R] for i in range(L * R)], capturable=on_cuda, fused=True)
        models = torch.arange(L * R, device=self.W.device)
        self.step = SequenceStep(self.W, self.b, train_x, train_y.repeat(L, 1), models, opt, L)
        # on a device the steps read their image from a device counter and replay from a CUDA graph;
        # on the CPU they are plain calls (`train_until`)
        self.steps = None if self.W.device.type == "cpu" else ReplayedSteps(self.step, chunk, on_cuda)
        self.L, self.R, self.done = L, R, 0

    def train_until(self, t, bar=None):
        """Take the steps up to image `t` of the sequences (exclusive), counted on the tqdm `bar`."""
        if self.steps is not None:
            self.steps.advance(t - self.done, bar)
        else:
            for s in range(self.done, t):
                x, y = self.step.image(s)
                adam_step_on_image(self.W, self.b, x, y, self.step.models, self.step.opt)
                if bar is not None:
                    bar.update(1)
        self.done = t

    def non_finite(self):
        """[L, R]: which last layers hold a NaN or an infinity (a learning rate far too large)."""
        finite = torch.isfinite(self.W).flatten(1).all(1) & torch.isfinite(self.b).all(1)
        return (~finite).view(self.L, self.R).cpu().numpy()

    def accuracy(self, x, y):
        """Accuracy [L, R] on each run's rows x [R, n, D] with labels y [R, n], and per row [L, R, n]."""
        Wl, bl = self.W.view(self.L, self.R, *self.W.shape[1:]), self.b.view(self.L, self.R, -1)
        correct = torch.stack([predict(Wl[l], bl[l], x) == y for l in range(self.L)])
        return hit_rate(correct), correct


def sequential_fit(features, runs, weights, bias, lrs, counts=None, bar=None):
    """Test-train then test-test of every (learning rate, run) pair at once, on frozen features.

    Each model is the last layer alone, starting from (`weights[r]`, `bias`), taking one Adam step
    per training image in sequence, exactly higherANML's loop with the frozen nets factored out
    (`LastLayers`). After the first N classes of the sequence, for each N in `counts` (default:
    all of the runs' classes), every model is scored on those N classes' test and training
    images. Returns accuracies [K, L, R], and the last count's test accuracy per class [L, R, N]."""
    train_x, train_y, test_x, test_y = stack_sequences(features, runs)
    n_classes, n_train = runs[0].train_idx.shape
    n_test = runs[0].test_idx.shape[1]
    counts = counts or [n_classes]
    layers = LastLayers(weights, bias, lrs, train_x, train_y, n_train)
    scores = {"test": np.zeros((len(counts), len(lrs), len(runs))), "train": np.zeros((len(counts), len(lrs), len(runs)))}
    for k, n in enumerate(counts):
        layers.train_until(n * n_train, bar)
        scores["train"][k] = layers.accuracy(train_x[:, :n * n_train], train_y[:, :n * n_train])[0]
        scores["test"][k], correct = layers.accuracy(test_x[:, :n * n_test], test_y[:, :n * n_test])
        scores["test_per_class"] = hit_rate(correct.view(len(lrs), len(runs), n, n_test))
    scores["non_finite"] = layers.non_finite()
    return scores


# ----------------------------------------------------------------------------- the i.i.d. oracle


def iid_orders(rng, counts, n_train, epochs=1):
    """For each class count N, the order in which the i.i.d. learner sees the N * n_train training
    images of the first N classes (indices into the class-major sequence): `epochs` independent
    shuffles one after the other, drawn from the numpy generator `rng` (count after count)."""
    return [np.concatenate([rng.permutation(n * n_train) for _ in range(epochs)]) for n in counts]


def iid_fit(features, runs, weights, bias, lrs, counts, orders, bar=None):
    """The i.i.d. oracle of `sequential_fit`: the same images, initialisation and Adam steps (one an
    image), but for each class count N a fresh last layer sees the first N classes' training images
    shuffled together, in the order `orders[r][k]` (`iid_orders`; several epochs possible). There
    is no nesting across counts: each count is its own training. Returns accuracies [K, L, R]."""
    train_x, train_y, test_x, test_y = stack_sequences(features, runs)
    n_train, n_test = runs[0].train_idx.shape[1], runs[0].test_idx.shape[1]
    scores = {"test": np.zeros((len(counts), len(lrs), len(runs))), "train": np.zeros((len(counts), len(lrs), len(runs))),
              "non_finite": np.zeros((len(lrs), len(runs)), dtype=bool)}
    for k, n in enumerate(counts):
        order = torch.as_tensor(np.stack([o[k] for o in orders]), device=train_x.device)  # [R, T]
        rows = torch.arange(len(runs), device=train_x.device)[:, None]
        layers = LastLayers(weights, bias, lrs, train_x[rows, order], train_y[rows, order], n_train)
        layers.train_until(order.shape[1], bar)
        scores["train"][k] = layers.accuracy(train_x[:, :n * n_train], train_y[:, :n * n_train])[0]
        scores["test"][k] = layers.accuracy(test_x[:, :n * n_test], test_y[:, :n * n_test])[0]
        scores["non_finite"] |= layers.non_finite()
    return scores

# ----------------------------------------------------------------------------- closed form


def ridge_fit(features, runs, ridges, counts, progress=False, scores=None):
    """The last layer in closed form: for each run, class count N and regulariser lambda, ridge least
    squares from the first N classes' training features to one-hot targets over those N classes,
    with an unpenalised intercept (features and targets centred). Predictions are the argmax over
    the N fitted classes. No SGD, no initialisation. Returns accuracies [K, L, R] (L = ridges),
    filled into `scores` run by run when it is given."""
    train_x, train_y, test_x, test_y = stack_sequences(features, runs)
    n_train, n_test = runs[0].train_idx.shape[1], runs[0].test_idx.shape[1]
    shape = (len(counts), len(ridges), len(runs))
    scores = scores or {"test": np.zeros(shape), "train": np.zeros(shape)}
    label = progress if isinstance(progress, str) else "lstsq"  # `progress`: True or the bar's name
    for r in progress_bar(range(len(runs)), disable=not progress, desc=label, unit="run"):
        for k, n in enumerate(counts):
            x, y = train_x[r, :n * n_train].double(), position_labels(n, n_train, train_x.device)
            weights, intercepts = ridge_solutions(x, torch.nn.functional.one_hot(y, n).double(), ridges)
            for key, xs, ys in (("train", x, y),
                                ("test", test_x[r, :n * n_test].double(), position_labels(n, n_test, train_x.device))):
                predictions = (xs @ weights + intercepts[:, None]).argmax(2)  # [L, rows]
                scores[key][k, :, r] = hit_rate(predictions == ys)
    return scores


def position_labels(n, per_class, device):
    """Labels 0..n-1 (the classes' positions in the run), each repeated per_class times."""
    return torch.arange(n, device=device).repeat_interleave(per_class)


def ridge_solutions(x, y, ridges):
    """argmin_W,b ||x W + b - y||^2 + lambda ||W||^2 for every lambda in `ridges`: W [L, D, C], b [L, C].

    One eigendecomposition serves every lambda: of the D x D Gram matrix when there are more rows
    than features, else of the n x n kernel matrix (the same solution, W = x^T (x x^T + lambda)^-1 y)."""
    x_mean, y_mean = x.mean(0), y.mean(0)
    xc, yc = x - x_mean, y - y_mean
    lam = torch.as_tensor(ridges, dtype=x.dtype, device=x.device)[:, None]
    if xc.shape[0] >= xc.shape[1]:
        e, v = torch.linalg.eigh(xc.T @ xc)
        weights = v @ ((v.T @ (xc.T @ yc)) / (e.clamp(min=0) + lam)[..., None])
    else:
        e, v = torch.linalg.eigh(xc @ xc.T)
        weights = xc.T @ (v @ ((v.T @ yc) / (e.clamp(min=0) + lam)[..., None]))
    return weights, y_mean - x_mean @ weights


# ----------------------------------------------------------------------------- nearest class mean


def ncm_fit(features, runs, distances, counts, progress=False, scores=None):
    """The nearest class mean on the frozen features, learned in sequence: each class's mean training
    feature, updated one image at a time as the sequence goes (`running_class_means`); after the first
    N classes, for each count N, every test and training image of those classes is given the class of
    the nearest of the N means (`nearest_mean`), for each distance of `distances`. No learning rate,
    no initialisation; float64. Returns accuracies [K, L, R] (L = distances), filled into `scores`
    run by run when it is given."""
    n_train, n_test = runs[0].train_idx.shape[1], runs[0].test_idx.shape[1]
    shape = (len(counts), len(distances), len(runs))
    scores = scores or {"test": np.zeros(shape), "train": np.zeros(shape)}
    label = progress if isinstance(progress, str) else "ncm"  # `progress`: True or the bar's name
    for r in progress_bar(range(len(runs)), disable=not progress, desc=label, unit="run"):
        train_x, _, test_x, _ = (a.double() for a in gather_sequence(features, runs[r]))
        device = train_x.device
        means = running_class_means(train_x, n_train, [n * n_train for n in counts])
        for k, (n, class_means) in enumerate(zip(counts, means)):
            for key, xs, ys in (("train", train_x[:n * n_train], position_labels(n, n_train, device)),
                                ("test", test_x[:n * n_test], position_labels(n, n_test, device))):
                for l, distance in enumerate(distances):
                    predictions = nearest_mean(xs, class_means[:n], distance)
                    scores[key][k, l, r] = hit_rate(predictions == ys)
    return scores


def running_class_means(x, per_class, stops):
    """The class means of a sequence x [T, D] (class-major, `per_class` images a class) as a sequential
    learner keeps them: image t moves its class's mean by (x_t - mean) / (images of that class seen
    so far). Returns, for each number of images in `stops`, the means [C, D] at that point (rows of
    classes not seen yet are zero)."""
    T, D = x.shape
    means = torch.zeros(T // per_class, D, dtype=x.dtype, device=x.device)
    seen = [0] * (T // per_class)
    out, stops = [], sorted(stops)
    for t in range(stops[-1]):
        c = t // per_class
        seen[c] += 1
        means[c] += (x[t] - means[c]) / seen[c]
        if t + 1 in stops:
            out.append(means.clone())
    return out


def nearest_mean(x, means, distance):
    """The index of the nearest of means [C, D] to each row of x [n, D]: by Euclidean distance, or
    by cosine distance (1 - cosine similarity: the nearest is the most similar). Ties go to the
    first class."""
    if distance == "euclidean":
        return torch.cdist(x, means).argmin(1)
    if distance == "cosine":
        unit = lambda a: a / a.norm(dim=1, keepdim=True).clamp_min(1e-12)
        return (unit(x) @ unit(means).T).argmax(1)
    raise ValueError(f"unknown distance {distance!r}")


class SequenceStep:
    """One test-train step of every model, reading image `t` of the sequence from a device counter,
    so that the same code runs eagerly or replayed from a CUDA graph."""

    def __init__(self, W, b, train_x, train_y, models, opt, copies):
        self.W, self.b, self.x, self.y, self.models, self.opt = W, b, train_x, train_y, models, opt
        self.copies = copies  # each run's sequence is shared by `copies` learning rates
        self.t = torch.zeros(1, dtype=torch.long, device=W.device)

    def image(self, t):
        """Every model's image t (an index: a long tensor of one element, or an int): (x [M, D], y [M])."""
        t = torch.as_tensor(t, device=self.t.device).reshape(1)
        return self.x.index_select(1, t).squeeze(1).repeat(self.copies, 1), self.y.index_select(1, t).squeeze(1)

    def __call__(self):
        x, y = self.image(self.t)
        adam_step_on_image(self.W, self.b, x, y, self.models, self.opt)
        self.t += 1


def adam_step_on_image(W, b, x, y, models, opt):
    """Cross-entropy gradient of each model on its one image (rank one), then one Adam step."""
    with torch.no_grad():
        p = torch.softmax(last_layer_logits(W, b, x.unsqueeze(1)).squeeze(1), 1)
        p[models, y] -= 1
        torch.mul(p.unsqueeze(2), x.unsqueeze(1), out=W.grad)
        b.grad.copy_(p)
    opt.step()


def last_layer_logits(W, b, x):
    """Logits [M, n, C] of M last layers (W [M, C, D], b [M, C]) on their feature rows [M, n, D].

    Computed as x W^T: for one row each, several times faster than the batched W x on the CPU."""
    return torch.baddbmm(b.unsqueeze(1), x, W.transpose(1, 2))


def predict(W, b, x):
    """Class predictions [M, n] of M last layers on their feature rows [M, n, D]."""
    with torch.no_grad():
        return last_layer_logits(W, b, x).argmax(2)
