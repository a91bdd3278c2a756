"""Numerical precision under mixed precision (AMP): the one place that decides it.

Under ``torch.autocast`` (``training.amp`` on CUDA: float16; CPU emulation in the tests:
float16 or bfloat16) the network's convolutions, linear layers and matrix products run in
reduced precision. Every reduction over voxels, samples or anchors that a loss or a
statistic makes must not: float16's largest value is 65504, and one crop of the paper's
patch has 884,736 (96^3) or 1,003,520 (112 x 112 x 80) voxels, so a sum of
probabilities over a crop overflows, and a matrix product run under autocast is cast
back to float16 whatever dtype its inputs had. :func:`full_precision` switches autocast
off (on every device type where it is on) and :func:`full_precision_op` wraps a
function in it, with its floating-point tensor arguments cast up to float32.
``docs/method-choices.md`` lists which parts of the method run in reduced precision.

Device handling (which device: :func:`resolve_device`; which autocast dtype) lives here;
nothing else calls ``.cuda()``.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
from torch import nn

#: Device types whose autocast state :func:`full_precision` inspects.
AUTOCAST_DEVICE_TYPES = ("cpu", "cuda")

T = TypeVar("T", bound=Callable)


def resolve_device(device: str = "auto") -> torch.device:
    """The device to run on: ``auto`` is CUDA when present, else the CPU; any other value
    (``cpu``, ``cuda``, ``cuda:1``, ``mps``) as ``torch.device`` reads it."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def default_amp_dtype(device_type: str) -> torch.dtype:
    """The autocast dtype AMP uses on ``device_type``: float16 on CUDA, bfloat16 elsewhere.

    bfloat16 has float32's range and runs fast on CPUs with AVX-512 BF16 / AMX; float16 on
    a CPU is emulated and slow (it is what the tests use to reproduce CUDA's float16).
    """
    return torch.float16 if device_type == "cuda" else torch.bfloat16


#: ``training.cpu_amp`` values: ``auto`` (bfloat16 where the CPU has bfloat16 units),
#: ``bfloat16`` (always on the CPU), ``off`` (float32).
CPU_AMP_CHOICES = ("auto", "bfloat16", "off")


def cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo``), or what :mod:`platform` says: for the
    machine line of a recorded timing."""
    import platform
    from pathlib import Path

    try:
        for line in Path("/proc/cpuinfo").read_text(encoding="utf-8").splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cpu_bf16_units() -> list[str]:
    """The CPU's bfloat16 instruction sets that PyTorch's kernels use: ``amx_bf16`` and / or
    ``avx512_bf16`` (empty without them, or where PyTorch does not report them)."""
    try:
        caps = torch._C._cpu._get_cpu_capability()
    except (AttributeError, RuntimeError):
        return []
    return [name for name in ("amx_bf16", "avx512_bf16") if caps.get(name)]


def training_autocast_dtype(device: torch.device | str, amp: bool = True, cpu_amp: str = "off") -> torch.dtype | None:
    """The autocast dtype of training on ``device``, or None for float32.

    CUDA: float16 when ``amp`` (``training.amp``). CPU: ``cpu_amp`` (``training.cpu_amp``)
    ``bfloat16`` always, ``auto`` only where :func:`cpu_bf16_units` finds AMX-BF16 or
    AVX-512-BF16 (elsewhere bfloat16 is emulated and slower than float32), ``off`` never.
    Other device types: float32. Losses and statistics stay float32 either way
    (:func:`full_precision`).
    """
    if cpu_amp not in CPU_AMP_CHOICES:
        raise ValueError(f"cpu_amp must be one of {', '.join(CPU_AMP_CHOICES)}, got {cpu_amp!r}")
    kind = torch.device(device).type
    if kind == "cuda":
        return torch.float16 if amp else None
    if kind == "cpu" and (cpu_amp == "bfloat16" or (cpu_amp == "auto" and cpu_bf16_units())):
        return torch.bfloat16
    return None


def autocast(device: torch.device | str, enabled: bool = True, dtype: torch.dtype | None = None) -> torch.autocast:
    """``torch.autocast`` for ``device``'s type with ``dtype`` (default :func:`default_amp_dtype`)."""
    device_type = torch.device(device).type
    return torch.autocast(device_type, dtype=dtype or default_amp_dtype(device_type), enabled=enabled)


def active_autocast() -> list[tuple[str, torch.dtype]]:
    """(device type, dtype) of every autocast region that is on in this thread."""
    return [(d, torch.get_autocast_dtype(d)) for d in AUTOCAST_DEVICE_TYPES if torch.is_autocast_enabled(d)]


@contextlib.contextmanager
def full_precision() -> Iterator[None]:
    """Run the block with autocast off on every device type where it is on.

    Tensors keep their dtype; the caller casts what it reduces (:func:`at_least_float32`).
    A no-op outside autocast.
    """
    with contextlib.ExitStack() as stack:
        for device_type, _ in active_autocast():
            stack.enter_context(torch.autocast(device_type, enabled=False))
        yield


def at_least_float32(x: torch.Tensor) -> torch.Tensor:
    """float16 / bfloat16 tensors up to float32; float32, float64 and integer tensors unchanged."""
    if x.is_floating_point() and x.dtype in (torch.float16, torch.bfloat16):
        return x.float()
    return x


def full_precision_op(fn: T) -> T:
    """Decorator: run ``fn`` under :func:`full_precision` with its floating-point tensor arguments
    (positional and keyword) cast up to float32. Other arguments pass unchanged."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        args = tuple(at_least_float32(a) if isinstance(a, torch.Tensor) else a for a in args)
        kwargs = {k: at_least_float32(v) if isinstance(v, torch.Tensor) else v for k, v in kwargs.items()}
        with full_precision():
            return fn(*args, **kwargs)

    return wrapper  # type: ignore[return-value]


#: Relative error (L2 norm of the difference / L2 norm of the float32 result) above which a
#: bfloat16 convolution kernel counts as faulty. A correct kernel is off by bfloat16's
#: rounding, about 0.002 on the probe's inputs; the faults found (oneDNN's AVX512_CORE_BF16
#: weight gradient of 3x3x3 convolutions over 2x2x1 and 2x2x2 inputs, docs/benchmarks.md)
#: are off by 0.8 to infinity.
BF16_KERNEL_TOLERANCE = 0.05


@dataclass(frozen=True)
class KernelCheck:
    """One convolution of a network, run at its training shape in bfloat16 and in float32.

    ``errors``: relative error of the bfloat16 result against float32 on the same
    (bfloat16-rounded) inputs, for ``output``, ``grad_input`` and ``grad_weight``;
    ``inf`` where the bfloat16 result is not finite.
    """

    module: str  # the module's name in the network (the first one, where several share a shape)
    op: str  # the module's class, e.g. Conv3d
    input_shape: tuple[int, ...]
    errors: dict[str, float]

    @property
    def worst(self) -> float:
        return max(self.errors.values())

    def describe(self) -> str:
        errs = ", ".join(f"{k} {v:.3g}" for k, v in self.errors.items())
        return f"{self.module} ({self.op}, input {'x'.join(map(str, self.input_shape))}): {errs}"


def _relative_error(value: torch.Tensor, reference: torch.Tensor) -> float:
    value, reference = value.double(), reference.double()
    if not torch.isfinite(value).all():
        return math.inf
    scale = reference.norm().item()
    diff = (value - reference).norm().item()
    return diff / scale if scale > 0 else (0.0 if diff == 0 else math.inf)


def _check_conv(module: nn.Module, shape: tuple[int, ...], dtype: torch.dtype, generator: torch.Generator) -> dict[str, float]:
    """Forward and backward of ``module`` on random input of ``shape``: ``dtype`` autocast against float32."""
    device = next(module.parameters()).device
    reference = copy.deepcopy(module).float().train()
    with torch.no_grad():  # inputs representable in dtype, so both runs see the same numbers
        for p in reference.parameters():
            p.copy_(torch.randn(p.shape, generator=generator).mul_(p.shape[1] ** -0.5 if p.dim() > 1 else 0.1).to(dtype))
    x = torch.randn(shape, generator=generator).to(dtype).float().to(device)
    results = []
    for low in (False, True):
        net = copy.deepcopy(reference)
        xin = x.clone().requires_grad_()
        with torch.autocast(device.type, dtype=dtype, enabled=low):
            y = net(xin)
        grad = torch.randn(y.shape, generator=generator.manual_seed(1)).to(dtype).float().to(device)
        y.float().backward(grad)
        results.append((y.detach().float(), xin.grad, net.weight.grad))
    (y32, dx32, dw32), (ylo, dxlo, dwlo) = results
    return {"output": _relative_error(ylo, y32), "grad_input": _relative_error(dxlo, dx32),
            "grad_weight": _relative_error(dwlo, dw32)}


def check_bf16_convolutions(
    model: nn.Module, run: Callable[[], Any], dtype: torch.dtype = torch.bfloat16, seed: int = 0,
) -> list[KernelCheck]:
    """Run every convolution that ``run()`` calls in ``model`` at the input shape it sees there,
    once under ``dtype`` autocast and once in float32, and compare output, input gradient and
    weight gradient (:class:`KernelCheck`, one per distinct layer configuration and shape).

    A CPU's reduced-precision convolution kernels can be wrong at some shapes only (oneDNN's
    AVX512_CORE_BF16 path: the weight gradient of 3x3x3 convolutions over 2x2x1 and 2x2x2
    inputs is NaN, infinite or wrong by about 100 %, while AMX's is right), and a wrong
    finite gradient is invisible to a finiteness check; this probes the kernels the
    training will call, at their shapes, before it does. ``run`` is called once under
    ``torch.no_grad()`` with ``model`` in eval mode (no batch-norm statistics change; the
    mode is restored); the probes draw from their own generator, not the global RNG. Cost:
    about one forward and two forward + backward passes of the network.
    """
    seen: dict[tuple, tuple[str, nn.Module, tuple[int, ...]]] = {}

    def hook(name):
        def record(m, args, _out):
            shape = tuple(args[0].shape)
            key = (type(m).__name__, repr(m), shape)
            seen.setdefault(key, (name, m, shape))
        return record

    convs = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.modules.conv._ConvNd)]
    handles = [m.register_forward_hook(hook(n)) for n, m in convs]
    was_training = model.training
    try:
        model.eval()
        with torch.no_grad():
            run()
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    generator = torch.Generator().manual_seed(seed)
    return [KernelCheck(name, type(m).__name__, shape, _check_conv(m, shape, dtype, generator))
            for name, m, shape in seen.values()]


def faulty_kernels(checks: list[KernelCheck], tolerance: float = BF16_KERNEL_TOLERANCE) -> list[KernelCheck]:
    """The checks off by more than ``tolerance`` (or not finite)."""
    return [c for c in checks if not c.worst <= tolerance]
