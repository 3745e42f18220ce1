"""Load and validate the pipeline config against src/crystal_transfer/config.schema.yaml.

The schema is the single description of every key (type, default, description). Validation fills in the
defaults and turns jsonschema's errors into one line that names the offending key and where it is.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import jsonschema
import yaml

from crystal_transfer.errors import UserError

SCHEMA_PATH = Path(__file__).with_name("config.schema.yaml")  # package data: installs carry it


class ConfigError(UserError):
    """The config does not follow the schema."""


def load_schema(path: str | Path = SCHEMA_PATH) -> dict[str, Any]:
    """The config schema as a dict."""
    with open(path) as handle:
        return yaml.safe_load(handle)


def _where(path: Any) -> str:
    parts = []
    for part in path:
        parts.append(f"[{part}]" if isinstance(part, int) else (("." if parts else "") + str(part)))
    return "".join(parts) or "<top level>"


def _message(error: jsonschema.ValidationError) -> str:
    where = _where(error.absolute_path)
    if error.validator == "additionalProperties":
        allowed = sorted(error.schema.get("properties", {}))
        extra = sorted(set(error.instance) - set(allowed))
        return f"unknown key {', '.join(repr(k) for k in extra)} in {where}" + (
            f" (allowed: {', '.join(allowed)})" if allowed else ""
        )
    if error.validator == "required":
        return f"{where}: {error.message}"
    return f"{where}: {error.message}"


def _fill_defaults(instance: Any, schema: dict[str, Any], root: dict[str, Any]) -> None:
    """Insert schema defaults into ``instance`` in place (objects, arrays, $ref and if/then branches)."""
    if "$ref" in schema:
        name = schema["$ref"].split("/")[-1]
        _fill_defaults(instance, root["$defs"][name], root)
        return
    if isinstance(instance, dict):
        for key, sub in schema.get("properties", {}).items():
            if key not in instance and "default" in sub:
                instance[key] = copy.deepcopy(sub["default"])
            if key in instance:
                _fill_defaults(instance[key], sub, root)
        extra = schema.get("additionalProperties")
        if isinstance(extra, dict):
            for key in set(instance) - set(schema.get("properties", {})):
                _fill_defaults(instance[key], extra, root)
        for branch in schema.get("allOf", []):
            condition = branch.get("if", {}).get("properties", {})
            if all(instance.get(k) == v.get("const") for k, v in condition.items()):
                _fill_defaults(instance, branch.get("then", {}), root)
    elif isinstance(instance, list) and isinstance(schema.get("items"), dict):
        for item in instance:
            _fill_defaults(item, schema["items"], root)


def validate_config(config: dict[str, Any], schema: dict[str, Any] | None = None) -> dict[str, Any]:
    """Return a validated copy of ``config`` with defaults filled in; raise ConfigError naming the problem."""
    schema = schema or load_schema()
    config = copy.deepcopy(config)
    _fill_defaults(config, schema, schema)
    validator = jsonschema.Draft202012Validator(schema)
    errors = sorted(validator.iter_errors(config), key=lambda e: (len(e.absolute_path), str(e.absolute_path)))
    if errors:
        deepest = max(errors, key=lambda e: len(list(e.absolute_path)))
        best = jsonschema.exceptions.best_match([deepest] + errors)
        details = [_message(e) for e in _leaves(best)]
        raise ConfigError("invalid config: " + "; ".join(dict.fromkeys(details)))
    for plan_name, plan in config["splits"].items():
        if plan["dataset"] not in config["datasets"]:
            raise ConfigError(
                f"invalid config: splits.{plan_name}.dataset names '{plan['dataset']}', which is not in datasets "
                f"({', '.join(config['datasets'])})"
            )
    return config


def _leaves(error: jsonschema.ValidationError) -> list[jsonschema.ValidationError]:
    if not error.context:
        return [error]
    return [leaf for sub in error.context for leaf in _leaves(sub)]


class _UniqueKeyLoader(yaml.SafeLoader):
    """PyYAML's safe loader, except that a key written twice in one mapping is an error (PyYAML keeps the last)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if isinstance(key, str | int | float | bool) and key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"key {key!r} appears twice in one mapping", key_node.start_mark
                )
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def read_yaml(path: str | Path, what: str) -> Any:
    """The YAML document in ``path``; a file that is not YAML (or not UTF-8 text) is a :class:`ConfigError`
    naming the file, line and column."""
    try:
        with open(path, encoding="utf-8") as handle:
            return yaml.load(handle, Loader=_UniqueKeyLoader) or {}  # noqa: S506 (a SafeLoader)
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{what} {path} is not UTF-8 text (byte {exc.start})") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ConfigError(f"{what} {path} is not valid YAML{where}: {problem}") from None


def load_config(path: str | Path) -> dict[str, Any]:
    """Read a YAML config file and validate it."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    data = read_yaml(path, "config file")
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} does not hold a mapping of keys")
    return validate_config(data)


def validate_dataset_spec(spec: dict[str, Any]) -> dict[str, Any]:
    """Validate one dataset's section plus its ``filters`` (the data stage's ``--spec``), defaults filled in."""
    filters = spec.get("filters", {})
    sources = {key: value for key, value in spec.items() if key != "filters"}
    config = validate_config({"datasets": {"spec": sources}, "splits": {}, "filters": filters})
    return {**config["datasets"]["spec"], "filters": config["filters"]}


def validate_source_spec(spec: dict[str, Any]) -> dict[str, Any]:
    """Validate one source entry of a dataset (the fetch stages' ``--spec``), defaults filled in."""
    config = validate_config({"datasets": {"spec": {"sources": [spec]}}, "splits": {}})
    return config["datasets"]["spec"]["sources"][0]


def validate_model_spec(name: str, spec: dict[str, Any]) -> dict[str, Any]:
    """Validate one entry of ``pretrain`` plus the config's ``architecture`` section that the workflow adds to it
    (the pretrain stage's ``--spec``), defaults filled in."""
    if not isinstance(spec, dict):
        raise ConfigError(f"invalid config: pretrain.{name} must be a mapping, not {type(spec).__name__}")
    schema = load_schema()
    entry = {key: value for key, value in spec.items() if key != "architecture"}
    validated = _validate_part(entry, schema["$defs"]["pretrained_model"], schema, f"pretrain.{name}")
    if "architecture" in spec:
        architecture = schema["properties"]["architecture"]
        validated["architecture"] = _validate_part(spec["architecture"], architecture, schema, "architecture")
    return validated


def validate_transfer_spec(spec: Any) -> dict[str, Any]:
    """Validate the transfer stage's ``--spec``: ``{"train": {...}, "architecture": {...}}`` (both optional, as the
    config's sections of those names), defaults filled in."""
    if not isinstance(spec, dict):
        raise ConfigError(f"invalid transfer spec: a mapping of train and architecture, not {type(spec).__name__}")
    unknown = sorted(set(spec) - {"train", "architecture"})
    if unknown:
        allowed = "allowed: architecture, train"
        raise ConfigError(f"invalid transfer spec: unknown key {', '.join(map(repr, unknown))} ({allowed})")
    schema = load_schema()
    parts = ("train", "architecture")
    return {key: _validate_part(spec.get(key, {}), schema["properties"][key], schema, key) for key in parts}


def _validate_part(instance: Any, part: dict[str, Any], schema: dict[str, Any], where: str) -> Any:
    """Validate ``instance`` against ``part`` of ``schema`` (its ``$defs`` available), defaults filled in."""
    missing = [key for key in part.get("required", []) if isinstance(instance, dict) and key not in instance]
    if missing:
        raise ConfigError(f"invalid config: {where} lacks the required key {', '.join(repr(k) for k in missing)}")
    instance = copy.deepcopy(instance)
    _fill_defaults(instance, part, schema)
    errors = list(jsonschema.Draft202012Validator({**part, "$defs": schema["$defs"]}).iter_errors(instance))
    if errors:
        best = jsonschema.exceptions.best_match(errors)
        details = [_message(e).replace("<top level>", where) for e in _leaves(best)]
        details = [d if d.startswith(where) or " in " in d else f"{where}.{d}" for d in details]
        raise ConfigError("invalid config: " + "; ".join(dict.fromkeys(details)))
    return instance
