"""Config files: load an `ml_collections` Python config, apply `--config.a.b=value` overrides.

A config file is a Python file with `get_config()` (optionally `get_config(arg)`, chosen with
`path.py:arg`, as in big_vision) returning a `ConfigDict`. Overrides are checked: an unknown key
names the valid keys at that level, a value that does not parse as the field's type names the
key, the expected type and the value given.
"""

from __future__ import annotations

import ast
import difflib
import hashlib
import importlib
import importlib.util
import json
import os

import ml_collections


class UserError(ValueError):
    """Something the user gave is wrong (a config value, a data file, a run directory). The
    message is one line naming the file / key / step, what was wrong and what is allowed;
    `rlhf-jax` prints it without a traceback (unless --debug) and exits with status 2."""

    kind = "error"


class ConfigError(UserError):
    """A config file or override is wrong; the message says which file / key and why."""

    kind = "config error"


class DataError(UserError):
    """A data file is wrong: the message names the file (and line) and what was expected."""

    kind = "data error"


class CheckpointError(UserError):
    """A checkpoint is missing, damaged, of another stage, or does not fit the config."""

    kind = "checkpoint error"


def load_config_module(spec: str):
    """Import the config file named by `spec` (`path.py` or `path.py:arg`) as a module."""
    path = spec.partition(":")[0]
    if not os.path.exists(path):
        raise ConfigError(f"config file {path!r} does not exist")
    name = "rlhf_jax_config_" + hashlib.md5(os.path.abspath(path).encode()).hexdigest()[:8]
    module_spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(module_spec)
    try:
        module_spec.loader.exec_module(module)
    except Exception as e:  # Show the user which file failed, keep the original traceback.
        raise ConfigError(f"{path}: failed to execute config file: {type(e).__name__}: {e}") from e
    if not hasattr(module, "get_config"):
        raise ConfigError(f"{path}: config file has no get_config() function")
    return module


def load_config_file(spec: str) -> ml_collections.ConfigDict:
    """`spec` is `path/to/file.py` or `path/to/file.py:arg`; returns `get_config([arg])`."""
    path, _, arg = spec.partition(":")
    module = load_config_module(spec)
    try:
        config = module.get_config(arg) if arg else module.get_config()
    except (ValueError, KeyError, TypeError) as e:  # an argument the file does not know, or none where it needs one
        raise ConfigError(f"{spec}: {e}") from None
    if not isinstance(config, ml_collections.ConfigDict):
        raise ConfigError(f"{path}: get_config() returned {type(config).__name__}, expected a ConfigDict")
    return config


def parse_value(key: str, text: str, current):
    """Parse `text` as the type of `current` (the field's present value)."""
    expected = type(current)
    try:
        if isinstance(current, bool):
            low = text.strip().lower()
            if low in ("true", "1", "yes"):
                return True
            if low in ("false", "0", "no"):
                return False
            raise ValueError
        if isinstance(current, int):
            value = ast.literal_eval(text)
            if isinstance(value, bool) or not isinstance(value, int):
                raise ValueError
            return value
        if isinstance(current, float):
            return float(text)
        if isinstance(current, str):
            return text
        if isinstance(current, (tuple, list)):
            value = ast.literal_eval(text)
            if isinstance(value, (int, float, str)):
                value = (value,)
            if not isinstance(value, (tuple, list)):
                raise ValueError
            return expected(value)
        if current is None:  # Untyped placeholder: take a Python literal, else the string.
            try:
                return ast.literal_eval(text)
            except (ValueError, SyntaxError):
                return text
    except (ValueError, SyntaxError):
        pass
    else:
        raise ConfigError(f"config key {key!r} holds a {expected.__name__}; it cannot be overridden from the command line")
    raise ConfigError(f"config key {key!r} expects a {expected.__name__} (now {current!r}); got {text!r}")


def apply_override(config: ml_collections.ConfigDict, key: str, text: str) -> None:
    """Set `config.<key> = text` parsed as the existing field's type; `key` is dotted."""
    parts = key.split(".")
    node = config
    for depth, part in enumerate(parts):
        where = ".".join(parts[:depth]) or "<top level>"
        if not isinstance(node, ml_collections.ConfigDict) or part not in node:
            valid = sorted(node.keys()) if isinstance(node, ml_collections.ConfigDict) else []
            close = difflib.get_close_matches(part, valid, n=1)
            hint = f" Did you mean {close[0]!r}?" if close else ""
            raise ConfigError(f"unknown config key {key!r}: {part!r} is not in {where}; valid keys there: {valid}.{hint}")
        if depth < len(parts) - 1:
            node = node[part]
    current = node[parts[-1]]
    if isinstance(current, ml_collections.ConfigDict):
        raise ConfigError(f"config key {key!r} is a group with keys {sorted(current.keys())}; set one of them")
    with node.unlocked():
        node[parts[-1]] = parse_value(key, text, current)


def split_override_args(argv: list[str]) -> tuple[list[str], list[tuple[str, str]]]:
    """Separate `--config.a.b=value` (or `--config.a.b value`) arguments from the rest."""
    rest, overrides, i = [], [], 0
    while i < len(argv):
        arg = argv[i]
        if arg.startswith("--config."):
            key, eq, value = arg[len("--config."):].partition("=")
            if not eq:
                if i + 1 >= len(argv):
                    raise ConfigError(f"{arg} needs a value: {arg}=<value>")
                value, i = argv[i + 1], i + 1
            overrides.append((key, value))
        else:
            rest.append(arg)
        i += 1
    return rest, overrides


def load_config(spec: str, overrides=()) -> ml_collections.ConfigDict:
    config = load_config_file(spec)
    for key, value in overrides:
        apply_override(config, key, value)
    config.lock()
    return config


def config_to_dict(config) -> dict:
    return json.loads(config.to_json_best_effort())


def has_checkpoint(workdir: str) -> bool:
    """Whether `<workdir>/checkpoints` holds a step (Orbax names step folders by their number)."""
    folder = os.path.join(workdir, "checkpoints")
    return os.path.isdir(folder) and any(name.isdigit() for name in os.listdir(folder))


def write_resolved_config(config, workdir: str, allow_change: bool = False, write: bool = True,
                          added_fields: dict | None = None) -> None:
    """Write `<workdir>/config.json`; on resume, refuse a config that differs from the saved one.

    Only a workdir with a checkpoint holds an experiment to protect: a run that failed before
    its first checkpoint (a missing file, a bad path) is simply started again with the
    corrected command. `added_fields` ({dotted key: default}) are fields newer than some saved
    runs: where the config has one and the saved config's section lacks it, it held its default."""
    os.makedirs(workdir, exist_ok=True)
    path = os.path.join(workdir, "config.json")
    resolved = config_to_dict(config)
    if os.path.exists(path) and not allow_change and has_checkpoint(workdir):
        with open(path) as f:
            saved = json.load(f)
        for key, default in (added_fields or {}).items():
            *parents, name = key.split(".")
            section, current = saved, resolved
            for part in parents:
                section = section.get(part) if isinstance(section, dict) else None
                current = current.get(part) if isinstance(current, dict) else None
            if isinstance(section, dict) and isinstance(current, dict) and name in current:
                section.setdefault(name, default)  # (only where this config has the field: not the snack's model)
        changed = differing_keys(saved, resolved)
        if changed:
            raise ConfigError(
                f"{workdir} holds a run with a different config (keys {changed}); resuming it would mix "
                "two experiments. Use a new --workdir, or pass --allow_config_change to resume anyway.")
    if not write:  # (the other processes of a multi-process run: process 0 writes)
        return
    write_json_atomic(path, resolved)


def write_json_atomic(path: str, data) -> None:
    """Write JSON so that a reader sees the old file or the whole new one, never a torn one."""
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=2, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def differing_keys(a, b, prefix=""):
    """Dotted keys whose values differ between two configs (ConfigDicts or JSON dicts)."""
    a = config_to_dict(a) if isinstance(a, ml_collections.ConfigDict) else a
    b = config_to_dict(b) if isinstance(b, ml_collections.ConfigDict) else b
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for k in sorted(set(a) | set(b)):
            out += differing_keys(a.get(k), b.get(k), f"{prefix}{k}.")
        return out
    return [prefix.rstrip(".")] if a != b else []


def read_resolved_config(workdir: str) -> ml_collections.ConfigDict:
    path = os.path.join(workdir, "config.json")
    if not os.path.exists(path):
        raise ConfigError(f"{workdir} has no config.json: is it a run directory?")
    try:
        with open(path, encoding="utf-8") as f:
            saved = json.load(f)
    except (ValueError, UnicodeDecodeError) as e:  # garbage bytes, cut short, not JSON
        raise ConfigError(f"{path} is not a readable run config ({e}); it was damaged or is not ours") from None
    if not isinstance(saved, dict):
        raise ConfigError(f"{path} holds a JSON {type(saved).__name__}, not a run config (an object)")
    return ml_collections.ConfigDict(saved)


def load_function(import_path: str):
    """Import ``"package.module:function"`` (``"package.module.function"`` also accepted).

    Raises ``ValueError`` for a malformed path, ``ImportError`` when the module cannot be
    imported, ``AttributeError`` when it has no such attribute and ``TypeError`` when the
    attribute is not callable; each message names ``import_path``.
    """
    if not isinstance(import_path, str) or not import_path.strip():
        raise ValueError(f"expected 'package.module:function', got {import_path!r}")
    import_path = import_path.strip()
    if ":" in import_path:
        module_name, _, attr = import_path.partition(":")
    else:
        module_name, _, attr = import_path.rpartition(".")
    if not module_name or not attr:
        raise ValueError(f"expected 'package.module:function', got {import_path!r}")
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise ImportError(
            f"cannot import module {module_name!r} of {import_path!r}: {e}"
        ) from e
    obj = module
    for part in attr.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise AttributeError(
                f"module {module_name!r} has no attribute {attr!r} (from {import_path!r})"
            ) from None
    if not callable(obj):
        raise TypeError(f"{import_path!r} is not callable (it is a {type(obj).__name__})")
    return obj


