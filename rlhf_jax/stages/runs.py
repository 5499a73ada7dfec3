"""Finished runs as inputs to later stages: their state, their policy, their reward model.

    config, state = load_run(workdir)                          # any stage, via rlhf_jax.stages.registry
    model_config, graphdef, params = load_policy(workdir)      # pretrain, sft, ppo, dpo (head 'lm')
    model_config, graphdef, params, norm = load_reward_model(workdir)   # reward runs

Every loader rebuilds the Orbax restore target from the run's own config.json (the stage module's
`abstract_state`), so each array comes back with its true structure. A run of the wrong stage
is a one-line error naming the run's stage and the stages the caller accepts.
"""

from __future__ import annotations

import json
import os
import sys

import jax
import numpy as np
from flax import nnx

from rlhf_jax.runtime import config as config_lib
from rlhf_jax.models import lora
from rlhf_jax.models import model as model_lib
from rlhf_jax.stages import registry
from rlhf_jax.runtime import run as run_lib
from rlhf_jax.models import sampling
from rlhf_jax.runtime.optim import make_optimizer
from rlhf_jax.models.tokenizer import make_tokenizer

NORMALIZATION_FILE = "reward_normalization.json"


def load_run(workdir: str, step: int | None = None):
    """(config, train state) of the last (or given) checkpoint of a run of any stage."""
    config = config_lib.read_resolved_config(workdir)
    target = registry.stage_module(config.stage).abstract_state(config)
    return config, run_lib.load_state(workdir, target, step)


def load_policy(workdir: str, seed_index: int = 0):
    """The language-model policy of a finished run: (model_config, graphdef, params).

    A run that trained several seeds in one program (`num_seeds` > 1) gives seed `seed_index`'s.
    """
    config = config_lib.read_resolved_config(workdir)
    if config.get("stage") not in registry.POLICY_STAGES:
        raise registry.NoPolicy(f"{workdir} is a {config.get('stage')!r} run, which has no language-model "
                                f"policy; this needs a run of stage {' / '.join(registry.POLICY_STAGES)}")
    num_seeds = config.get("num_seeds", 1)
    if not 0 <= seed_index < num_seeds:  # (JAX would clamp an index out of range, silently)
        raise ValueError(f"seed_index={seed_index}: {workdir} trained num_seeds={num_seeds}")
    config, state = load_run(workdir)
    graphdef, params = registry.stage_module(config.stage).policy_params(config, state)
    if num_seeds > 1:
        params = jax.tree.map(lambda x: x[seed_index], params)
    return config.model, graphdef, params


def load_matching_policy(workdir: str, model_config, stage: str):
    """load_policy, refusing a run whose model is not `model_config`: the calling run's own
    config.json must describe the params it will save, or they could not be restored."""
    run_model, graphdef, params = load_policy(workdir)
    changed = config_lib.differing_keys(run_model, model_config)
    if changed:
        raise config_lib.ConfigError(
            f"{stage}: config.model differs from the model of {workdir} (its config.json) in {changed}; "
            "set --config.model.* to match")
    return run_model, graphdef, params


def load_reference(config, policy, stage: str):
    """The frozen reference of PPO / DPO: `policy` (init_from's params), or the run named by
    `config.reference_from` (rounds: an earlier round's policy). Refused with LoRA, whose
    reference is init_from's base weights with the adapters off."""
    if not config.get("reference_from"):
        return policy
    if lora.enabled(config.get("lora")):
        raise config_lib.ConfigError("reference_from: with LoRA the reference is init_from's base weights "
                                     "(adapters off); leave reference_from empty")
    return load_matching_policy(config.reference_from, config.model, stage)[2]


def supervised_abstract_state(config, head: str = "lm"):
    """(graphdef, ShapeDtypeStructs of {'params', 'opt_state'}): the state of the stages trained
    with one supervised loss (pretrain, SFT, reward, DPO). With LoRA the params are the adapters
    (and the reward model's scalar head)."""
    graphdef, params = model_lib.abstract_params(config.model, head)
    heads = ("scalar_head",) if head == "scalar" else ()
    params = jax.eval_shape(lambda p: lora.split(p, config.get("lora"), 0, heads)[0], params)
    state = {"params": params, "opt_state": jax.eval_shape(make_optimizer(config.optimizer).init, params)}
    return graphdef, jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), state)


def load_reward_model(workdir: str, merge_lora: bool = True):
    """A finished reward run: (model_config, graphdef, params, normalization {'mean', 'std'}).

    normalization is {'mean': 0.0, 'std': 1.0} when the run fitted none. Score with
    model.reward_scores(graphdef, params, tokens, mask), then (r - mean) / std.
    A LoRA reward run's params are its adapters merged into the trunk of the SFT run it started
    from; with merge_lora=False they stay {'lora', 'scalar_head'} (the caller holds that trunk).
    """
    config = config_lib.read_resolved_config(workdir)
    if config.get("stage") != "reward":
        raise config_lib.ConfigError(f"{workdir} is a {config.get('stage')!r} run; a reward model is a "
                                     "'reward' run (rlhf-jax train --config=experiments/reviews/reward.py)")
    graphdef, target = supervised_abstract_state(config, head="scalar")
    params = run_lib.load_state(workdir, target)["params"]
    if lora.enabled(config.get("lora")) and merge_lora:  # adapters + head on the trunk of its SFT run
        _, _, policy = load_policy(config.init_from)
        trunk = nnx.State({k: v for k, v in policy.items() if k != "unembed"})
        params = lora.combine_restored(params, trunk, config.lora)
    return config.model, graphdef, params, read_normalization(workdir)


def read_normalization(workdir: str) -> dict:
    normalization = {"mean": 0.0, "std": 1.0}
    path = os.path.join(workdir, NORMALIZATION_FILE)
    if os.path.exists(path):
        with open(path) as f:
            saved = json.load(f)
        normalization = {"mean": float(saved["mean"]), "std": float(saved["std"])}
    return normalization


class PolicySampler:
    """A run's policy loaded once, sampled many times: what `rlhf-jax sample` uses for one prompt and
    the chat mode of `rlhf-jax serve` for every turn (one loading path for both).

        sampler = PolicySampler(workdir)
        texts = sampler(prompt, num=2, temperature=1.0, max_new_tokens=64, seed=0)
    """

    def __init__(self, workdir: str):
        self.workdir = workdir
        run_config = config_lib.read_resolved_config(workdir)
        _, self.graphdef, self.params = load_policy(workdir)
        self.tokenizer = make_tokenizer(run_config.get("tokenizer"))
        self.stage = run_config.get("stage")

    def __call__(self, prompt: str, num: int, temperature: float = 1.0, max_new_tokens: int = 128,
                 greedy: bool = False, seed: int = 0) -> list[str]:
        return sampling.generate_texts(self.graphdef, self.params, self.tokenizer, [prompt] * num,
                                       max_new_tokens=max_new_tokens, rng=jax.random.key(seed),
                                       temperature=temperature, greedy=greedy)


def sample_from_run(workdir, prompt, num, temperature=1.0, max_new_tokens=128, greedy=False, seed=0):
    """`rlhf-jax sample`: `num` responses of a run's policy (any policy stage) to one prompt."""
    sampler = PolicySampler(workdir)
    print(f"sampling from {workdir} (temperature {temperature}{', greedy' if greedy else ''})", file=sys.stderr)
    return sampler(prompt, num, temperature, max_new_tokens, greedy, seed)


def score_from_run(workdir: str, prompt: str, response: str) -> float:
    """`rlhf-jax score`: the normalised reward of prompt + response under a reward run."""
    run_config = config_lib.read_resolved_config(workdir)
    tokenizer = make_tokenizer(run_config.get("tokenizer"))
    _, graphdef, params, normalization = load_reward_model(workdir)
    tokens, mask = sampling.encode_prompt_responses(tokenizer, [prompt], [response], int(run_config.seq_len))
    raw = jax.jit(model_lib.reward_scores, static_argnums=0)(graphdef, params, tokens, mask)
    return float((np.asarray(raw, np.float64)[0] - normalization["mean"]) / normalization["std"])
