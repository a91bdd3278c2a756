"""Stage-1 overhead over the bare V-Net, and data-loading wait, measured side by side.

1. Time of one AUA + BCL iteration (student forward/backward on L + U crops, teacher
   forward on U noisy crops, antithetic sampling, MC-integral NLL, Dice, GED, BCL, SGD
   step, EMA update) divided by the time of the bare V-Net (segmentation head only) doing
   the same forward/backward passes (forward/backward on L + U crops with cross-entropy,
   forward on U crops without gradients, SGD step). Target <= 1.3. Both are timed
   alternately in one process, median of ``--repeats`` iterations after ``--warmup``.
2. Data-loading wait as a share of step time: the real engine (``semiseg.training.engine.train``)
   on preprocessed HDF5 cases, ``--loader-iterations`` iterations. Target < 5 %.

    python benchmarks/bench_stage1.py [--patch 64 64 64] [--base-filters 16] [--device auto]
        [--cases 'results/preprocessed/demo/*.h5']
"""

from __future__ import annotations

import argparse
import copy
import csv
import glob
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from semiseg.training.engine import (
    Stage1Step,
    TrainConfig,
    build_model,
    ema_alpha,
    ema_update,
    optimizer_step,
    resolve_device,
    train,
)


def sync(dev):
    if dev.type == "cuda":
        torch.cuda.synchronize()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--patch", type=int, nargs=3, default=(64, 64, 64))
    ap.add_argument("--base-filters", type=int, default=16)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--amp", action="store_true", help="autocast float16 (CUDA only)")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=6)
    ap.add_argument("--bcl-max-samples", type=int, default=9000)
    ap.add_argument("--cases", default="results/preprocessed/demo/*.h5")
    ap.add_argument("--loader-iterations", type=int, default=20)
    ap.add_argument("--loader-patch", type=int, nargs=3, default=(64, 64, 32))
    ap.add_argument("--loader-base-filters", type=int, default=8)
    ap.add_argument("--num-workers", type=int, default=1)
    args = ap.parse_args()
    dev = resolve_device(args.device)
    amp = args.amp and dev.type == "cuda"
    print(f"machine: {platform.machine()}, device {dev} ({torch.cuda.get_device_name(dev) if dev.type == 'cuda' else platform.processor() or 'cpu'}), "
          f"torch {torch.__version__}, threads {torch.get_num_threads()}, amp {amp}")

    cfg = TrainConfig(method="aua_bcl", lambda_c=0.01, patch_size=tuple(args.patch), base_filters=args.base_filters,
                      bcl_max_samples=args.bcl_max_samples, iterations=6000)
    torch.manual_seed(0)
    student = build_model(cfg).to(dev)
    teacher = copy.deepcopy(student)
    bare_cfg = TrainConfig(method="supervised", patch_size=cfg.patch_size, base_filters=cfg.base_filters)
    bare = build_model(bare_cfg).to(dev)
    bare_t = copy.deepcopy(bare)
    opt_m = torch.optim.SGD(student.parameters(), lr=1e-3, momentum=0.9, weight_decay=1e-4)
    opt_b = torch.optim.SGD(bare.parameters(), lr=1e-3, momentum=0.9, weight_decay=1e-4)
    step = Stage1Step(cfg, student, teacher)
    scaler = torch.amp.GradScaler("cuda", enabled=amp)

    # A labelled batch with a real boundary (a sphere), and an unlabelled one.
    p = cfg.patch_size
    g = torch.stack(torch.meshgrid(*(torch.arange(n, dtype=torch.float32) - n / 2 for n in p), indexing="ij"))
    sphere = (g.pow(2).sum(0).sqrt() < min(p) / 4).long()
    batch = {
        "image_l": torch.randn(2, 1, *p, device=dev) + sphere.to(dev)[None, None],
        "label_l": sphere.to(dev).expand(2, *p).contiguous(),
        "image_u": torch.randn(2, 1, *p, device=dev),
    }

    def method_iter(t):
        with torch.autocast(dev.type, dtype=torch.float16, enabled=amp):
            loss, _ = step(batch, t)
        optimizer_step(loss, opt_m, scaler)
        ema_update(teacher, student, ema_alpha(t + 1, 0.99))

    def bare_iter(t):
        with torch.autocast(dev.type, dtype=torch.float16, enabled=amp):
            x = torch.cat([batch["image_l"], batch["image_u"]])
            y = torch.cat([batch["label_l"], batch["label_l"]])
            loss = F.cross_entropy(bare(x).logits.float(), y)
            with torch.no_grad():
                bare_t(batch["image_u"])
        optimizer_step(loss, opt_b, scaler)

    times = {"method": [], "bare": []}
    for t in range(args.warmup + args.repeats):
        for name, fn in (("method", method_iter), ("bare", bare_iter)):
            sync(dev)
            t0 = time.perf_counter()
            fn(t)
            sync(dev)
            if t >= args.warmup:
                times[name].append(time.perf_counter() - t0)
    m, b = statistics.median(times["method"]), statistics.median(times["bare"])
    print(f"patch {p}, base width {cfg.base_filters}, S={cfg.samples}, rank {cfg.rank}, BCL samples/crop {cfg.bcl_max_samples}")
    print(f"stage-1 iteration (AUA + BCL): {m:.3f} s   bare V-Net same passes: {b:.3f} s   ratio {m / b:.3f}  (target <= 1.3)")

    cases = sorted(glob.glob(args.cases))
    if len(cases) < 4:
        print(f"data-loading wait: skipped (fewer than 4 case files match {args.cases!r}; run `snakemake --cores 2 all` first)")
        return
    with tempfile.TemporaryDirectory() as tmp:
        lcfg = TrainConfig(method="aua_bcl", lambda_c=0.01, patch_size=tuple(args.loader_patch),
                           base_filters=args.loader_base_filters, iterations=args.loader_iterations, bcl_max_samples=2000)
        train(lcfg, cases[:2], cases[2:], tmp, device=str(dev), num_workers=args.num_workers, progress=False,
              checkpoint_every=10**9)
        with open(Path(tmp) / "losses.csv", encoding="utf-8") as fh:
            rows = list(csv.DictReader(fh))[1:]  # the first batch includes the workers' start
        wait = sum(float(r["data_wait_s"]) for r in rows)
        total = sum(float(r["step_s"]) for r in rows)
        print(f"data-loading wait: {100 * wait / total:.2f}% of step time over {len(rows)} iterations "
              f"(engine, patch {tuple(args.loader_patch)}, width {args.loader_base_filters}, {args.num_workers} worker(s); target < 5%)")


if __name__ == "__main__":
    main()
