"""The stage registry: one interface, and stage modules that never import each other."""

import ast
import importlib
import os

import pytest

from rlhf_jax.stages import registry

ROOT = os.path.join(os.path.dirname(__file__), "..")


def imported_modules(module_name: str) -> set[str]:
    """Every rlhf_jax module a module imports, at top level or inside functions."""
    path = os.path.join(ROOT, *module_name.split(".")) + ".py"
    found = set()
    for node in ast.walk(ast.parse(open(path).read())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("rlhf_jax"):
            found |= {f"{node.module}.{a.name}" if node.module == "rlhf_jax" else node.module for a in node.names}
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("rlhf_jax")}
    return found


def test_stage_modules_never_import_each_other():
    stage_modules = set(registry.STAGES.values())
    for module in stage_modules:
        others = (imported_modules(module) & stage_modules) - {module}
        assert not others, f"{module} imports the stage module(s) {sorted(others)}: load runs through rlhf_jax.stages.runs"


@pytest.mark.parametrize("stage", sorted(registry.STAGES))
def test_every_stage_has_the_interface(stage):
    module = importlib.import_module(registry.STAGES[stage])
    for name in ("train", "abstract_state", "policy_params"):
        assert callable(getattr(module, name, None)), f"{module.__name__} has no {name}()"


def test_unknown_stage_names_the_valid_ones():
    with pytest.raises(registry.config_lib.ConfigError, match="expected one of"):
        registry.stage_module("rlhf")
