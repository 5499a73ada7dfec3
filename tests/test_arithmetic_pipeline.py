"""Accuracy against a verifier (rlhf_jax.models.evaluation) and the arithmetic pipeline's report:
fast tests on hand-written responses and a fake policy, and a scaled-down end-to-end run (slow)."""

import itertools
import json
import math
import os

import numpy as np
import pytest

from rlhf_jax.data import arithmetic as A
from rlhf_jax.drivers import pipeline
from rlhf_jax.models import evaluation
from rlhf_jax.runtime import config as config_lib
from rlhf_jax.stages import registry
from test_pipeline_e2e import run_pipeline_in_a_process

ROOT = os.path.join(os.path.dirname(__file__), "..")
PIPELINE = os.path.join(ROOT, "experiments", "arithmetic", "pipeline.py")


# ----------------------------------------------------------------------------------------------
# pass@k and accuracy_metrics.


@pytest.mark.parametrize("n,c,k", [(1, 0, 1), (1, 1, 1), (4, 1, 2), (8, 3, 1), (8, 3, 4), (8, 5, 4), (8, 0, 8),
                                   (8, 8, 8), (10, 2, 9)])
def test_pass_at_k_is_the_chance_that_some_of_k_draws_is_right(n, c, k):
    # Brute force: every k-subset of n samples (the first c right), the fraction with a right one.
    subsets = list(itertools.combinations(range(n), k))
    expected = sum(any(i < c for i in s) for s in subsets) / len(subsets)
    assert evaluation.pass_at_k(n, c, k) == pytest.approx(expected, abs=1e-12)
    assert evaluation.pass_at_k(n, c, k) == pytest.approx(1 - math.comb(n - c, k) / math.comb(n, k), abs=1e-12)


def test_pass_at_k_rejects_k_beyond_the_samples():
    with pytest.raises(ValueError, match="k=3"):
        evaluation.pass_at_k(2, 1, 3)
    with pytest.raises(ValueError, match="num_correct"):
        evaluation.pass_at_k(2, 3, 1)


def test_accuracy_metrics_on_hand_written_responses():
    prompts = ["What is 3 + 5?", "What is 12 - 7?"]
    responses = [" 3+5=8\n#### 8", " 3+5=8\n#### 9",          # prompt 0: one right of two
                 " 12-7=5\n#### 5\n#### 5", "\n#### 05"]     # prompt 1: two markers; leading zero
    m = evaluation.accuracy_metrics(prompts, responses, A.arithmetic_reward, samples_per_prompt=2, ks=(1, 2),
                                    lengths=[10, 12, 20, 6])
    assert m["correct"] == [1.0, 0.0, 0.0, 0.0]
    assert m["accuracy"] == 0.25
    assert m["pass@1"] == pytest.approx(0.25)
    assert m["pass@2"] == pytest.approx(0.5)  # prompt 0 always has its right one among 2 of 2
    # The sem is over problems (per-problem accuracies 0.5 and 0.0), not over the 4 responses.
    assert m["accuracy_sem"] == pytest.approx(np.std([0.5, 0.0], ddof=1) / math.sqrt(2))
    assert m["length"] == 12.0 and m["length_correct"] == 10.0 and m["length_incorrect"] == pytest.approx(38 / 3)


def test_accuracy_metrics_counts_rows_per_prompt():
    with pytest.raises(ValueError, match="samples_per_prompt=2"):
        evaluation.accuracy_metrics(["What is 1 + 1?"], [" #### 2"], A.arithmetic_reward, samples_per_prompt=2)
    m = evaluation.accuracy_metrics(["What is 1 + 1?"], [" #### 2"], A.arithmetic_reward, ks=(1,))
    assert np.isnan(evaluation.accuracy_metrics(["What is 1 + 1?"], [" #### 3"], A.arithmetic_reward,
                                                lengths=[3])["length_correct"])
    assert m["accuracy"] == 1.0 and m["accuracy_sem"] == 0.0 and "length" not in m


# ----------------------------------------------------------------------------------------------
# The evaluator and the report, on a fake policy: `sample` answers by a rule per policy.


def fake_sampler(answers_right):
    """evaluation.sample's stand-in: policy `graphdef` answers problem i right iff
    answers_right[graphdef](i, sample index); records the calls."""
    calls = []

    def sample(graphdef, params, tokenizer, prompts, *, samples_per_prompt, greedy=False, **kwargs):
        calls.append(dict(graphdef=graphdef, samples_per_prompt=samples_per_prompt, greedy=greedy, **kwargs))
        texts = []
        for i, prompt in enumerate(prompts):
            for j in range(samples_per_prompt):
                answer = A.solve(prompt) + (0 if answers_right[graphdef](i, j) else 1)
                texts.append(f" work\n#### {answer}")
        n = len(texts)
        return {"texts": texts, "response_mask": np.tile(np.arange(8) < 5, (n, 1)).astype(np.int32)}

    return sample, calls


def test_accuracy_evaluator_samples_and_scores(monkeypatch):
    sample, calls = fake_sampler({"policy": lambda i, j: i % 2 == 0 or j == 0})
    monkeypatch.setattr(evaluation, "sample", sample)
    prompts = ["What is 3 + 5?", "What is 12 - 7?", "What is 40 + 2?"]
    evaluate = evaluation.make_accuracy_evaluator(None, prompts, A.arithmetic_reward, samples_per_prompt=4,
                                                  ks=(1, 4), temperature=0.7, max_new_tokens=8)
    m = evaluate("policy", None)
    assert calls[0]["samples_per_prompt"] == 4 and calls[0]["temperature"] == 0.7 and not calls[0]["greedy"]
    assert m["accuracy"] == pytest.approx((4 + 1 + 4) / 12)
    assert m["pass@4"] == 1.0 and m["pass@1"] == pytest.approx(m["accuracy"])
    assert m["samples"][4] == ("What is 12 - 7?", " work\n#### 5") and m["length"] == 5.0
    with pytest.raises(ValueError, match="greedy"):
        evaluation.make_accuracy_evaluator(None, prompts, A.arithmetic_reward, greedy=True, samples_per_prompt=2)


def fake_pipeline_workdir(tmp_path):
    """A workdir with the RL stage's metrics.jsonl, as a finished pipeline leaves it."""
    os.makedirs(tmp_path / "ppo")
    with open(tmp_path / "ppo" / "metrics.jsonl", "w") as f:
        for step, score in ((5, 0.3), (10, 0.5)):
            f.write(json.dumps({"step": step, "objective/scores": score, "val/mean_response_length": 20.0}) + "\n")
    return str(tmp_path)


def test_report_compares_sft_and_rl_accuracy_on_held_out_problems(tmp_path, monkeypatch):
    prompts = [f"What is {a} + {a + 1}?" for a in range(10)]
    sample, calls = fake_sampler({"sft": lambda i, j: i < 3 or (j == 1 and i < 6),  # greedy (j=0): 3 of 10
                                  "ppo": lambda i, j: i < 8})                          # 8 of 10
    monkeypatch.setattr(evaluation, "sample", sample)
    monkeypatch.setattr(pipeline.runs, "load_policy", lambda workdir: (None, os.path.basename(workdir), None))
    config = config_lib.load_config(PIPELINE, [("report_prompts", repr(tuple(prompts))),
                                               ("report_samples_per_prompt", "4")])
    workdir = fake_pipeline_workdir(tmp_path)
    pipeline.write_report(config, workdir)

    report = json.load(open(os.path.join(workdir, "report.json")))
    assert report["sft"]["accuracy"] == pytest.approx(0.3) and report["rl"]["accuracy"] == pytest.approx(0.8)
    assert report["sft"]["sampled_accuracy"] == pytest.approx((3 * 4 + 3 * 1) / 40)
    assert report["sft"]["pass@4"] == pytest.approx(0.6) and report["rl"]["pass@4"] == pytest.approx(0.8)
    assert "pass@8" not in report["sft"]  # k above the samples per problem is left out
    assert report["held_out"]["prompts"] == 10 and report["held_out"]["samples_per_prompt"] == 4
    assert report["held_out"]["temperature"] == config.report_temperature
    assert report["verifier"] == "rlhf_jax.data.arithmetic:arithmetic_reward"
    greedy_calls = [c for c in calls if c["greedy"]]
    assert len(greedy_calls) == 2 and all(c["samples_per_prompt"] == 1 for c in greedy_calls)
    # Both policies are sampled with the same seed: the differences are not evaluation noise.
    assert len({c["seed"] for c in calls}) == 1
    text = open(os.path.join(workdir, "report.md")).read()
    assert "SFT 0.300 -> RL (grpo) 0.800 (+0.500)" in text and "temperature 1.0" in text
    assert os.path.exists(os.path.join(workdir, "curves.png"))


def test_arithmetic_pipeline_config_validates():
    """The experiment's stages pass every stage check, GRPO with the verifier and no reward model."""
    config = config_lib.load_config(PIPELINE)
    stages = pipeline.wire_stages(config, "/tmp/unused")
    assert "reward_model" not in stages["ppo"] or not stages["ppo"].reward_model
    assert stages["ppo"].reward_function == config.verifier and stages["ppo"].loss == "grpo"
    for name in config.stages:
        registry.validate(stages[name], prefix=f"{name}.")


# ----------------------------------------------------------------------------------------------
# End to end, scaled down: pre-train -> SFT -> GRPO with the verifier (a few minutes on 2 cores).

SCALED_DOWN = [
    ("pretrain.num_steps", "200"), ("pretrain.optimizer.decay_steps", "200"), ("pretrain.eval_every", "100"),
    ("pretrain.checkpoint_every", "100"),
    ("sft.num_steps", "300"), ("sft.optimizer.decay_steps", "300"), ("sft.eval_every", "150"),
    ("sft.checkpoint_every", "150"),
    ("ppo.num_steps", "12"), ("ppo.samples_per_prompt", "8"), ("ppo.checkpoint_every", "6"),
    ("ppo.sample_every", "0"),
    ("num_report_prompts", "100"), ("report_samples_per_prompt", "4"), ("report_pass_k", "(1, 4)"),
]


# Measured on this scaled-down run (2026-12-07, 2-core CPU sandbox, 4 min): SFT greedy 0.05,
# pass@4 0.13; GRPO (12 steps) greedy 0.04, sampled 0.028 (SFT 0.035); with 30 GRPO steps and
# 200 problems: SFT greedy 0.035, pass@4 0.14, GRPO greedy 0.035. The bars: half SFT's measured
# pass@4 (a policy that never solves a problem gives GRPO no signal), and GRPO within 0.05 of
# SFT's greedy accuracy (~2.5 standard errors at 100 problems).
SFT_PASS_AT_4_BAR = 0.07
LOSS_TOLERANCE = 0.05


@pytest.fixture(scope="module")
def arithmetic_run(tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("arithmetic"))
    overrides = SCALED_DOWN + [(f"{stage}.data_dir", os.path.join(workdir, "datasets"))
                               for stage in ("pretrain", "sft", "ppo")]
    run_pipeline_in_a_process(PIPELINE, overrides, workdir)
    return workdir, json.load(open(os.path.join(workdir, "report.json")))


@pytest.mark.slow
def test_verifier_pipeline_reports_held_out_accuracy_without_a_reward_model(arithmetic_run):
    workdir, report = arithmetic_run
    assert not os.path.exists(os.path.join(workdir, "reward")), "a verifier pipeline trains no reward model"
    assert report["held_out"]["split"] == "test" and report["held_out"]["prompts"] == 100
    assert report["held_out"]["samples_per_prompt"] == 4
    for policy in ("sft", "rl"):
        assert {"accuracy", "sampled_accuracy", "pass@1", "pass@4"} <= set(report[policy]), report[policy]
    # SFT learned the format and some arithmetic, so GRPO has signal; pass@4 >= pass@1 (the
    # estimator's monotonicity, on real samples).
    assert report["sft"]["pass@4"] > SFT_PASS_AT_4_BAR, report["sft"]
    assert report["sft"]["pass@4"] >= report["sft"]["pass@1"]
    assert "Accuracy (greedy): SFT" in open(os.path.join(workdir, "report.md")).read()


@pytest.mark.slow
def test_grpo_with_the_verifier_does_not_lose_held_out_accuracy(arithmetic_run):
    _, report = arithmetic_run
    assert report["rl"]["accuracy"] >= report["sft"]["accuracy"] - LOSS_TOLERANCE, report


@pytest.mark.slow
@pytest.mark.xfail(strict=False, reason="GRPO on this tiny model does not yet raise held-out arithmetic accuracy "
                                        "within a CPU budget: experiments/results/arithmetic/README.md")
def test_grpo_with_the_verifier_raises_held_out_accuracy(arithmetic_run):
    _, report = arithmetic_run
    assert report["rl"]["sampled_accuracy"] >= report["sft"]["sampled_accuracy"] + 0.05, report
