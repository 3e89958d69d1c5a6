"""Configs as users write them: a YAML file of differences from the defaults, plus `a.b=value` overrides.

Every key and value is checked; a mistake is one line naming the YAML file, or the override when one
caused it. With `init_from`, the model is the checkpoint's own (its `model_config.json`): a `model:`
section may only repeat its values, or change how it is computed (`COMPUTE_FIELDS`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import pathlib
import re
import typing
from collections.abc import Sequence
from typing import Any

import yaml

from mellama_jax.config import COMPUTE_FIELDS, DataConfig, ModelConfig, TrainConfig, typed
from mellama_jax.errors import UserError

PRESETS = ("llama2_7b", "llama2_13b", "llama2_70b", "tiny")


def load_config(path: str | None = None, overrides: Sequence[str] = ()) -> TrainConfig:
    """YAML (only the differences from the defaults) plus `a.b=value` overrides; unknown keys are errors.

    `model.preset` picks a named ModelConfig preset; other `model.*` keys override its fields.
    """
    raw: dict[str, Any] = {}
    if path is not None:
        try:
            with open(path) as f:
                raw = yaml.safe_load(f) or {}
        except (OSError, yaml.YAMLError) as e:
            raise UserError(f"{path}: cannot read config: {str(e).splitlines()[0]}") from None
        if not isinstance(raw, dict):
            raise UserError(f"{path}: expected a mapping of config keys at the top level")
    given: dict[str, str] = {}  # dotted key -> the override that set it
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise UserError(f"override {item!r}: expected key.sub=value")
        *parents, leaf = key.split(".")
        node = raw
        for name in parents:
            node = node.setdefault(name, {})
            if not isinstance(node, dict):
                raise UserError(f"override {item!r}: {name!r} is not a section")
        node[leaf] = yaml.safe_load(value)
        given[key] = item
    try:
        stored = pathlib.Path(str(raw.get("init_from") or "")) / "model_config.json"
        if raw.get("init_from") and stored.is_file():  # (a missing init_from is refused when training starts)
            raw["model"] = _model_over(stored, raw.get("model"))
        return _build(TrainConfig(), raw, "")
    except UserError as e:
        raise UserError(f"{_origin(str(e), given, path)}: {e}") from None


def _origin(message: str, given: dict[str, str], path: str | None) -> str:
    """The override whose key the message names, else the YAML file."""
    for key, item in given.items():
        if re.search(rf"(?<![\w.]){re.escape(key)}(?![\w])", message):
            return f"override {item!r}"
    return path or "command line"


def read_json_object(path: pathlib.Path) -> dict:
    """A JSON file holding an object (every config file we read does); anything else is a one-line error."""
    try:
        value = json.loads(pathlib.Path(path).read_text())
    except OSError as e:
        raise UserError(f"{path}: cannot read ({e.strerror})") from None
    except json.JSONDecodeError as e:
        raise UserError(f"{path}:{e.lineno}: invalid JSON ({e.msg})") from None
    except UnicodeDecodeError:
        raise UserError(f"{path}: not UTF-8 text") from None
    if not isinstance(value, dict):
        raise UserError(f"{path}: expected a JSON object, got a {type(value).__name__}")
    return value


def read_model_config(path: pathlib.Path) -> ModelConfig:
    """A `model_config.json` as we write it: ModelConfig's fields (compute settings may be absent), each of its
    declared JSON type."""
    raw = read_json_object(path)
    kinds = typing.get_type_hints(ModelConfig)
    unknown = sorted(set(raw) - set(kinds))
    if unknown:
        raise UserError(f"{path}: unknown field {unknown[0]!r} (known: {', '.join(kinds)})")
    missing = [key for key in kinds if key not in raw and key not in COMPUTE_FIELDS]
    if missing:
        raise UserError(f"{path}: missing field {missing[0]!r}")
    try:
        return ModelConfig(**{key: typed(value, kinds[key], key) for key, value in raw.items()})
    except UserError as e:
        raise UserError(f"{path}: {e}") from None


def _model_over(stored: pathlib.Path, section: Any) -> ModelConfig:
    """The checkpoint's model with the run's compute settings; a `model:` field that contradicts it is an error."""
    base = dataclasses.replace(
        read_model_config(stored), **{f: getattr(TrainConfig().model, f) for f in COMPUTE_FIELDS}
    )
    if section is None:
        return base
    if not isinstance(section, dict):
        raise UserError(f"'model' must be a section, got {section!r}")
    wanted = _build(TrainConfig().model, section, "model.")
    named = [f.name for f in dataclasses.fields(ModelConfig)] if "preset" in section else list(section)
    for name in named:
        if name not in COMPUTE_FIELDS and getattr(wanted, name) != getattr(base, name):
            raise UserError(
                f"model.{name}={getattr(wanted, name)!r} contradicts {stored}"
                f" ({getattr(base, name)!r}); a run over a checkpoint may only change {', '.join(COMPUTE_FIELDS)}"
            )
    return dataclasses.replace(base, **{name: getattr(wanted, name) for name in named if name in COMPUTE_FIELDS})


def _build(base: Any, raw: dict[str, Any], prefix: str):
    """`base` (a config dataclass) with `raw`'s differences applied, section by section."""
    cls, raw = type(base), dict(raw)
    preset = raw.pop("preset", None) if cls is ModelConfig else None
    if preset is not None and preset not in PRESETS:
        raise UserError(f"unknown {prefix}preset {preset!r} (known: {', '.join(PRESETS)})")
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for key, value in raw.items():
        if key not in hints:
            raise UserError(f"unknown key {prefix + key!r} (known: {', '.join(sorted(hints))})")
        kind, section = hints[key], _section(hints[key])
        if typing.get_origin(kind) is tuple:
            kwargs[key] = _build_tuple(typing.get_args(kind)[0], value, prefix + key)
        elif section and (isinstance(value, section) or (value is None and kind is not section)):
            kwargs[key] = value  # already resolved (init_from's model), or an optional section left out (null)
        elif section:
            if not isinstance(value, dict):
                raise UserError(f"{prefix + key!r} must be a section, got {value!r}")
            kwargs[key] = _build(getattr(base, key) or section(), value, f"{prefix}{key}.")
        else:
            kwargs[key] = _scalar(kind, value, prefix + key)
    try:
        return getattr(cls, preset)(**kwargs) if preset else dataclasses.replace(base, **kwargs)
    except TypeError as e:  # a preset's own keyword clashing: should not happen, but never a traceback
        raise UserError(f"{prefix or 'config'}: {e}") from None
    except UserError as e:
        if cls is DataConfig and prefix != "data.":  # DataConfig names its fields `data.`: say which section
            raise UserError(re.sub(r"(?<![\w.])data\.", prefix, str(e))) from None
        raise


def _section(kind: Any) -> type | None:
    """The config dataclass a field holds: `kind` itself, or X of an optional `X | None`; else None."""
    options = [k for k in typing.get_args(kind) if k is not type(None)] if typing.get_args(kind) else [kind]
    return options[0] if len(options) == 1 and dataclasses.is_dataclass(options[0]) else None


def _scalar(kind: Any, value: Any, name: str) -> Any:
    kinds = typing.get_args(kind) or (kind,)  # `int | str` (steps: N or "auto") allows either
    if float in kinds and type(value) is int:
        value = float(value)
    if float in kinds and isinstance(value, str):  # PyYAML (YAML 1.1) reads 1e-4 as a string
        with contextlib.suppress(ValueError):
            value = float(value)
    if type(value) not in kinds:  # exact: YAML's `true` must not pass as an int
        raise UserError(f"{name!r} must be {' or '.join(k.__name__ for k in kinds)}, got {value!r}")
    return value


def _build_tuple(item: type, value: Any, name: str) -> tuple:
    """A YAML list as a tuple of `item`s (config sections when `item` is a dataclass)."""
    if not isinstance(value, list):
        raise UserError(f"{name!r} must be a list, got {value!r}")
    if dataclasses.is_dataclass(item):
        if not all(isinstance(v, dict) for v in value):
            raise UserError(f"every item of {name!r} must be a section")
        return tuple(_build(item(), v, f"{name}[{i}].") for i, v in enumerate(value))
    if not all(type(v) is item for v in value):
        raise UserError(f"every item of {name!r} must be {item.__name__}, got {value!r}")
    return tuple(value)


def to_yaml(cfg: TrainConfig) -> str:
    """The whole resolved config as YAML that `load_config` reads back to the same config."""
    return yaml.safe_dump(json.loads(json.dumps(dataclasses.asdict(cfg))), sort_keys=False)
