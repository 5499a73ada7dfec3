"""Batches for every stage, built with Grain's random-access `MapDataset`.

Every loader returns a `grain.MapDataset` of batches. Index it with the step number:

    batches = sft_batches(sources['train'], tokenizer, seq_len=256, batch_size=32, seed=0)
    batch = batches[step]          # dict of int32 numpy arrays, a pure function of (seed, step)

`batches[i]` works for any i >= 0 (no end): `len(batches)` is the number of batches in one epoch,
and index `i` falls in epoch `i // len(batches)`, whose order is a permutation of the examples
drawn with seed `seed + epoch` (Grain's `shuffle`), so every epoch is reshuffled. The last partial
batch of each epoch is dropped. Because a batch is a pure function of (seed, step), **the data
iterator state is just the step number**: a run restored at step s continues exactly by asking
for `batches[s]`; nothing else needs checkpointing.

Evaluation: pass `shuffle=False` and read `batches[i] for i in range(len(batches))`: one pass in
stored order; the last partial batch (fewer than batch_size examples) is dropped, so pick
batch_size to divide the split if every example must count.

Token conventions (all int32, right padding with tokenizer.pad_id unless said otherwise):
  tokens[b, t]          token ids
  positions[b, t]       0, 1, 2, ... along the row
  attention_mask[b, t]  1 on real tokens, 0 on padding
  loss_mask[b, t]       1 where token t is a *target*, predicted from position t-1; a loss is
                        `xent(logits[:, :-1], tokens[:, 1:])` weighted by `loss_mask[:, 1:]`
                        (loss_mask[:, 0] is always 0: nothing predicts the first token).

Prompt/response text is joined as `prompt + response` (responses start with a space, see
reviews.py) and ends with EOS. When prompt + response + EOS is longer than seq_len, the prompt is
cut from the left (its end, next to the response, stays); if response + EOS alone is longer, it
is cut from the right and loses its EOS.

Padding: SFT and preference rows are padded to seq_len, or with `pad_to_multiple=m > 0` only to
the batch's longest row rounded up to a multiple of m (at most seq_len). Trailing padding changes
nothing a causal model computes at the real tokens, and a step costs about its width (T=192
instead of 256: 0.64-0.75x the time of a tiny-model step on CPU, experiments/bench_padding.py), so short batches run faster, while
at most seq_len / m widths reach the jitted step (each compiles once).
"""

from __future__ import annotations

import math

import grain
import numpy as np

from rlhf_jax.runtime.config import DataError

# ----------------------------------------------------------------------------------------------
# Reading and tokenizing examples.


def read(source, indices: list[int]) -> list[dict]:
    """source[i] for each index; a source is a TFDS data source, a data.Source or a list."""
    if hasattr(source, "__getitems__"):
        return list(source.__getitems__(indices))
    return [source[i] for i in indices]


def read_all(source, chunk: int = 4096) -> list[dict]:
    """Every example of a source, in stored order."""
    examples = []
    for start in range(0, len(source), chunk):
        examples += read(source, list(range(start, min(start + chunk, len(source)))))
    return examples


def as_str(value) -> str:
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)


def document_text(example: dict) -> str:
    """The text of a document: 'text' if present (reviews, text folders), else prompt + response."""
    if "text" in example:
        return as_str(example["text"])
    return as_str(example["prompt"]) + as_str(example["response"])


def join_prompt_response(prompt_ids: list[int], response_ids: list[int], seq_len: int,
                         eos_id: int) -> tuple[list[int], int]:
    """(prompt + response + [EOS], number of prompt tokens kept), at most seq_len tokens."""
    response = list(response_ids) + [eos_id]
    if len(response) >= seq_len:
        return response[:seq_len], 0
    keep = min(len(prompt_ids), seq_len - len(response))
    prompt = list(prompt_ids[len(prompt_ids) - keep:])
    return prompt + response, keep


def _check_size(num_examples: int, batch_size: int, what: str):
    if num_examples < batch_size:
        raise DataError(f"{what}: {num_examples} examples cannot fill one batch of batch_size={batch_size}; "
                        "expected more data or a smaller batch_size")


def _batches(num_examples: int, batch_size: int, seed: int, shuffle: bool, make_batch):
    """Grain MapDataset of batches; make_batch(list of example indices) -> dict of arrays."""
    indices = grain.MapDataset.range(num_examples)
    if shuffle:
        indices = indices.shuffle(seed=seed)
    return indices.batch(batch_size, drop_remainder=True,
                         batch_fn=lambda idx: make_batch([int(i) for i in idx]))


def padded_width(longest: int, seq_len: int, pad_to_multiple: int) -> int:
    """seq_len, or with pad_to_multiple=m > 0 the longest row rounded up to a multiple of m (<= seq_len)."""
    if pad_to_multiple <= 0:
        return seq_len
    return min(seq_len, max(1, -(-longest // pad_to_multiple)) * pad_to_multiple)


def widen(batch: dict, width: int, pad_id: int) -> dict:
    """A preference_batches batch right-padded to `width` tokens (several seeds' batches stacked
    need one width): `*tokens` arrays with pad_id, masks with 0; 1-D arrays as they are."""
    def pad(key, x):
        if x.ndim < 2 or x.shape[1] == width:
            return x
        return np.pad(x, ((0, 0), (0, width - x.shape[1])), constant_values=pad_id if key.endswith("tokens") else 0)
    return {key: pad(key, x) for key, x in batch.items()}


def _right_padded(rows: list[list[int]], seq_len: int, pad_id: int) -> tuple[np.ndarray, ...]:
    """tokens, attention_mask [B, seq_len] for token rows of length <= seq_len."""
    tokens = np.full((len(rows), seq_len), pad_id, np.int32)
    mask = np.zeros((len(rows), seq_len), np.int32)
    for b, row in enumerate(rows):
        tokens[b, :len(row)] = row
        mask[b, :len(row)] = 1
    return tokens, mask


# ----------------------------------------------------------------------------------------------
# Pre-training: packed windows.


def token_stream(source, tokenizer) -> np.ndarray:
    """[N] int32: every document of the source in stored order, each followed by EOS."""
    pieces = []
    for example in read_all(source):
        pieces.append(np.asarray(tokenizer.encode(document_text(example)), np.int32))
        pieces.append(np.asarray([tokenizer.eos_id], np.int32))
    return np.concatenate(pieces) if pieces else np.zeros([0], np.int32)


def pack_windows(stream: np.ndarray, seq_len: int, pad_id: int) -> np.ndarray:
    """[num_windows, seq_len]: the stream cut into consecutive windows; the last one is padded."""
    num_windows = math.ceil(len(stream) / seq_len)
    padded = np.full(num_windows * seq_len, pad_id, np.int32)
    padded[:len(stream)] = stream
    return padded.reshape(num_windows, seq_len)


def pretrain_batches(source, tokenizer, seq_len: int, batch_size: int, seed: int,
                     shuffle: bool = True):
    """Batches of packed text: dict(tokens, positions, attention_mask, loss_mask), each [B, T].

    The documents (field 'text', or prompt + response) are tokenized once, joined with EOS
    after each document, and cut into windows of T = seq_len tokens (kept in memory). Batches
    draw windows; each epoch reshuffles the windows. Windows do not reset at document
    boundaries: positions run 0..T-1 and attention is causal over the whole window (GPT-2 style
    packing). Only the final window of the stream has padding (attention_mask and loss_mask 0).
    """
    windows = pack_windows(token_stream(source, tokenizer), seq_len, tokenizer.pad_id)
    _check_size(len(windows), batch_size, f"pretrain_batches (seq_len={seq_len} windows)")
    real = (windows != tokenizer.pad_id).astype(np.int32)
    positions = np.broadcast_to(np.arange(seq_len, dtype=np.int32), (batch_size, seq_len))

    def make_batch(indices):
        attention_mask = real[indices]
        loss_mask = attention_mask.copy()
        loss_mask[:, 0] = 0
        return dict(tokens=windows[indices], positions=positions.copy(),
                    attention_mask=attention_mask, loss_mask=loss_mask)

    return _batches(len(windows), batch_size, seed, shuffle, make_batch)


# ----------------------------------------------------------------------------------------------
# Supervised fine-tuning: prompt + response + EOS, loss on the response and EOS only.


def sft_batches(source, tokenizer, seq_len: int, batch_size: int, seed: int,
                shuffle: bool = True, pad_to_multiple: int = 0):
    """Batches of SFT pairs: dict(tokens, positions, attention_mask, loss_mask), each [B, T].

    Row = prompt + response + EOS, right-padded with pad_id to T = seq_len, or to the bucketed
    longest row with pad_to_multiple (module docstring; so is truncation). loss_mask is 1 exactly
    on the response tokens and the EOS: never on the prompt, never on padding.
    """
    _check_size(len(source), batch_size, "sft_batches")

    def make_batch(indices):
        rows, prompt_lens = [], []
        for example in read(source, indices):
            row, prompt_len = join_prompt_response(
                tokenizer.encode_prompt(as_str(example["prompt"])),
                tokenizer.encode(as_str(example["response"])), seq_len, tokenizer.eos_id)
            rows.append(row)
            prompt_lens.append(prompt_len)
        width = padded_width(max(map(len, rows)), seq_len, pad_to_multiple)
        tokens, attention_mask = _right_padded(rows, width, tokenizer.pad_id)
        is_response = np.arange(width)[None, :] >= np.asarray(prompt_lens)[:, None]
        loss_mask = (attention_mask * is_response).astype(np.int32)
        positions = np.broadcast_to(np.arange(width, dtype=np.int32), tokens.shape).copy()
        return dict(tokens=tokens, positions=positions, attention_mask=attention_mask, loss_mask=loss_mask)

    return _batches(len(source), batch_size, seed, shuffle, make_batch)


# ----------------------------------------------------------------------------------------------
# Prompts for sampling and PPO rollouts: left-padded.


def prompt_batches(source, tokenizer, max_prompt_len: int, batch_size: int, seed: int,
                   shuffle: bool = True):
    """Batches of prompts (field 'prompt'), LEFT-padded so every prompt ends at column P-1:

        prompt_tokens [B, P]     pad_id ... pad_id, prompt tokens
        prompt_mask [B, P]       0 on padding, 1 on prompt tokens
        prompt_positions [B, P]  0, 1, ... counted from the first real token (0 on padding)
        index [B]                the example's index in `source`; prompt_texts(source, index)
                                 gives the strings back
    Prompts longer than P = max_prompt_len keep their last P tokens.
    """
    _check_size(len(source), batch_size, "prompt_batches")
    P = max_prompt_len

    def make_batch(indices):
        tokens = np.full((len(indices), P), tokenizer.pad_id, np.int32)
        mask = np.zeros((len(indices), P), np.int32)
        for b, example in enumerate(read(source, indices)):
            ids = tokenizer.encode_prompt(as_str(example["prompt"]))[-P:]
            if ids:
                tokens[b, P - len(ids):] = ids
                mask[b, P - len(ids):] = 1
        positions = np.maximum(np.cumsum(mask, axis=1) - 1, 0).astype(np.int32)
        return dict(prompt_tokens=tokens, prompt_mask=mask, prompt_positions=positions,
                    index=np.asarray(indices, np.int32))

    return _batches(len(source), batch_size, seed, shuffle, make_batch)


def prompt_texts(source, index) -> list[str]:
    """The prompt strings of a prompt batch: prompt_texts(source, batch['index'])."""
    return [as_str(example["prompt"]) for example in read(source, [int(i) for i in index])]


# ----------------------------------------------------------------------------------------------
# Preferences for the reward model.


def preference_batches(source, tokenizer, seq_len: int, batch_size: int, seed: int,
                       shuffle: bool = True, pad_to_multiple: int = 0):
    """Batches of preference pairs, each side prompt + response + EOS right-padded to T (seq_len,
    or both sides to the bucketed longest row of the batch with pad_to_multiple):

        chosen_tokens, chosen_mask [B, T]       (mask = attention mask: 1 on real tokens)
        rejected_tokens, rejected_mask [B, T]
        chosen_loss_mask, rejected_loss_mask [B, T]   1 on the response tokens and EOS (the
                                                targets of DPO's log-probs; loss_mask convention)
        margin [B] float32                      (0 where the pair has none)
        index [B] int32                         the pair's index in `source`
    The reward is read at the last real token: index mask.sum(-1) - 1 (the EOS unless
    truncated). Truncation: module docstring.
    """
    _check_size(len(source), batch_size, "preference_batches")

    def make_batch(indices):
        rows = {"chosen": [], "rejected": []}
        prompt_kept = {"chosen": [], "rejected": []}
        margins = []
        for example in read(source, indices):
            prompt = tokenizer.encode_prompt(as_str(example["prompt"]))
            for side in ("chosen", "rejected"):
                response = tokenizer.encode(as_str(example[side]))
                row, kept = join_prompt_response(prompt, response, seq_len, tokenizer.eos_id)
                rows[side].append(row)
                prompt_kept[side].append(kept)
            margins.append(float(example.get("margin", 0.0)))
        batch = {}
        width = padded_width(max(map(len, rows["chosen"] + rows["rejected"])), seq_len, pad_to_multiple)
        for side in ("chosen", "rejected"):
            tokens, mask = _right_padded(rows[side], width, tokenizer.pad_id)
            columns = np.arange(width)[None, :]
            # A response cut to the whole window keeps no prompt: its first token is not a target.
            first_target = np.maximum(np.asarray(prompt_kept[side]), 1)[:, None]
            batch[f"{side}_tokens"], batch[f"{side}_mask"] = tokens, mask
            batch[f"{side}_loss_mask"] = (mask.astype(bool) & (columns >= first_target)).astype(np.int32)
        return dict(batch, margin=np.asarray(margins, np.float32), index=np.asarray(indices, np.int32))

    return _batches(len(source), batch_size, seed, shuffle, make_batch)


# ----------------------------------------------------------------------------------------------
# A baseline for language-model losses.


def unigram_entropy(source, tokenizer) -> float:
    """Per-token cross-entropy (nats) of the best unigram model of the split, on the split itself.

    Tokens are those of the pre-training stream (each document followed by EOS). A model whose
    validation loss is well below this has learned more than token frequencies.
    """
    stream = token_stream(source, tokenizer)
    counts = np.bincount(stream).astype(np.float64)
    p = counts[counts > 0] / len(stream)
    return float(-(p * np.log(p)).sum())
