"""Train/test splits and labelled/unlabelled training lists.

The field's convention: the labelled cases are the first N IDs of the training list, with
N the labelled percentage of the training cases rounded half up (5% of 60 = 3, 20% of
60 = 12, 20% of 62 = 12, 5% of 32 = 2). Lists are deterministic given the seed, or taken
verbatim from published lists. Extra unlabelled images (cases without a label, e.g. MSD
``imagesTs``) join the unlabelled list of every split, after the training list's own
unlabelled cases; they are never test, labelled or "training" cases (the fully supervised
upper bound does not see them).
"""

from __future__ import annotations

import json
import random
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from fractions import Fraction
from pathlib import Path

from semiseg.io.atomic import atomic_write_text


@dataclass(frozen=True)
class Split:
    """A data set split: ``test``, ``labelled`` and ``unlabelled`` training case IDs.

    ``extra_unlabelled``: the cases of ``unlabelled`` that have no label at all (extra
    unlabelled images); ``train`` (labelled + the other unlabelled cases) excludes them.
    """

    test: list[str]
    labelled: list[str]
    unlabelled: list[str]
    statement: str
    extra_unlabelled: list[str] = field(default_factory=list)

    @property
    def train(self) -> list[str]:
        extra = set(self.extra_unlabelled)
        return self.labelled + [c for c in self.unlabelled if c not in extra]


def labelled_count(percent: float, n_train: int) -> int:
    """Number of labelled cases for ``percent`` % of ``n_train``: rounded half up, at least 1."""
    if not 0 < percent <= 100:
        raise ValueError(f"labelled percentage must be in (0, 100], got {percent}")
    exact = Fraction(str(percent)) * n_train / 100
    return max(1, int(exact + Fraction(1, 2)))


def read_list(path: str | Path) -> list[str]:
    """Case IDs from a text file, one per line (blank lines and ``#`` comments ignored)."""
    ids = []
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            ids.append(line)
    return ids


def _check_known(ids: Sequence[str], known: set[str], what: str) -> None:
    missing = [c for c in ids if c not in known]
    if missing:
        shown = ", ".join(missing[:8]) + (" ..." if len(missing) > 8 else "")
        raise ValueError(f"{what}: {len(missing)} case(s) not in the data set: {shown}")
    dup = sorted({c for c in ids if list(ids).count(c) > 1})
    if dup:
        raise ValueError(f"{what}: duplicated case IDs: {', '.join(dup)}")


def make_split(
    cases: Sequence[str],
    *,
    seed: int = 0,
    test_ids: Sequence[str] | None = None,
    test_fraction: float | None = None,
    test_count: int | None = None,
    train_ids: Sequence[str] | None = None,
    labelled_percent: float | None = None,
    labelled_number: int | None = None,
    labelled_ids: Sequence[str] | None = None,
    max_unlabelled: int | None = None,
    extra_unlabelled: Sequence[str] = (),
) -> Split:
    """Split ``cases`` into test, labelled and unlabelled training lists.

    Test set: ``test_ids`` verbatim, else ``test_count`` or ``round(test_fraction * n)``
    cases drawn with ``seed``. Training list: ``train_ids`` verbatim (order kept), else
    the remaining cases shuffled with ``seed`` (the same for every labelled percentage,
    so the 5% labelled set is inside the 20% one). Labelled: ``labelled_ids`` verbatim,
    else the first ``labelled_number`` or :func:`labelled_count` of ``labelled_percent``.
    ``extra_unlabelled`` (case IDs without a label, not among ``cases``) are appended to
    the unlabelled list. ``max_unlabelled`` keeps the first that many unlabelled cases
    (the Table VIII sweep; the training list's own unlabelled cases come first).
    """
    cases = sorted(set(cases))
    known = set(cases)
    rng = random.Random(int(seed))
    if test_ids is not None:
        test = list(test_ids)
        _check_known(test, known, "test list")
    else:
        if test_count is None:
            if test_fraction is None:
                raise ValueError("give test_ids, test_count or test_fraction")
            test_count = int(Fraction(str(test_fraction)) * len(cases) + Fraction(1, 2))
        if not 0 <= test_count < len(cases):
            raise ValueError(f"test count {test_count} leaves no training case out of {len(cases)}")
        test = sorted(rng.sample(cases, test_count))
    if train_ids is not None:
        train = list(train_ids)
        _check_known(train, known, "training list")
    else:
        train = [c for c in cases if c not in set(test)]
        rng.shuffle(train)
    overlap = set(train) & set(test)
    if overlap:
        raise ValueError(f"cases in both the training and the test list: {', '.join(sorted(overlap))}")
    if labelled_ids is not None:
        labelled = list(labelled_ids)
        _check_known(labelled, set(train), "labelled list (must be training cases)")
        how = f"{len(labelled)} labelled cases given explicitly"
    else:
        if labelled_number is not None:
            n = int(labelled_number)
            how = f"{n} labelled cases as configured"
        elif labelled_percent is not None:
            n = labelled_count(labelled_percent, len(train))
            how = f"{labelled_percent:g}% of {len(train)} training cases = {float(Fraction(str(labelled_percent)) * len(train) / 100):g}, rounded half up to {n}"
        else:
            raise ValueError("give labelled_percent, labelled_number or labelled_ids")
        if not 1 <= n <= len(train):
            raise ValueError(f"{n} labelled cases requested but the training list has {len(train)}")
        labelled = train[:n]
    extra = sorted(set(extra_unlabelled))
    clash = sorted(set(extra) & known)
    if clash:
        shown = ", ".join(clash[:8]) + (" ..." if len(clash) > 8 else "")
        raise ValueError(f"extra unlabelled images with the ID of a labelled case: {shown}")
    unlabelled = [c for c in train if c not in set(labelled)] + extra
    if max_unlabelled is not None:
        unlabelled = unlabelled[: int(max_unlabelled)]
    extra = [c for c in unlabelled if c in set(extra)]
    statement = f"{how}; {len(unlabelled)} unlabelled"
    if extra:
        statement += f" ({len(extra)} of them extra images without a label)"
    statement += f"; {len(test)} test"
    return Split(test=test, labelled=labelled, unlabelled=unlabelled, statement=statement, extra_unlabelled=extra)


def write_split(split: Split, out_dir: str | Path, extra: dict | None = None) -> None:
    """Write ``test.txt``, ``labelled.txt``, ``unlabelled.txt`` and ``split.json`` atomically."""
    out = Path(out_dir)
    for name in ("test", "labelled", "unlabelled"):
        ids = getattr(split, name)
        atomic_write_text(out / f"{name}.txt", "".join(f"{c}\n" for c in ids))
    names = ("test", "labelled", "unlabelled", "extra_unlabelled")
    record = {**asdict(split), "counts": {k: len(getattr(split, k)) for k in names}}
    if extra:
        record.update(extra)
    atomic_write_text(out / "split.json", json.dumps(record, indent=2) + "\n")


def load_split(out_dir: str | Path) -> Split:
    """Read a split written by :func:`write_split`."""
    rec = json.loads((Path(out_dir) / "split.json").read_text(encoding="utf-8"))
    return Split(
        test=rec["test"], labelled=rec["labelled"], unlabelled=rec["unlabelled"], statement=rec["statement"],
        extra_unlabelled=rec.get("extra_unlabelled", []),
    )


def split_from_config(
    cases: Sequence[str], split_cfg: dict, selection: dict, base: str | Path = ".", extra_unlabelled: Sequence[str] = ()
) -> Split:
    """A :class:`Split` from a data set's ``split`` block and one ``splits`` entry.

    ``extra_unlabelled``: the data set's images without a label (see :func:`make_split`).
    """
    return make_split(
        cases,
        seed=int(split_cfg.get("seed", 0)),
        test_ids=read_list(Path(base) / split_cfg["test_list"]) if split_cfg.get("test_list") else None,
        train_ids=read_list(Path(base) / split_cfg["train_list"]) if split_cfg.get("train_list") else None,
        test_fraction=split_cfg.get("test_fraction"),
        test_count=split_cfg.get("test_count"),
        labelled_percent=selection.get("labelled_percent"),
        labelled_number=selection.get("labelled_number"),
        labelled_ids=selection.get("labelled_ids"),
        max_unlabelled=selection.get("max_unlabelled"),
        extra_unlabelled=extra_unlabelled,
    )
