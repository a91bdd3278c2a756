"""Running one pipeline job: logging to the rule's log file and one-line errors, and the
settings that decide which files a job reads.

Rule scripts wrap their work in :func:`job`, so that bad input ends the job with a single
line naming the case, the file and the problem (in the log and on stderr) and a non-zero
exit status, while Snakemake's ``--keep-going`` lets the other jobs finish.

:func:`between_stages_model` decides which stage-1 model file the pseudo-label and
prototype rules read (``between_stages.stage1_iteration``); the workflow's glue
(``workflow/rules/common.smk``) only calls it. This module imports no PyTorch, so the
workflow can use it while it parses.
"""

from __future__ import annotations

import contextlib
import logging
import sys
import traceback
from collections.abc import Iterator, Sequence
from pathlib import Path

from semiseg.errors import CaseError, ConfigError

log = logging.getLogger("semiseg")

#: The line format of every job log and per-case log.
LOG_FORMAT = "%(asctime)s %(levelname)s %(message)s"

#: The config key that picks the stage-1 model used between the stages.
STAGE1_ITERATION_KEY = "between_stages.stage1_iteration"


def stage1_snapshot_name(iteration: int) -> str:
    """File name of the stage-1 model after ``iteration`` iterations, next to its ``model.pt``."""
    return f"model_iter{int(iteration)}.pt"


def check_stage1_iteration(stage1_iteration: int | None, iterations: int, dataset: str) -> int | None:
    """``between_stages.stage1_iteration`` for one data set whose stage-1 runs take
    ``iterations`` iterations: the snapshot iteration, or None for the final model.

    Raises :class:`ConfigError` naming the key when it is not within 1..``iterations``.
    """
    if stage1_iteration is None:
        return None
    if isinstance(stage1_iteration, bool) or not isinstance(stage1_iteration, int) or not 1 <= stage1_iteration <= iterations:
        raise ConfigError(
            f"invalid configuration: {STAGE1_ITERATION_KEY}: {stage1_iteration!r} is not a stage-1 iteration of data set "
            f"{dataset!r}, whose stage-1 runs take {iterations} iterations; give 1..{iterations}, or null for the final model"
        )
    return stage1_iteration


def between_stages_model(stage1_dir: str, stage1_iteration: int | None, iterations: int, dataset: str) -> str:
    """The stage-1 model file that pseudo labels and prototypes are made from.

    ``stage1_dir``: the AUA + BCL run's folder (``.../stage1_aua_bcl``); ``stage1_iteration``:
    ``between_stages.stage1_iteration`` (None: the final ``model.pt``; n: the snapshot
    ``model_iter<n>.pt`` that run also writes, see :func:`stage1_snapshot_name`);
    ``iterations``: the data set's stage-1 iterations. Raises :class:`ConfigError` naming the
    key for an iteration beyond the run.
    """
    chosen = check_stage1_iteration(stage1_iteration, iterations, dataset)
    name = "model.pt" if chosen is None else stage1_snapshot_name(chosen)
    return f"{stage1_dir.rstrip('/')}/{name}"


def case_files_in(folder: str | Path, case_paths: Sequence[str | Path], ext: str = ".h5") -> list[Path]:
    """The per-case files of a folder output, in the order of ``case_paths``:
    ``folder / (<case file's stem> + ext)``.

    A rule whose one job writes the files of many cases (``predict``, ``pseudo_labels``)
    declares the folder as its output; the rules that read it name the files this way.
    """
    return [Path(folder) / f"{Path(c).stem}{ext}" for c in case_paths]


@contextlib.contextmanager
def case_log(log_dir: str | Path | None, case: str) -> Iterator[None]:
    """Copy what is logged while one case is processed to ``log_dir/<case>.log`` as well.

    A job that processes many cases keeps one log per case this way (beside its own log).
    An exception that leaves the block is written to the case's log, then re-raised.
    ``log_dir=None`` does nothing.
    """
    if log_dir is None:
        yield
        return
    path = Path(log_dir) / f"{case}.log"
    path.parent.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(path, mode="w", encoding="utf-8")
    handler.setFormatter(logging.Formatter(LOG_FORMAT))
    root = logging.getLogger()
    root.addHandler(handler)
    level = log.level
    if log.getEffectiveLevel() > logging.INFO:  # outside a job: the case log still gets INFO lines
        log.setLevel(logging.INFO)
    try:
        yield
    except BaseException as exc:
        handler.handle(log.makeRecord(log.name, logging.ERROR, __file__, 0, "%s", (exc,), None))
        raise
    finally:
        log.setLevel(level)
        root.removeHandler(handler)
        handler.close()


@contextlib.contextmanager
def job(log_path: str | Path | None, name: str) -> Iterator[logging.Logger]:
    """Log to ``log_path`` (and stderr); turn known input errors into one line and exit 1."""
    handlers: list[logging.Handler] = [logging.StreamHandler(sys.stderr)]
    if log_path:
        Path(log_path).parent.mkdir(parents=True, exist_ok=True)
        handlers.append(logging.FileHandler(log_path, mode="w", encoding="utf-8"))
    logging.basicConfig(level=logging.INFO, format=LOG_FORMAT, handlers=handlers, force=True)
    logger = logging.getLogger(f"semiseg.{name}")
    try:
        yield logger
    except (CaseError, ConfigError, ValueError) as exc:
        logger.error("%s", exc)
        if not isinstance(exc, (CaseError, ConfigError)):
            # A ValueError may also be a bug: keep where it came from in the log.
            logger.info("where it was raised:\n%s", "".join(traceback.format_tb(exc.__traceback__)))
        logging.shutdown()
        raise SystemExit(1) from None
    logging.shutdown()
