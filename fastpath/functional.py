"""The functional meta-gradient: the same mathematics as `higher`'s unroll, in fewer operations.

The three conv blocks are written with `torch.nn.functional` over a dict of parameters, the inner
loop is unrolled with plain autograd (`create_graph=True`), and the outer backward goes through it.
`func_meta_loss` is the one unroll, of one model or of L lanes (several models or tasks in the same
operations, `batched.py`); OML's (`oml.py`) takes the same inner step at its last layer. The
operations whose derivatives are written by hand, in fewer operations than autograd's, are in
`derivatives.py`. `anml.meta_loss` calls `func_meta_loss`; the CUDA graph records it.
"""
import torch
import torch.nn as nn
import torch.nn.functional as F

from fastpath.derivatives import GroupedConv, InnerLastLayer, addmm, instance_norm, linear, max_pool, relu
from model import adapted_in_the_inner_loop


def accuracy(logits, labels):
    return (logits.argmax(1) == labels).float().mean()


# ----------------------------------------------------------------------------- the network

# Conv biases that feed an InstanceNorm are removed by its mean subtraction: their gradient is
# exactly zero and they do not change the output. The functional path skips them in the compute
# (they stay in the model and the checkpoint) and gives them an explicit zero gradient.


def norm_fed_biases(params):
    """The conv biases among {name: parameter}."""
    return [p for n, p in params.items() if n.endswith("conv.bias")]


def conv_blocks(params, prefix, x, groups=None):
    """The three conv blocks of `model.py`, written functionally over a dict of parameters.

    With `groups` = L, x is [N, L C_in, H, W] and the dict holds L networks' parameters side by side
    ([L C, C_in, 3, 3] convolutions, [L C] norms): the grouped convolution (GroupedConv, whatever L)
    runs the L networks at once (`lane_features`), and the result is [N, L 9 C].

    Max-pooling before the ReLU gives the same values and gradients (both are max operations,
    and the ReLU's zero gradient for x <= 0 survives either order) on a 4x smaller tensor."""
    for i, pool in ((1, True), (2, True), (3, False)):
        p = f"{prefix}.convBlock{i}."
        weight = params[p + "conv.weight"]  # bias skipped: see norm_fed_biases
        x = F.conv2d(x, weight) if groups is None else GroupedConv.apply(x, weight, groups)
        x = instance_norm(x, params[p + "norm.weight"], params[p + "norm.bias"])
        x = relu(max_pool(x) if pool else x)
    return x.flatten(1)


def gate(params, x, features=conv_blocks):
    """NM output in (0, 1): computed once per batch, since the inner loop never adapts the NM.
    `features` is conv_blocks (one model) or lane_features (lanes)."""
    return torch.sigmoid(linear(features(params, "nm", x), params["nm.fc.weight"], params["nm.fc.bias"]))


class AdaptedLinear:
    """The last layer during the inner loop, without materialising its adapted weight.

    One inner SGD step changes the fc weight by -lr * g f^T, the outer product of the logits'
    gradient g and the layer's input f (one image a step). So W_k = W_0 + sum_j u_j f_j^T with
    u_j = -lr g_j, and W_k x = W_0 x + U^T (F x): the same mathematics, without writing a new
    1000 x 2304 matrix (and its gradient) at every step."""

    def __init__(self, weight):
        self.weight, self.U, self.F = weight, None, None

    def __call__(self, x, bias):
        out = linear(x, self.weight, bias)
        if self.U is not None:
            out = addmm(out, x @ self.F.mT, self.U)
        return out

    def step(self, u, f):
        """Add the rank-one change u^T f (rows [1, out] and [1, in]; u = -lr times the logits'
        gradient). U and F grow by one row, concatenated to the previous U and F: differentiated,
        each step's U then receives one gradient for all its rows (one addition), where
        concatenating every row afresh would add each row's gradient separately at every step."""
        self.U = u if self.U is None else torch.cat([self.U, u], -2)
        self.F = f if self.F is None else torch.cat([self.F, f], -2)


# ----------------------------------------------------------------------------- L lanes of the network

# K models' parameters stacked [K, ...], B tasks each: L = K B lanes, lane l's episode its own, all lanes
# in the same operations (grouped convolutions, per-channel norms, batched products at the last layer).


def expand_lanes(params, lanes_per_model):
    """{name: [K, ...]} -> {name: [K lanes_per_model, ...]}: each model's weights once per task (the B lanes of
    model k are k B .. k B + B - 1), differentiably: a model's gradient is the sum over its lanes."""
    if lanes_per_model == 1:
        return dict(params)
    return {n: p.unsqueeze(1).expand(p.shape[0], lanes_per_model, *p.shape[1:]).reshape(-1, *p.shape[1:]).contiguous()
            for n, p in params.items()}  # contiguous: a copy once, not at each use of a stride-0 view


def grouped(params):
    """The layout conv_blocks reads for L lanes: conv weights [L C, C_in, 3, 3], norms [L C] (views)."""
    return {n: p.flatten(0, 1) if ".convBlock" in n else p for n, p in params.items()}


def lane_features(params, prefix, images):
    """The conv blocks of L lanes on `images` [N, L, H, W] (lane l's images in channel l): [L, N, 9 C]."""
    lanes = images.shape[1]
    return conv_blocks(grouped(params), prefix, images, groups=lanes).view(len(images), lanes, -1).transpose(0, 1)


def lane_gate(params, images):
    """Each lane's NM output on its images [N, L, H, W]: [L, N, mask]."""
    return gate(params, images, lane_features)


def images_first(ims):
    """[L, N, 1, H, W] episodes -> [N, L, H, W]: lane l's images in channel l of a grouped convolution."""
    return ims.squeeze(2).transpose(0, 1)


def lane_rates(inner_lr, lanes_per_model, dtype):
    """The inner rate as InnerLastLayer takes it: one number, or one per model ([K]) as one per lane [L, 1, 1]."""
    if not torch.is_tensor(inner_lr):
        return inner_lr
    return inner_lr.to(dtype).repeat_interleave(lanes_per_model).view(-1, 1, 1)


def lane_means(t, lanes_per_model, mean_over):
    """[L] per-lane values -> [K] per-model sums over the model's lanes, divided by `mean_over`."""
    return t.detach().view(-1, lanes_per_model).sum(1) / mean_over


# ----------------------------------------------------------------------------- the meta-gradient


def flatten(params, names):
    """The named tensors in one vector: the inner loop updates it with one operation a step."""
    return torch.cat([params[n].flatten() for n in names])


def unflatten(vector, params, names):
    """Views of `vector` shaped like the named tensors (no copies)."""
    pieces = vector.split([params[n].numel() for n in names])
    return {n: piece.view_as(params[n]) for n, piece in zip(names, pieces)}


def one_hot(labels, classes, like):
    """[*labels.shape, classes] one-hot rows in `like`'s dtype: a comparison, with no range check that
    would read a value back to the host (F.one_hot's may)."""
    return (labels[..., None] == torch.arange(classes, device=labels.device)).to(like.dtype)


def inner_step(fc, f, bias, lr_target, lr, first_order, fast=None):
    """One inner SGD step on one image, from its features f at the last layer: InnerLastLayer gives
    the bias's step u and the features' gradient (the inner loss is never computed), `fc` takes
    the weight's rank-one step, and autograd carries the features' gradient back to the fast
    weights `fast` that f and the bias were computed from. Returns the step of `fast`, or the
    bias's step where only the last layer adapts (`fast` None: OML).

    `first_order` (FOMAML, the original ANML code's): the step is a constant, so the initial weights
    get the outer loss's gradient at the adapted ones. The unrolls' one first-order switch."""
    u, grad_f = InnerLastLayer.apply(f, bias, fc.weight, fc.U, fc.F, lr_target, lr)
    if first_order:
        u, grad_f = u.detach(), grad_f.detach()
    fc.step(u, f.detach() if first_order else f)
    if fast is None:
        return u.view_as(bias)
    (step,) = torch.autograd.grad([f, bias], fast, [grad_f, u.view_as(bias)], create_graph=not first_order)
    return step


def func_meta_loss(model, inner_lr, train_ims, train_labels, valid_ims, valid_labels, first_order=False,
                   outer_chunk=None, lanes_per_model=None, mean_over=None):
    """Same mathematics as `anml.higher_meta_loss`, with a functional unroll and plain autograd: the
    meta-gradient is left in the parameters' .grad (the conv biases' is zero: see norm_fed_biases).

    One model: `model` an ANML (or its parameters by name), train_ims [20, 1, H, W], valid_ims
    [84, 1, H, W]; returns (loss, accuracy) tensors. `outer_chunk` is the outer backward's images per
    chunk (None: the device's default; 0: whole).
    Lanes (`lanes_per_model` = B): `model` is K models' parameters {name: [K, ...]} (leaves), the
    episodes have a leading dimension L = K B (train_ims [L, 20, 1, H, W]), `inner_lr` is one rate or
    a [K] tensor; each model's .grad is the mean over its B lanes of their meta-gradients, the sums
    divided by `mean_over` (default B; a meta-batch shared out over processes: their sums then add up
    to the means); returns each model's mean outer (loss, accuracy), [K] each.

    The fast weights (RLN and fc bias) are one vector, updated with one addition a step (inner_step)."""
    params = dict(model.named_parameters()) if isinstance(model, nn.Module) else model
    lanes = lanes_per_model is not None
    mean_over = mean_over or lanes_per_model
    dim = 1 if lanes else 0  # the episodes' image dimension
    as_images, features = (images_first, lane_features) if lanes else (lambda ims: ims, conv_blocks)
    weights = expand_lanes(params, lanes_per_model) if lanes else params
    inner_lr = lane_rates(inner_lr, lanes_per_model, train_ims.dtype) if lanes else inner_lr
    masks = gate(weights, as_images(torch.cat([train_ims, valid_ims], dim)), features)
    # split: one cat backward
    train_masks, valid_masks = masks.split([train_ims.shape[dim], valid_ims.shape[dim]], dim)
    fc = AdaptedLinear(weights["fc.weight"])
    fast_names = [n for n in params  # the fc weight adapts through `fc`, the conv biases not at all
                  if adapted_in_the_inner_loop(n) and not n.endswith("conv.bias") and n != "fc.weight"]
    fast = flatten(weights, fast_names)
    lr_targets = inner_lr * one_hot(train_labels, weights["fc.weight"].shape[-2], fast)
    steps = zip(as_images(train_ims).split(1), train_masks.split(1, dim), lr_targets.split(1, dim))
    for image, mask, lr_target in steps:
        adapted = {**weights, **unflatten(fast, weights, fast_names)}
        f = features(adapted, "rln", image) * mask
        fast = fast + inner_step(fc, f, adapted["fc.bias"], lr_target, inner_lr, first_order, fast)
    chunk = default_outer_chunk(valid_ims.device) if outer_chunk is None else outer_chunk
    if not lanes and chunk and chunk < len(valid_ims):  # lanes take the batch whole
        loss, out = outer_backward_in_chunks(weights, fast_names, fast, fc, valid_ims, valid_masks, valid_labels, chunk)
    else:
        adapted = {**weights, **unflatten(fast, weights, fast_names)}
        out = fc(features(adapted, "rln", as_images(valid_ims)) * valid_masks, adapted["fc.bias"])
        if lanes:  # each lane's mean over its images
            loss = F.cross_entropy(out.flatten(0, 1), valid_labels.flatten(), reduction="none")
            loss = loss.view(len(out), -1).mean(1)
            (loss.sum() / mean_over).backward()
        else:
            loss = F.cross_entropy(out, valid_labels)
            loss.backward()
    for p in norm_fed_biases(params):
        p.grad = torch.zeros_like(p)
    if lanes:
        hits = (out.argmax(-1) == valid_labels).to(loss.dtype).mean(1)
        return lane_means(loss, lanes_per_model, mean_over), lane_means(hits, lanes_per_model, mean_over)
    return loss.detach(), accuracy(out, valid_labels)


# Images per chunk of the outer backward on the CPU, where a chunk's first-block activations then
# stay in the cache (docs/speed.md); other devices take the batch whole, since large batches are
# what is fast on a GPU.
CPU_OUTER_CHUNK = 12


def default_outer_chunk(device):
    """The outer backward's images per chunk on `device`; 0 takes the batch whole."""
    return CPU_OUTER_CHUNK if torch.device(device).type == "cpu" else 0


def outer_backward_in_chunks(params, fast_names, fast, fc, valid_ims, valid_masks, valid_labels, chunk):
    """The outer loss's backward, a few images at a time (on the CPU, a chunk's 256 x 26 x 26
    activations stay in the cache): the graph is cut at what the outer forward reads from the
    inner loop (adapted weights, the last layer's rank-one terms, the NM's gates), each chunk's
    gradient is accumulated there, then one backward carries the sum through the inner loop."""
    inputs = [t for t in (fast, fc.U, fc.F, valid_masks) if t is not None]
    cut = [t.detach().requires_grad_(t.requires_grad) for t in inputs]  # first order: U, F are constants
    weights = {**params, **unflatten(cut[0], params, fast_names)}
    cut_fc = AdaptedLinear(fc.weight)
    if fc.U is not None:
        cut_fc.U, cut_fc.F = cut[1], cut[2]
    outs, loss = [], 0.0
    for i in range(0, len(valid_ims), chunk):
        feats = conv_blocks(weights, "rln", valid_ims[i:i + chunk]) * cut[-1][i:i + chunk]
        out = cut_fc(feats, weights["fc.bias"])
        part = F.cross_entropy(out, valid_labels[i:i + chunk], reduction="sum") / len(valid_ims)
        part.backward()  # into the cut tensors, and straight into the parameters read directly
        outs.append(out.detach())
        loss += part.detach()
    used = [(t, c.grad) for t, c in zip(inputs, cut) if c.grad is not None]
    torch.autograd.backward([t for t, _ in used], [g for _, g in used])
    return loss, torch.cat(outs)


def oml_meta_loss(model, inner_lr, train_ims, train_labels, valid_ims, valid_labels, first_order=False):
    """OML's meta-gradient, left in the parameters' .grad; returns (loss, accuracy) tensors.

    One inner SGD step (`inner_lr`) of the last layer per training image, in order (ANML's inner
    step at the last layer, `functional.inner_step`), then the cross-entropy of the adapted network
    on `valid_ims`, back-propagated through every inner step (`first_order`: the inner gradients are
    constants). The RLN is fixed during the inner loop, so the features of all the images are
    computed once."""
    feats = model.features(torch.cat([train_ims, valid_ims]))
    train_feats, valid_feats = feats.split([len(train_ims), len(valid_ims)])
    fc = AdaptedLinear(model.fc.weight)
    bias = model.fc.bias
    lr_targets = inner_lr * one_hot(train_labels, model.fc.weight.shape[0], feats)
    for f, lr_target in zip(train_feats.split(1), lr_targets.split(1)):
        bias = bias + inner_step(fc, f, bias, lr_target, inner_lr, first_order)
    out = fc(valid_feats, bias)
    loss = F.cross_entropy(out, valid_labels)
    loss.backward()
    return loss.detach(), accuracy(out, valid_labels)

