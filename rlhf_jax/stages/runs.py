"""The hand-off: what a finished stage leaves for later stages, and the loaders that read it.

A stage that produces a policy or a reward model writes, as the last thing before DONE,

    <run>/handoff/handoff.json    what the folder holds (written last: its presence means complete)
        {"format": 1, "kind": "policy" | "reward_model", "stage": "sft", "step": 400,
         "members": P,              runs trained together in one program (seeds), P >= 1
         "model": {...},            the model config the params fit (rlhf_jax.models.presets' fields)
         "tokenizer": {...},        the run's tokenizer config
         "seq_len": 256,            reward models: the window they were trained to score
         "normalization": {"mean", "std"} | null,   reward models: fitted on policy samples
         "lora": {...} | null, "base": "<realpath>"} reward models trained with LoRA: adapters kept
                                    too, with the run their base is
    <run>/handoff/params/<step>/  Orbax checkpoint {"params": [P, ...]}: the merged params
                                  (LoRA adapters folded in; head 'lm' or 'scalar'), one slice per
                                  member, verified against its manifest.json like any checkpoint
    <run>/handoff/lora/<step>/    LoRA reward models: {"params": [P, ...]} of {'lora', 'scalar_head'}

The loaders below read this layout and nothing else of the run: they never import a stage
module, and a run of any stage, today's or a future one, hands off the same way.

    model_config, graphdef, params = load_policy(workdir[, seed_index])
    model_config, graphdef, params, norm = load_reward_model(workdir)
"""

from __future__ import annotations

import json
import os
import shutil
import sys

import jax
import ml_collections
import numpy as np

from rlhf_jax.models import lora, model as model_lib, sampling
from rlhf_jax.models.tokenizer import make_tokenizer
from rlhf_jax.runtime import checkpoints, config as config_lib, distributed
from rlhf_jax.runtime.optim import make_optimizer

HANDOFF_DIR = "handoff"
HANDOFF_FILE = "handoff.json"
FORMAT = 1
NORMALIZATION_FILE = "reward_normalization.json"
# The stages whose runs hand off a language-model policy (what `sample`, `export` and the
# drivers read); the one definition (the pipeline's report takes its last RL stage from it).
POLICY_STAGES = ("pretrain", "sft", "ppo", "dpo")
RL_STAGES = ("ppo", "dpo")


class NoPolicy(config_lib.ConfigError):
    """The run hands off no language-model policy (a reward model, the snack learner)."""


# ----------------------------------------------------------------------------- writing


def stack_members(params, members: int):
    """Params of a run with `members` runs trained together: already [P, ...] when P > 1, a
    leading axis of 1 added otherwise (the hand-off always has the member axis)."""
    return params if members > 1 else jax.tree.map(lambda x: x[None], params)


def _to_dict(config) -> dict | None:
    return None if config is None else json.loads(config.to_json_best_effort())


def _write(workdir: str, info: dict, trees: dict) -> None:
    """Save each tree under handoff/<name>/<step>/ (collective), then handoff.json (process 0)."""
    folder = os.path.join(workdir, HANDOFF_DIR)
    if distributed.is_main_process() and os.path.exists(folder):  # a rerun writes it anew
        shutil.rmtree(folder)
    distributed.barrier("hand-off cleared")
    for name, tree in trees.items():
        manager = checkpoints.checkpoint_manager(folder, max_to_keep=1, subfolder=name)
        try:
            checkpoints.save_checkpoint(manager, info["step"], {"params": tree})
        finally:
            manager.close()
    if distributed.is_main_process():
        config_lib.write_json_atomic(os.path.join(folder, HANDOFF_FILE), {"format": FORMAT, **info})
    distributed.barrier("hand-off written")


def write_policy(workdir: str, config, params, *, members: int = 1, step: int | None = None) -> None:
    """Hand off a policy: `params` merged (no LoRA split), [P, ...] when members > 1."""
    info = dict(kind="policy", stage=config.get("stage"), step=int(step if step is not None else config.num_steps),
                members=int(members), model=_to_dict(config.model), tokenizer=_to_dict(config.get("tokenizer")),
                seq_len=config.get("seq_len"), normalization=None, lora=None, base=None)
    _write(workdir, info, {"params": stack_members(params, members)})


def write_reward_model(workdir: str, config, params, normalization: dict | None, adapters=None) -> None:
    """Hand off a reward model: merged params (head 'scalar'), and with LoRA its adapters too."""
    norm = None if normalization is None else {"mean": float(normalization["mean"]), "std": float(normalization["std"])}
    with_lora = adapters is not None
    info = dict(kind="reward_model", stage=config.get("stage"), step=int(config.num_steps), members=1,
                model=_to_dict(config.model), tokenizer=_to_dict(config.get("tokenizer")), seq_len=config.get("seq_len"),
                normalization=norm, lora=_to_dict(config.lora) if with_lora else None,
                base=os.path.realpath(config.init_from) if with_lora else None)
    trees = {"params": stack_members(params, 1)}
    if with_lora:
        trees["lora"] = stack_members(adapters, 1)
    _write(workdir, info, trees)


def save_random_run(workdir: str, model_config, seed: int = 0):
    """A finished 'SFT run' of randomly initialised params (config.json, the hand-off, DONE): a
    stand-in policy for tests and benchmarks of the later stages. Returns the params."""
    config = ml_collections.ConfigDict(dict(stage="sft", model=model_config, num_steps=0,
                                            tokenizer=dict(kind="byte", path="")))
    config_lib.write_resolved_config(config, workdir)
    _, params = model_lib.init_params(model_config, "lm", seed)
    write_policy(workdir, config, params)
    checkpoints.mark_finished(workdir, "random init")
    return params


# ----------------------------------------------------------------------------- reading


def _check_kind(workdir: str, stage, kind: str | None, handed_off: str | None) -> None:
    """Refuse a run of the wrong stage before anything else is said about it."""
    if kind == "policy" and (stage not in POLICY_STAGES or handed_off not in (None, "policy")):
        raise NoPolicy(f"{workdir} is a {stage!r} run, which hands off no language-model policy; this needs "
                       f"a run of stage {' / '.join(POLICY_STAGES)}")
    if kind == "reward_model" and (stage != "reward" or handed_off not in (None, "reward_model")):
        raise config_lib.ConfigError(f"{workdir} is a {stage!r} run; a reward model is a 'reward' run "
                                     "(rlhf-jax train --config=experiments/reviews/reward.py)")


def read_handoff(workdir: str, kind: str | None = None) -> dict:
    """handoff.json of a run; a clear error saying why a run has none, or (kind 'policy' /
    'reward_model' given) why it is the wrong stage."""
    path = os.path.join(workdir, HANDOFF_DIR, HANDOFF_FILE)
    if os.path.isfile(path):
        try:
            with open(path, encoding="utf-8") as f:
                info = json.load(f)
        except (OSError, ValueError) as e:
            raise checkpoints.DamagedCheckpoint(f"{path}: cannot be read ({e})") from None
        if not isinstance(info, dict) or info.get("format") != FORMAT:
            raise checkpoints.DamagedCheckpoint(f"{path}: expected a hand-off of format {FORMAT}")
        _check_kind(workdir, info.get("stage"), kind, info.get("kind"))
        return info
    run_config = config_lib.read_resolved_config(workdir)  # (says so when there is no run there)
    stage = run_config.get("stage")
    _check_kind(workdir, stage, kind, None)
    if stage not in POLICY_STAGES + ("reward",):
        raise NoPolicy(f"{workdir} is a {stage!r} run, which hands off no language-model policy or reward model")
    if not checkpoints.is_finished(workdir):
        step = checkpoints.latest_step(workdir)
        last = f"its last checkpoint is step {step}" if step is not None else "it has no checkpoint"
        raise config_lib.CheckpointError(f"{workdir}: the {stage} run has not finished ({last} of "
                                         f"num_steps={run_config.get('num_steps')}; "
                                         f"no {HANDOFF_DIR}/{HANDOFF_FILE}): run its command again to finish it, or "
                                         "set --config.init_from_unfinished=True to start from that checkpoint")
    raise config_lib.CheckpointError(
        f"{workdir}: finished before runs wrote {HANDOFF_DIR}/ (2026-12-02): run its `rlhf-jax train` command "
        "again on this workdir; it writes the hand-off from the last checkpoint without training")


def _restore(workdir: str, info: dict, name: str, abstract, members: int):
    target = {"params": jax.tree.map(lambda x: jax.ShapeDtypeStruct((members,) + tuple(x.shape), x.dtype), abstract)}
    manager = checkpoints.checkpoint_manager(os.path.join(workdir, HANDOFF_DIR), subfolder=name)
    try:
        # Hand-offs were always written with a manifest: one without is never used unverified.
        found = checkpoints.restore_checkpoint(manager, target, info["step"], require_manifest=True)
    finally:
        manager.close()
    if found is None:
        raise checkpoints.DamagedCheckpoint(f"{os.path.join(workdir, HANDOFF_DIR, name)}: holds no step {info['step']}")
    params = found[1]["params"]
    if jax.process_count() == 1:
        # Restored replicated on every device (what several processes need); on one process the
        # params become uncommitted arrays on the default device instead, or every program that
        # reads them alone (sampling, scoring) would run once per device: 8 times the work with 8
        # devices. Uncommitted, they still join arrays placed on a mesh (moved there by jit), and
        # a stage with a mesh places them itself.
        params = jax.tree.map(lambda x: jax.device_put(np.asarray(x)), params)
    return params


def _member(tree, index: int):
    return jax.tree.map(lambda x: x[index], tree)


def load_policy(workdir: str, seed_index: int = 0):
    """The language-model policy a run handed off: (model_config, graphdef, params).
    A run that trained several seeds in one program gives seed `seed_index`'s."""
    info = read_handoff(workdir, "policy")
    if not 0 <= seed_index < info["members"]:  # (JAX would clamp an index out of range, silently)
        raise ValueError(f"seed_index={seed_index}: {workdir} trained num_seeds={info['members']}")
    model_config = model_lib.stored_model_config(info["model"])
    graphdef, abstract = model_lib.abstract_params(model_config, "lm")
    params = _member(_restore(workdir, info, "params", abstract, info["members"]), seed_index)
    return model_config, graphdef, params


def load_unfinished_policy(workdir: str):
    """The policy params of an unfinished run's last checkpoint: (model_config, graphdef, params).

    Only where the checkpoint holds the whole policy as `state['params']`: a pretrain, SFT or
    DPO run of one seed without LoRA (a LoRA run's checkpoint holds adapters only, a PPO run's
    a TrainState of several models); any other run has to be finished to hand off."""
    config = config_lib.read_resolved_config(workdir)
    stage = config.get("stage")
    _check_kind(workdir, stage, "policy", None)
    if stage not in ("pretrain", "sft", "dpo") or lora.enabled(config.get("lora")) or config.get("num_seeds", 1) > 1:
        raise config_lib.CheckpointError(
            f"{workdir}: init_from_unfinished reads an unfinished pretrain, SFT or DPO run of one seed without "
            f"LoRA; this {stage} run has to finish first (run its command again)")
    step = checkpoints.latest_step(workdir)
    state = checkpoints.load_state(workdir, supervised_abstract_state(config, "lm")[1], step)
    print(f"init_from {workdir}: the run has not finished; starting from its checkpoint of step {step} of "
          f"{config.get('num_steps')} (init_from_unfinished=True)", file=sys.stderr, flush=True)
    graphdef, _ = model_lib.abstract_params(config.model, "lm")
    return config.model, graphdef, state["params"]


def load_matching_policy(workdir: str, model_config, stage: str, unfinished_ok: bool = False):
    """load_policy, refusing a run whose model is not `model_config`: the calling run's own
    config.json must describe the params it will save, or they could not be restored.
    `unfinished_ok` (a config's init_from_unfinished): an unfinished run gives its last checkpoint."""
    if unfinished_ok and not checkpoints.is_finished(workdir):
        run_model, graphdef, params = load_unfinished_policy(workdir)
    else:
        run_model, graphdef, params = load_policy(workdir)
    differing = config_lib.differing_keys(run_model, model_config)
    changed = [k for k in differing if k not in model_lib.COMPUTE_FIELDS]
    if changed:
        raise config_lib.ConfigError(
            f"{stage}: config.model differs from the model of {workdir} (its hand-off) in {changed}; "
            "set --config.model.* to match")
    if differing:  # the same params, computed as this run says (a bfloat16 run from a float32 one)
        graphdef = model_lib.abstract_params(model_config, "lm")[0]
    return model_config, graphdef, params


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


def reward_model_info(workdir: str) -> dict:
    """handoff.json of a reward run (kind checked): model, tokenizer, seq_len, normalization, lora."""
    return read_handoff(workdir, "reward_model")


def load_reward_model(workdir: str, merge_lora: bool = True):
    """A reward run's hand-off: (model_config, graphdef, params, normalization {'mean', 'std'}).

    normalization is {'mean': 0.0, 'std': 1.0} when the run fitted none. Score with
    model.reward_scores(graphdef, params, tokens, mask), then (r - mean) / std.
    With merge_lora=False a LoRA reward run gives {'lora', 'scalar_head'} only (the caller holds
    the trunk: the run its base names, info['base'])."""
    info = reward_model_info(workdir)
    model_config = model_lib.stored_model_config(info["model"])
    graphdef, abstract = model_lib.abstract_params(model_config, "scalar")
    if info.get("lora") and not merge_lora:
        lora_config = ml_collections.ConfigDict(info["lora"])
        adapters = jax.eval_shape(lambda p: lora.split(p, lora_config, 0, ("scalar_head",))[0], abstract)
        params = _member(_restore(workdir, info, "lora", adapters, 1), 0)
    else:
        params = _member(_restore(workdir, info, "params", abstract, 1), 0)
    normalization = info.get("normalization") or {"mean": 0.0, "std": 1.0}
    return model_config, graphdef, params, normalization


class PolicySampler:
    """A run's policy loaded once, sampled many times: what `rlhf-jax sample` uses for one prompt and
    the chat mode of `rlhf-jax serve` for every turn (one loading path for both).

        sampler = PolicySampler(workdir)
        texts = sampler(prompt, num=2, temperature=1.0, max_new_tokens=64, seed=0)
    """

    def __init__(self, workdir: str):
        self.workdir = workdir
        info = read_handoff(workdir, "policy")
        self.model_config, self.graphdef, self.params = load_policy(workdir)
        self.tokenizer = make_tokenizer(ml_collections.ConfigDict(info["tokenizer"]) if info.get("tokenizer") else None)
        self.stage = info["stage"]

    def __call__(self, prompt: str, num: int, temperature: float = 1.0, max_new_tokens: int = 128,
                 greedy: bool = False, seed: int = 0) -> list[str]:
        """The prompt keeps as many of its last tokens as the window leaves beside max_new_tokens."""
        window = int(self.model_config.max_len)
        if max_new_tokens >= window:
            raise config_lib.ConfigError(f"max_new_tokens={max_new_tokens}: the model's window (model.max_len) is {window} "
                              "tokens, prompt included; ask for fewer")
        return sampling.generate_texts(self.graphdef, self.params, self.tokenizer, [prompt] * num,
                                       max_new_tokens=max_new_tokens, rng=jax.random.key(seed),
                                       temperature=temperature, greedy=greedy, max_prompt_len=window - max_new_tokens)


def sample_from_run(workdir, prompt, num, temperature=1.0, max_new_tokens=128, greedy=False, seed=0):
    """`rlhf-jax sample`: `num` responses of a run's policy (any policy stage) to one prompt."""
    sampler = PolicySampler(workdir)
    print(f"sampling from {workdir} (temperature {temperature}{', greedy' if greedy else ''})", file=sys.stderr)
    return sampler(prompt, num, temperature, max_new_tokens, greedy, seed)


def score_from_run(workdir: str, prompt: str, response: str) -> float:
    """`rlhf-jax score`: the normalised reward of prompt + response under a reward run."""
    info = reward_model_info(workdir)
    tokenizer = make_tokenizer(ml_collections.ConfigDict(info["tokenizer"]) if info.get("tokenizer") else None)
    _, graphdef, params, normalization = load_reward_model(workdir)
    tokens, mask = sampling.encode_prompt_responses(tokenizer, [prompt], [response], int(info["seq_len"]))
    raw = jax.jit(model_lib.reward_scores, static_argnums=0)(graphdef, params, tokens, mask)
    return float((np.asarray(raw, np.float64)[0] - normalization["mean"]) / normalization["std"])


# ----------------------------------------------------------------------------- config checks (stages.registry.validate runs them)


def check_init_from(c, required: bool = False):
    c.boolean("init_from_unfinished")
    if c.get("init_from_unfinished") and c.get("lora.rank"):
        c.fail("init_from_unfinished", True, "a LoRA run's hand-off merges its adapters into init_from's own "
               "hand-off: let init_from finish first")
    if c.get("init_from") and c.get("init_from_hf"):
        c.fail("init_from_hf", c.get("init_from_hf"), "set at most one of init_from and init_from_hf")
    if required and not c.get("init_from"):
        c.fail("init_from", c.get("init_from"), f"expected the workdir of the run this {c.get('stage')} stage starts from")
