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


def validate_config(config: dict[str, Any], schema_path: str | Path | None = None) -> dict[str, Any]:
    """Validate ``config`` in place, filling in the schema's defaults; return it.

    Raises :class:`ConfigError` whose message names the offending key as a dotted path
    (``datasets.demo.preprocessing.crop_margin: -1 is less than the minimum of 0``).
    """
    _check_moved_keys(config)
    path = Path(schema_path) if schema_path is not None else DEFAULT_SCHEMA
    with open(path, encoding="utf-8") as fh:
        schema = yaml.safe_load(fh)
    validator = _with_defaults(jsonschema.Draft202012Validator)(schema)
    _raise_first(validator.iter_errors(config), prefix="")
    # A data set's training block overrides single keys of the top-level one: validate the merge.
    training_schema = {"$defs": schema["$defs"], **schema["$defs"]["training"]}
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
