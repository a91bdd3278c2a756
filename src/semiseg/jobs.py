"""Running one pipeline job: logging to the rule's log file and one-line errors.

Rule scripts wrap their work in :func:`job`, so that bad input ends the job with a single
line naming the case, the file and the problem (in the log and on stderr) and a non-zero
exit status, while Snakemake's ``--keep-going`` lets the other jobs finish.
"""

from __future__ import annotations

import contextlib
import logging
import sys
import traceback
from collections.abc import Iterator
from pathlib import Path

from semiseg.errors import CaseError, ConfigError

log = logging.getLogger("semiseg")


@contextlib.contextmanager
def job(log_path: str | Path | None, name: str) -> Iterator[logging.Logger]:
    """Log to ``log_path`` (and stderr); turn known input errors into one line and exit 1."""
    handlers: list[logging.Handler] = [logging.StreamHandler(sys.stderr)]
    if log_path:
        Path(log_path).parent.mkdir(parents=True, exist_ok=True)
        handlers.append(logging.FileHandler(log_path, mode="w", encoding="utf-8"))
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", handlers=handlers, force=True)
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
