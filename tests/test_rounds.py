"""`rlhf-jax rounds` with a micro model: two rounds end to end (pairs from the current policy into
the one label store, simulated labels, reward model on all labels so far, PPO continued from the
previous round with the SFT reference), the report, and resuming a finished or killed run."""

import json
import os

import pytest
from test_reward import fake_sft_run, micro_model, tiny_reward_config

from configs import datasets, optimizers, ppo as ppo_configs
from rlhf_jax.drivers import rounds
from rlhf_jax.people import label_store
from rlhf_jax.runtime import checkpoints, config as config_lib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tiny_rounds_config(sft_dir, data_dir, **fields):
    c = config_lib.load_config_file(os.path.join(REPO, "experiments", "reviews", "rounds.py"))
    c.num_rounds = 2
    c.base_policy = str(sft_dir)
    c.data_dir = str(data_dir)
    c.pairs.prompts = datasets.reviews_sft(num_train=64, num_validation=32)
    c.pairs.update(num_prompts=8, num_validation_prompts=4, samples_per_prompt=2, batch_size=8, max_prompt_len=16,
                   max_new_tokens=8)
    c.reward = tiny_reward_config(sft_dir, data_dir, num_steps=6)
    c.reward.preferences.enabled = False
    c.reward.eval_every = 6
    c.reward.checkpoint_every = 6
    c.ppo = ppo_configs.trl(num_steps=2)
    c.ppo.update(model=micro_model(), data=datasets.reviews_sft(num_train=64, num_validation=32),
                 data_dir=str(data_dir), batch_size=8, max_prompt_len=16, max_new_tokens=8, num_minibatches=2,
                 ppo_epochs=1, log_every=1, checkpoint_every=100, sample_every=0, gold_function=rounds.labelers.__name__
                 + ":vader_gold_score")
    c.ppo.optimizer = optimizers.adam(1e-3, grad_clip_norm=1.0)
    c.eval.update(num_prompts=4, max_new_tokens=8)
    c.update(fields)
    c.lock()
    return c


@pytest.fixture(scope="module")
def sft(tmp_path_factory):
    root = tmp_path_factory.mktemp("rounds_sft")
    fake_sft_run(root / "sft", root / "data")
    return root / "sft", root / "data"


@pytest.mark.slow  # about 60 s on 2 CPU cores: two rounds of sampling, reward, PPO and evaluation
def test_two_rounds_of_ppo_with_simulated_labels_and_resume(sft, tmp_path):
    sft_dir, data_dir = sft
    config = tiny_rounds_config(sft_dir, data_dir)
    workdir = str(tmp_path / "rounds")
    results = rounds.run_rounds_from_config(config, workdir)
    assert [r.round for r in results] == [0, 1]
    store = label_store.LabelStore(os.path.join(workdir, rounds.STORE_DIR, label_store.STORE_FILE))
    for r in (0, 1):
        pairs = store.pairs(rounds.source_of(r))
        assert pairs and all(p.id.startswith(f"r{r}-") for p in pairs)
        assert {p.split for p in pairs} == {"train", "validation"}
    # Round 1 sampled from round 0's policy, on prompts round 0 never saw.
    assert store.pairs("round-1")[0].metadata["policy"] == results[0].policy
    assert not {p.prompt for p in store.pairs("round-0")} & {p.prompt for p in store.pairs("round-1")}
    # Every pair answered once by the simulated annotator; round 1's reward model saw both rounds' labels.
    assert len(store.answers("simulated")) == len(store.pairs())
    assert results[1].labelled_pairs == len(store.preferences()) > results[0].labelled_pairs
    # The distribution-shift number exists from round 1 on; the policy was continued, reference = SFT.
    assert results[0].rm_accuracy_before is None and 0.0 <= results[1].rm_accuracy_before <= 1.0
    ppo1 = config_lib.read_resolved_config(results[1].policy)
    assert ppo1.init_from == results[0].policy and ppo1.reference_from == str(sft_dir)
    assert ppo1.reward_model == os.path.join(rounds.round_dir(workdir, 1), "reward")
    reward1 = config_lib.read_resolved_config(os.path.join(rounds.round_dir(workdir, 1), "reward"))
    assert reward1.continue_from == os.path.join(rounds.round_dir(workdir, 0), "reward")
    assert checkpoints.is_finished(results[1].policy)
    table = open(os.path.join(workdir, "rounds.md")).read()
    assert "| SFT |" in table and "| 1 |" in table and os.path.getsize(os.path.join(workdir, "rounds.png")) > 0

    # A finished run trains nothing again; a run killed after round 0 redoes only round 1.
    before = json.load(open(os.path.join(rounds.round_dir(workdir, 1), rounds.ROUND_FILE)))
    os.remove(os.path.join(rounds.round_dir(workdir, 1), rounds.ROUND_FILE))
    again = rounds.run_rounds_from_config(config, workdir)
    assert [r.policy for r in again] == [r.policy for r in results]
    assert json.load(open(os.path.join(rounds.round_dir(workdir, 1), rounds.ROUND_FILE)))["gold"] == before["gold"]
    assert len(store.answers("simulated")) == len(store.pairs())  # nothing labelled twice


def test_bad_round_settings_are_named(sft, tmp_path):
    sft_dir, data_dir = sft
    for field, value, message in (("reference", "base", "reference"), ("policy_stage", "sft", "policy_stage"),
                                  ("labeler", "crowd", "labeler"), ("num_rounds", 0, "num_rounds")):
        with pytest.raises(config_lib.ConfigError, match=message):
            rounds.run_rounds_from_config(tiny_rounds_config(sft_dir, data_dir, **{field: value}), str(tmp_path))
    # More rounds than the prompt split has fresh blocks for.
    config = tiny_rounds_config(sft_dir, data_dir, num_rounds=9)
    with pytest.raises(config_lib.ConfigError, match="round 8 needs prompts"):
        rounds.fresh_prompts(config, "train", 8, 8)


def test_reference_from_is_refused_with_lora(sft, tmp_path):
    """With LoRA the reference is the base the adapters sit on (init_from): another reference run
    cannot be that base, so the stages refuse the combination instead of training against it."""
    from configs import lora as lora_configs
    from configs.dpo import dpo_stage
    from rlhf_jax.stages import dpo

    sft_dir, data_dir = sft
    config = dpo_stage(num_steps=1, batch_size=4, seq_len=32)
    config.update(model=micro_model(), init_from=str(sft_dir), reference_from=str(sft_dir), data_dir=str(data_dir))
    config.lora = lora_configs.rank(2)
    with pytest.raises(config_lib.ConfigError, match="reference_from: with LoRA"):
        dpo.train(config, str(tmp_path / "dpo"))
