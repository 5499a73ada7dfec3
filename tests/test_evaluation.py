"""The evaluation every method shares: sampled sequence KL to the SFT policy, and best-of-n."""

import math

import jax
import numpy as np
import pytest

from configs import models
from rlhf_jax.models import evaluation, model as model_lib, sampling
from rlhf_jax.models.tokenizer import ByteTokenizer


def micro_model():
    config = models.tiny()
    config.update(dict(max_len=64, d_model=32, num_layers=1, num_heads=2, num_kv_heads=2, d_ff=64))
    return config


def test_kl_of_the_reference_itself_is_zero():
    graphdef, params = model_lib.init_params(micro_model(), "lm", 0)
    evaluate = evaluation.make_policy_evaluator((graphdef, params), ByteTokenizer(), ["Review 1:", "Hi"],
                                                max_new_tokens=6, batch_size=8, samples_per_prompt=4)
    metrics = evaluate(graphdef, params)
    assert abs(metrics["kl"]) < 1e-4
    assert len(metrics["samples"]) == 8


def test_sampled_kl_matches_the_exact_kl_of_one_token_responses():
    """With one new token the sequence KL is the next-token KL, computable exactly over the
    vocabulary; the sampled estimate must agree within its standard error."""
    config = micro_model()
    tok = ByteTokenizer()
    graphdef, p = model_lib.init_params(config, "lm", 1)
    _, q = model_lib.init_params(config, "lm", 2)
    p = jax.tree.map(lambda x: 8.0 * x, p)  # sharper distributions: a KL well above the noise
    prompt = "The hotel"
    tokens, mask = sampling.encode_prompts(tok, [prompt], 16)
    logits = lambda params: model_lib.apply(graphdef, params, tokens, model_lib.positions_from_mask(mask), mask)[0][
        "logits"][0, -1]
    logp, logq = jax.nn.log_softmax(logits(p)), jax.nn.log_softmax(logits(q))
    exact = float(np.sum(np.exp(logp) * (logp - logq)))
    evaluate = evaluation.make_policy_evaluator((graphdef, q), tok, [prompt], max_prompt_len=16, max_new_tokens=1,
                                                samples_per_prompt=2048, batch_size=512, seed=3)
    metrics = evaluate(graphdef, p)
    assert exact > 0.5
    assert metrics["kl"] == pytest.approx(exact, abs=4 * metrics["kl_sem"] + 1e-3)


def test_best_of_n_picks_the_highest_reward_and_reports_the_analytic_kl():
    graphdef, params = model_lib.init_params(micro_model(), "lm", 0)
    prompts = ["a", "b", "c"]
    reward = lambda ps, rs: np.asarray([r.count("e") for r in rs], np.float64)  # a toy reward
    gold = lambda p, r: float(len(r))
    rows = evaluation.best_of_n((graphdef, params), ByteTokenizer(), prompts, reward=reward, gold_fn=gold,
                                ns=(1, 2, 8), max_prompt_len=4, max_new_tokens=6, batch_size=8)
    assert [r["n"] for r in rows] == [1, 2, 8]
    assert rows[0]["kl"] == 0.0
    assert rows[2]["kl"] == pytest.approx(math.log(8) - 7 / 8)
    assert rows[0]["rm"] <= rows[1]["rm"] <= rows[2]["rm"]  # more samples, never a worse best
    # best-of-8 by hand from the same 8 samples per prompt
    out = evaluation.sample(graphdef, params, ByteTokenizer(), prompts, samples_per_prompt=8, max_prompt_len=4,
                            max_new_tokens=6, temperature=1.0, batch_size=8, seed=0)
    best = [max(out["texts"][i * 8:(i + 1) * 8], key=lambda r: r.count("e")) for i in range(3)]
    assert rows[2]["rm"] == pytest.approx(np.mean([b.count("e") for b in best]))
