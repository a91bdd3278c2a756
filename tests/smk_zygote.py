"""Snakemake runs for the tests without paying Snakemake's start each time.

``python -m snakemake`` spends about 1.3 s of CPU importing Snakemake, its plugins and
pandas before it reads the Snakefile; the suite starts it some sixty times. This module is
preloaded once into a ``multiprocessing`` fork server (a zygote: a process that has done
the imports and does nothing else). Each run is a fork of it that calls
``snakemake.cli.main`` with the run's arguments, working directory and environment, with
its standard output and error redirected to files, exactly as ``python -m snakemake``
(``snakemake/__main__.py``) would; the fork's exit code is the run's.

The zygote imports the SLURM executor plugin with a failing ``scontrol`` first on PATH
(see ``tests.test_workflow.no_scontrol_path``), as every non-SLURM run of the suite does:
the plugin asks ``scontrol`` for the cluster's configuration at import time. Runs that
need the real ``scontrol`` (tests/test_slurm.py) start ``python -m snakemake`` as a
process of their own.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import subprocess
import sys
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path

_ZYGOTE_PATH = os.environ.get("SEMISEG_TEST_ZYGOTE_PATH")
if _ZYGOTE_PATH is not None:  # inside the fork server, while it preloads this module
    os.environ["PATH"] = _ZYGOTE_PATH
    import snakemake.api  # noqa: F401
    import snakemake.cli  # noqa: F401
    import snakemake.scheduling.job_scheduler  # noqa: F401
    import snakemake_executor_plugin_slurm  # noqa: F401  (pandas, the scontrol question)

_CONTEXT = None


def _context(path: str):
    """The fork-server context, its server started with ``path`` as PATH (once a process)."""
    global _CONTEXT
    if _CONTEXT is None:
        ctx = mp.get_context("forkserver")
        ctx.set_forkserver_preload([__name__])
        saved = os.environ.get("SEMISEG_TEST_ZYGOTE_PATH")
        os.environ["SEMISEG_TEST_ZYGOTE_PATH"] = path
        try:
            from multiprocessing import forkserver

            forkserver.ensure_running()  # started now, with the variable above
        finally:
            if saved is None:
                del os.environ["SEMISEG_TEST_ZYGOTE_PATH"]
            else:
                os.environ["SEMISEG_TEST_ZYGOTE_PATH"] = saved
        _CONTEXT = ctx
    return _CONTEXT


def _child(argv: list[str], cwd: str, env: dict[str, str], out: str, err: str) -> None:
    """In the fork: what ``python -m snakemake <argv>`` does, in ``cwd`` with ``env``."""
    os.chdir(cwd)
    os.environ.clear()
    os.environ.update(env)
    os.environ.pop("SEMISEG_TEST_ZYGOTE_PATH", None)
    for fd, name in ((1, out), (2, err)):
        target = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.dup2(target, fd)
        os.close(target)
    sys.argv = ["snakemake", *argv]
    from snakemake.cli import main

    main(argv)  # exits through SystemExit: multiprocessing makes its code the exit code


def run_snakemake(argv: Sequence[str], cwd: str | Path, env: Mapping[str, str], timeout: float) -> subprocess.CompletedProcess:
    """Run Snakemake's command line with ``argv`` in a fork of the zygote.

    ``env`` must carry the PATH the zygote was started with (the first call's); returns
    what :func:`subprocess.run` with ``capture_output`` and text would. On ``timeout``
    the fork is killed and :class:`subprocess.TimeoutExpired` raised.
    """
    ctx = _context(env["PATH"])
    with tempfile.TemporaryDirectory(prefix="smk-run-") as tmp:
        out, err = os.path.join(tmp, "stdout"), os.path.join(tmp, "stderr")
        proc = ctx.Process(target=_child, args=(list(argv), str(cwd), dict(env), out, err))
        proc.start()
        proc.join(timeout)
        if proc.is_alive():
            proc.kill()
            proc.join()
            raise subprocess.TimeoutExpired(["snakemake", *argv], timeout)

        def read(name: str) -> str:
            return Path(name).read_text(encoding="utf-8", errors="replace") if os.path.exists(name) else ""

        return subprocess.CompletedProcess(["snakemake", *argv], proc.exitcode, read(out), read(err))
