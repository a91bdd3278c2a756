"""Model, checkpoint and snapshot files load with ``weights_only=True``: loading never runs code."""

from __future__ import annotations

import pickle
import random

import numpy as np
import pytest
import torch

from semiseg.training.engine import TrainConfig, _rng_state, _set_rng_state, load_model, read_torch_file, train
from test_training import TINY, tiny_cases  # noqa: F401 (fixture)


def test_rng_state_round_trips_through_a_weights_only_file(tmp_path):
    torch.manual_seed(1), random.seed(2), np.random.seed(3)
    torch.save(_rng_state(), tmp_path / "rng.pt")
    expected = (torch.rand(3), random.random(), np.random.standard_normal(3))
    _set_rng_state(torch.load(tmp_path / "rng.pt", weights_only=True))
    got = (torch.rand(3), random.random(), np.random.standard_normal(3))
    assert torch.equal(got[0], expected[0]) and got[1] == expected[1] and np.array_equal(got[2], expected[2])


def test_model_and_checkpoint_load_weights_only(tiny_cases, tmp_path):  # noqa: F811
    lab, unl = tiny_cases
    model = train(TrainConfig(method="aua_bcl", lambda_c=0.1, **{**TINY, "iterations": 2}), lab, unl, tmp_path,
                  device="cpu", checkpoint_every=1, progress=False)
    for path in (model, tmp_path / "checkpoint.pt"):
        assert isinstance(torch.load(path, weights_only=True), dict)
    assert load_model(model, "teacher").aleatoric is not None


def test_a_file_that_is_not_a_semiseg_model_fails_with_one_line(tmp_path):
    class Payload:  # any pickled object: weights_only refuses to build it
        def __reduce__(self):
            return (print, ("this must never run",))

    evil = tmp_path / "evil.pt"
    with open(evil, "wb") as fh:
        pickle.dump({"format": "semiseg-model-1", "x": Payload()}, fh, protocol=2)
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a model at all")
    other = tmp_path / "other.pt"
    torch.save({"weights": torch.zeros(2)}, other)
    for path in (evil, garbage, other):
        with pytest.raises(ValueError) as err:
            load_model(path)
        message = str(err.value)
        assert str(path) in message and "not a semiseg model file" in message and "\n" not in message
    with pytest.raises(FileNotFoundError):
        read_torch_file(tmp_path / "missing.pt")


def test_an_unreadable_checkpoint_is_ignored_with_a_warning(tiny_cases, tmp_path, caplog):  # noqa: F811
    lab, unl = tiny_cases
    (tmp_path / "checkpoint.pt").write_bytes(b"truncated")
    cfg = TrainConfig(method="supervised", **{**TINY, "iterations": 1})
    with caplog.at_level("WARNING", logger="semiseg.training"):
        train(cfg, lab, unl, tmp_path, device="cpu", checkpoint_every=1, progress=False)
    assert "not a semiseg checkpoint file" in caplog.text
    assert read_torch_file(tmp_path / "checkpoint.pt", what="checkpoint")["iteration"] == 1
