"""The machinery of config checks: each rule is written once, beside the code it protects
(`check_*_config(c)` functions in the modules that read those fields; each stage's
`check_config(c)` composes them), and `rlhf_jax.stages.registry.validate` runs the rules of a
config's stage before anything is written. A bad value is one line naming the key, the value
and what is allowed:

    config.batch_size=-4: expected an integer >= 1

A rule looks only at the keys a config has (a stage's config may lack optional fields).
What needs the files of other runs (does init_from exist, does its model match) is checked where
the run is loaded (rlhf_jax.stages.runs): in a pipeline those runs do not exist yet.
"""

from __future__ import annotations

import math

from rlhf_jax.runtime import config as config_lib


class _Missing:
    """A key the config does not have: falsy, so `if c.get(key)` reads as 'unset'."""

    def __bool__(self):
        return False

    def __repr__(self):
        return "<missing>"


MISSING = _Missing()


class Checks:
    """The checks of one config; `prefix` is how the keys are named in messages."""

    def __init__(self, config, prefix: str):
        self.config, self.prefix = config, prefix

    def get(self, key: str):
        node = self.config
        for part in key.split("."):
            if node is None or not hasattr(node, "keys") or part not in node:
                return MISSING
            node = node[part]
        return node

    def fail(self, key: str, value, allowed: str):
        raise config_lib.ConfigError(f"config.{self.prefix}{key}={value!r}: {allowed}")

    def integer(self, key: str, low: int = 1):
        value = self.get(key)
        if value is MISSING:
            return
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            self.fail(key, value, f"expected an integer >= {low}")

    def number(self, key: str, low: float = 0.0, high: float = math.inf, low_open=False, high_open=False):
        """A finite number in the interval [low, high] (either end open when asked)."""
        value = self.get(key)
        if value is MISSING:
            return
        ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
        ok = ok and (value > low if low_open else value >= low)
        ok = ok and (value < high if high_open or high == math.inf else value <= high)
        if not ok:
            interval = (f"{'(' if low_open else '['}{low:g}, "
                        f"{'inf)' if high == math.inf else f'{high:g}' + (')' if high_open else ']')}")
            self.fail(key, value, f"expected a finite number in {interval}")

    def boolean(self, key: str):
        value = self.get(key)
        if value is not MISSING and not isinstance(value, bool):
            self.fail(key, value, "expected True or False")

    def positive(self, key: str):
        self.number(key, 0.0, low_open=True)

    def choice(self, key: str, choices):
        value = self.get(key)
        if value is not MISSING and value not in choices:
            self.fail(key, value, f"expected one of {', '.join(map(repr, choices))}")

    def function_path(self, key: str, required: bool = False):
        """'package.module:function', importable and callable."""
        value = self.get(key)
        if value is MISSING or (not value and not required):
            return
        try:
            config_lib.load_function(value)
        except (ValueError, ImportError, AttributeError, TypeError) as e:
            self.fail(key, value, f"expected an importable 'package.module:function' ({e})")
