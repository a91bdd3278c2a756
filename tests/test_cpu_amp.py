"""training.cpu_amp: bfloat16 autocast for training on CPUs with bfloat16 units (detected),
float32 elsewhere; an explicit value forces either."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch

from semiseg import precision
from semiseg.precision import cpu_bf16_units, training_autocast_dtype
from semiseg.training import engine
from semiseg.training.engine import TrainConfig, train
from tests.test_stage2 import artifacts, stage1  # noqa: F401  (fixtures)
from tests.test_training import TINY, tiny_cases  # noqa: F401  (fixture)


@pytest.mark.parametrize(
    ("device", "amp", "cpu_amp", "units", "expected"),
    [
        ("cpu", True, "auto", ["amx_bf16"], torch.bfloat16),
        ("cpu", True, "auto", ["avx512_bf16"], torch.bfloat16),
        ("cpu", True, "auto", [], None),  # emulated bfloat16 would be slower than float32
        ("cpu", False, "bfloat16", [], torch.bfloat16),  # forced; training.amp is CUDA's
        ("cpu", True, "off", ["amx_bf16"], None),
        ("cuda", True, "off", [], torch.float16),
        ("cuda", False, "bfloat16", ["amx_bf16"], None),
        ("mps", True, "bfloat16", ["amx_bf16"], None),
    ],
)
def test_training_autocast_dtype(monkeypatch, device, amp, cpu_amp, units, expected):
    monkeypatch.setattr(precision, "cpu_bf16_units", lambda: units)
    assert training_autocast_dtype(device, amp, cpu_amp) == expected


def test_bad_cpu_amp_is_rejected():
    with pytest.raises(ValueError, match="cpu_amp must be one of auto, bfloat16, off"):
        training_autocast_dtype("cpu", True, "fp16")
    with pytest.raises(ValueError, match="cpu_amp must be one of"):
        TrainConfig(method="supervised", cpu_amp="yes")


def test_cpu_bf16_units_reads_this_cpu():
    units = cpu_bf16_units()
    assert set(units) <= {"amx_bf16", "avx512_bf16"}
    caps = torch._C._cpu._get_cpu_capability()
    assert bool(units) == bool(caps.get("amx_bf16") or caps.get("avx512_bf16"))


@pytest.mark.parametrize("method", ["supervised", "aua_bcl"])
@pytest.mark.usefixtures("reference_convolutions")
def test_training_runs_the_network_in_bfloat16_and_the_losses_in_float32(tiny_cases, tmp_path, monkeypatch, caplog, method):  # noqa: F811
    """cpu_amp: bfloat16 on the CPU: convolutions under bfloat16 autocast, every logged loss
    finite, and the run's model file loads in float32."""
    lab, unl = tiny_cases
    seen: list[torch.dtype] = []
    real_autocast = engine.autocast

    def recording_autocast(device, enabled=True, dtype=None):
        if enabled:
            seen.append(dtype)
        return real_autocast(device, enabled=enabled, dtype=dtype)

    monkeypatch.setattr(engine, "autocast", recording_autocast)
    conv_dtypes: list[torch.dtype] = []
    real_conv = torch.nn.Conv3d.forward

    def conv_forward(self, x):
        out = real_conv(self, x)
        conv_dtypes.append(out.dtype)
        return out

    monkeypatch.setattr(torch.nn.Conv3d, "forward", conv_forward)
    checked: list[bool] = []
    real_check = engine.cpu_kernels_agree

    def kernel_check(*args, **kwargs):  # its float32 and bfloat16 probes are not the training's convs
        checked.append(real_check(*args, **kwargs))
        conv_dtypes.clear()
        return checked[-1]

    monkeypatch.setattr(engine, "cpu_kernels_agree", kernel_check)
    cfg = TrainConfig(method=method, lambda_c=0.1 if method == "aua_bcl" else 0.0, cpu_amp="bfloat16", **{**TINY, "iterations": 2})
    with caplog.at_level(logging.INFO, logger="semiseg.training"):
        model = train(cfg, lab, unl, tmp_path, device="cpu", progress=False)
    assert checked == [True]  # this CPU's kernels agree at these shapes
    assert seen == [torch.bfloat16, torch.bfloat16]
    # The backbone's convolutions in bfloat16 (a head that the precision module keeps in
    # float32 may add float32 ones).
    assert conv_dtypes[0] == torch.bfloat16 and conv_dtypes.count(torch.bfloat16) > 0.8 * len(conv_dtypes)
    assert "training precision on the CPU: bfloat16 autocast (cpu_amp bfloat16" in caplog.text
    rows = (tmp_path / "losses.csv").read_text(encoding="utf-8").splitlines()
    header = rows[0].split(",")
    values = np.array([[float(v) for v in r.split(",")] for r in rows[1:]])
    assert np.isfinite(values).all(), dict(zip(header, values.T))
    net = engine.load_model(model)
    assert all(p.dtype == torch.float32 for p in net.parameters())


def test_off_trains_in_float32(tiny_cases, tmp_path, caplog):  # noqa: F811
    lab, _ = tiny_cases
    cfg = TrainConfig(method="supervised", cpu_amp="off", **{**TINY, "iterations": 1})
    with caplog.at_level(logging.INFO, logger="semiseg.training"):
        train(cfg, lab, [], tmp_path, device="cpu", progress=False)
    assert "training precision on the CPU: float32 (cpu_amp off" in caplog.text


class _NaNBackward(torch.autograd.Function):
    """Identity forward, NaN gradient: what a faulty bfloat16 kernel's backward gives."""

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        return grad * float("nan")


def _faulty_bf16_steps(monkeypatch, faulty_calls: int | None = None) -> list[bool]:
    """Make the loss's gradient NaN whenever a step runs under CPU autocast (the first
    ``faulty_calls`` such steps, or all); returns the autocast flag of every step call."""
    calls: list[bool] = []
    real = engine.make_step

    def make_step(*args, **kwargs):
        step = real(*args, **kwargs)

        def faulty(batch, t):
            loss, terms = step(batch, t)
            in_bf16 = torch.is_autocast_enabled("cpu")
            calls.append(in_bf16)
            if in_bf16 and (faulty_calls is None or sum(calls) <= faulty_calls):
                loss = _NaNBackward.apply(loss)
            return loss, terms

        return faulty

    monkeypatch.setattr(engine, "make_step", make_step)
    return calls


def _rows(path):
    rows = (path / "losses.csv").read_text(encoding="utf-8").splitlines()
    header = rows[0].split(",")
    return [dict(zip(header, map(float, r.split(",")))) for r in rows[1:]]


@pytest.mark.parametrize("method", ["aua_bcl", "full"])
@pytest.mark.usefixtures("reference_convolutions")
def test_bfloat16_steps_with_non_finite_gradients_are_computed_again_in_float32(
        tiny_cases, artifacts, tmp_path, monkeypatch, caplog, method):  # noqa: F811
    """A bfloat16 step whose gradients are not finite is computed again in float32 from the same
    RNG states, batch-norm statistics and prototype statistics; after BF16_REDO_LIMIT such
    steps the run goes on in float32. With every bfloat16 step faulty, the weights end as a
    float32 run's do, bit for bit."""
    lab, unl = tiny_cases
    pseudo, protos = artifacts
    extra = dict(pseudo=pseudo, prototypes=protos) if method == "full" else {}
    kw = dict(lambda_c=0.1) if method == "aua_bcl" else dict(lambda_r=0.1)
    iterations = engine.BF16_REDO_LIMIT + 2
    ref = train(TrainConfig(method=method, cpu_amp="off", **kw, **{**TINY, "iterations": iterations}), lab, unl,
                tmp_path / "fp32", device="cpu", progress=False, **extra)
    calls = _faulty_bf16_steps(monkeypatch)
    with caplog.at_level(logging.WARNING, logger="semiseg.training"):
        got = train(TrainConfig(method=method, cpu_amp="bfloat16", **kw, **{**TINY, "iterations": iterations}), lab, unl,
                    tmp_path / "bf16", device="cpu", progress=False, **extra)
    limit = engine.BF16_REDO_LIMIT
    assert calls == [True, False] * limit + [False] * (iterations - limit)
    assert [r["float32_redo"] for r in _rows(tmp_path / "bf16")] == [1.0] * limit + [0.0] * (iterations - limit)
    assert caplog.text.count("non-finite gradients in bfloat16") == limit
    assert "the rest of this run trains in float32" in caplog.text
    assert "computing this step again in float32" in caplog.text and "backbone.enc1.0.weight" in caplog.text  # names the parameters
    a, b = (torch.load(p, weights_only=True) for p in (ref, got))
    for part in ("student", "teacher", "prototypes"):
        if a[part] is not None:
            assert all(torch.equal(a[part][k], b[part][k]) for k in a[part]), part


@pytest.mark.usefixtures("reference_convolutions")
def test_a_single_faulty_bfloat16_step_leaves_the_rest_in_bfloat16(tiny_cases, tmp_path, monkeypatch):  # noqa: F811
    lab, unl = tiny_cases
    calls = _faulty_bf16_steps(monkeypatch, faulty_calls=1)
    train(TrainConfig(method="aua_bcl", lambda_c=0.1, cpu_amp="bfloat16", **{**TINY, "iterations": 3}), lab, unl, tmp_path,
          device="cpu", progress=False)
    assert calls == [True, False, True, True]
    assert [r["float32_redo"] for r in _rows(tmp_path)] == [1.0, 0.0, 0.0]


def test_non_finite_gradients_in_float32_stop_the_run_and_name_the_parameters(tiny_cases, tmp_path, monkeypatch):  # noqa: F811
    lab, unl = tiny_cases
    real = engine.make_step

    def make_step(*args, **kwargs):
        step = real(*args, **kwargs)
        return lambda batch, t: (lambda loss, terms: (_NaNBackward.apply(loss) if t == 1 else loss, terms))(*step(batch, t))

    monkeypatch.setattr(engine, "make_step", make_step)
    with pytest.raises(FloatingPointError, match=r"non-finite gradients at iteration 1 \(float32\).*parameters: backbone.enc1.0.weight"):
        train(TrainConfig(method="supervised", cpu_amp="off", **{**TINY, "iterations": 3}), [*lab], [], tmp_path,
              device="cpu", progress=False, checkpoint_every=1)
    assert not (tmp_path / "model.pt").exists()
    assert [r["iteration"] for r in _rows(tmp_path)] == [0.0]  # the last checkpoint's history, before the fault


@pytest.mark.usefixtures("reference_convolutions")
def test_a_bfloat16_step_whose_float32_redo_is_not_finite_stops_the_run(tiny_cases, tmp_path, monkeypatch):  # noqa: F811
    lab, unl = tiny_cases
    real = engine.make_step

    def make_step(*args, **kwargs):
        step = real(*args, **kwargs)
        return lambda batch, t: (lambda loss, terms: (_NaNBackward.apply(loss), terms))(*step(batch, t))

    monkeypatch.setattr(engine, "make_step", make_step)
    with pytest.raises(FloatingPointError, match=r"non-finite gradients at iteration 0 \(float32\)"):
        train(TrainConfig(method="aua_bcl", lambda_c=0.1, cpu_amp="bfloat16", **{**TINY, "iterations": 2}), lab, unl, tmp_path,
              device="cpu", progress=False)
    assert not (tmp_path / "model.pt").exists()
