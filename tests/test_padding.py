"""Bucketed padding (`pad_to_multiple`): the widths the SFT and preference loaders give, the same
rows inside them, and the SFT, reward-model and DPO losses and gradients at the trimmed width
equal to those at the full seq_len (trailing padding changes nothing a causal model computes)."""

import jax
import ml_collections
import numpy as np
import pytest

from configs import models
from rlhf_jax.data import loaders
from rlhf_jax.models import model as model_lib
from rlhf_jax.models.tokenizer import ByteTokenizer
from rlhf_jax.stages import dpo, pretrain, reward

TOK = ByteTokenizer()
SEQ_LEN = 96

SFT_ROWS = [{"prompt": "Review the hotel:", "response": " The room was lovely."},
            {"prompt": "I found the", "response": " staff rude."},
            {"prompt": "Write a review of the film:", "response": " Terrible."},
            {"prompt": "Tell us about the cafe:", "response": " great coffee" * 2}]
PAIRS = [{"prompt": "Review the film:", "chosen": " Wonderful!", "rejected": " Awful plot, slow and long.",
          "margin": 1.0},
         {"prompt": "I", "chosen": " loved it.", "rejected": " no."},
         {"prompt": "The cafe", "chosen": " was warm and bright.", "rejected": " was shut."},
         {"prompt": "Our room", "chosen": " faced the sea.", "rejected": " smelled."}]


@pytest.mark.parametrize("longest,multiple,expected", [(47, 16, 48), (48, 16, 48), (49, 16, 64), (90, 64, 96),
                                                       (1, 64, 64), (47, 0, 96), (200, 64, 96)])
def test_padded_width_rounds_the_longest_row_up_and_stays_within_seq_len(longest, multiple, expected):
    assert loaders.padded_width(longest, SEQ_LEN, multiple) == expected


def test_sft_rows_are_the_same_tokens_in_a_narrower_batch():
    full = loaders.sft_batches(SFT_ROWS, TOK, SEQ_LEN, 4, 0, shuffle=False)[0]
    trimmed = loaders.sft_batches(SFT_ROWS, TOK, SEQ_LEN, 4, 0, shuffle=False, pad_to_multiple=16)[0]
    longest = int(full["attention_mask"].sum(1).max())
    width = -(-longest // 16) * 16
    assert width < SEQ_LEN
    for key in full:
        assert trimmed[key].shape == (4, width), key
        np.testing.assert_array_equal(trimmed[key], full[key][:, :width], err_msg=key)
        if key != "positions":  # only padding is cut
            assert not full[key][:, width:].any() or (full[key][:, width:] == TOK.pad_id).all(), key


def test_preference_sides_share_one_width_and_widen_restores_the_full_batch():
    full = loaders.preference_batches(PAIRS, TOK, SEQ_LEN, 4, 0, shuffle=False)[0]
    trimmed = loaders.preference_batches(PAIRS, TOK, SEQ_LEN, 4, 0, shuffle=False, pad_to_multiple=16)[0]
    longest = max(int(full[f"{side}_mask"].sum(1).max()) for side in ("chosen", "rejected"))
    width = -(-longest // 16) * 16
    assert trimmed["chosen_tokens"].shape == trimmed["rejected_tokens"].shape == (4, width) and width < SEQ_LEN
    widened = loaders.widen(trimmed, SEQ_LEN, TOK.pad_id)
    assert widened.keys() == full.keys()
    for key in full:
        np.testing.assert_array_equal(widened[key], full[key], err_msg=key)


def micro_model():
    m = models.tiny()
    m.update(d_model=32, num_layers=2, num_heads=2, num_kv_heads=2, d_ff=64, max_len=SEQ_LEN)
    return m


def assert_same_value_and_grads(loss_fn, params, full, trimmed):
    # Jitted: one compile per width, not op-by-op dispatch of every small op of forward and backward.
    value_and_grad = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))
    (a, a_metrics), a_grads = value_and_grad(params, full)
    (b, b_metrics), b_grads = value_and_grad(params, trimmed)
    np.testing.assert_allclose(float(a), float(b), rtol=1e-6)
    for key in a_metrics:
        np.testing.assert_allclose(np.asarray(a_metrics[key]), np.asarray(b_metrics[key]), rtol=1e-5, atol=1e-6,
                                   err_msg=key)
    for (path, x), y in zip(jax.tree_util.tree_flatten_with_path(a_grads)[0], jax.tree.leaves(b_grads)):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-4, atol=1e-7,
                                   err_msg=jax.tree_util.keystr(path))


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_sft_loss_and_gradients_at_the_trimmed_width_equal_the_full_width(family):
    config = micro_model() if family == "gpt2" else models.llama_tiny()
    if family == "llama":
        config.update(d_model=32, num_layers=2, num_heads=2, num_kv_heads=1, d_ff=64, max_len=SEQ_LEN)
    graphdef, params = model_lib.init_params(config, seed=1)
    full = loaders.sft_batches(SFT_ROWS, TOK, SEQ_LEN, 4, 0, shuffle=False)[0]
    trimmed = loaders.sft_batches(SFT_ROWS, TOK, SEQ_LEN, 4, 0, shuffle=False, pad_to_multiple=16)[0]
    assert trimmed["tokens"].shape[1] < SEQ_LEN
    assert_same_value_and_grads(lambda p, b: pretrain.language_model_loss(p, graphdef, b), params, full, trimmed)


def test_reward_and_dpo_losses_and_gradients_at_the_trimmed_width_equal_the_full_width():
    config = micro_model()
    graphdef, params = model_lib.init_params(config, seed=2)
    full = loaders.preference_batches(PAIRS, TOK, SEQ_LEN, 4, 0, shuffle=False)[0]
    trimmed = loaders.preference_batches(PAIRS, TOK, SEQ_LEN, 4, 0, shuffle=False, pad_to_multiple=16)[0]
    assert trimmed["chosen_tokens"].shape[1] < SEQ_LEN

    rm_graphdef, rm_params = model_lib.replace_head_with_scalar(graphdef, params, config, seed=0)
    assert_same_value_and_grads(lambda p, b: reward.preference_loss(p, rm_graphdef, b, True, 0.01),
                                rm_params, full, trimmed)

    ref = np.stack(dpo.pair_logprobs(graphdef, params, full), axis=1) - 0.1  # a reference a little behind
    with_ref = lambda b: dict(b, ref_chosen_logps=ref[:, 0], ref_rejected_logps=ref[:, 1])  # noqa: E731
    loss_config = ml_collections.ConfigDict(dict(kind="sigmoid", beta=0.1, label_smoothing=0.0, simpo_gamma=0.5))
    assert_same_value_and_grads(lambda p, b: dpo.pair_loss(p, graphdef, b, loss_config), params,
                                with_ref(full), with_ref(trimmed))
