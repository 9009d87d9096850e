"""The meta-test on frozen features: RLN and NM do not learn at meta-test time, so the features of
every image are computed once, and the seed's sequence of one-image Adam steps runs on the last
layer alone (many runs and learning rates at once as one batch of last layers)."""
import numpy as np
import torch

from cuda_graphs import ReplayedSteps


class MetaTestRun:
    """One run's sample: classes [N] and per class the drawers used to train [N, k] and test."""

    def __init__(self, classes, train_idx, test_idx):
        self.classes, self.train_idx, self.test_idx = map(np.asarray, (classes, train_idx, test_idx))

class FeatureBank:
    """RLN * NM features of evaluation images, computed once (both nets are frozen) on demand."""

    def __init__(self, model, images, batch_size=None):
        self.model, self.images = model, images  # images [C, 20, 1, H, W]
        self.device = next(model.parameters()).device
        # On the CPU, small batches keep the 256 x 26 x 26 activations of the first block in the
        # cache (twice as fast as batches of 500: README, Speed).
        self.batch_size = batch_size or (20 if self.device.type == "cpu" else 2000)
        self.done = torch.zeros(images.shape[0], dtype=torch.bool)
        self.features = None

    def __call__(self, classes):
        """Features [len(classes), 20, D] on the model's device."""
        classes = torch.as_tensor(np.asarray(classes), dtype=torch.long)
        missing = torch.unique(classes[~self.done[classes]])
        per_batch = max(1, self.batch_size // self.images.shape[1])
        for chunk in (missing[i:i + per_batch] for i in range(0, len(missing), per_batch)):
            ims = self.images[chunk].flatten(0, 1).to(self.device)
            with torch.no_grad():
                feats = self.model.features(ims).view(len(chunk), self.images.shape[1], -1)
            if self.features is None:
                self.features = torch.zeros(self.images.shape[0], *feats.shape[1:], dtype=feats.dtype,
                                            device=self.device)
            self.features[chunk.to(self.device)] = feats
            self.done[chunk] = True
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

def sequential_fit(features, runs, weights, bias, lrs, counts=None, bar=None):
    """Test-train then test-test of every (learning rate, run) pair at once, on frozen features.

    Each model is the last layer alone, starting from (`weights[r]`, `bias`), taking one Adam step
    per training image in sequence, exactly the seed's loop with the frozen nets factored out.
    The R runs x L learning rates are one batch of R*L models: batched matmuls and a fused
    Adam with one parameter group per model. After the first N classes of the sequence, for each
    N in `counts` (default: all of the runs' classes), every model is scored on those N classes'
    test and training images. Returns accuracies [K, L, R], and the last count's test accuracy
    per class [L, R, N]."""
    seqs = [gather_sequence(features, run) for run in runs]
    train_x = torch.stack([s[0] for s in seqs])  # [R, T, D]
    train_y = torch.stack([s[1] for s in seqs])
    test_x, test_y = torch.stack([s[2] for s in seqs]), torch.stack([s[3] for s in seqs])
    R, L = len(runs), len(lrs)
    n_classes, n_train = runs[0].train_idx.shape
    n_test = runs[0].test_idx.shape[1]
    counts = counts or [n_classes]
    weights, bias = weights.detach(), bias.detach()
    W = weights.repeat(L, 1, 1)  # model i = (learning rate i // R, run i % R)
    b = bias.expand(L * R, *bias.shape).clone()
    W.grad, b.grad = torch.zeros_like(W), torch.zeros_like(b)
    groups = [{"params": [W[i], b[i]], "lr": lrs[i // R]} for i in range(L * R)]
    opt = torch.optim.Adam(groups, fused=True, capturable=W.device.type == "cuda")
    for i, g in enumerate(groups):  # the fused step reads the grads of the views
        g["params"][0].grad, g["params"][1].grad = W.grad[i], b.grad[i]
    models = torch.arange(L * R, device=W.device)
    steps = ReplayedSteps(SequenceStep(W, b, train_x, train_y.repeat(L, 1), models, opt, L), n_train,
                          W.device.type == "cuda")
    Wl, bl = W.view(L, R, *weights.shape[1:]), b.view(L, R, *bias.shape)
    scores = {"test": np.zeros((len(counts), L, R)), "train": np.zeros((len(counts), L, R))}
    for k, n in enumerate(counts):
        steps.advance(n * n_train - steps.done, bar)
        for key, x, y in (("test", test_x[:, :n * n_test], test_y[:, :n * n_test]),
                          ("train", train_x[:, :n * n_train], train_y[:, :n * n_train])):
            correct = torch.stack([predict(Wl[l], bl[l], x) == y for l in range(L)]).float()  # [L, R, n]
            scores[key][k] = correct.mean(2).cpu().numpy()
            if key == "test":
                scores["test_per_class"] = correct.view(L, R, n, n_test).mean(-1).cpu().numpy()
    return scores

class SequenceStep:
    """One test-train step of every model, reading image `t` of the sequence from a device counter,
    so that the same code runs eagerly or replayed from a CUDA graph."""

    def __init__(self, W, b, train_x, train_y, models, opt, copies):
        self.W, self.b, self.x, self.y, self.models, self.opt = W, b, train_x, train_y, models, opt
        self.copies = copies  # each run's sequence is shared by `copies` learning rates
        self.t = torch.zeros(1, dtype=torch.long, device=W.device)

    def __call__(self):
        x = self.x.index_select(1, self.t).squeeze(1).repeat(self.copies, 1)
        y = self.y.index_select(1, self.t).squeeze(1)
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
