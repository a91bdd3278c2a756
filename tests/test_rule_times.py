"""benchmarks/rule_times.py: per-rule wall time from a Snakemake log."""

from __future__ import annotations

import importlib.util
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

LOG = """Building DAG of jobs...
[Tue Dec  1 13:37:51 2026]
localrule generate_demo:
    log: results/logs/generate/demo.log
    jobid: 3
[Tue Dec  1 13:39:15 2026]
Finished jobid: 3 (Rule: generate_demo)
[Tue Dec  1 13:39:15 2026]
rule preprocess_case:
    jobid: 5
[Tue Dec  1 13:39:16 2026]
rule preprocess_case:
    jobid: 6
[Tue Dec  1 13:39:18 2026]
Finished jobid: 6 (Rule: preprocess_case)
[Tue Dec  1 13:39:20 2026]
Finished jobid: 5 (Rule: preprocess_case)
"""


def test_rule_times_pairs_starts_and_ends(tmp_path):
    spec = importlib.util.spec_from_file_location("rule_times", REPO / "benchmarks" / "rule_times.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    log = tmp_path / "run.snakemake.log"
    log.write_text(LOG, encoding="utf-8")
    times, span = mod.rule_times(log)
    assert times == {"generate_demo": [84.0], "preprocess_case": [2.0, 5.0]}
    assert span == 89.0
