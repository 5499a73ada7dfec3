"""Preference pairs from a policy's own samples: sample K per prompt, pair, label, store.

    sources = make_preferences(config, out_dir)     # {'train': source, 'validation': source}

`config` is a reward- or DPO-stage config (configs/reward.py, configs/dpo.py); `config.preferences`
says how:

  1. sample  K = samples_per_prompt responses to each of num_prompts prompts (prompt_batches
             over the `prompts` dataset, train_split; and num_validation_prompts from
             validation_split for held-out pairs) from the policy run (default config.init_from,
             the SFT run), at the configured temperature / top-k / top-p;
  2. pair    'all' pairs of the K responses (K(K-1)/2 per prompt) or 'disjoint' ones (K/2);
             pairs of two identical responses are dropped (their label would be noise);
  3. label   'simulated': the Bradley-Terry annotator over the gold score (VADER) with
                          `noise_temperature`;
             'function':  a deterministic labeler preferring the higher fn(prompt, response);
             'human':     pairs.jsonl is written to out_dir for `rlhf-jax label --data=<out_dir>`
                          or `rlhf-jax serve --data=<out_dir>`; once answered, labels are read
                          back from the label store out_dir/labels.sqlite (majority of votes);
  4. store   builders.write_preferences(..., data_dir=<out_dir>/tfds, name='preferences'), one
             record per pair with metadata: pair id, split, labeler, choice, p_a, gold_a/gold_b
             (the labeler's scores; for human labels the gold fn's), gold_chosen/gold_rejected,
             the sampling config and the time.

Files in out_dir:
    samples.jsonl        {'split', 'batch', 'index', 'prompt', 'responses'} per prompt, appended per
                         sampling call, so a killed run resumes at the next call; the call's rng is
                         fold_in(seed, split, call), so a resumed run samples what a straight one would
    pairs.jsonl          human labeler: the pairs to label;  labels.sqlite: the label store
    preferences.json     written last: the generation config, counts, time. Its presence (with the
                         same config) makes make_preferences a no-op that only loads the dataset.

Imported preference files do not come through here: use the `preferences_jsonl` dataset config.
"""

from __future__ import annotations

import datetime
import itertools
import json
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np

from rlhf_jax.data import builders, loaders
from rlhf_jax.models import sampling
from rlhf_jax.models.tokenizer import make_tokenizer
from rlhf_jax.people import labelers
from rlhf_jax.runtime import config as config_lib
from rlhf_jax.runtime.jsonl import read_jsonl
from rlhf_jax.stages import runs

SAMPLES_FILE = "samples.jsonl"
SUMMARY_FILE = "preferences.json"
TFDS_DIR = "tfds"
RECORDS_NAME = "preferences"
LABELERS = ("simulated", "function", "human")
PAIRINGS = ("all", "disjoint")


class LabelsNeeded(RuntimeError):
    """The human labeler has pairs to answer before preferences can be stored."""


# ----------------------------------------------------------------------------- sampling


def sample_responses(graphdef, params, tokenizer, source, *, num_prompts, samples_per_prompt,
                     batch_size, max_prompt_len, max_new_tokens, temperature, top_k=0, top_p=1.0,
                     seed=0, start_call=0):
    """Yield (call, [{'index', 'prompt', 'responses': [K str]}]) per sampling call.

    Prompts: the first ceil(num_prompts / batch_size) batches of prompt_batches(source, ...,
    shuffle seed `seed`), cut to num_prompts. Each call samples batch_size * K rows, the K copies
    of a prompt adjacent; its rng is fold_in(key(seed), call). Calls before `start_call` are
    skipped (resume).
    """
    batch_size = min(batch_size, num_prompts, len(source))
    batches = loaders.prompt_batches(source, tokenizer, max_prompt_len, batch_size, seed)
    num_calls = -(-num_prompts // batch_size)
    k = samples_per_prompt
    for call in range(start_call, num_calls):
        batch = batches[call]
        keep = min(batch_size, num_prompts - call * batch_size)
        tokens = np.repeat(batch["prompt_tokens"][:keep], k, axis=0)  # [keep * K, P]
        mask = np.repeat(batch["prompt_mask"][:keep], k, axis=0)
        out = sampling.generate(graphdef, params, jnp.asarray(tokens), jnp.asarray(mask),
                                jax.random.fold_in(jax.random.key(seed), call),
                                max_new_tokens=max_new_tokens, eos_id=tokenizer.eos_id,
                                pad_id=tokenizer.pad_id, temperature=temperature, top_k=top_k,
                                top_p=top_p)
        texts = sampling.decode_responses(tokenizer, np.asarray(out["response"]),
                                          np.asarray(out["response_mask"]))
        prompts = loaders.prompt_texts(source, batch["index"][:keep])
        yield call, [{"index": int(i), "prompt": p, "responses": texts[j * k:(j + 1) * k]}
                     for j, (i, p) in enumerate(zip(batch["index"][:keep], prompts))]


def _sample_split(out_dir, split, num_prompts, pcfg, policy, prompt_source, tokenizer):
    """Sample (or resume sampling) one split's prompts into samples.jsonl; return its rows."""
    path = os.path.join(out_dir, SAMPLES_FILE)
    every_row = read_jsonl(path, appended=True)
    rows = [r for r in every_row if r["split"] == split]
    # Keep the calls complete from the first on; a call cut short by a kill is redone whole.
    per_call = min(pcfg.batch_size, num_prompts, len(prompt_source))
    start = 0
    while sum(r["batch"] == start for r in rows) == min(per_call, num_prompts - start * per_call) > 0:
        start += 1
    rows = [r for r in rows if r["batch"] < start]
    if len(rows) < sum(r["split"] == split for r in every_row) or os.path.exists(path) and not _ends_clean(path):
        _rewrite_jsonl(path, [r for r in every_row if r["split"] != split] + rows)
    if start * per_call >= num_prompts:
        return rows  # all sampled earlier; the policy is not even loaded
    graphdef, params = policy()
    seed = (pcfg.seed * 7919 + _split_id(split)) % 2**31  # prompt order and sampling rng, per split
    generator = sample_responses(
        graphdef, params, tokenizer, prompt_source, num_prompts=num_prompts,
        samples_per_prompt=pcfg.samples_per_prompt, batch_size=pcfg.batch_size,
        max_prompt_len=pcfg.max_prompt_len, max_new_tokens=pcfg.max_new_tokens,
        temperature=pcfg.temperature, top_k=pcfg.top_k, top_p=pcfg.top_p, seed=seed,
        start_call=start)
    with open(path, "a", encoding="utf-8") as f:
        for call, items in generator:
            for item in items:
                row = {"split": split, "batch": call, **item}
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
                rows.append(row)
            f.flush()
            os.fsync(f.fileno())
            print(f"preferences: sampled {len(rows)}/{num_prompts} {split} prompts", file=sys.stderr,
                  flush=True)
    return rows


def _ends_clean(path) -> bool:
    with open(path, "rb") as f:
        f.seek(0, os.SEEK_END)
        if f.tell() == 0:
            return True
        f.seek(-1, os.SEEK_END)
        return f.read(1) == b"\n"


def _rewrite_jsonl(path, rows):
    with open(path + ".tmp", "w", encoding="utf-8") as f:
        f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
    os.replace(path + ".tmp", path)


def _split_id(split: str) -> int:
    """A stable small integer per split name (Python's hash() of a str changes per process)."""
    return int.from_bytes(split.encode("utf-8")[:4].ljust(4, b"\0"), "little")


# ----------------------------------------------------------------------------- pairs and labels


def make_pairs(rows, pairing: str) -> list[dict]:
    """Pairs {'id', 'prompt', 'response_a', 'response_b', 'split'} from sampled rows.

    'all': every (i, j), i < j, of the K responses; 'disjoint': (0, 1), (2, 3), ...
    Identical responses are never paired.
    """
    pairs = []
    for row in rows:
        k = len(row["responses"])
        if pairing == "all":
            index_pairs = itertools.combinations(range(k), 2)
        elif pairing == "disjoint":
            index_pairs = [(i, i + 1) for i in range(0, k - 1, 2)]
        else:
            raise config_lib.ConfigError(f"preferences.pairing={pairing!r}: expected 'all' or 'disjoint'")
        for i, j in index_pairs:
            a, b = row["responses"][i], row["responses"][j]
            if a == b:
                continue
            pairs.append({"id": f"{row['split']}-{row['index']}-{i}-{j}", "prompt": row["prompt"],
                          "response_a": a, "response_b": b, "split": row["split"]})
    return pairs


def make_labeler(pcfg):
    """(labeler fn, name) for 'simulated' or 'function'."""
    if pcfg.labeler == "simulated":
        gold = labelers.load_function(pcfg.gold)
        rng = np.random.default_rng(pcfg.seed)
        return labelers.simulated_annotator(gold, pcfg.noise_temperature, rng), "simulated"
    if pcfg.labeler == "function":
        if not pcfg.function:
            raise config_lib.ConfigError("preferences.labeler='function' needs preferences.function "
                                         "(an import path 'package.module:fn')")
        return labelers.function_labeler(pcfg.function), f"function:{pcfg.function}"
    raise config_lib.ConfigError(f"preferences.labeler={pcfg.labeler!r}: expected one of {LABELERS}")


def _human_preferences(out_dir, pairs, pcfg):
    """Write pairs.jsonl (once) and return the labeled records, or raise LabelsNeeded."""
    if not os.path.exists(os.path.join(out_dir, labelers.PAIRS_FILE)):
        labelers.write_pairs(out_dir, pairs)
    store = labelers.open_store(out_dir)  # the label store both labelers write (labels.sqlite)
    answered = store.num_answered()
    need = pcfg.min_labels or len(pairs)
    if answered < need:
        raise LabelsNeeded(
            f"{answered} of {len(pairs)} pairs in {os.path.join(out_dir, labelers.PAIRS_FILE)} are "
            f"answered; {need} are needed. Label them with `rlhf-jax label --data={out_dir}` or "
            f"`rlhf-jax serve --data={out_dir}` and run this stage again (it resumes).")
    gold = labelers.load_function(pcfg.gold)
    records = store.preferences()
    for r in records:
        r["metadata"]["gold_chosen"] = float(gold(r["prompt"], r["chosen"]))
        r["metadata"]["gold_rejected"] = float(gold(r["prompt"], r["rejected"]))
    return records, answered


# ----------------------------------------------------------------------------- the entry point


def preference_data(config, workdir: str) -> dict:
    """The pairs a preference-trained stage (reward, DPO) reads: {split: source}. Generated into
    <workdir>/preferences with config.preferences.enabled, else the dataset config.data."""
    if config.preferences.enabled:
        out_dir = os.path.join(workdir, "preferences")
        if jax.process_count() > 1 and not os.path.exists(os.path.join(out_dir, SUMMARY_FILE)):
            # Sampling and labelling write one folder from one process; several would race.
            raise config_lib.ConfigError(
                f"{config.stage}: {out_dir} holds no finished preferences; a run of {jax.process_count()} processes "
                "reads them but does not make them. Make them with the same command on one process first "
                f"(it may be stopped once {SUMMARY_FILE} is written), or give the pairs in config.data")
        return make_preferences(config, out_dir)
    if not config.data or not config.data.get("name"):
        raise config_lib.ConfigError(f"{config.stage}: set preferences.enabled=True or a preference dataset in "
                                     "config.data")
    return builders.load_dataset(config.data, config.data_dir)


def generation_config(config) -> dict:
    """What determines the dataset: the preferences fields and the policy run. Stored and compared."""
    pcfg = config.preferences
    return {**config_lib.config_to_dict(pcfg), "policy": pcfg.policy or config.init_from,
            "tokenizer": config_lib.config_to_dict(config.tokenizer)}


def make_preferences(config, out_dir: str) -> dict:
    """Sample, pair, label and store preferences in out_dir; returns {split: source}.

    Idempotent: when out_dir/preferences.json holds the same generation config, the stored dataset
    is loaded and nothing is sampled. A different config in the same out_dir is an error. Killed
    midway, it resumes at the next sampling call. With the human labeler it raises LabelsNeeded
    until enough pairs are answered (and rebuilds the dataset when more answers come in).
    """
    pcfg = config.preferences
    os.makedirs(out_dir, exist_ok=True)
    wanted = generation_config(config)
    summary_path = os.path.join(out_dir, SUMMARY_FILE)
    tfds_dir = os.path.join(out_dir, TFDS_DIR)
    if os.path.exists(summary_path):
        with open(summary_path) as f:
            summary = json.load(f)
        if summary["config"] != wanted:
            raise config_lib.ConfigError(
                f"{out_dir} holds preferences made with a different config; use another directory")
        fresh_labels = pcfg.labeler == "human" and (
            labelers.open_store(out_dir).num_answered() != summary["num_answered"])
        if not fresh_labels:
            return builders.load_preferences(tfds_dir, RECORDS_NAME)
    # Compare against what an earlier, unfinished call sampled with.
    config_path = os.path.join(out_dir, "generation_config.json")
    if os.path.exists(config_path):
        with open(config_path) as f:
            if json.load(f) != wanted:
                raise config_lib.ConfigError(
                    f"{out_dir} holds samples made with a different config; use another directory")
    else:
        with open(config_path, "w") as f:
            json.dump(wanted, f, indent=2, sort_keys=True)

    tokenizer = make_tokenizer(config.tokenizer)
    policy_dir = pcfg.policy or config.init_from
    loaded = {}

    def policy():  # loaded only if something is left to sample
        if not loaded:
            _, graphdef, params = runs.load_policy(policy_dir)
            loaded["policy"] = (graphdef, params)
        return loaded["policy"]

    prompt_data = builders.load_dataset(pcfg.prompts, config.data_dir)
    splits = {"train": (pcfg.train_split, pcfg.num_prompts)}
    if pcfg.validation_split and pcfg.num_validation_prompts:
        splits["validation"] = (pcfg.validation_split, pcfg.num_validation_prompts)
    pairs = []
    for split, (prompt_split, num) in splits.items():
        if prompt_split not in prompt_data:
            raise config_lib.ConfigError(f"preferences: prompt dataset has no split {prompt_split!r} "
                                         f"(it has {sorted(prompt_data)})")
        rows = _sample_split(out_dir, split, num, pcfg, policy, prompt_data[prompt_split], tokenizer)
        pairs += make_pairs(rows, pcfg.pairing)

    now = datetime.datetime.now(datetime.timezone.utc).isoformat()
    sampling_config = {k: wanted[k] for k in ("policy", "temperature", "top_k", "top_p", "max_prompt_len",
                                              "max_new_tokens", "samples_per_prompt", "pairing", "seed")}
    num_answered = 0
    if pcfg.labeler == "human":
        records, num_answered = _human_preferences(out_dir, pairs, pcfg)
        split_of = {p["id"]: p["split"] for p in pairs}
        for r in records:
            r["metadata"]["split"] = split_of[r["metadata"]["id"]]
    else:
        labeler, name = make_labeler(pcfg)
        records = labelers.label_pairs(pairs, labeler, name)
        for r, p in zip(records, pairs):
            m = r["metadata"]
            m["split"] = p["split"]
            m["time"] = now
            chosen_first = m["choice"] == 0
            m["gold_chosen"] = m["gold_a"] if chosen_first else m["gold_b"]
            m["gold_rejected"] = m["gold_b"] if chosen_first else m["gold_a"]
    for r in records:
        r["metadata"]["sampling"] = sampling_config
    by_split = {s: [r for r in records if r["metadata"]["split"] == s] for s in splits}
    by_split = {s: rs for s, rs in by_split.items() if rs or s == "train"}
    sources = builders.write_preferences(by_split, tfds_dir, RECORDS_NAME)

    agree = [r["metadata"]["gold_chosen"] > r["metadata"]["gold_rejected"] for r in records
             if r["metadata"]["gold_chosen"] != r["metadata"]["gold_rejected"]]
    summary = {"config": wanted, "time": now, "labeler": pcfg.labeler, "num_answered": num_answered,
               "num_pairs": {s: len(rs) for s, rs in by_split.items()},
               "label_gold_agreement": float(np.mean(agree)) if agree else None}
    tmp = summary_path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(summary, f, indent=2, sort_keys=True)
    os.replace(tmp, summary_path)
    print(f"preferences: {summary['num_pairs']} pairs in {tfds_dir} (labels agree with gold on "
          f"{summary['label_gold_agreement']})", file=sys.stderr, flush=True)
    return sources


# ----------------------------------------------------------------------------- config checks (registry.validate runs them)


def check_preferences_config(c):
    """config.preferences: sample, pair and label (make_preferences), or read config.data."""
    if not c.get("preferences.enabled"):
        builders.check_dataset_config(c)
        return
    sampling.check_sampling_config(c, "preferences")
    c.integer("preferences.num_validation_prompts", 0)
    c.integer("preferences.samples_per_prompt", 2)
    c.choice("preferences.pairing", PAIRINGS)
    c.choice("preferences.labeler", LABELERS)
    c.number("preferences.noise_temperature", 0.0)
    c.integer("preferences.min_labels", 0)
    builders.check_dataset_config(c, "preferences.prompts")
    labeler = c.get("preferences.labeler")
    c.function_path("preferences.gold", required=labeler == "simulated")
    c.function_path("preferences.function", required=labeler == "function")
