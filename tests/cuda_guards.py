"""Guards that let a CPU catch code that would fail or differ on a GPU.

- `CudaKernelGuard`, a dispatch mode, refuses the argument patterns whose CUDA kernel differs from
  the CPU one; every operation of a training or meta-test step passes through it. With
  `capturing`, it also refuses a copy from the host inside a step that a CUDA graph records.
- `meta_as_cuda()` lets the meta device stand in for CUDA: meta tensors hold no values, and, as on
  CUDA, an operation that mixes a CPU tensor (other than a 0-dim scalar) into them raises. Inside it,
  torch's capturable Adam accepts them (and CPU tensors), so the capturable branches run here.

Why meta and not FakeTensorMode's fake CUDA tensors: on a CPU build of torch, Python indexing of a
fake CUDA tensor and autograd's gradient accumulation into one both ask for a CUDA device guard,
which a CPU build does not have (the second aborts the process), so no training step can run on them.
"""
import contextlib
import importlib

import torch
from torch.utils._python_dispatch import TorchDispatchMode

aten = torch.ops.aten


class CudaDifference(AssertionError):
    """An operation whose arguments would make the CUDA kernel fail or give another result."""


class CudaKernelGuard(TorchDispatchMode):
    """Refuses, on any device, the calls whose CUDA kernel differs from the CPU kernel:

    - native_batch_norm_backward asked for the weight or bias sums without a weight (the CUDA kernel
      allocates them like the weight: it fails for an undefined one);
    - index_copy_ / index_copy with repeated indices and different values for them (which one lands
      is not fixed on CUDA);
    - with `capturing`, a copy from the CPU to another device (a CUDA graph cannot record it).
    `seen` counts the calls of each operation, so that a test can show the guarded calls were made."""

    def __init__(self, capturing=False):
        super().__init__()
        self.capturing, self.seen = capturing, {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        self.seen[func] = self.seen.get(func, 0) + 1
        if func is aten.native_batch_norm_backward.default:
            check_norm_backward(args, kwargs)
        elif func in (aten.index_copy_.default, aten.index_copy.default):
            check_repeated_rows(args[0], args[1], args[2], args[3])
        elif self.capturing and func in (aten._to_copy.default, aten.copy_.default):
            check_no_host_copy(func, args, kwargs)
        return func(*args, **kwargs)


def check_norm_backward(args, kwargs):
    weight = args[2]
    mask = args[9] if len(args) > 9 else kwargs["output_mask"]
    if weight is None and (mask[1] or mask[2]):
        raise CudaDifference("native_batch_norm_backward asked for the weight/bias sums without a weight: "
                             "the CUDA kernel allocates them like the (undefined) weight and fails")


def check_repeated_rows(target, dim, index, source):
    if target.device.type == "meta" or index.numel() < 2:
        return  # no values to compare
    values, counts = index.unique(return_counts=True)
    for value in values[counts > 1].tolist():
        rows = source.index_select(dim, (index == value).nonzero().flatten())
        if not (rows == rows.narrow(dim, 0, 1)).all():
            raise CudaDifference(f"index_copy_ writes different values to the repeated index {value}: "
                                 "which one lands is not fixed on CUDA")


def check_no_host_copy(func, args, kwargs):
    if func is aten.copy_.default:
        target, source = args[0], args[1]
        to_device = target.device.type != "cpu" and torch.is_tensor(source) and source.device.type == "cpu"
    else:
        device = kwargs.get("device")
        to_device = device is not None and torch.device(device).type != "cpu" and args[0].device.type == "cpu"
    if to_device:
        raise CudaDifference(f"{func} copies from the host inside a step that a CUDA graph records")


@contextlib.contextmanager
def meta_as_cuda():
    """Within the block, torch's Adam takes capturable state on meta and CPU tensors (its capturable
    branch: the step count a tensor on the parameter's device), as it does on CUDA."""
    adam = importlib.import_module("torch.optim.adam")
    supported = adam._get_capturable_supported_devices
    adam._get_capturable_supported_devices = lambda *a, **k: [*supported(*a, **k), "meta", "cpu"]
    try:
        yield
    finally:
        adam._get_capturable_supported_devices = supported


@contextlib.contextmanager
def guarded_steps(cls, method):
    """Run `cls.method` (a step that a CUDA graph records) under CudaKernelGuard(capturing=True)."""
    original = getattr(cls, method)

    def guarded(self, *args, **kwargs):
        with CudaKernelGuard(capturing=True):
            return original(self, *args, **kwargs)
    setattr(cls, method, guarded)
    try:
        yield
    finally:
        setattr(cls, method, original)
