"""This CPU's bfloat16 convolution kernels against float32, over the shapes a V-Net trains at.

For each oneDNN instruction-set cap (the CPU's own, then each one named with --isa, set
through ONEDNN_MAX_CPU_ISA in a process of its own), every 3-D convolution of the grid below
(3x3x3 and 1x1x1 convs, 2x2x2 stride-2 convs and transposed convs; batch 1-8; 2-128
channels; input extents from 1x1x1 to 8x8x4) runs forward and backward under bfloat16
autocast and in float32 on the same bfloat16-rounded inputs
(``semiseg.precision.check_bf16_convolutions``). Prints the shapes whose output, input
gradient or weight gradient is off by more than the training's tolerance, and a count per
cap.

    python benchmarks/bench_bf16_kernels.py --isa AVX512_CORE_BF16
"""

from __future__ import annotations

import argparse
import itertools
import os
import subprocess
import sys
from collections import Counter

BATCHES = (1, 2, 3, 4, 6, 8)
CHANNELS = ((2, 2), (4, 4), (8, 8), (16, 16), (16, 32), (32, 32), (32, 16), (64, 64), (128, 128), (128, 64))
EXTENTS = ((1, 1, 1), (2, 2, 1), (2, 2, 2), (3, 3, 2), (4, 4, 2), (4, 4, 4), (6, 6, 6), (7, 7, 5), (8, 8, 4))
KINDS = (("Conv3d", 3, 1, 1), ("Conv3d", 1, 1, 0), ("Conv3d", 2, 2, 0), ("ConvTranspose3d", 2, 2, 0))


def sweep(threads: int) -> None:
    import torch

    from semiseg.precision import BF16_KERNEL_TOLERANCE, check_bf16_convolutions, faulty_kernels

    torch.set_num_threads(threads)
    bad: Counter = Counter()
    total = 0
    for (kind, k, stride, pad), n, (cin, cout), extent in itertools.product(KINDS, BATCHES, CHANNELS, EXTENTS):
        if stride == 2 and kind == "Conv3d" and min(extent) < 2:
            continue
        module = getattr(torch.nn, kind)(cin, cout, k, stride=stride, padding=pad)
        x = torch.zeros(n, cin, *extent)
        (check,) = check_bf16_convolutions(module, lambda m=module, x=x: m(x))
        total += 1
        for c in faulty_kernels([check]):
            bad[(kind, k, extent)] += 1
            print(f"  {kind} k{k} s{stride} N{n} {cin}->{cout} over {'x'.join(map(str, extent))}: "
                  + ", ".join(f"{key} {v:.3g}" for key, v in c.errors.items()), flush=True)
    isa = os.environ.get("ONEDNN_MAX_CPU_ISA", "the CPU's own")
    print(f"ISA cap {isa}, {threads} thread(s): {sum(bad.values())} of {total} shapes off by more than "
          f"{BF16_KERNEL_TOLERANCE}" + "".join(f"\n  {kind} {k}x{k}x{k} over {'x'.join(map(str, e))}: {c}"
                                                for (kind, k, e), c in sorted(bad.items())), flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--isa", action="append", default=[], help="also run with ONEDNN_MAX_CPU_ISA=ISA (repeatable)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        sweep(args.threads)
        return
    import torch

    from semiseg.precision import cpu_bf16_units

    print(f"torch {torch.__version__}, bfloat16 units: {', '.join(cpu_bf16_units()) or 'none'}", flush=True)
    for isa in [None, *args.isa]:
        env = dict(os.environ)
        env.pop("ONEDNN_MAX_CPU_ISA", None)
        if isa:
            env["ONEDNN_MAX_CPU_ISA"] = isa
        subprocess.run([sys.executable, __file__, "--child", "--threads", str(args.threads)], env=env, check=True)


if __name__ == "__main__":
    main()
