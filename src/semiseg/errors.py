"""Error types that name the case, the file and the problem in one line."""

from __future__ import annotations

from os import PathLike


class CaseError(Exception):
    """A problem with one case's input data.

    The message is a single line ``case <id>: <file>: <problem>`` so that a failing
    Snakemake job (and its log) says at once which case and file are wrong and why.
    """

    def __init__(self, case: str, path: str | PathLike | None, problem: str) -> None:
        self.case = case
        self.path = None if path is None else str(path)
        self.problem = " ".join(str(problem).split())  # one line
        where = f"{self.path}: " if self.path else ""
        super().__init__(f"case {case}: {where}{self.problem}")


class ConfigError(ValueError):
    """An invalid configuration value; the message names the dotted key."""
