"""The functional meta-gradient: the same mathematics as `higher`'s unroll, faster.

The three conv blocks are written with `torch.nn.functional` over a dict of parameters, the inner
loop is unrolled with plain autograd (`create_graph=True`), and the outer backward goes through it.
`anml.meta_step(..., backend="func")` calls `func_meta_loss`; the CUDA graph records it.
"""
import torch
import torch.nn.functional as F


def accuracy(logits, labels):
    return (logits.argmax(1) == labels).float().mean()


def inner_sgd(inner_opt, model):
    """(names of the inner-loop parameters, inner learning rate) of a plain SGD optimiser."""
    if not isinstance(inner_opt, torch.optim.SGD) or len(inner_opt.param_groups) != 1:
        raise ValueError("the 'func' backend needs a single-group torch.optim.SGD inner optimiser")
    group = inner_opt.param_groups[0]
    if group["momentum"] or group["weight_decay"] or group["nesterov"] or group["maximize"]:
        raise ValueError("the 'func' backend implements plain SGD (no momentum or weight decay)")
    ids = {id(p) for p in group["params"]}
    return [n for n, p in model.named_parameters() if id(p) in ids], group["lr"]


# Conv biases that feed an InstanceNorm are removed by its mean subtraction: their gradient is
# exactly zero and they do not change the output. The functional path skips them in the compute
# (they stay in the model and the checkpoint) and gives them an explicit zero gradient.

def norm_fed_biases(model):
    return [p for n, p in model.named_parameters() if n.endswith("conv.bias")]

def conv_blocks(params, prefix, x):
    """The three conv blocks of `model.py`, written functionally over a dict of parameters.

    Max-pooling before the ReLU gives the same values and gradients (both are max operations,
    and the ReLU's zero gradient for x <= 0 survives either order) on a 4x smaller tensor."""
    for i, pool in ((1, True), (2, True), (3, False)):
        p = f"{prefix}.convBlock{i}."
        x = F.conv2d(x, params[p + "conv.weight"])  # bias skipped: see norm_fed_biases
        x = F.instance_norm(x, weight=params[p + "norm.weight"], bias=params[p + "norm.bias"])
        x = F.relu(F.max_pool2d(x, 2) if pool else x)
    return x.flatten(1)

def gate(params, x):
    """NM output in (0, 1): computed once per batch, since the inner loop never adapts the NM."""
    return torch.sigmoid(F.linear(conv_blocks(params, "nm", x), params["nm.fc.weight"], params["nm.fc.bias"]))

class AdaptedLinear:
    """The last layer during the inner loop, without materialising its adapted weight.

    One inner SGD step changes the fc weight by -lr * g f^T, the outer product of the logits'
    gradient g and the layer's input f (one image a step). So W_k = W_0 - lr * sum_j g_j f_j^T,
    and W_k x = W_0 x - lr * G (F x): the same mathematics, without writing a new 1000 x 2304
    matrix (and its gradient) at every step."""

    def __init__(self, weight, lr):
        self.weight, self.lr, self.g, self.f = weight, lr, [], []

    def __call__(self, x, bias):
        out = F.linear(x, self.weight, bias)
        if self.g:
            out = out - self.lr * (x @ torch.stack(self.f).T) @ torch.stack(self.g)
        return out

    def step(self, g, f):
        self.g.append(g)
        self.f.append(f)

def func_meta_loss(model, inner_opt, train_ims, train_labels, valid_ims, valid_labels, first_order=False):
    """Same mathematics as `anml.higher_meta_loss`, with a functional unroll and plain autograd: the
    meta-gradient is left in the parameters' .grad; returns (loss, accuracy) tensors.

    `first_order`: the inner steps are not differentiated (their gradients are constants), as the
    original ANML code computed it."""
    names, lr = inner_sgd(inner_opt, model)
    params = dict(model.named_parameters())
    masks = gate(params, torch.cat([train_ims, valid_ims]))
    train_masks, valid_masks = masks[:len(train_ims)], masks[len(train_ims):]
    adapt_fc = "fc.weight" in names
    fc = AdaptedLinear(params["fc.weight"], lr)
    fast = {n: params[n] for n in names if not n.endswith("conv.bias") and n != "fc.weight"}
    features = lambda x, mask: conv_blocks({**params, **fast}, "rln", x) * mask
    for i in range(len(train_ims)):
        f = features(train_ims[i:i + 1], train_masks[i:i + 1])
        out = fc(f, fast.get("fc.bias", params["fc.bias"]))
        loss = F.cross_entropy(out, train_labels[i:i + 1])
        *grads, g = torch.autograd.grad(loss, list(fast.values()) + [out], create_graph=not first_order,
                                        retain_graph=True)
        fast = {n: w - lr * grad for (n, w), grad in zip(fast.items(), grads)}
        if adapt_fc:
            fc.step(g[0], f[0].detach() if first_order else f[0])
    chunk = OUTER_CHUNK.get(valid_ims.device.type)
    if chunk and chunk < len(valid_ims):
        loss, out = outer_backward_in_chunks(params, fast, fc, valid_ims, valid_masks, valid_labels, chunk)
    else:
        out = fc(features(valid_ims, valid_masks), fast.get("fc.bias", params["fc.bias"]))
        loss = F.cross_entropy(out, valid_labels)
        loss.backward()
    for p in norm_fed_biases(model):
        p.grad = torch.zeros_like(p)
    return loss.detach(), accuracy(out, valid_labels)


# Images per chunk of the outer backward, by device type; a device not listed takes the batch whole
# (on a GPU, large batches are what is fast). 12 measured best on a 2-core CPU (README, Speed).

OUTER_CHUNK = {"cpu": 12}

def outer_backward_in_chunks(params, fast, fc, valid_ims, valid_masks, valid_labels, chunk):
    """The outer loss's backward, a few images at a time (on the CPU, a chunk's 256 x 26 x 26
    activations stay in the cache): the graph is cut at what the outer forward reads from the
    inner loop (adapted weights, the last layer's rank-one terms, the NM's gates), each chunk's
    gradient is accumulated there, then one backward carries the sum through the inner loop."""
    inputs = [*fast.values(), *fc.g, *fc.f, valid_masks]
    cut = [t.detach().requires_grad_() for t in inputs]
    n_fast, n_steps = len(fast), len(fc.g)
    cut_fast = dict(zip(fast, cut[:n_fast]))
    cut_fc = AdaptedLinear(fc.weight, fc.lr)
    cut_fc.g, cut_fc.f = cut[n_fast:n_fast + n_steps], cut[n_fast + n_steps:n_fast + 2 * n_steps]
    bias = cut_fast.get("fc.bias", params["fc.bias"])
    outs, loss = [], 0.0
    for i in range(0, len(valid_ims), chunk):
        feats = conv_blocks({**params, **cut_fast}, "rln", valid_ims[i:i + chunk]) * cut[-1][i:i + chunk]
        out = cut_fc(feats, bias)
        part = F.cross_entropy(out, valid_labels[i:i + chunk], reduction="sum") / len(valid_ims)
        part.backward()  # into the cut tensors, and straight into the parameters read directly
        outs.append(out.detach())
        loss += part.detach()
    used = [(t, c.grad) for t, c in zip(inputs, cut) if c.grad is not None and t.requires_grad]
    torch.autograd.backward([t for t, _ in used], [g for _, g in used])
    return loss, torch.cat(outs)
