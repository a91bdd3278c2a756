"""Summed wall time per rule of one Snakemake run, from its log.

Reads a log of ``.snakemake/log/`` (the newest one in ``--dir`` by default): each job's
start (the ``[date]`` line before ``rule <name>:`` / ``localrule <name>:`` and its
``jobid``) and its end (``Finished jobid: <n>``), and prints per rule the number of jobs,
their summed wall time and the mean per job, then the run's total span. Jobs run side by
side, so the sums add up to more than the span on several cores.

    python benchmarks/rule_times.py [--dir .] [--log .snakemake/log/<file>] [--markdown]
"""

from __future__ import annotations

import argparse
import re
from datetime import datetime
from pathlib import Path

STAMP = re.compile(r"^\[(\w{3} \w{3} +\d+ \d\d:\d\d:\d\d \d{4})\]$")
RULE = re.compile(r"^(?:local)?rule (\w+):$")
JOBID = re.compile(r"^\s+jobid: (\d+)$")
FINISHED = re.compile(r"^Finished jobid: (\d+)")


def rule_times(log: Path) -> tuple[dict[str, list[float]], float]:
    """{rule: [wall seconds of each job]}, and the span from the first start to the last end."""
    starts: dict[str, tuple[str, datetime]] = {}
    times: dict[str, list[float]] = {}
    stamp = pending = None
    first = last = None
    for line in log.read_text(encoding="utf-8", errors="replace").splitlines():
        if m := STAMP.match(line):
            stamp = datetime.strptime(m[1], "%a %b %d %H:%M:%S %Y")
            first = first or stamp
            last = stamp
        elif (m := RULE.match(line)) and stamp is not None:
            pending = m[1]
        elif (m := JOBID.match(line)) and pending is not None:
            starts[m[1]] = (pending, stamp)
            pending = None
        elif (m := FINISHED.match(line)) and m[1] in starts:
            rule, t0 = starts.pop(m[1])
            times.setdefault(rule, []).append((stamp - t0).total_seconds())
    span = (last - first).total_seconds() if first and last else 0.0
    return times, span


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dir", default=".", help="the run's working directory")
    ap.add_argument("--log", help="a Snakemake log file (default: the newest in <dir>/.snakemake/log)")
    ap.add_argument("--markdown", action="store_true")
    args = ap.parse_args()
    log = Path(args.log) if args.log else max((Path(args.dir) / ".snakemake" / "log").glob("*.snakemake.log"), key=lambda p: p.stat().st_mtime)
    times, span = rule_times(log)
    rows = sorted(times.items(), key=lambda kv: -sum(kv[1]))
    if args.markdown:
        print("| rule | jobs | wall s | per job |\n|---|---|---|---|")
        for rule, ts in rows:
            print(f"| {rule} | {len(ts)} | {sum(ts):.0f} | {sum(ts) / len(ts):.1f} |")
    else:
        for rule, ts in rows:
            print(f"{rule:26s} {len(ts):4d} jobs {sum(ts):8.0f} s  {sum(ts) / len(ts):7.1f} s/job")
    print(f"{log.name}: {sum(len(t) for t in times.values())} jobs, span {span / 60:.1f} min")


if __name__ == "__main__":
    main()
