"""CPU training speed of the demo's runs, measured side by side in one invocation.

Seconds per iteration of the real engine (``semiseg.training.engine.train``) on the demo's
preprocessed cases with the demo's settings (width 8, 64 x 48 x 32 crops, 2 + 2 crops a
batch), for:

1. precision: float32 against bfloat16 autocast (``training.cpu_amp: bfloat16``); on a CPU
   without bfloat16 units (``semiseg.precision.cpu_bf16_units`` empty) bfloat16 is emulated,
   which is what ``cpu_amp: auto`` avoids;
2. threads: one training on 1 thread, one on 2 threads, and two 1-thread trainings at once
   (the throughput of two side-by-side jobs, as Snakemake runs them with ``--cores 2`` when
   each asks for one thread: the demo's setting), each in both precisions;
3. memory format: the bare V-Net's forward + backward with the input and weights in
   channels-last 3-D against the default layout (the engine trains in the default layout),
   in both precisions.

Variants run alternately (``--rounds``) and the median over rounds of each run's median
step time (first ``--skip`` iterations left out) is printed, with ratios against float32 on
2 threads. Prints the CPU model and its bfloat16 units.

    python benchmarks/bench_cpu_training.py --cases 'results/preprocessed/demo/*.h5' \
        [--methods supervised aua_bcl] [--iterations 12] [--rounds 2]
"""

from __future__ import annotations

import argparse
import glob
import json
import multiprocessing as mp
import statistics
import tempfile
import time
from pathlib import Path

import torch

from semiseg.precision import cpu_bf16_units, cpu_model
from semiseg.training.engine import TrainConfig, build_model, train

DEMO = dict(patch_size=(64, 48, 32), base_filters=8, dropout=0.1, bcl_max_samples=2000, labelled_batch=2, unlabelled_batch=2)


def run(method: str, cpu_amp: str, threads: int, iterations: int, skip: int, cases: list[str]) -> float:
    """Median seconds per step of one short training run."""
    torch.set_num_threads(threads)
    lab, unl = cases[:2], cases[2:]
    cfg = TrainConfig(method=method, iterations=iterations, lr_step=iterations, lambda_c=0.01 if method == "aua_bcl" else 0.0,
                      cpu_amp=cpu_amp, **DEMO)
    with tempfile.TemporaryDirectory() as tmp:
        train(cfg, lab, unl, tmp, device="cpu", checkpoint_every=10**6, num_workers=0, progress=False)
        rows = (Path(tmp) / "losses.csv").read_text(encoding="utf-8").splitlines()
    header = rows[0].split(",")
    k = header.index("step_s")
    return statistics.median(float(r.split(",")[k]) for r in rows[1 + skip:])


def _child(args, queue) -> None:
    queue.put(run(*args))


def run_pair(args: tuple) -> tuple[float, float]:
    """Two 1-thread runs at once, in two processes: their step times."""
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_child, args=(args, queue)) for _ in range(2)]
    for p in procs:
        p.start()
    out = [queue.get() for _ in procs]
    for p in procs:
        p.join()
    return out[0], out[1]


def bare_step(net, x, y, opt, bf16: bool) -> float:
    t0 = time.perf_counter()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        out = net(x)
    loss = torch.nn.functional.cross_entropy(out.logits.float(), y)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    return time.perf_counter() - t0


def channels_last(repeats: int, bf16: bool) -> dict[str, float]:
    """The bare V-Net's forward + backward on 4 crops, 2 threads: default layout and
    channels-last 3-D, in float32 and (``bf16``) under bfloat16 autocast; median seconds."""
    torch.set_num_threads(2)
    cfg = TrainConfig(method="supervised", **DEMO)
    x = torch.randn(4, 1, *cfg.patch_size)
    y = torch.randint(0, 2, (4, *cfg.patch_size))
    nets = {}
    for fmt in ("default", "channels_last_3d"):
        xin = x if fmt == "default" else x.contiguous(memory_format=torch.channels_last_3d)
        for prec in ("float32", "bfloat16") if bf16 else ("float32",):
            torch.manual_seed(0)  # one network and optimiser per variant, same initial weights
            net = build_model(cfg)
            if fmt == "channels_last_3d":
                net = net.to(memory_format=torch.channels_last_3d)
            nets[f"{fmt}, {prec}"] = (net, torch.optim.SGD(net.parameters(), lr=0.01), xin, prec == "bfloat16")
    times = {name: [] for name in nets}
    for _ in range(repeats + 1):
        for name, (net, opt, xin, use_bf16) in nets.items():
            times[name].append(bare_step(net, xin, y, opt, use_bf16))
    return {name: statistics.median(ts[1:]) for name, ts in times.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cases", default="results/preprocessed/demo/*.h5")
    ap.add_argument("--methods", nargs="+", default=["supervised", "aua_bcl"])
    ap.add_argument("--iterations", type=int, default=12)
    ap.add_argument("--skip", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--no-pair", action="store_true", help="skip the two-trainings-at-once measurement")
    ap.add_argument("--no-bf16", action="store_true",
                    help="skip bfloat16 (on a CPU without bfloat16 units it is emulated, about 20x slower)")
    ap.add_argument("--json", help="also write the figures to this JSON file")
    args = ap.parse_args()
    cases = sorted(glob.glob(args.cases))
    if len(cases) < 4:
        raise SystemExit(f"need at least 4 preprocessed cases at {args.cases!r} (run the demo first)")
    cases = cases[:6]
    print(f"CPU: {cpu_model()}; {torch.get_num_threads()} threads available; bfloat16 units: "
          f"{', '.join(cpu_bf16_units()) or 'none'}; torch {torch.__version__}")
    results: dict[str, dict[str, float]] = {}
    for method in args.methods:
        variants = {"float32, 2 threads": ("off", 2), "bfloat16, 2 threads": ("bfloat16", 2),
                    "float32, 1 thread": ("off", 1), "bfloat16, 1 thread": ("bfloat16", 1)}
        precisions = {"float32": "off", "bfloat16": "bfloat16"}
        if args.no_bf16:
            variants = {name: v for name, v in variants.items() if v[0] == "off"}
            del precisions["bfloat16"]
        times: dict[str, list[float]] = {name: [] for name in variants}
        pairs: dict[str, list[float]] = {name: [] for name in precisions}
        for _ in range(args.rounds):
            for name, (amp, threads) in variants.items():
                times[name].append(run(method, amp, threads, args.iterations, args.skip, cases))
            if not args.no_pair:
                # The demo's setting: two 1-thread jobs side by side, in each precision.
                for name, amp in precisions.items():
                    pairs[name] += run_pair((method, amp, 1, args.iterations, args.skip, cases))
        med = {name: statistics.median(ts) for name, ts in times.items()}
        for name, ts in pairs.items():
            if ts:
                med[f"{name}, two 1-thread runs at once (each)"] = statistics.median(ts)
        results[method] = med
        ref = med["float32, 2 threads"]
        print(f"\n{method}: seconds per iteration (median), ratio to float32 on 2 threads")
        for name, s in med.items():
            print(f"  {name:44s} {s:7.3f} s  {s / ref:5.2f}x")
        if not args.no_pair:
            # Throughput of two side-by-side 1-thread jobs against one 2-thread job after another.
            print(f"  -> two 1-thread jobs side by side finish {2 * ref / med['float32, two 1-thread runs at once (each)']:.2f}x "
                  f"as many iterations per second as 2-thread jobs one after another")
    cl = channels_last(repeats=5, bf16=not args.no_bf16)
    ref = cl["default, float32"]
    print("\nbare V-Net forward + backward, 4 crops, 2 threads (ratio to the default layout in float32):")
    for name, s in cl.items():
        print(f"  {name:44s} {s:7.3f} s  {s / ref:5.2f}x")
    results["bare_vnet_layout"] = cl
    if args.json:
        Path(args.json).write_text(json.dumps({"cpu": cpu_model(), "bf16_units": cpu_bf16_units(), **results}, indent=2))


if __name__ == "__main__":
    main()
