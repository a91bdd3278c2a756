"""Splits: determinism, sizes, the paper's rounding, published lists verbatim."""

import json
from pathlib import Path

import pytest

from semiseg.splits import labelled_count, load_split, make_split, read_list, split_from_config, write_split

REPO = Path(__file__).resolve().parents[1]
CASES = [f"c{i:03d}" for i in range(40)]


@pytest.mark.parametrize(
    ("percent", "n", "expected"),
    [(5, 60, 3), (20, 60, 12), (20, 62, 12), (5, 62, 3), (5, 100, 5), (20, 80, 16), (5, 80, 4), (5, 32, 2), (20, 32, 6), (5, 10, 1), (2.5, 60, 2)],
)
def test_labelled_count_rounding(percent, n, expected):
    assert labelled_count(percent, n) == expected


def test_deterministic_given_seed():
    a = make_split(CASES, seed=3, test_fraction=0.2, labelled_percent=5)
    b = make_split(list(reversed(CASES)), seed=3, test_fraction=0.2, labelled_percent=5)
    c = make_split(CASES, seed=4, test_fraction=0.2, labelled_percent=5)
    assert a == b and a.test != c.test


def test_sizes_and_disjointness():
    s = make_split(CASES, seed=0, test_fraction=0.2, labelled_percent=5)
    assert (len(s.test), len(s.labelled), len(s.unlabelled)) == (8, 2, 30)
    assert set(s.test).isdisjoint(s.train) and sorted(s.test + s.train) == CASES
    assert "5% of 32 training cases = 1.6, rounded half up to 2" in s.statement


def test_labelled_sets_nest_across_percentages():
    s5 = make_split(CASES, seed=1, test_count=8, labelled_percent=5)
    s20 = make_split(CASES, seed=1, test_count=8, labelled_percent=20)
    assert s5.test == s20.test and s5.train == s20.train
    assert s20.labelled[: len(s5.labelled)] == s5.labelled


def test_published_lists_verbatim():
    train = read_list(REPO / "workflow/resources/splits/pancreas_train.list")
    test = read_list(REPO / "workflow/resources/splits/pancreas_test.list")
    s = make_split(train + test, test_ids=test, train_ids=train, labelled_percent=5)
    assert s.test == test and s.labelled == ["PANCREAS_0031", "PANCREAS_0069", "PANCREAS_0003"]
    s20 = make_split(train + test, test_ids=test, train_ids=train, labelled_percent=20)
    assert s20.labelled == train[:12] and s20.unlabelled == train[12:] and len(s20.unlabelled) == 48
    la_train = read_list(REPO / "workflow/resources/splits/LA_train.list")
    la = make_split(la_train + read_list(REPO / "workflow/resources/splits/LA_test.list"),
                    test_ids=read_list(REPO / "workflow/resources/splits/LA_test.list"), train_ids=la_train, labelled_percent=20)
    assert len(la.labelled) == 16 and la.labelled == la_train[:16]


def test_explicit_labelled_ids_and_max_unlabelled():
    s = make_split(CASES, test_ids=CASES[:8], labelled_ids=["c011", "c010"], max_unlabelled=5, seed=0)
    assert s.labelled == ["c011", "c010"] and len(s.unlabelled) == 5


def test_bad_lists_are_named():
    with pytest.raises(ValueError, match="test list: 1 case"):
        make_split(CASES, test_ids=["nope"], labelled_percent=5)
    with pytest.raises(ValueError, match="both the training and the test"):
        make_split(CASES, test_ids=["c000"], train_ids=["c000", "c001"], labelled_percent=5)
    with pytest.raises(ValueError, match="labelled list"):
        make_split(CASES, test_count=8, labelled_ids=["zzz"])


def test_write_and_load(tmp_path):
    s = make_split(CASES, seed=0, test_fraction=0.2, labelled_percent=20)
    write_split(s, tmp_path / "s", extra={"dataset": "x"})
    assert load_split(tmp_path / "s") == s
    assert (tmp_path / "s" / "labelled.txt").read_text(encoding="utf-8").split() == s.labelled
    rec = json.loads((tmp_path / "s" / "split.json").read_text(encoding="utf-8"))
    assert rec["counts"] == {"test": 8, "labelled": 6, "unlabelled": 26} and rec["dataset"] == "x"


def test_split_from_config_reads_list_files():
    train = read_list(REPO / "workflow/resources/splits/pancreas_train.list")
    test = read_list(REPO / "workflow/resources/splits/pancreas_test.list")
    cfg = {"test_list": "workflow/resources/splits/pancreas_test.list", "train_list": "workflow/resources/splits/pancreas_train.list"}
    s = split_from_config(train + test, cfg, {"labelled_percent": 20}, base=REPO)
    assert len(s.labelled) == 12 and s.test == test
