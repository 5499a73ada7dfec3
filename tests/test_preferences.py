"""Preference generation: pairing, the stored dataset and its metadata, idempotence, resume after a
kill, and the human and function labelers."""

import json
import os

import pytest
from test_reward import fake_sft_run, tiny_reward_config

from rlhf_jax.data import loaders
from rlhf_jax.people import labelers
from rlhf_jax.runtime import config as config_lib
from rlhf_jax.stages import preferences


@pytest.fixture(scope="module")
def sft(tmp_path_factory):
    root = tmp_path_factory.mktemp("sft")
    fake_sft_run(root / "sft", root / "data")
    return root / "sft", root / "data"


def config_for(sft, **preference_fields):
    sft_dir, data_dir = sft
    config = tiny_reward_config(sft_dir, data_dir)
    config.preferences.batch_size = 4  # 8 train prompts: two sampling calls
    config.preferences.update(preference_fields)
    return config


def records(sources):
    """{split: [record]} with the labeling time left out of the metadata (it differs per call)."""
    out = {}
    for split, source in sources.items():
        out[split] = []
        for r in loaders.read_all(source):
            meta = json.loads(r["metadata"])
            meta.pop("time", None)
            out[split].append({**r, "metadata": json.dumps(meta, sort_keys=True)})
    return out


def test_pairing_all_and_disjoint():
    rows = [{"split": "train", "index": 3, "prompt": "p", "responses": [" a", " b", " c", " a"]}]
    every = preferences.make_pairs(rows, "all")
    # 6 index pairs, minus (0, 3): identical responses carry no preference.
    assert [p["id"] for p in every] == ["train-3-0-1", "train-3-0-2", "train-3-1-2", "train-3-1-3", "train-3-2-3"]
    assert [(p["response_a"], p["response_b"]) for p in preferences.make_pairs(rows, "disjoint")] == [(" a", " b"),
                                                                                                     (" c", " a")]
    with pytest.raises(config_lib.ConfigError, match="pairing"):
        preferences.make_pairs(rows, "some")


def test_simulated_preferences_metadata_idempotent_and_resumable(sft, tmp_path, monkeypatch):
    config = config_for(sft, noise_temperature=0.5)
    out = str(tmp_path / "prefs")
    sources = preferences.make_preferences(config, out)
    assert "time" in json.loads(sources["train"][0]["metadata"])
    stored = records(sources)
    assert set(stored) == {"train", "validation"}
    # 8 and 4 prompts x all 6 pairs of 4 samples (random-init samples are never identical).
    assert len(stored["train"]) == 48 and len(stored["validation"]) == 24
    record = stored["train"][0]
    meta = json.loads(record["metadata"])
    assert {"id", "split", "labeler", "choice", "p_a", "gold_a", "gold_b", "gold_chosen", "gold_rejected",
            "sampling"} <= set(meta)
    assert meta["labeler"] == "simulated" and meta["split"] == "train"
    assert meta["sampling"]["temperature"] == 1.0 and meta["sampling"]["samples_per_prompt"] == 4
    assert meta["sampling"]["policy"] == config.init_from
    assert 0.0 <= meta["p_a"] <= 1.0
    assert meta["gold_chosen"] == labelers.vader_gold_score(record["prompt"], record["chosen"])
    summary = json.load(open(os.path.join(out, preferences.SUMMARY_FILE)))
    assert summary["num_pairs"] == {"train": 48, "validation": 24}

    # Idempotent: a second call samples nothing and returns the same dataset.
    def no_sampling(*args, **kwargs):
        raise AssertionError("sampled again")

    with monkeypatch.context() as m:
        m.setattr(preferences, "sample_responses", no_sampling)
        assert records(preferences.make_preferences(config, out)) == stored

    # A different config in the same directory is refused.
    other = config_for(sft, noise_temperature=0.5, temperature=0.7)
    with pytest.raises(config_lib.ConfigError, match="different config"):
        preferences.make_preferences(other, out)

    # Killed during the second train sampling call (a torn line, no summary): the rerun redoes only
    # that call and ends with the dataset of the uninterrupted run.
    samples_path = os.path.join(out, preferences.SAMPLES_FILE)
    lines = open(samples_path).read().splitlines(keepends=True)
    train_lines = [line for line in lines if json.loads(line)["split"] == "train"]
    assert len(train_lines) == 8
    with open(samples_path, "w") as f:
        f.writelines(train_lines[:5])
        f.write(train_lines[5][:20])
    os.remove(os.path.join(out, preferences.SUMMARY_FILE))
    assert records(preferences.make_preferences(config, out)) == stored
    assert len(open(samples_path).read().splitlines()) == 12  # no row twice


def preferred_length(prompt, response):
    return float(len(response))


def test_function_and_human_labelers(sft, tmp_path):
    config = config_for(sft, labeler="function", function="test_preferences:preferred_length",
                        num_validation_prompts=0, pairing="disjoint")
    stored = records(preferences.make_preferences(config, str(tmp_path / "function")))
    assert set(stored) == {"train"} and len(stored["train"]) == 16
    for r in stored["train"]:
        assert len(r["chosen"]) >= len(r["rejected"])
        assert json.loads(r["metadata"])["labeler"] == "function:test_preferences:preferred_length"

    out = str(tmp_path / "human")
    config = config_for(sft, labeler="human", pairing="disjoint")
    with pytest.raises(preferences.LabelsNeeded, match="rlhf-jax label --data="):
        preferences.make_preferences(config, out)
    pairs = labelers.read_pairs(out)
    assert len(pairs) == 24
    # A person answers (here: the first response, except one skip), then the stage runs again.
    with open(os.path.join(out, labelers.LABELS_FILE), "w") as f:
        for i, p in enumerate(pairs):
            f.write(json.dumps({"id": p["id"], "choice": None if i == 0 else 0, "labeler": "human",
                                "time": "t"}) + "\n")
    stored = records(preferences.make_preferences(config, out))
    assert len(stored["train"]) == 15 and len(stored["validation"]) == 8
    meta = json.loads(stored["validation"][0]["metadata"])
    assert meta["labeler"] == "human" and meta["split"] == "validation" and "gold_chosen" in meta
    by_id = {p["id"]: p for p in pairs}
    assert stored["validation"][0]["chosen"] == by_id[meta["id"]]["response_a"]
