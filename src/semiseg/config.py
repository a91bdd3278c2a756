"""Load and validate the pipeline configuration against its JSON schema (with defaults).

The schema is ``workflow/schemas/config.schema.yaml``; the Snakefile validates with it
before any job runs, and stages run without Snakemake validate the same way.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jsonschema
import yaml

from semiseg.errors import ConfigError

#: The schema in a source checkout (``pip install -e .``).
DEFAULT_SCHEMA = Path(__file__).resolve().parents[2] / "workflow" / "schemas" / "config.schema.yaml"


def _with_defaults(validator_class):
    validate_properties = validator_class.VALIDATORS["properties"]

    def set_defaults(validator, properties, instance, schema):
        if isinstance(instance, dict):
            for name, sub in properties.items():
                if isinstance(sub, dict) and "default" in sub:
                    instance.setdefault(name, _copy(sub["default"]))
        yield from validate_properties(validator, properties, instance, schema)

    return jsonschema.validators.extend(validator_class, {"properties": set_defaults})


def _copy(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _copy(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_copy(v) for v in value]
    return value


def _key_path(error: jsonschema.ValidationError) -> str:
    parts = [str(p) for p in error.absolute_path]
    return ".".join(parts) if parts else "(top level)"


def coerce_scalars(config: dict[str, Any], schema: Mapping[str, Any]) -> list[str]:
    """Read, in place, the string values that the schema rejects as YAML scalars where YAML
    makes a number, a boolean or null of them that the schema accepts; return their dotted keys.

    Snakemake's ``--config 'training={lr: 0.02}'`` parses nested values without types
    (``'0.02'``, ``'true'``); this gives them the types that ``config.yaml`` would. A string
    the schema accepts (a path, a name, ``'1337'`` where a string is allowed) is left alone,
    and so is one whose YAML reading the schema rejects too (then validation reports it).
    """
    validator = jsonschema.Draft202012Validator(schema)
    changed: list[str] = []
    tried: set[tuple] = set()
    while True:
        for err in validator.iter_errors(config):
            where = tuple(err.absolute_path)
            if not where or not isinstance(err.instance, str) or where in tried:
                continue
            tried.add(where)
            try:
                value = yaml.safe_load(err.instance)
            except yaml.YAMLError:
                continue
            if isinstance(value, str) or not (value is None or isinstance(value, (bool, int, float))):
                continue
            parent = config
            for key in where[:-1]:
                parent = parent[key]
            parent[where[-1]] = value
            if any(tuple(e.absolute_path)[: len(where)] == where for e in validator.iter_errors(config)):
                parent[where[-1]] = err.instance  # the schema rejects the YAML reading too: keep the string
                continue
            changed.append(".".join(str(k) for k in where))
            break  # validate again from the start: the error list has changed
        else:
            return changed


def validate_config(config: dict[str, Any], schema_path: str | Path | None = None) -> dict[str, Any]:
    """Validate ``config`` in place, filling in the schema's defaults; return it.

    String values that the schema rejects but accepts as YAML reads them (``'0.02'``,
    ``'true'``, as Snakemake's ``--config`` passes nested values) are read so first
    (:func:`coerce_scalars`). Raises :class:`ConfigError` whose message names the offending
    key as a dotted path (``datasets.demo.preprocessing.crop_margin: -1 is less than the
    minimum of 0``).
    """
    _check_moved_keys(config)
    path = Path(schema_path) if schema_path is not None else DEFAULT_SCHEMA
    with open(path, encoding="utf-8") as fh:
        schema = yaml.safe_load(fh)
    coerce_scalars(config, schema)
    training_schema = {"$defs": schema["$defs"], **schema["$defs"]["training"]}
    for ds in (config.get("datasets") or {}).values():  # their training blocks are checked merged, below
        if isinstance(ds, dict) and isinstance(ds.get("training"), dict):
            coerce_scalars(ds["training"], training_schema)
    validator = _with_defaults(jsonschema.Draft202012Validator)(schema)
    _raise_first(validator.iter_errors(config), prefix="")
    # A data set's training block overrides single keys of the top-level one: validate the merge.
    plain = jsonschema.Draft202012Validator(training_schema)
    for name, ds in config.get("datasets", {}).items():
        if ds.get("training"):
            merged = {**config.get("training", {}), **ds["training"]}
            _raise_first(plain.iter_errors(merged), prefix=f"datasets.{name}.training.")
    return config


def _check_moved_keys(config: dict[str, Any]) -> None:
    """Keys that moved: a one-line error that says where to (instead of "not allowed")."""
    blocks = [("training", config.get("training"))] + [
        (f"datasets.{name}.training", ds.get("training")) for name, ds in (config.get("datasets") or {}).items()
        if isinstance(ds, dict)
    ]
    for where, block in blocks:
        if isinstance(block, dict) and "seed" in block:
            raise ConfigError(
                f"invalid configuration: {where}.seed: the training seed is now the list 'seeds' (top level, or per "
                f"data set: datasets.<name>.seeds), e.g. seeds: [{block['seed']}]"
            )


def _raise_first(errors, prefix: str) -> None:
    errors = list(errors)
    if errors:
        err = jsonschema.exceptions.best_match(errors)
        raise ConfigError(f"invalid configuration: {prefix}{_key_path(err)}: {err.message}")


def load_config(path: str | Path, schema_path: str | Path | None = None, overrides: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Read a YAML config, merge ``overrides`` (top-level keys) and validate it."""
    with open(path, encoding="utf-8") as fh:
        config = yaml.safe_load(fh) or {}
    if overrides:
        config.update(overrides)
    return validate_config(config, schema_path)
