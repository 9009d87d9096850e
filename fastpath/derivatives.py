"""The operations of the functional meta-gradient whose derivatives are written by hand.

Where autograd would differentiate the inner loop's backward operation by operation, these Functions
give that derivative in fewer operations (InstanceNorm with NormGrad, GroupedConv with ConvGrad,
MaxPool, InnerLastLayer): on a GPU the iteration's time follows its number of operations
(docs/speed.md counts them). Each is checked against PyTorch's own with gradcheck and, where the
meta-gradient differentiates it twice, gradgradcheck (tests/test_functional.py). The unroll that
uses them is `functional.py`.
"""
import torch
import torch.nn.functional as F


# ----------------------------------------------------------------------------- instance norm


def spatial_sum(t):
    """[N, C, H, W] -> [N, C, 1, 1] sums."""
    return t.sum((2, 3), keepdim=True)


def batch_sum(t):
    """[N, C, 1, 1] -> [C], summed over the batch (a view, no operation, for a single image)."""
    return t.flatten() if t.shape[0] == 1 else t.sum(0).flatten()


def as_channels(t):
    """[N, C, H, W] -> [1, N C, H, W]: each image's channels as one batch norm's channels (a view)."""
    n, c, h, w = t.shape
    return t.reshape(1, n * c, h, w)


_UNIT_WEIGHTS = {}


def unit_weight(like):
    """A ones weight shaped like `like` ([N C] batch-norm channels), kept per (size, dtype, device).

    Batch norm's backward kernels need a defined weight to return the weight and bias sums on CUDA
    (the CPU kernel allocates them from the input, the CUDA kernel from the weight); a ones weight
    gives bit-identical results. Kept, so that an iteration allocates and fills no new one (and a
    CUDA graph records none); built fresh for tensor subclasses (fake tensors of the CPU tests)."""
    if type(like) is not torch.Tensor:
        return torch.ones_like(like)
    key = (like.numel(), like.dtype, like.device)
    if key not in _UNIT_WEIGHTS:
        _UNIT_WEIGHTS[key] = torch.ones(like.numel(), dtype=like.dtype, device=like.device)
    return _UNIT_WEIGHTS[key]


def norm_backward(g, stats, projection=True, sums=True):
    """Batch norm's backward kernel on the instance norm seen as one image with N C channels, in one
    operation: the projection rstd (g - A S[g] - A xhat S[g xhat]) (A = 1 / (H W), S a spatial sum),
    which is the gradient at x of a norm without affine for the gradient g at xhat, and the sums
    (S[g xhat], S[g]) as [N, C, 1, 1]; what is not asked for is None. `stats` = (x, mean, rstd, eps)
    of the forward."""
    x, mean, rstd, eps = stats
    grad_x, sum_g_xhat, sum_g = torch.ops.aten.native_batch_norm_backward(
        as_channels(g), as_channels(x), unit_weight(mean), None, None, mean, rstd, True, eps,
        [projection, sums, sums])
    shape = (*g.shape[:2], 1, 1)
    return (grad_x.view(g.shape) if projection else None,
            *(t.view(shape) if sums else None for t in (sum_g_xhat, sum_g)))


class InstanceNorm(torch.autograd.Function):
    """F.instance_norm with an affine weight and bias (no running statistics), in fewer operations.

    Returns (y, xhat, rstd, scale = weight * rstd); `instance_norm` keeps y. The others are outputs
    so that the inner loop's backward (NormGrad, a Function of them) can be differentiated: their
    gradients come back into this Function's backward. The norm is computed as a batch norm of one
    image with N C channels, so that batch norm's kernels give the sums and projections of the
    backward in one operation each. y is twice differentiable (the meta-gradient's need); the
    gradient through the other outputs is once. Checked against F.instance_norm with gradcheck
    and gradgradcheck (tests/test_functional.py)."""

    @staticmethod
    def forward(ctx, x, weight, bias, eps):
        xhat, mean, rstd = torch.native_batch_norm(as_channels(x), None, None, None, None, True, 0.0, eps)
        xhat, rstd4 = xhat.view(x.shape), rstd.view(*x.shape[:2], 1, 1)
        scale = rstd4 * weight.view(-1, 1, 1)
        y = torch.addcmul(bias.view(-1, 1, 1), xhat, weight.view(-1, 1, 1))
        ctx.save_for_backward(x, mean, rstd, xhat, scale, weight)
        ctx.eps = eps
        ctx.set_materialize_grads(False)
        return y, xhat, rstd4, scale

    @staticmethod
    def backward(ctx, grad_y, grad_xhat, grad_rstd, grad_scale):
        x, mean, rstd, xhat, scale, weight = ctx.saved_tensors
        stats, rstd4 = (x, mean, rstd, ctx.eps), rstd.view(scale.shape)
        area, w = xhat.shape[2] * xhat.shape[3], weight.view(-1, 1, 1)
        if grad_y is not None and grad_xhat is None and grad_rstd is None and grad_scale is None:
            return (*NormGrad.apply(grad_y, xhat, scale, weight, stats), None)  # the inner loop's case
        # The outer pass: gradients of y, of xhat and scale (from NormGrad), rarely of rstd. Batch
        # norm's kernels compute it, and PyTorch cannot differentiate their sums-only form.
        if torch.is_grad_enabled():
            raise RuntimeError("InstanceNorm: the gradient through xhat, rstd or scale can be taken once, "
                               "not differentiated again (the meta-gradient's outer pass does not need it)")
        grad_bias = sum_for_weight = None
        if grad_y is not None:
            _, sum_for_weight, sum_y = norm_backward(grad_y, stats, projection=False)
            grad_bias = batch_sum(sum_y)
            grad_xhat = grad_y * w if grad_xhat is None else torch.addcmul(grad_xhat, grad_y, w)
        if grad_scale is not None:  # scale = weight * rstd
            sum_for_weight = grad_scale * rstd4 if sum_for_weight is None else \
                torch.addcmul(sum_for_weight, grad_scale, rstd4)
        grad_weight = None if sum_for_weight is None else batch_sum(sum_for_weight)
        # rstd's gradient k enters x's as -A rstd xhat k (d rstd / dx = -A rstd^2 xhat); through
        # scale, k = grad_scale * weight, so rstd k = grad_scale * scale
        rstd_k = None
        if grad_scale is not None:
            rstd_k = grad_scale * scale
        if grad_rstd is not None:
            rstd_k = grad_rstd * rstd4 if rstd_k is None else torch.addcmul(rstd_k, grad_rstd, rstd4)
        grad_x = None if grad_xhat is None else norm_backward(grad_xhat, stats, sums=False)[0]
        if rstd_k is not None:
            rstd_k = rstd_k * rstd4
            grad_x = xhat * (rstd_k * (-1 / area)) if grad_x is None else \
                torch.addcmul(grad_x, xhat, rstd_k, value=-1 / area)
        return grad_x, grad_weight, grad_bias, None


class NormGrad(torch.autograd.Function):
    """The instance norm's backward for the inner loop, (grad_x, grad_weight, grad_bias) from grad_y,
    with its own derivative written by hand, in fewer operations than autograd takes to differentiate
    a backward written in differentiable operations and to sum their gradients.

    With A = 1 / (H W), spatial sums S[.], s_y = S[gy] and s_yx = S[gy xhat]:
        centred = gy - A (s_y + xhat s_yx),  grad_x = scale centred,
        grad_weight = sum over images of s_yx,  grad_bias = sum over images of s_y.
    `weight` and `stats` (x, mean, rstd, eps: the forward's) are constants here: they only let batch
    norm's kernels compute what is written above; the derivative is taken w.r.t. gy, xhat and scale.
    Its backward gives instance_norm's second derivative, checked by gradgradcheck against
    F.instance_norm's (tests/test_functional.py); it is not differentiable a third time."""

    @staticmethod
    def forward(ctx, grad_y, xhat, scale, weight, stats):
        rstd_centred, sum_y_xhat, sum_y = norm_backward(grad_y, stats)
        ctx.save_for_backward(grad_y, xhat, scale, rstd_centred, sum_y_xhat)
        ctx.stats = stats
        return rstd_centred * weight.view(-1, 1, 1), batch_sum(sum_y_xhat), batch_sum(sum_y)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_grad_x, grad_grad_weight, grad_grad_bias):
        """With h = scale * grad_grad_x, c0 = grad_grad_bias - A S[h], c1 = grad_grad_weight - A S[h xhat]:
        d gy = h + c0 + xhat c1,  d xhat = gy c1 - A s_yx h,  d scale = S[grad_grad_x centred]."""
        grad_y, xhat, scale, rstd_centred, sum_y_xhat = ctx.saved_tensors
        rstd = ctx.stats[2]
        area = xhat.shape[2] * xhat.shape[3]
        h = grad_grad_x * scale
        _, sum_h_xhat, sum_h = norm_backward(h, ctx.stats, projection=False)
        c0 = torch.add(grad_grad_bias.view(1, -1, 1, 1), sum_h, alpha=-1 / area)
        c1 = torch.add(grad_grad_weight.view(1, -1, 1, 1), sum_h_xhat, alpha=-1 / area)
        d_xhat = torch.addcmul(grad_y * c1, h, sum_y_xhat, value=-1 / area)
        d_grad_y = torch.addcmul(h.add_(c0), xhat, c1)
        d_scale = spatial_sum(grad_grad_x * rstd_centred) / rstd.view(scale.shape)  # rstd > 0
        return d_grad_y, d_xhat, d_scale, None, None


def instance_norm(x, weight, bias, eps=1e-5):
    """F.instance_norm(x, weight=weight, bias=bias, eps=eps), twice differentiable, in few operations."""
    return InstanceNorm.apply(x, weight, bias, eps)[0]


# ----------------------------------------------------------------------------- convolution, pooling, ReLU, linear


def conv_grads(grad_y, x, weight, groups, mask):
    """(grad_x, grad_weight) of y = conv2d(x, weight, groups=groups) for grad_y, in one operation;
    what `mask` does not ask for is None."""
    grad_x, grad_w, _ = torch.ops.aten.convolution_backward(
        grad_y, x, weight, None, [1, 1], [0, 0], [1, 1], False, [0, 0], groups, [mask[0], mask[1], False])
    return grad_x, grad_w


class GroupedConv(torch.autograd.Function):
    """F.conv2d(x, weight, groups=groups) (3x3, no padding) whose backward is ConvGrad (differentiable
    by hand): PyTorch's own double backward of a grouped convolution loops over the groups, one
    convolution and one concatenation per group, where grouped kernels do the same work in one
    operation each."""

    @staticmethod
    def forward(ctx, x, weight, groups):
        ctx.save_for_backward(x, weight)
        ctx.groups = groups
        return F.conv2d(x, weight, groups=groups)

    @staticmethod
    def backward(ctx, grad_y):
        x, weight = ctx.saved_tensors
        return (*ConvGrad.apply(grad_y, x, weight, ctx.groups, ctx.needs_input_grad[0]), None)


class ConvGrad(torch.autograd.Function):
    """(grad_x, grad_weight) of a grouped convolution, with its derivative written with grouped
    kernels. With gx, gw the gradients given for grad_x and grad_weight:
        d grad_y = conv(gx, weight) + conv(x, gw),
        d weight = the weight gradient of conv(gx, weight) for grad_y,
        d x      = the input gradient of conv(x, gw) for grad_y.
    Checked against F.conv2d's with gradcheck and gradgradcheck (tests/test_functional.py)."""

    @staticmethod
    def forward(ctx, grad_y, x, weight, groups, input_grad=True):
        ctx.save_for_backward(grad_y, x, weight)
        ctx.groups = groups
        grad_x, grad_w = conv_grads(grad_y, x, weight, groups, (input_grad, True))
        return grad_x, grad_w

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, gg_x, gg_w):
        grad_y, x, weight = ctx.saved_tensors
        groups = ctx.groups
        d_grad_y = d_weight = d_x = None
        if gg_x is not None:
            d_grad_y = F.conv2d(gg_x, weight, groups=groups)
            d_weight = conv_grads(grad_y, gg_x, weight, groups, (False, True))[1]
        if gg_w is not None:
            from_w = F.conv2d(x, gg_w, groups=groups)
            d_grad_y = from_w if d_grad_y is None else d_grad_y + from_w
            if ctx.needs_input_grad[1]:
                d_x = conv_grads(grad_y, x, gg_w, groups, (True, False))[0]
        return d_grad_y, d_x, d_weight, None, None


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


def addmm(c, a, b):
    """c + a @ b in one operation, for matrices or for batches of them ([L, n, m]: lanes)."""
    return torch.addmm(c, a, b) if a.dim() == 2 else torch.baddbmm(c, a, b)



def linear(x, weight, bias):
    """F.linear, with a [1, out] bias for one input row, so that its gradient needs no reduction;
    with a leading dimension of L layers (weight [L, out, in], bias [L, out], x [L, N, in]), L at once."""
    return addmm(bias.unsqueeze(-2), x, weight.mT)


# ----------------------------------------------------------------------------- the last layer's inner step


class InnerLastLayer(torch.autograd.Function):
    """One inner step at the last layer, with its derivative written by hand: from the features f,
    the logits out = b + f W^T with W = W0 + U^T F (the step's adapted weight, see functional.AdaptedLinear),
    u = -lr (softmax(out) - onehot) (the bias's SGD step, and the rank-one term of the weight's)
    and g = u W, the inner loss's gradient at f times -lr (what the conv blocks backpropagate).

    Differentiated by autograd, these few products and the softmax take many operations a step in
    the outer backward, mostly gradient sums; the hand-written derivative takes fewer, reusing the
    products f F^T and u U^T of the forward. Checked with gradcheck (tests/test_functional.py).
    With a leading dimension of L layers (f [L, 1, in], weight [L, out, in], ...), L steps at once."""

    @staticmethod
    def forward(ctx, f, bias, weight, U, F, lr_targets, lr):
        out = linear(f, weight, bias)
        f_F = u_U = None
        if U is not None:
            f_F = f @ F.mT
            out = addmm(out, f_F, U)
        softmax = torch.softmax(out, -1)
        u = torch.addcmul(lr_targets, softmax, lr, value=-1) if torch.is_tensor(lr) else \
            torch.add(lr_targets, softmax, alpha=-lr)  # a tensor: one rate per layer, [L, 1, 1]
        g = u @ weight
        if U is not None:
            u_U = u @ U.mT
            g = addmm(g, u_U, F)
        ctx.save_for_backward(f, weight, U, F, softmax, u, f_F, u_U)
        ctx.lr, ctx.bias_shape = lr, bias.shape
        return u, g

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_u, grad_g):
        f, weight, U, F, softmax, u, f_F, u_U = ctx.saved_tensors
        grad_u = addmm(grad_u, grad_g, weight.mT)  # g = u W: u's whole gradient
        if U is not None:
            g_F = grad_g @ F.mT
            grad_u = addmm(grad_u, g_F, U)
        d = torch._softmax_backward_data(grad_u, softmax, softmax.dim() - 1, softmax.dtype) * -ctx.lr  # the logits'
        grad_f = d @ weight
        grad_U = grad_F = None
        if U is not None:
            d_U = d @ U.mT
            grad_f = addmm(grad_f, d_U, F)
            grad_U = addmm(g_F.mT @ u, f_F.mT, d)
            grad_F = addmm(u_U.mT @ grad_g, d_U.mT, f)
        grad_weight = addmm(u.mT @ grad_g, d.mT, f)
        return grad_f, d.view(ctx.bias_shape), grad_weight, grad_U, grad_F, None, None
