"""Tables over several training seeds: the spread over seeds, the per-seed CSV, the paired
Wilcoxon test against the reference row, and the comparison table (paper, Tables II-IV)."""

from __future__ import annotations

import runpy
from pathlib import Path
from types import SimpleNamespace

import matplotlib.image as mpimg
import numpy as np
import pandas as pd
import pytest
from scipy.stats import wilcoxon

from semiseg.evaluation import (
    ABLATION_ROWS,
    COMPARISON_ROWS,
    ablation_table,
    comparison_table,
    format_p,
    paired_wilcoxon,
    per_seed_means,
    read_seed_metrics,
    seed_map,
    seed_summary_row,
    summary_row,
    sweep_table,
)


def metrics(dice, asd=1.0, hd95=3.0, cases=None):
    """A per-case metrics frame as case_metrics writes it."""
    dice = [float(d) for d in dice]
    return pd.DataFrame({
        "case": cases if cases is not None else [f"c{i}" for i in range(len(dice))],
        "dice": dice, "jaccard": [d / (2 - d) for d in dice], "asd": asd, "hd95": hd95,
        "empty_pred": [d == 0 for d in dice], "empty_ref": False,
    })


# Three seeds, two cases each: per-seed Dice means 85, 75, 90 %; ASD 1, 2, 3.
THREE = {0: metrics([0.8, 0.9], asd=1.0), 1: metrics([0.7, 0.8], asd=2.0), 2: metrics([0.9, 0.0], asd=3.0)}
THREE[2].loc[1, "dice"] = 0.9  # the last case: an empty prediction flag with Dice 0.9 (counted, not checked)


def test_one_seed_reproduces_the_per_case_summary(tmp_path):
    rng = np.random.default_rng(1)
    frame = metrics(rng.uniform(0.5, 0.95, 8), asd=rng.uniform(0, 4, 8), hd95=rng.uniform(1, 9, 8))
    frame.to_csv(tmp_path / "m.csv", index=False)
    row = seed_summary_row(read_seed_metrics({0: tmp_path / "m.csv"}))
    assert row == {**summary_row(frame), "Seeds": 1}
    d = frame["dice"] * 100
    assert row["Dice[%]"] == f"{d.mean():.2f} ± {d.std(ddof=0):.2f}"  # population sd over the cases, as before
    out = ablation_table({"aua": {0: frame}, "full": {0: tmp_path / "m.csv"}}, {"aua": (4, 16), "full": (4, 16)})
    assert out["Dice[%]"].tolist() == [row["Dice[%]"]] * 2 and out["Seeds"].tolist() == [1, 1]
    assert out["p (Wilcoxon vs full)"].tolist() == ["1.000", "—"]  # identical rows: all differences zero


def test_three_seeds_mean_of_seed_means_and_sample_sd(tmp_path):
    row = seed_summary_row(THREE)
    # Dice: seed means 85, 75, 90 -> mean 83.333; deviations 1.667, -8.333, 6.667 ->
    # sample variance (2.778 + 69.444 + 44.444) / 2 = 58.333 -> sd 7.638.
    assert row["Dice[%]"] == "83.33 ± 7.64"
    assert row["ASD[voxel]"] == "2.00 ± 1.00" and row["95HD[voxel]"] == "3.00 ± 0.00"
    j = [np.mean([d / (2 - d) for d in ds]) * 100 for ds in ([0.8, 0.9], [0.7, 0.8], [0.9, 0.0])]
    assert row["Jaccard[%]"] == f"{np.mean(j):.2f} ± {np.std(j, ddof=1):.2f}"
    assert row["Test cases"] == 2 and row["Empty predictions"] == 1 and row["Seeds"] == 3
    out = ablation_table({"full": THREE}, {"full": (4, 16)}, "mm", tmp_path / "t.csv", tmp_path / "t.md",
                         {"protocol": "clean", "unit": "mm"}, out_per_seed=tmp_path / "t_per_seed.csv")
    assert out["Dice[%]"][0] == "83.33 ± 7.64" and out["Seeds"][0] == 3
    assert list(out.columns)[-3:] == ["Seeds", "p (Wilcoxon vs full)", "Protocol"]
    md = (tmp_path / "t.md").read_text(encoding="utf-8")
    assert "± is the sample standard deviation over 3 seeds of the per-seed test-set mean" in md


def test_per_seed_csv_holds_plain_per_seed_means(tmp_path):
    files = {"supervised": {0: metrics([0.5, 0.6]), 1: metrics([0.7, 0.7])}, "full": THREE}
    ablation_table(files, {"supervised": (4, 0), "full": (4, 16)}, out_per_seed=tmp_path / "p.csv", reference=None)
    per_seed = pd.read_csv(tmp_path / "p.csv")
    assert list(per_seed.columns) == ["Method", "Seed", "Dice[%]", "Jaccard[%]", "ASD[voxel]", "95HD[voxel]",
                                      "Test cases", "Empty predictions"]
    assert per_seed["Method"].tolist() == [ABLATION_ROWS["supervised"]] * 2 + [ABLATION_ROWS["full"]] * 3
    assert per_seed["Seed"].tolist() == [0, 1, 0, 1, 2]
    np.testing.assert_allclose(per_seed["Dice[%]"], [55.0, 70.0, 85.0, 75.0, 90.0])
    np.testing.assert_allclose(per_seed["ASD[voxel]"], [1, 1, 1, 2, 3])
    assert per_seed["Empty predictions"].tolist() == [0, 0, 0, 0, 1]
    assert per_seed.dtypes["Dice[%]"] == np.float64
    assert per_seed_means(THREE).shape == (3, 7)


def test_paired_wilcoxon_hand_computed_exact_p():
    ref = {0: metrics([0.5] * 6)}
    # All six differences positive: W- = 0; the exact two-sided p is 2 / 2**6 = 0.03125.
    up = {0: metrics([0.5 + 0.01 * k for k in range(1, 7)])}
    assert paired_wilcoxon(ref, up) == pytest.approx(2 / 64)
    assert format_p(paired_wilcoxon(ref, up)) == "0.031"
    # Ranks +1..+5 and -6: W- = 6; subsets of {1..6} with rank sum <= 6: 1+1+1+2+2+3+4 = 14,
    # so p = 2 * 14 / 64 = 0.4375.
    mixed = {0: metrics([0.51, 0.52, 0.53, 0.54, 0.55, 0.44])}
    assert paired_wilcoxon(ref, mixed) == pytest.approx(28 / 64)
    assert paired_wilcoxon(ref, ref) == 1.0  # every difference zero
    assert paired_wilcoxon({0: metrics([0.5] * 5)}, {0: metrics([0.6] * 5)}) is None  # 5 pairs: too few
    assert format_p(None) == "n/a (n<6)" and format_p(0.0004) == "<0.001" and format_p(0.5) == "0.500"


def test_paired_wilcoxon_pairs_by_seed_and_case_and_matches_scipy():
    rng = np.random.default_rng(3)
    cases = ["a", "b", "c", "d"]
    ref = {s: metrics(rng.uniform(0.6, 0.9, 4), cases=cases) for s in (0, 1, 2)}
    other = {s: metrics(rng.uniform(0.5, 0.9, 4), cases=cases) for s in (0, 1, 2)}
    # The other row's cases in another order, its seeds too: pairing is by (seed, case).
    shuffled = {s: other[s].iloc[::-1].reset_index(drop=True) for s in (2, 0, 1)}
    x = np.concatenate([other[s]["dice"].to_numpy() for s in (0, 1, 2)])
    y = np.concatenate([ref[s]["dice"].to_numpy() for s in (0, 1, 2)])
    direct = wilcoxon(x, y, alternative="two-sided", method="exact").pvalue  # 12 pairs, no ties
    assert paired_wilcoxon(ref, shuffled) == pytest.approx(direct)
    out = ablation_table({"aua": shuffled, "full": ref}, {"aua": (4, 16), "full": (4, 16)})
    assert out["p (Wilcoxon vs full)"].tolist() == [format_p(direct), "—"]
    # Zero differences are dropped; ties among the rest: the normal approximation.
    d = np.array([0.0, 0.0, 0.1, 0.1, -0.2, 0.3, 0.3, 0.4, -0.05])
    tied = {0: metrics(0.5 + d)}
    flat = {0: metrics([0.5] * len(d))}
    expected = wilcoxon(d[d != 0], zero_method="wilcox", method="asymptotic", correction=False).pvalue
    assert paired_wilcoxon(flat, tied) == pytest.approx(expected)


def test_paired_wilcoxon_rejects_unmatched_pairs():
    ref = {0: metrics([0.5] * 6), 1: metrics([0.6] * 6)}
    with pytest.raises(ValueError, match=r"other lacks 1 \(seed, case\) pair\(s\) that reference has: \(seed 1, c5\)"):
        paired_wilcoxon(ref, {0: metrics([0.5] * 6), 1: metrics([0.6] * 5)})
    with pytest.raises(ValueError, match=r"other lacks 6 \(seed, case\) pair"):
        paired_wilcoxon(ref, {0: metrics([0.5] * 6)})
    with pytest.raises(ValueError, match=r"reference lacks 6 \(seed, case\) pair"):
        paired_wilcoxon(ref, {**ref, 2: metrics([0.5] * 6)})
    with pytest.raises(ValueError, match=r"AUA lacks 6 .* that AUA \+ BCL \+ Pseudo labeling \+ PCL \(Full\) has"):
        ablation_table({"aua": {0: ref[0]}, "full": ref}, {"aua": (1, 1), "full": (1, 1)})


def test_one_seed_few_cases_gives_na_and_the_note_says_why(tmp_path):
    five = {0: metrics([0.5, 0.6, 0.7, 0.8, 0.9])}
    six = {0: metrics([0.5, 0.6, 0.7, 0.8, 0.9, 0.4])}
    out = ablation_table({"aua": five, "full": {0: metrics([0.6] * 5)}}, {"aua": (1, 1), "full": (1, 1)},
                         out_md=tmp_path / "t.md")
    assert out["p (Wilcoxon vs full)"].tolist() == ["n/a (n<6)", "—"]
    assert "n/a (n<6): fewer than 6 pairs" in (tmp_path / "t.md").read_text(encoding="utf-8")
    out = ablation_table({"aua": six, "full": {0: metrics([0.65] * 6)}}, {"aua": (1, 1), "full": (1, 1)})
    assert out["p (Wilcoxon vs full)"][0] not in ("n/a (n<6)", "—")


def test_table_input_errors():
    with pytest.raises(ValueError, match="different numbers of test cases"):
        seed_summary_row({0: metrics([0.5, 0.6]), 1: metrics([0.5])})
    with pytest.raises(ValueError, match="reference row 'full' is not among"):
        ablation_table({"aua": THREE}, {"aua": (1, 1)})
    with pytest.raises(ValueError, match="lack columns"):
        read_seed_metrics({0: pd.DataFrame({"case": ["a"], "dice": [1.0]})})
    with pytest.raises(ValueError, match="cases listed twice"):
        read_seed_metrics({0: metrics([0.5, 0.6], cases=["a", "a"])})
    assert seed_map([0, 1], ["a.csv", "b.csv"]) == {0: "a.csv", 1: "b.csv"}
    assert seed_map([7], "a.csv") == {7: "a.csv"}
    with pytest.raises(ValueError, match="1 metric files for 2 seeds"):
        seed_map([0, 1], ["a.csv"])


def test_sweep_table_against_the_split_setting(tmp_path):
    rows = [{s: metrics(np.linspace(0.5, 0.9, 6) + 0.01 * k * (s + 1)) for s in (0, 1)} for k in range(3)]
    out = sweep_table("lambda_c", [0.01, 0.09, 0.3], rows, [(4, 16)] * 3, reference=0.09,
                      out_md=tmp_path / "s.md", out_per_seed=tmp_path / "s_per_seed.csv")
    col = "p (Wilcoxon vs lambda_c = 0.09)"
    assert list(out.columns)[-2:] == ["Seeds", col] and out[col][1] == "—"
    assert out[col][0] == format_p(paired_wilcoxon(rows[1], rows[0]))
    assert "against the row lambda_c = 0.09 (the split's own setting)" in (tmp_path / "s.md").read_text(encoding="utf-8")
    per_seed = pd.read_csv(tmp_path / "s_per_seed.csv")
    assert per_seed["lambda_c"].tolist() == [0.01, 0.01, 0.09, 0.09, 0.3, 0.3] and per_seed["Seed"].tolist() == [0, 1] * 3
    assert "Seeds" in sweep_table("lambda_c", [0.01, 0.09, 0.3], rows, [(4, 16)] * 3).columns
    assert not any(c.startswith("p (") for c in sweep_table("lambda_c", [0.01, 0.09, 0.3], rows, [(4, 16)] * 3).columns)
    with pytest.raises(ValueError, match="reference value 0.05 is not among"):
        sweep_table("lambda_c", [0.01, 0.09, 0.3], rows, [(4, 16)] * 3, reference=0.05)


def test_comparison_table_rows_order_selection_and_reference(tmp_path):
    rng = np.random.default_rng(5)
    files = {k: {s: metrics(rng.uniform(0.4, 0.9, 6)) for s in (0, 1, 2)} for k in COMPARISON_ROWS}
    counts = {k: (4, 0 if "supervised" in k else 16) for k in COMPARISON_ROWS}
    evaluation = {"protocol": "paper", "unit": "voxel"}
    out = comparison_table(["full", "bcp", "supervised", "mt", "fully_supervised"], files, counts, "voxel",
                           tmp_path / "c.csv", tmp_path / "c.md", evaluation, out_per_seed=tmp_path / "c_per_seed.csv")
    assert out["Method"].tolist() == ["Supervised baseline", "MT", "BCP", "Ours (full)", "Fully supervised (upper bound)"]
    assert list(out.columns) == ["Method", "Labeled", "Unlabeled", "Dice[%]", "Jaccard[%]", "ASD[voxel]", "95HD[voxel]",
                                 "Test cases", "Empty predictions", "Seeds", "p (Wilcoxon vs full)", "Protocol"]
    assert out["p (Wilcoxon vs full)"][3] == "—"
    assert out["p (Wilcoxon vs full)"][1] == format_p(paired_wilcoxon(files["full"], files["mt"]))
    assert out["Labeled"].tolist() == [4] * 5 and out["Unlabeled"].tolist() == [0, 16, 16, 16, 0]
    assert pd.read_csv(tmp_path / "c.csv").shape == (5, 12)
    assert pd.read_csv(tmp_path / "c_per_seed.csv").shape == (15, 8)
    md = (tmp_path / "c.md").read_text(encoding="utf-8").split("\n\n")
    assert md[0].startswith("Evaluation protocol: **paper**")
    assert md[1].startswith("± is the sample standard deviation over 3 seeds")
    assert md[2].startswith("p: two-sided Wilcoxon") and "against the row “Ours (full)” (—)" in md[2]
    # Without `full`: against the first stage; without either: no p column.
    first = comparison_table(["uamt", "aua_bcl", "supervised"], files, counts)
    assert first["Method"].tolist() == ["Supervised baseline", "UA-MT", "Ours (first stage)"]
    assert first["p (Wilcoxon vs aua_bcl)"].tolist()[-1] == "—"
    none = comparison_table(["mt", "uamt"], files, counts)
    assert list(none.columns)[-1] == "Seeds"
    assert "p (Wilcoxon vs mt)" in comparison_table(["mt", "uamt"], files, counts, reference="mt").columns
    assert list(comparison_table(["full", "mt"], files, counts, reference=None).columns)[-1] == "Seeds"
    with pytest.raises(ValueError, match="unknown methods \\['aua'\\]"):
        comparison_table(["aua", "full"], files, counts)
    with pytest.raises(ValueError, match="no metric files for \\['bcp'\\]"):
        comparison_table(["bcp"], {"full": files["full"]}, counts)
    with pytest.raises(ValueError, match="reference 'full' is not among"):
        comparison_table(["mt"], files, counts, reference="full")


def test_spread_note_for_rows_with_different_seed_counts(tmp_path):
    files = {"supervised": {0: metrics([0.5, 0.6])}, "full": THREE}
    ablation_table(files, {"supervised": (4, 0), "full": (4, 16)}, out_md=tmp_path / "t.md", reference=None)
    md = (tmp_path / "t.md").read_text(encoding="utf-8")
    assert md.startswith("Where Seeds > 1, ± is the sample standard deviation over the row's seeds of the per-seed "
                         "test-set mean; where Seeds = 1, ± is the standard deviation over the test cases (one seed);")
    assert "p:" not in md


# ---- the rule scripts: the input / param layout the rules are to pass ---------------

SCRIPTS = Path(__file__).resolve().parents[1] / "workflow" / "scripts"


def _named(values: dict):
    """A Namedlist as Snakemake builds it: list values flattened, their names on slices."""
    from snakemake.iocontainers import Namedlist

    nl = Namedlist()
    for key, value in values.items():
        start = len(nl)
        if isinstance(value, list) and not isinstance(value, str):
            nl.extend(value)
            nl._set_name(key, start, len(nl))
        else:
            nl.append(value)
            nl._set_name(key, start)
    return nl


def _run_script(name, tmp_path, inputs, output, params, wildcards=None):
    """Run one rule script with a stand-in ``snakemake`` object."""
    smk = SimpleNamespace(input=inputs, output=_named(output), params=_named(params), wildcards=_named(wildcards or {}),
                          log=[str(tmp_path / f"{name}.log")])
    runpy.run_path(str(SCRIPTS / name), init_globals={"snakemake": smk}, run_name="__main__")


def test_rule_scripts_read_per_seed_inputs(tmp_path):
    rng = np.random.default_rng(7)
    seeds = [0, 1, 2]

    def csvs(prefix):
        paths = []
        for s in seeds:
            paths.append(str(tmp_path / f"{prefix}_seed{s}.csv"))
            metrics(rng.uniform(0.5, 0.9, 6)).to_csv(paths[-1], index=False)
        return paths

    evaluation = {"protocol": "clean", "unit": "voxel"}
    files = {k: csvs(k) for k in ABLATION_ROWS}
    out = {k: str(tmp_path / f"ablation.{k}") for k in ("csv", "md")} | {"per_seed": str(tmp_path / "ablation_per_seed.csv")}
    _run_script("ablation_table.py", tmp_path, _named(files), out,
                {"counts": {k: [4, 16] for k in ABLATION_ROWS}, "evaluation": evaluation, "seeds": seeds})
    table = pd.read_csv(out["csv"])
    assert table["Seeds"].tolist() == [3] * 6 and "p (Wilcoxon vs full)" in table
    assert pd.read_csv(out["per_seed"]).shape == (18, 8)

    sweep_files = [p for k in ("aua", "full") for p in files[k]]  # row-major: value, then seed
    out = {k: str(tmp_path / f"sweep.{k}") for k in ("csv", "md")} | {"per_seed": str(tmp_path / "sweep_per_seed.csv")}
    _run_script("sweep_table.py", tmp_path, sweep_files, out,
                {"rows": {"values": [0.01, 0.09], "counts": [[4, 16], [4, 16]], "reference": 0.09},
                 "evaluation": evaluation, "seeds": seeds}, {"sweep": "lambda_c"})
    table = pd.read_csv(out["csv"])
    assert table["p (Wilcoxon vs lambda_c = 0.09)"].tolist()[1] == "—"
    per_seed = pd.read_csv(out["per_seed"])
    np.testing.assert_allclose(per_seed["Dice[%]"][3:],
                               [100 * pd.read_csv(p)["dice"].mean() for p in files["full"]])

    cmp_files = {k: csvs(k) for k in ("mt", "full", "supervised")}
    out = {k: str(tmp_path / f"cmp.{k}") for k in ("csv", "md")} | {"per_seed": str(tmp_path / "cmp_per_seed.csv")}
    params = {"methods": ["mt", "full", "supervised"], "seeds": seeds,
              "counts": {k: [4, 16] for k in cmp_files}, "evaluation": evaluation}
    _run_script("comparison_table.py", tmp_path, _named(cmp_files), out, params)
    assert pd.read_csv(out["csv"])["Method"].tolist() == ["Supervised baseline", "MT", "Ours (full)"]

    png = str(tmp_path / "cmp.png")
    _run_script("figure_comparison.py", tmp_path, _named(cmp_files), {"png": png},
                {"methods": ["mt", "full", "supervised"], "seeds": seeds, "size": [5, 3], "dpi": 50},
                {"dataset": "demo", "split": "5pct"})
    assert mpimg.imread(png).ndim == 3
