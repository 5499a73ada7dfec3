"""The architecture as tests: layers whose imports point down, stages that never import each
other, a hand-off that reads files only, and the old flat import paths still resolving."""

import ast
import glob
import importlib
import importlib.util
import os

import pytest

import rlhf_jax
from rlhf_jax.stages import registry

ROOT = os.path.normpath(os.path.join(os.path.dirname(__file__), ".."))
# Bottom to top; a module may import its own layer or those below it, never one above.
LAYERS = ["runtime", "data", "models", "losses", "people", "stages", "drivers", "apps"]


def library_modules() -> list[str]:
    paths = glob.glob(os.path.join(ROOT, "rlhf_jax", "**", "*.py"), recursive=True)
    names = [os.path.relpath(p, ROOT)[:-3].replace(os.sep, ".") for p in paths]
    return sorted(n[: -len(".__init__")] if n.endswith(".__init__") else n for n in names)


def imports_of(module: str, function_level: bool = True) -> set[str]:
    """Every module `module` imports (`from pkg import name` counts as pkg.name when that is a module)."""
    path = os.path.join(ROOT, *module.split(".")) + ".py"
    if not os.path.exists(path):
        path = os.path.join(ROOT, *module.split("."), "__init__.py")
    tree = ast.parse(open(path).read())
    nodes = ast.walk(tree) if function_level else tree.body
    found = set()
    for node in nodes:
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            for alias in node.names:
                full = f"{node.module}.{alias.name}"
                found.add(full if importlib.util.find_spec(node.module) and _is_module(full) else node.module)
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
    return found


def _is_module(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


def layer_of(module: str) -> int:
    part = module.split(".")[1]
    return LAYERS.index(part)


@pytest.mark.parametrize("module", [m for m in library_modules() if m != "rlhf_jax"])
def test_imports_point_down(module):
    own = layer_of(module)
    for imported in imports_of(module):
        if imported.startswith("rlhf_jax.") :
            assert layer_of(imported) <= own, (
                f"{module} ({LAYERS[own]}) imports {imported} ({LAYERS[layer_of(imported)]}), a layer above it")
        assert not imported.split(".")[0] in ("configs", "experiments"), (
            f"{module} imports {imported}: the library never imports configs/ or experiments/ (they compose it)")


def test_stage_modules_never_import_each_other_or_the_registry():
    stage_modules = set(registry.STAGES.values()) | {"rlhf_jax.stages.preferences"}
    for module in stage_modules:
        others = imports_of(module) & (stage_modules | {"rlhf_jax.stages.registry"})
        others -= {module}
        if module in ("rlhf_jax.stages.reward", "rlhf_jax.stages.dpo"):
            others -= {"rlhf_jax.stages.preferences"}  # (their pairs: a step of theirs, not a stage)
        assert not others, f"{module} imports {sorted(others)}: load earlier runs through rlhf_jax.stages.runs"


def test_the_hand_off_reads_files_only():
    stage_package = {m for m in library_modules() if m.startswith("rlhf_jax.stages.")} - {"rlhf_jax.stages.runs"}
    assert not imports_of("rlhf_jax.stages.runs") & stage_package


def test_function_level_imports_are_only_optional_extras():
    """Imports sit at the top of a module (they show its dependencies) except the web app's
    optional extra (starlette, uvicorn: `pip install -e '.[serve]'`)."""
    allowed = {"starlette", "uvicorn"}
    for module in library_modules():
        path = os.path.join(ROOT, *module.split(".")) + ".py"
        if not os.path.exists(path):
            continue
        top = imports_of(module, function_level=False)
        inner = {i for i in imports_of(module) - top if i.split(".")[0] not in allowed}
        assert not inner, f"{module} imports {sorted(inner)} inside a function"


@pytest.mark.parametrize("stage", sorted(registry.STAGES))
def test_every_stage_has_the_interface(stage):
    module = importlib.import_module(registry.STAGES[stage])
    for name in ("train", "abstract_state", "check_config"):
        assert callable(getattr(module, name, None)), f"{module.__name__} has no {name}()"


def test_unknown_stage_names_the_valid_ones():
    with pytest.raises(registry.config_lib.ConfigError, match="expected one of"):
        registry.stage_module("rlhf")


@pytest.mark.parametrize("old", sorted(rlhf_jax.MOVED))
def test_old_flat_paths_resolve_to_the_new_modules(old):
    new = importlib.import_module(rlhf_jax._new_home(old))
    assert importlib.import_module(f"rlhf_jax.{old}") is new
    assert getattr(rlhf_jax, old) is new
    namespace = {}
    exec(f"from rlhf_jax import {old} as m", namespace)
    assert namespace["m"] is new


def test_function_paths_of_saved_configs_still_load():
    """config.json files written before the move name functions by the old paths."""
    from rlhf_jax.people import labelers
    from rlhf_jax.runtime import config as config_lib

    assert config_lib.load_function("rlhf_jax.labelers:vader_gold_score") is labelers.vader_gold_score
