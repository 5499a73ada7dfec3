"""rlhf_jax: RLHF as a JAX functional research codebase.

The package is cut into layers; imports point down this list, never up (tests/test_layout.py):

    runtime/   config, checks, run contract (metrics, checkpoints, loop), mesh, distributed, optim
    data/      TFDS builders and loaders (the review corpus, prompts, preferences)
    models/    the transformer, sampling, LoRA, tokenizers, HF import/export, evaluation
    losses.py  every objective, readable as equations
    people/    the label store and the labelers (a person, a simulated annotator, a function)
    stages/    one file per stage (pretrain/SFT, preferences, reward, ppo, dpo, snack),
               the hand-off they read (runs) and the registry that runs them
    drivers/   pipeline, compare, rounds: several stages composed
    apps/      the command line and the labelling web app

Until 2026-12-02 every module sat directly in `rlhf_jax/`. Old paths (`from rlhf_jax import ppo`,
`import rlhf_jax.labelers`, and `rlhf_jax.labelers:vader_gold_score` in a saved config.json)
still resolve to the module's new home through the aliases below.
"""

import importlib
import importlib.abc
import importlib.util
import sys

# Old flat module name -> where it lives now.
MOVED = {
    "config": "runtime", "validation": "runtime", "run": "runtime", "mesh": "runtime",
    "distributed": "runtime", "optim": "runtime", "plotting": "runtime", "benchmarking": "runtime",
    "model": "models", "sampling": "models", "lora": "models", "tokenizer": "models",
    "hf_import": "models", "hf_export": "models", "evaluation": "models",
    "label_store": "people", "labelers": "people",
    "runs": "stages", "preferences": "stages", "pretrain": "stages", "reward": "stages",
    "ppo": "stages", "dpo": "stages", "snack": "stages", "registry": "stages",
    "pipeline": "drivers", "compare": "drivers", "rounds": "drivers",
    "serve": "apps", "cli": "apps",
}


# Modules that did not just move but were merged into another.
MERGED = {"validation": "rlhf_jax.stages.registry"}  # validate(config) and the rules' runner


def _new_home(name: str) -> str:
    return MERGED.get(name) or f"{__name__}.{MOVED[name]}.{name}"


def __getattr__(name):  # `from rlhf_jax import ppo`, `rlhf_jax.ppo`
    if name in MOVED:
        return importlib.import_module(_new_home(name))
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


class _MovedModuleFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """`import rlhf_jax.ppo` (and import paths in old configs) get the module at its new path:
    the very same module object, so state and isinstance checks are shared."""

    def find_spec(self, fullname, path=None, target=None):
        prefix, _, name = fullname.rpartition(".")
        if prefix == __name__ and name in MOVED:
            return importlib.util.spec_from_loader(fullname, self)
        return None

    def create_module(self, spec):
        return importlib.import_module(_new_home(spec.name.rpartition(".")[2]))

    def exec_module(self, module):
        pass


if not any(isinstance(f, _MovedModuleFinder) for f in sys.meta_path):
    sys.meta_path.append(_MovedModuleFinder())
