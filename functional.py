"""The functional meta-gradient: the same mathematics as `higher`'s unroll, in fewer operations.

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


# ----------------------------------------------------------------------------- instance norm


def spatial_sum(t):
    """[N, C, H, W] -> [N, C, 1, 1] sums."""
    return t.sum((2, 3), keepdim=True)


def batch_sum(t):
    """[N, C, 1, 1] -> [C], summed over the batch (a view, no operation, for a single image)."""
    return t.flatten() if t.shape[0] == 1 else t.sum(0).flatten()


class InstanceNorm(torch.autograd.Function):
    """F.instance_norm with an affine weight and bias (no running statistics), in fewer operations.

    Returns (y, xhat, rstd, scale = weight * rstd); `instance_norm` keeps y. The others are outputs
    so that the backward, written in differentiable operations of them, can itself be differentiated
    (the inner loop's create_graph): their gradients come back into this Function's backward.
    Checked against F.instance_norm with gradcheck and gradgradcheck (tests/test_functional.py)."""

    @staticmethod
    def forward(ctx, x, weight, bias, eps):
        n, c, h, w = x.shape  # each image's channels are one batch norm's channels: one operation
        xhat, _, rstd = torch.native_batch_norm(x.reshape(1, n * c, h, w), None, None, None, None, True, 0.0, eps)
        xhat, rstd = xhat.view(n, c, h, w), rstd.view(n, c, 1, 1)
        scale = rstd * weight.view(-1, 1, 1)
        y = torch.addcmul(bias.view(-1, 1, 1), xhat, weight.view(-1, 1, 1))
        ctx.save_for_backward(xhat, rstd, scale, weight)
        ctx.set_materialize_grads(False)
        return y, xhat, rstd, scale

    @staticmethod
    def backward(ctx, grad_y, grad_xhat, grad_rstd, grad_scale):
        xhat, rstd, scale, weight = ctx.saved_tensors
        area, w = xhat.shape[2] * xhat.shape[3], weight.view(-1, 1, 1)
        if grad_y is not None and grad_xhat is None and grad_rstd is None and grad_scale is None:
            return (*NormGrad.apply(grad_y, xhat, scale), None)  # the inner loop's case
        # The outer pass: gradients of y, of xhat and scale (from NormGrad), rarely of rstd.
        grad_bias = sum_for_weight = None
        if grad_y is not None:
            grad_bias = batch_sum(spatial_sum(grad_y))
            sum_for_weight = spatial_sum(grad_y * xhat)
            grad_xhat = grad_y * w if grad_xhat is None else torch.addcmul(grad_xhat, grad_y, w)
        # scale = weight * rstd: weight gets grad_scale * rstd, and rstd's gradient times rstd,
        # the form it enters below, is grad_scale * weight * rstd = grad_scale * scale
        rstd_terms = [(grad_scale, scale)] if grad_scale is not None else []
        if grad_rstd is not None:
            rstd_terms.append((grad_rstd, rstd))
        if grad_scale is not None:
            sum_for_weight = grad_scale * rstd if sum_for_weight is None else \
                torch.addcmul(sum_for_weight, grad_scale, rstd)
        grad_weight = None if sum_for_weight is None else batch_sum(sum_for_weight)
        if grad_xhat is None and not rstd_terms:
            return None, grad_weight, grad_bias, None
        along_xhat = None if grad_xhat is None else spatial_sum(grad_xhat * xhat)
        for grad, factor in rstd_terms:  # d rstd / dx = -rstd^2 xhat / area: the same form as xhat's
            along_xhat = grad * factor if along_xhat is None else torch.addcmul(along_xhat, grad, factor)
        if grad_xhat is None:
            return xhat * (along_xhat * rstd * (-1 / area)), grad_weight, grad_bias, None
        projection = torch.addcmul(spatial_sum(grad_xhat), xhat, along_xhat)
        return torch.sub(grad_xhat, projection, alpha=1 / area) * rstd, grad_weight, grad_bias, None


class NormGrad(torch.autograd.Function):
    """The instance norm's backward for the inner loop, (grad_x, grad_weight, grad_bias) from grad_y,
    with its own derivative written by hand: differentiating the seven operations of the backward
    would take autograd about twenty operations, their gradients' sums included; this takes twelve.

    With A = 1 / (H W), spatial sums S[.], s_y = S[gy] and s_yx = S[gy xhat]:
        centred = gy - A (s_y + xhat s_yx),  grad_x = scale centred,
        grad_weight = sum over images of s_yx,  grad_bias = sum over images of s_y.
    Checked with gradcheck (tests/test_functional.py); it is not differentiable a third time."""

    @staticmethod
    def forward(ctx, grad_y, xhat, scale):
        area = xhat.shape[2] * xhat.shape[3]
        sum_y, sum_y_xhat = spatial_sum(grad_y), spatial_sum(grad_y * xhat)
        centred = torch.add(grad_y, torch.addcmul(sum_y, xhat, sum_y_xhat), alpha=-1 / area)
        ctx.save_for_backward(grad_y, xhat, scale, centred, sum_y_xhat)
        return centred * scale, batch_sum(sum_y_xhat), batch_sum(sum_y)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_grad_x, grad_grad_weight, grad_grad_bias):
        """With h = scale * grad_grad_x, c0 = grad_grad_bias - A S[h], c1 = grad_grad_weight - A S[h xhat]:
        d gy = h + c0 + xhat c1,  d xhat = gy c1 - A s_yx h,  d scale = S[grad_grad_x centred]."""
        grad_y, xhat, scale, centred, sum_y_xhat = ctx.saved_tensors
        area = xhat.shape[2] * xhat.shape[3]
        h = grad_grad_x * scale
        c0 = torch.add(grad_grad_bias.view(1, -1, 1, 1), spatial_sum(h), alpha=-1 / area)
        c1 = torch.add(grad_grad_weight.view(1, -1, 1, 1), spatial_sum(h * xhat), alpha=-1 / area)
        d_xhat = torch.addcmul(grad_y * c1, h, sum_y_xhat, value=-1 / area)
        d_grad_y = torch.addcmul(h.add_(c0), xhat, c1)
        return d_grad_y, d_xhat, spatial_sum(grad_grad_x * centred)


def instance_norm(x, weight, bias, eps=1e-5):
    """F.instance_norm(x, weight=weight, bias=bias, eps=eps), twice differentiable, in few operations."""
    return InstanceNorm.apply(x, weight, bias, eps)[0]


# ----------------------------------------------------------------------------- the network

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
        x = instance_norm(x, params[p + "norm.weight"], params[p + "norm.bias"])
        x = relu(max_pool(x) if pool else x)
    return x.flatten(1)


class MaxPool(torch.autograd.Function):
    """F.max_pool2d(x, 2) whose backward scatters the gradient by the forward's indices (a constant),
    so that its double backward is one gather: autograd's own also builds a zero gradient for x."""

    @staticmethod
    def forward(ctx, x):
        out, indices = F.max_pool2d(x, 2, return_indices=True)
        ctx.save_for_backward(indices)
        ctx.size = x.shape[-2:]
        return out

    @staticmethod
    def backward(ctx, grad):
        (indices,) = ctx.saved_tensors
        return F.max_unpool2d(grad, indices, 2, output_size=ctx.size)


def max_pool(x):
    """F.max_pool2d(x, 2), in fewer operations when differentiated twice."""
    return MaxPool.apply(x)


def relu(x):
    """F.relu as a product with its constant 0/1 mask: the same values and gradient, and its double
    backward has no zero gradient to build and add for the mask (the ReLU's second derivative is zero)."""
    return x * (x.detach() > 0)


def linear(x, weight, bias):
    """F.linear, with a [1, out] bias for one input row, so that its gradient needs no reduction."""
    return torch.addmm(bias.view(1, -1), x, weight.T)


def gate(params, x):
    """NM output in (0, 1): computed once per batch, since the inner loop never adapts the NM."""
    return torch.sigmoid(linear(conv_blocks(params, "nm", x), params["nm.fc.weight"], params["nm.fc.bias"]))


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
            out = torch.addmm(out, x @ self.F.T, self.U)
        return out

    def step(self, u, f):
        """Add the rank-one change u^T f (rows [1, out] and [1, in]; u = -lr times the logits'
        gradient). U and F grow by one row, concatenated to the previous U and F: differentiated,
        each step's U then receives one gradient for all its rows (one addition), where
        concatenating every row afresh would add each row's gradient separately at every step."""
        self.U = u if self.U is None else torch.cat([self.U, u])
        self.F = f if self.F is None else torch.cat([self.F, f])


# ----------------------------------------------------------------------------- the meta-gradient


def flatten(params, names):
    """The named tensors in one vector: the inner loop updates it with one operation a step."""
    return torch.cat([params[n].flatten() for n in names])


def unflatten(vector, params, names):
    """Views of `vector` shaped like the named tensors (no copies)."""
    pieces = vector.split([params[n].numel() for n in names])
    return {n: piece.view_as(params[n]) for n, piece in zip(names, pieces)}


def one_hot(labels, classes, like):
    """[len(labels), classes] one-hot rows in `like`'s dtype: a comparison, with no range check that
    would read a value back to the host (F.one_hot's may)."""
    return (labels[:, None] == torch.arange(classes, device=labels.device)).to(like.dtype)


def scaled_logit_gradients(out, lr_targets, lr):
    """-lr times the cross-entropy's gradient at the logits, -lr (softmax(out) - onehot), in one
    operation after the softmax (`lr_targets` = lr * onehot): the inner loss itself is never needed."""
    return torch.add(lr_targets, torch.softmax(out, 1), alpha=-lr)  # add: its backward has no negation


def func_meta_loss(model, inner_opt, train_ims, train_labels, valid_ims, valid_labels, first_order=False):
    """Same mathematics as `anml.higher_meta_loss`, with a functional unroll and plain autograd: the
    meta-gradient is left in the parameters' .grad; returns (loss, accuracy) tensors.

    The fast weights (RLN and fc bias) are one vector, updated with one addition a step; the inner
    loss is never computed, only its gradient at the logits (softmax - onehot), written directly.

    `first_order=True` gives the first-order meta-gradient (FOMAML, the original ANML code's): the
    inner gradients and the last layer's rank-one terms are constants, so the initial weights get
    the outer loss's gradient at the adapted ones, and the NM gets gradient only through the outer pass."""
    names, lr = inner_sgd(inner_opt, model)
    params = dict(model.named_parameters())
    masks = gate(params, torch.cat([train_ims, valid_ims]))
    train_masks, valid_masks = masks.split([len(train_ims), len(valid_ims)])  # split: one cat backward
    adapt_fc = "fc.weight" in names
    fc = AdaptedLinear(params["fc.weight"])
    fast_names = [n for n in names if not n.endswith("conv.bias") and n != "fc.weight"]
    fast = flatten(params, fast_names)
    lr_targets = lr * one_hot(train_labels, params["fc.weight"].shape[0], fast)
    for image, mask, lr_target in zip(train_ims.split(1), train_masks.split(1), lr_targets.split(1)):
        weights = {**params, **unflatten(fast, params, fast_names)}
        f = conv_blocks(weights, "rln", image) * mask
        out = fc(f, weights["fc.bias"])
        u = scaled_logit_gradients(out, lr_target, lr)
        if first_order:
            u, f = u.detach(), f.detach()
        (step,) = torch.autograd.grad(out, fast, u, create_graph=not first_order)
        fast = fast + step
        if adapt_fc:
            fc.step(u, f)
    chunk = OUTER_CHUNK.get(valid_ims.device.type)
    if chunk and chunk < len(valid_ims):
        loss, out = outer_backward_in_chunks(params, fast_names, fast, fc, valid_ims, valid_masks,
                                             valid_labels, chunk)
    else:
        weights = {**params, **unflatten(fast, params, fast_names)}
        out = fc(conv_blocks(weights, "rln", valid_ims) * valid_masks, weights["fc.bias"])
        loss = F.cross_entropy(out, valid_labels)
        loss.backward()
    for p in norm_fed_biases(model):
        p.grad = torch.zeros_like(p)
    return loss.detach(), accuracy(out, valid_labels)


# Images per chunk of the outer backward, by device type; a device not listed takes the batch whole
# (on a GPU, large batches are what is fast). 12 measured best on a 2-core CPU (README, Speed).

OUTER_CHUNK = {"cpu": 12}


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
