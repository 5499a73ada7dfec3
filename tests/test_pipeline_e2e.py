"""End to end: the default pipeline, scaled down, offline on 2 CPU cores (several minutes)."""

import json
import os
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rlhf_jax.drivers import pipeline
from rlhf_jax.models import sampling
from rlhf_jax.models.tokenizer import ByteTokenizer
from rlhf_jax.runtime import metrics as metrics_lib
from rlhf_jax.stages import runs


ROOT = os.path.join(os.path.dirname(__file__), "..")
PIPELINE = os.path.join(ROOT, "experiments", "reviews", "pipeline.py")

SCALED_DOWN = [
    ("pretrain.num_steps", "300"), ("pretrain.optimizer.decay_steps", "300"), ("pretrain.eval_every", "150"),
    ("pretrain.checkpoint_every", "150"), ("pretrain.sample_every", "0"),
    ("sft.num_steps", "100"), ("sft.optimizer.decay_steps", "100"), ("sft.eval_every", "50"), ("sft.sample_every", "0"),
    # The reward stage's pairs at the default experiment's size: with 512 pairs' prompts the reward
    # model's gold Spearman was ~0.16, too weak for 30 PPO steps to raise the gold score. 100 steps
    # (1.6 passes over the pairs), not 200: at 200 steps the held-out loss had risen (0.665 at step
    # 100, 0.757 at 200; gold accuracy 0.65 -> 0.57, Spearman 0.155 -> 0.124; 2026-12-07), and the
    # stage took 250 of this fixture's 510 s.
    ("reward.preferences.num_prompts", "1024"), ("reward.preferences.num_validation_prompts", "128"),
    ("reward.num_steps", "100"), ("reward.optimizer.decay_steps", "100"), ("reward.eval_every", "50"),
    ("num_report_prompts", "32"),
    ("ppo.num_steps", "30"), ("ppo.checkpoint_every", "15"), ("ppo.sample_every", "15"),
]


def run_pipeline_in_a_process(config, overrides, workdir):
    """`rlhf-jax pipeline` in a process of its own, on one CPU device with XLA's default code
    generation, as a user runs it on this machine. The test processes have 8 fake devices and
    unoptimised code generation (tests/conftest.py), which suit their many small compiles; run
    there, these minutes of training took about twice as long (2026-12-08, 2-core sandbox: the
    reward stage 171 s here, 235 s on 8 fake devices, 349 s unoptimised)."""
    args = [f"--config.{key}={value}" for key, value in overrides]
    with open(os.path.join(workdir, "pipeline.log"), "w") as log:
        proc = subprocess.run([sys.executable, "-m", "rlhf_jax.apps.cli", "pipeline", f"--config={config}",
                               f"--workdir={workdir}", *args], cwd=ROOT, env={**os.environ, "XLA_FLAGS": ""},
                              stdout=log, stderr=subprocess.STDOUT)
    assert proc.returncode == 0, open(os.path.join(workdir, "pipeline.log")).read()[-5000:]


@pytest.fixture(scope="module")
def pipeline_run(tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("pipeline"))
    overrides = SCALED_DOWN + [(f"{stage}.data_dir", os.path.join(workdir, "datasets"))
                               for stage in ("pretrain", "sft", "reward", "ppo")]
    run_pipeline_in_a_process(PIPELINE, overrides, workdir)
    return workdir, overrides


def eval_rows(workdir):
    return [r for r in metrics_lib.read_metrics(workdir) if "eval/loss" in r]


@pytest.mark.slow
def test_pretraining_beats_the_unigram_baseline(pipeline_run):
    workdir, _ = pipeline_run
    last = eval_rows(os.path.join(workdir, "pretrain"))[-1]
    assert last["eval/loss"] < 0.4 * last["eval/unigram_loss"], last


@pytest.mark.slow
def test_sft_samples_are_reviews_that_end_with_eos(pipeline_run):
    workdir, _ = pipeline_run
    _, graphdef, params = runs.load_policy(os.path.join(workdir, "sft"))
    tok = ByteTokenizer()
    prompts = ["Write a review of the hotel:", "Review the film:", "Review the headphones:", "The cafe was"] * 4
    tokens, mask = sampling.encode_prompts(tok, prompts, 32)
    out = sampling.generate(graphdef, params, jnp.asarray(tokens), jnp.asarray(mask), jax.random.key(0),
                            max_new_tokens=192, eos_id=tok.eos_id, pad_id=tok.pad_id, temperature=0.7)
    ended = np.asarray(jnp.any(out["response"] == tok.eos_id, axis=1))
    assert ended.mean() >= 0.8, ended
    texts = sampling.decode_responses(tok, out["response"], out["response_mask"])
    review_words = ("was", "were", "felt", "the", "The")
    assert np.mean([any(w in t for w in review_words) for t in texts]) >= 0.8, texts


@pytest.mark.slow
def test_reward_model_ranks_like_the_gold_scorer(pipeline_run):
    workdir, _ = pipeline_run
    last = eval_rows(os.path.join(workdir, "reward"))[-1]
    assert last["eval/gold_accuracy"] > 0.55, last
    # Rank correlation with the gold score over the held-out pairs' responses: ~0.16 before and
    # 0.124 after the LM loss went through lm_head's chunks (2026-12-07; the same loss to 1e-5,
    # summed in another order, so 400 steps of pre-training and SFT end elsewhere). 0.1 is above
    # what an unrelated scorer reaches on these ~250 responses (null std ~0.06) with room for such drift.
    # With 100 reward steps instead of 200: 0.193 (2026-12-07, the suite on a fresh clone).
    assert last["eval/spearman"] > 0.1, last
    with open(os.path.join(workdir, "reward", "reward_normalization.json")) as f:
        assert json.load(f)["std"] > 0


@pytest.mark.slow
def test_ppo_raises_reward_and_gold_score(pipeline_run):
    workdir, _ = pipeline_run
    rows = metrics_lib.read_metrics(os.path.join(workdir, "ppo"))
    first, last = rows[0], rows[-1]
    for key in ("objective/scores", "objective/gold_scores", "objective/kl", "objective/entropy",
                "policy/approxkl_avg", "policy/clipfrac_avg", "loss/policy_avg", "loss/value_avg", "val/ratio",
                "val/num_eos_tokens", "objective/kl_coef", "objective/non_score_reward", "objective/rlhf_reward"):
        assert key in last, key
    assert last["objective/scores"] > first["objective/scores"] + 0.3
    assert last["objective/gold_scores"] > first["objective/gold_scores"]
    assert os.path.getsize(os.path.join(workdir, "curves.png")) > 5000
    report = open(os.path.join(workdir, "report.md")).read()
    assert "before (SFT) and after (PPO)" in report and "Mean gold score" in report


@pytest.mark.slow
def test_finished_pipeline_is_skipped_when_run_again(pipeline_run):
    workdir, overrides = pipeline_run
    t0 = time.time()
    pipeline.run_pipeline(PIPELINE, overrides, workdir)
    assert time.time() - t0 < 120  # Only the report is redone: every stage has its DONE marker.


DPO_SCALED_DOWN = [
    ("dpo.preferences.num_prompts", "256"), ("dpo.preferences.num_validation_prompts", "64"),
    ("dpo.num_steps", "48"), ("dpo.eval_every", "24"), ("dpo.checkpoint_every", "24"), ("dpo.log_every", "8"),
    ("dpo.optimizer.decay_steps", "48"), ("dpo.eval_prompts.num", "32"), ("num_report_prompts", "64"),
]


@pytest.mark.slow
def test_dpo_variant_trains_on_its_own_pairs_and_raises_the_gold_score(pipeline_run, tmp_path):
    """pipeline.py:dpo from the finished pre-training and SFT runs (copied: they are skipped):
    pairs sampled and labelled as the reward stage does, then DPO against the SFT reference."""
    import shutil

    source, overrides = pipeline_run
    workdir = str(tmp_path / "dpo_pipeline")
    for stage in ("pretrain", "sft"):
        shutil.copytree(os.path.join(source, stage), os.path.join(workdir, stage))
    data = os.path.join(source, "datasets")
    stage_overrides = [(k, v) for k, v in overrides if k.split(".")[0] in ("pretrain", "sft")]
    run_pipeline_in_a_process(PIPELINE + ":dpo", stage_overrides + DPO_SCALED_DOWN + [
        ("dpo.data_dir", data), ("dpo.eval_prompts.data_dir", data)], workdir)
    rows = [r for r in metrics_lib.read_metrics(os.path.join(workdir, "dpo")) if "eval/rewards/accuracies" in r]
    # 256 training pairs, 3 epochs: the training pairs are fitted (held-out pair accuracy on 64
    # pairs is noise at this size: 0.41-0.44 seen; 0.63 with the full 1021 pairs), and the samples
    # move toward what the annotator prefers (below).
    assert rows[-1]["rewards/accuracies"] > 0.8, rows[-1]
    assert os.path.exists(os.path.join(workdir, "dpo", "preferences", "preferences.json"))
    assert not os.path.exists(os.path.join(workdir, "reward"))  # no reward model in this variant
    report = open(os.path.join(workdir, "report.md")).read()
    assert "before (SFT) and after (DPO)" in report
    # Gold score on 64 held-out prompts, mean +- sem: DPO above SFT by more than 2 standard errors
    # of the difference (measured 2026-12-08: SFT +0.205 +- 0.046, DPO +0.519 +- 0.044, 4.9 se).
    # Not the DPO run's own eval/gold at step 24 against step 48 (32 prompts, from half-way
    # trained): that comparison is noise (0.235 then 0.198 on one device; it had passed on 8).
    gold = {stage: [float(x) for x in line.split("|")[2].split("+-")] for line in report.splitlines()
            for stage in ("sft", "dpo") if line.startswith(f"| {stage} |")}
    (sft, sft_sem), (dpo_gold, dpo_sem) = gold["sft"], gold["dpo"]
    assert dpo_gold - sft > 2 * (sft_sem ** 2 + dpo_sem ** 2) ** 0.5, report
