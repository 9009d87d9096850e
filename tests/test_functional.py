"""The building blocks of the functional meta-gradient (`functional.py`), against PyTorch's own."""
import pytest
import torch
import torch.nn.functional as F

from fastpath.derivatives import GroupedConv, InnerLastLayer, InstanceNorm, instance_norm, max_pool, relu


def norm_inputs(batch, seed=0):
    """float64 (x, weight, bias) of a [batch, 4, 5, 5] InstanceNorm, all requiring grad."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 4, 5, 5, generator=g, dtype=torch.float64) * 3 + 1
    weight = torch.rand(4, generator=g, dtype=torch.float64) + 0.5
    bias = torch.randn(4, generator=g, dtype=torch.float64)
    return [t.requires_grad_() for t in (x, weight, bias)]


def value_and_two_orders(norm, inputs, seed=1):
    """norm's output, its gradient for a random output gradient v (w.r.t. the inputs), and the
    gradient of a random projection of that gradient w.r.t. x, weight and v: second order (the bias
    has none: the gradient does not depend on it)."""
    g = torch.Generator().manual_seed(seed)
    y = norm(*inputs)
    v = torch.randn(y.shape, generator=g, dtype=y.dtype).requires_grad_()
    first = torch.autograd.grad(y, inputs, v, create_graph=True)
    projection = sum((d * torch.randn(d.shape, generator=g, dtype=d.dtype)).sum() for d in first)
    second = torch.autograd.grad(projection, inputs[:2] + [v])
    return [y.detach()] + [d.detach() for d in first] + list(second)


@pytest.mark.parametrize("batch", [1, 3])
def test_instance_norm_equals_torchs_in_value_gradient_and_second_order(batch):
    ours = value_and_two_orders(instance_norm, norm_inputs(batch))
    torchs = value_and_two_orders(lambda x, w, b: F.instance_norm(x, weight=w, bias=b), norm_inputs(batch))
    assert len(ours) == 7
    for a, b in zip(ours, torchs):
        assert b.abs().max() > 0
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def all_outputs(x, weight, bias):
    """(y, xhat, rstd, scale): the outer backward sends gradients to all of them."""
    return InstanceNorm.apply(x, weight, bias, 1e-5)


@pytest.mark.parametrize("batch", [1, 3])
def test_instance_norm_passes_gradcheck_and_gradgradcheck(batch):
    """y twice (the meta-gradient's inner and outer passes), all four outputs once (the outer pass
    sends gradients to xhat, rstd and scale); differentiating the latter again is refused, not wrong."""
    inputs = tuple(norm_inputs(batch, seed=2))
    assert torch.autograd.gradcheck(instance_norm, inputs)
    assert torch.autograd.gradgradcheck(instance_norm, inputs)
    assert torch.autograd.gradcheck(all_outputs, inputs)
    outputs = all_outputs(*inputs)
    vs = [torch.ones_like(t, requires_grad=True) for t in outputs]
    with pytest.raises(RuntimeError, match="differentiated again"):
        torch.autograd.grad(outputs, inputs, vs, create_graph=True)


@pytest.mark.parametrize("ours, torchs, size", [(relu, F.relu, 4), (max_pool, lambda x: F.max_pool2d(x, 2), 11)])
def test_relu_and_max_pool_equal_torchs_in_value_gradient_and_second_order(ours, torchs, size):
    """Equal bit for bit, on an odd size for the pool (its last row and column are dropped)."""
    x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    x = x.requires_grad_()
    results = []
    for f in (ours, torchs):
        y = f(x)
        v = torch.randn(y.shape, dtype=x.dtype, generator=torch.Generator().manual_seed(4)).requires_grad_()
        (gx,) = torch.autograd.grad(y, x, v, create_graph=True)
        (gv,) = torch.autograd.grad((gx * x).sum(), v)
        results.append((y, gx, gv))
    for a, b in zip(*results):
        assert torch.equal(a, b) and a.abs().sum() > 0
    assert (results[0][1] == 0).any()  # some inputs get no gradient


def test_instance_norm_third_derivative_is_refused_not_wrong():
    """The second derivative comes from NormGrad's hand-written backward (checked by the gradgradcheck
    above); a third is refused with PyTorch's once_differentiable error."""
    x, weight, bias = norm_inputs(1, seed=6)
    y = instance_norm(x, weight, bias)
    v = torch.randn(y.shape, dtype=y.dtype, generator=torch.Generator().manual_seed(7)).requires_grad_()
    (grad_x,) = torch.autograd.grad(y, x, v, create_graph=True)
    (grad_v,) = torch.autograd.grad((grad_x * x).sum(), v, create_graph=True)
    with pytest.raises(RuntimeError, match="once_differentiable"):
        grad_v.sum().backward()


@pytest.mark.parametrize("steps", [0, 3])
def test_inner_last_layer_hand_written_derivative_passes_gradcheck(steps):
    """InnerLastLayer (u and the features' gradient of one inner step) against numerical derivatives,
    at the first step (no rank-one terms yet) and after `steps` of them."""
    g = torch.Generator().manual_seed(8)
    f, bias, weight = torch.rand(1, 6, generator=g), torch.randn(5, generator=g), torch.randn(5, 6, generator=g)
    U = torch.randn(steps, 5, generator=g) * 0.3 if steps else None
    F_ = torch.rand(steps, 6, generator=g) if steps else None
    inputs = [t.double().requires_grad_() if t is not None else None for t in (f, bias, weight, U, F_)]
    lr_targets = 0.1 * torch.nn.functional.one_hot(torch.tensor([2]), 5).double()
    assert torch.autograd.gradcheck(lambda *a: InnerLastLayer.apply(*a, lr_targets, 0.1), inputs)


def grouped_inputs(seed=3, groups=3, batch=2, requires_x=True):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, groups * 2, 6, 6, generator=g, dtype=torch.float64).requires_grad_(requires_x)
    w = torch.randn(groups * 3, 2, 3, 3, generator=g, dtype=torch.float64).requires_grad_()
    return x, w


def test_grouped_conv_equals_torchs_in_value_gradient_and_second_order():
    """GroupedConv (conv with groups > 1) against F.conv2d: the output, the gradient and the gradient
    of a projection of the gradient (the meta-gradient's need)."""
    ours = value_and_two_orders(lambda x, w: GroupedConv.apply(x, w, 3), list(grouped_inputs()))
    torchs = value_and_two_orders(lambda x, w: F.conv2d(x, w, groups=3), list(grouped_inputs()))
    for a, b in zip(ours, torchs):
        assert b.abs().max() > 0
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_grouped_conv_of_a_constant_input_differentiates_its_weight_gradient():
    """The first block's case: the images are constants; the weight's gradient, differentiated w.r.t.
    the output gradient, as F.conv2d's."""
    results = []
    for fn in (lambda x, w: GroupedConv.apply(x, w, 3), lambda x, w: F.conv2d(x, w, groups=3)):
        x, w = grouped_inputs(requires_x=False)
        y = fn(x, w)
        v = torch.ones_like(y).mul(0.5).requires_grad_()
        (grad_w,) = torch.autograd.grad(y, w, v, create_graph=True)
        r = torch.linspace(-1, 1, grad_w.numel(), dtype=grad_w.dtype).view_as(grad_w)
        results.append([grad_w.detach(), *torch.autograd.grad((grad_w * r).sum(), v)])
    for a, b in zip(*results):
        assert b.abs().max() > 0
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_grouped_conv_passes_gradcheck_and_gradgradcheck():
    x, w = grouped_inputs(seed=4)
    fn = lambda x, w: GroupedConv.apply(x, w, 3)
    assert torch.autograd.gradcheck(fn, (x, w))
    assert torch.autograd.gradgradcheck(fn, (x, w))
