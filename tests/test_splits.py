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
    assert rec["counts"] == {"test": 8, "labelled": 6, "unlabelled": 26, "extra_unlabelled": 0} and rec["dataset"] == "x"


def test_split_from_config_reads_list_files():
    train = read_list(REPO / "workflow/resources/splits/pancreas_train.list")
    test = read_list(REPO / "workflow/resources/splits/pancreas_test.list")
    cfg = {"test_list": "workflow/resources/splits/pancreas_test.list", "train_list": "workflow/resources/splits/pancreas_train.list"}
    s = split_from_config(train + test, cfg, {"labelled_percent": 20}, base=REPO)
    assert len(s.labelled) == 12 and s.test == test


COLON = [f"colon_{i:03d}" for i in range(1, 127)]  # 126 labelled MSD Task10_Colon volumes


def colon_split_config() -> dict:
    import yaml

    return yaml.safe_load((REPO / "config.yaml").read_text(encoding="utf-8"))["datasets"]["colon"]


def test_colon_seeded_split_is_26_test_100_train_and_one_value_away_from_another():
    ds = colon_split_config()
    s = split_from_config(COLON, ds["split"], ds["splits"]["5pct"])
    assert (len(s.test), len(s.train), len(s.labelled)) == (26, 100, 5) and s.labelled == s.train[:5]
    assert s == split_from_config(list(reversed(COLON)), ds["split"], ds["splits"]["5pct"])  # deterministic
    other = split_from_config(COLON, {**ds["split"], "seed": 1}, ds["splits"]["5pct"])
    assert other.test != s.test and len(other.test) == 26


def test_colon_explicit_lists_replace_the_draw(tmp_path):
    ds = colon_split_config()
    (tmp_path / "test.list").write_text("\n".join(COLON[-26:]) + "\n", encoding="utf-8")
    s = split_from_config(COLON, {**ds["split"], "test_list": "test.list"}, ds["splits"]["5pct"], base=tmp_path)
    assert s.test == COLON[-26:] and len(s.train) == 100
    drawn = split_from_config(COLON, ds["split"], ds["splits"]["5pct"])
    ids = drawn.train[10:12][::-1]
    s = split_from_config(COLON, ds["split"], {"labelled_ids": ids})
    assert s.labelled == ids and s.test == drawn.test and len(s.unlabelled) == 98


def test_extra_unlabelled_images_join_the_unlabelled_pool_only(tmp_path):
    extra = ["colon_200", "colon_190"]
    s = make_split(COLON, seed=0, test_count=26, labelled_percent=5, extra_unlabelled=extra)
    assert s.extra_unlabelled == ["colon_190", "colon_200"] and s.unlabelled[-2:] == ["colon_190", "colon_200"]
    assert len(s.unlabelled) == 97 and len(s.train) == 100 and not set(extra) & set(s.train + s.test)
    assert "97 unlabelled (2 of them extra images without a label); 26 test" in s.statement
    plain = make_split(COLON, seed=0, test_count=26, labelled_percent=5)
    assert (plain.test, plain.labelled) == (s.test, s.labelled)  # the extras change nothing else
    write_split(s, tmp_path / "s")
    assert load_split(tmp_path / "s") == s
    capped = make_split(COLON, seed=0, test_count=26, labelled_percent=5, extra_unlabelled=extra, max_unlabelled=96)
    assert capped.extra_unlabelled == ["colon_190"]  # the training list's own unlabelled cases come first
    with pytest.raises(ValueError, match="extra unlabelled images with the ID of a labelled case: colon_001"):
        make_split(COLON, seed=0, test_count=26, labelled_percent=5, extra_unlabelled=["colon_001"])


def test_shipped_lists_are_the_published_ones():
    published = REPO.parent / "shared" / "data" / "splits"
    if not published.is_dir():
        pytest.skip(f"published lists not found at {published}")
    for name in ("pancreas_train", "pancreas_test", "LA_train", "LA_test"):
        assert read_list(REPO / f"workflow/resources/splits/{name}.list") == read_list(published / f"{name}.list"), name
    assert (len(read_list(published / "pancreas_train.list")), len(read_list(published / "LA_train.list"))) == (60, 80)
