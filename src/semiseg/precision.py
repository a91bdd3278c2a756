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
import functools
from collections.abc import Callable, Iterator
from typing import TypeVar

import torch

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
