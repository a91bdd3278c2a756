"""Shared test helpers: write small raw cases in any SimpleITK format."""

from __future__ import annotations

import os
from pathlib import Path

# Under pytest-xdist (pyproject.toml: one worker per CPU), each worker and what it starts
# (PyTorch in the tests, Snakemake jobs that do not set their own threads) shares the CPUs
# with the other workers: a fair share of threads each, not every CPU each, which
# oversubscribes the cores (OpenMP threads spinning against each other).
if os.environ.get("PYTEST_XDIST_WORKER_COUNT"):
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // int(os.environ["PYTEST_XDIST_WORKER_COUNT"]))))

import numpy as np
import pytest
import SimpleITK as sitk

from semiseg.io.readers import Geometry, from_xyz_array

REPO = Path(__file__).resolve().parents[1]
LA_H5 = Path(os.environ.get("SEMISEG_LA_H5", REPO.parent / "shared" / "data" / "la2018_h5"))

IDENTITY = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)


def write_volume(path: Path, array: np.ndarray, geometry: Geometry) -> Path:
    """Write an (x, y, z) array with ``geometry`` to ``path`` (format from the suffix)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(from_xyz_array(array, geometry), str(path), useCompression=path.suffix == ".gz")
    return path


def phantom(shape=(40, 36, 20), spacing=(0.8, 0.8, 2.5), origin=(-10.0, 20.0, -30.0), direction=IDENTITY, seed=0):
    """A small CT-like volume (int16 HU) with an ellipsoid foreground label.

    Returns (image, label, geometry); the body is a cylinder of soft tissue in air.
    """
    rng = np.random.default_rng(seed)
    x, y, z = np.meshgrid(*(np.arange(n) for n in shape), indexing="ij")
    cx, cy = (shape[0] - 1) / 2, (shape[1] - 1) / 2
    body = ((x - cx) / (0.4 * shape[0])) ** 2 + ((y - cy) / (0.4 * shape[1])) ** 2 <= 1
    image = np.full(shape, -1000, dtype=np.int16)
    image[body] = 40
    lab = ((x - cx - 3) / 6.0) ** 2 + ((y - cy) / 5.0) ** 2 + ((z - shape[2] / 2) / 3.0) ** 2 <= 1
    image[lab] = 300  # above the clip window, so clipping is visible
    image = (image + rng.normal(0, 5, size=shape)).astype(np.int16)
    geom = Geometry(tuple(shape), tuple(float(s) for s in spacing), tuple(float(o) for o in origin), tuple(direction))
    return image, lab.astype(np.uint8), geom


@pytest.fixture
def la_h5_dir() -> Path:
    if not LA_H5.is_dir():
        pytest.skip(f"real LA cases not found at {LA_H5} (set SEMISEG_LA_H5 to their folder)")
    return LA_H5


@pytest.fixture
def reference_convolutions():
    """PyTorch's own CPU convolutions (oneDNN off) for one test.

    Tests of the engine's bfloat16 logic (autocast, float32 redo, kernel-check fallback) must
    not depend on this host's oneDNN kernels: on CPUs with AVX-512-BF16 and no AMX, oneDNN's
    bfloat16 weight gradient is wrong over 2x2x2 inputs (docs/benchmarks.md), which the tiny
    test networks have. The kernel check's own tests on the host's kernels are in
    tests/test_bf16_kernel_check.py.
    """
    import warnings

    import torch

    with warnings.catch_warnings():  # setting the flags warns of a TF32 option for Intel GPUs, every time
        warnings.filterwarnings("ignore", message="TF32 acceleration on top of oneDNN", category=UserWarning)
        with torch.backends.mkldnn.flags(enabled=False):
            yield


@pytest.fixture(scope="session")
def micro_run(tmp_path_factory) -> Path:
    """A micro demo run of the whole workflow (models, tables, figures), built once a session.

    Tests may change its ``config.yaml`` for a dry run and must restore it
    (``tests.test_workflow.micro_config``); a test that runs jobs copies it first.
    """
    from tests.test_workflow import build_micro_run

    return build_micro_run(tmp_path_factory.mktemp("micro"))


@pytest.hookimpl(tryfirst=True)  # before xdist reads the groups
def pytest_collection_modifyitems(config, items):
    """pytest-xdist groups (``--dist loadgroup``): tests that share a fixture built once per
    session or module run in one worker, so that it is still built once.

    - every test that uses the micro demo run (``micro_run``, directly or through another
      fixture): group ``micro``;
    - every test that uses a module-scoped fixture of its own module (the SLURM run, the
      layout run, the device check's smoke run, small trained models): that module's group;
    - every other test is sent to whichever worker is free.
    """
    for item in items:
        info = getattr(item, "_fixtureinfo", None)
        if info is None:
            continue
        if "micro_run" in info.names_closure:
            group = "micro"
        else:
            module = item.nodeid.split("::")[0]
            shared = [d for defs in info.name2fixturedefs.values() for d in defs
                      if d.scope in ("module", "session") and d.baseid == module]
            group = module if shared else None
        if group is not None:
            item.add_marker(pytest.mark.xdist_group(group))


class _GroupsTookEffect:
    """In an xdist worker: stop the run when the groups did not reach xdist's scheduler.

    xdist passes a test's group by appending ``@<group>`` to its node ID while the worker
    collects; where that has no effect (pytest 9.2, pytest-xdist issue 1386), grouped tests
    would silently run side by side in two workers (two SLURM clusters started and
    stopped under each other, two tests editing the micro run's config.yaml at once).
    """

    @pytest.hookimpl(trylast=True)  # after xdist's own hook
    def pytest_collection_modifyitems(self, config, items):
        if not getattr(config.option, "loadgroup", False):
            return
        lost = [item.nodeid for item in items if item.get_closest_marker("xdist_group") and "@" not in item.nodeid]
        if lost:
            raise pytest.UsageError(
                f"pytest-xdist's --dist loadgroup did not group {len(lost)} tests (e.g. {lost[0]}): this pytest and "
                "pytest-xdist do not work together (pytest-xdist issue 1386); install the test extra's versions "
                "(pip install -e '.[test]') or run in one process (-n 0)"
            )


def pytest_configure(config):
    if os.environ.get("PYTEST_XDIST_WORKER"):
        config.pluginmanager.register(_GroupsTookEffect(), "semiseg-xdist-groups")
