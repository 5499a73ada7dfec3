"""Data: review generator, TFDS array_record builders (no TensorFlow), Grain loaders."""

import json
import math
import os
import sys

import numpy as np
import pytest

from configs import datasets
from rlhf_jax.data import builders, load_dataset, load_preferences, loaders, reviews, write_preferences
from rlhf_jax.models.tokenizer import ByteTokenizer
from rlhf_jax.runtime import config as config_lib

TOK = ByteTokenizer()


# ------------------------------------------------------------------------------------ generator


def test_generator_is_deterministic_and_seed_dependent():
    a = reviews.generate_reviews(0, 200)
    assert a == reviews.generate_reviews(0, 200)
    assert a != reviews.generate_reviews(1, 200)
    assert set(a[0]) == {"text", "topic", "sentiment"}


def test_generator_variety_and_vader_agrees_with_latent_sentiment():
    from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

    rs = reviews.generate_reviews(0, 1000)
    assert len({r["topic"] for r in rs}) >= 8
    sentiment = np.array([r["sentiment"] for r in rs])
    assert sentiment.min() < -0.9 and sentiment.max() > 0.9
    assert np.mean(np.abs(sentiment) < 0.3) > 0.15  # mixed reviews exist too
    num_sentences = [r["text"].count(".") + r["text"].count("!") + r["text"].count("?")
                     for r in rs]
    assert min(num_sentences) == 1 and max(num_sentences) >= 4
    assert len({r["text"] for r in rs}) > 0.9 * len(rs)
    vader = SentimentIntensityAnalyzer()
    compound = [vader.polarity_scores(r["text"])["compound"] for r in rs]
    assert np.corrcoef(compound, sentiment)[0, 1] > 0.6


def test_splits_do_not_share_texts():
    splits = reviews.review_splits(0, 500, 100)
    assert len(splits["train"]) == 500 and len(splits["validation"]) == 100
    assert not {r["text"] for r in splits["train"]} & {r["text"] for r in splits["validation"]}


def test_sft_examples_conventions():
    rs = reviews.generate_reviews(0, 300)
    examples = reviews.sft_examples(rs, seed=0)
    assert examples == reviews.sft_examples(rs, seed=0)
    assert len(examples) == len(rs)
    for example, review in zip(examples, rs):
        assert not example["prompt"].endswith(" ")
        assert example["response"].startswith(" ")
        assert example["response"][1:] == review["text"] or (
            example["prompt"] + example["response"] == review["text"])
    kinds = [e["prompt"] + e["response"] == r["text"] for e, r in zip(examples, rs)]
    assert 0.2 < np.mean(kinds) < 0.8  # both instructions and continuations


# ------------------------------------------------------------------------------------- builders


def _sizes(sources):
    return {split: len(source) for split, source in sources.items()}


def test_builders_round_trip_without_tensorflow(tmp_path):
    data_dir = str(tmp_path / "data")
    config = datasets.reviews(seed=3, num_train=120, num_validation=30)
    sources = load_dataset(config, data_dir)
    assert _sizes(sources) == {"train": 120, "validation": 30}
    expected = reviews.review_splits(3, 120, 30)
    got = sorted(loaders.read_all(sources["train"]), key=lambda r: r["text"])
    want = sorted(expected["train"], key=lambda r: r["text"])
    assert [r["text"] for r in got] == [r["text"] for r in want]
    assert [r["topic"] for r in got] == [r["topic"] for r in want]
    np.testing.assert_allclose([r["sentiment"] for r in got], [r["sentiment"] for r in want],
                               atol=1e-6)
    assert isinstance(got[0]["text"], str)

    # Prepared once: loading again reads the same files.
    info = tmp_path / "data" / "rlhf_reviews" / "seed3_train120_val30" / "1.0.0"
    mtime = os.path.getmtime(info / "dataset_info.json")
    assert any(f.endswith("array_record-00000-of-00001") for f in os.listdir(info))
    again = load_dataset(config, data_dir)
    assert os.path.getmtime(info / "dataset_info.json") == mtime
    assert again["validation"][5] == sources["validation"][5]

    sft = load_dataset(datasets.reviews_sft(seed=3, num_train=120, num_validation=30), data_dir)
    assert _sizes(sft) == {"train": 120, "validation": 30}
    assert set(sft["train"][0]) == {"prompt", "response"}
    assert "tensorflow" not in sys.modules


def test_text_folder_documents_per_file_and_per_paragraph(tmp_path):
    folder = tmp_path / "texts"
    (folder / "sub").mkdir(parents=True)
    (folder / "a.txt").write_text("First paragraph.\n\nSecond paragraph.\n")
    (folder / "sub" / "b.txt").write_text("Another document.")
    (folder / "ignored.md").write_text("not text")
    data_dir = str(tmp_path / "data")
    per_file = load_dataset(datasets.text_folder(str(folder), validation_fraction=0.0), data_dir)
    assert sorted(e["text"] for e in loaders.read_all(per_file["train"])) == [
        "Another document.", "First paragraph.\n\nSecond paragraph."]
    per_par = load_dataset(datasets.text_folder(str(folder), validation_fraction=0.0,
                                                split_paragraphs=True), data_dir)
    assert sorted(e["text"] for e in loaders.read_all(per_par["train"])) == [
        "Another document.", "First paragraph.", "Second paragraph."]
    assert "tensorflow" not in sys.modules


def _write_jsonl(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return str(path)


def test_jsonl_sft_and_hash_held_out_validation(tmp_path):
    rows = [{"prompt": f"Question {i}:", "response": f" answer {i}"} for i in range(200)]
    path = _write_jsonl(tmp_path / "sft.jsonl", rows)
    sources = load_dataset(datasets.jsonl_sft(path, validation_fraction=0.2), str(tmp_path / "d"))
    sizes = _sizes(sources)
    assert sizes["train"] + sizes["validation"] == 200 and 15 < sizes["validation"] < 70
    prompts = [e["prompt"] for e in loaders.read_all(sources["validation"])]
    assert all(builders.in_validation(p, 0.2) for p in prompts)


@pytest.mark.parametrize("line, words", [
    ("{not json", ["line 2", "not valid JSON"]),
    ('{"prompt": "p"}', ["line 2", "'response'"]),
    ('{"prompt": 3, "response": "r"}', ["line 2", "'prompt'", "str"]),
    ('["prompt", "response"]', ["line 2", "JSON object"]),
])
def test_malformed_jsonl_names_file_line_and_key(tmp_path, line, words):
    path = _write_jsonl(tmp_path / "bad.jsonl", ['{"prompt": "a", "response": " b"}', line])
    with pytest.raises(ValueError) as error:
        load_dataset(datasets.jsonl_sft(path), str(tmp_path / "d"))
    assert "bad.jsonl" in str(error.value)
    for word in words:
        assert word in str(error.value)


def test_preferences_from_jsonl_and_records(tmp_path):
    rows = [{"prompt": f"p{i}", "chosen": " good", "rejected": " bad", "margin": 0.5 * i,
             "metadata": {"labeler": "sim"}, "round": 1} for i in range(40)]
    path = _write_jsonl(tmp_path / "prefs.jsonl", rows)
    sources = load_dataset(datasets.preferences_jsonl(path), str(tmp_path / "d"))
    examples = loaders.read_all(sources["train"]) + loaders.read_all(sources["validation"])
    assert sorted(e["prompt"] for e in examples) == sorted(r["prompt"] for r in rows)
    example = next(e for e in examples if e["prompt"] == "p4")
    assert example["margin"] == 2.0
    assert json.loads(example["metadata"]) == {"labeler": "sim", "round": 1}

    bad = _write_jsonl(tmp_path / "bad.jsonl", [rows[0], {**rows[1], "margin": "big"}])
    with pytest.raises(ValueError, match=r"bad.jsonl line 2: key .margin."):
        load_dataset(datasets.preferences_jsonl(bad), str(tmp_path / "d"))

    records = [{"prompt": f"q{i}", "chosen": " yes", "rejected": " no"} for i in range(30)]
    written = write_preferences(records, str(tmp_path / "d"), "round_1")
    assert sum(_sizes(written).values()) == 30
    assert written["train"][0]["margin"] == 0.0 and written["train"][0]["metadata"] == "{}"
    rewritten = write_preferences({"train": records[:10], "validation": records[10:12]},
                                  str(tmp_path / "d"), "round_1")
    assert _sizes(rewritten) == {"train": 10, "validation": 2}
    assert _sizes(load_preferences(str(tmp_path / "d"), "round_1")) == _sizes(rewritten)
    assert _sizes(load_dataset(datasets.preferences("round_1"), str(tmp_path / "d"))) == {
        "train": 10, "validation": 2}
    with pytest.raises(ValueError, match=r"records\[1\]: missing key 'rejected'"):
        write_preferences([records[0], {"prompt": "x", "chosen": "y"}], str(tmp_path / "d"), "r2")
    with pytest.raises(config_lib.DataError, match="no preferences named"):
        load_preferences(str(tmp_path / "d"), "never_written")
    assert "tensorflow" not in sys.modules


def test_unknown_dataset_name_lists_valid_names(tmp_path):
    config = datasets.reviews()
    config.name = "reviewz"
    with pytest.raises(ValueError, match="reviews_sft"):
        load_dataset(config, str(tmp_path))


def test_dataset_configs_share_all_fields():
    """Every dataset config has every common field (a generated set may add its own knobs)."""
    configs = [datasets.reviews(), datasets.reviews_sft(), datasets.arithmetic(), datasets.text_folder("/x"),
               datasets.jsonl_sft("/x"), datasets.preferences_jsonl("/x"),
               datasets.preferences("r"), datasets.imdb_reviews()]
    keys = set(configs[0].keys())
    assert all(set(c.keys()) >= keys for c in configs)
    assert {c.name for c in configs} == set(builders.DATASET_NAMES)


# -------------------------------------------------------------------------------------- loaders

DOCS = [{"text": "alpha beta"}, {"text": "gamma"}, {"text": "delta epsilon zeta"},
        {"text": "eta"}, {"text": "theta iota"}]


def _stream(docs):
    out = []
    for d in docs:
        out += TOK.encode(d["text"]) + [TOK.eos_id]
    return out


def test_packing_is_the_eos_joined_stream():
    seq_len = 8
    batches = loaders.pretrain_batches(DOCS, TOK, seq_len, batch_size=1, seed=0, shuffle=False)
    stream = _stream(DOCS)
    assert len(batches) == math.ceil(len(stream) / seq_len)
    rows = [batches[i] for i in range(len(batches))]
    tokens = np.concatenate([r["tokens"][0] for r in rows])
    mask = np.concatenate([r["attention_mask"][0] for r in rows])
    assert tokens[mask == 1].tolist() == stream
    assert (tokens[mask == 0] == TOK.pad_id).all() and mask.sum() == len(stream)
    assert (tokens == TOK.eos_id).sum() == len(DOCS)
    for r in rows:
        assert {k: v.dtype for k, v in r.items()} == {k: np.int32 for k in r}
        assert r["positions"][0].tolist() == list(range(seq_len))
        assert r["loss_mask"][0, 0] == 0
        np.testing.assert_array_equal(r["loss_mask"][0, 1:], r["attention_mask"][0, 1:])


def test_pretrain_batches_shapes_and_epoch_reshuffle():
    docs = reviews.generate_reviews(0, 10)
    batches = loaders.pretrain_batches(docs, TOK, 16, batch_size=4, seed=0)
    batch = batches[0]
    assert set(batch) == {"tokens", "positions", "attention_mask", "loss_mask"}
    assert all(v.shape == (4, 16) for v in batch.values())
    n = len(batches)
    epoch0 = np.concatenate([batches[i]["tokens"] for i in range(n)])
    epoch1 = np.concatenate([batches[n + i]["tokens"] for i in range(n)])
    assert not np.array_equal(epoch0, epoch1)  # reshuffled
    windows = [tuple(w) for w in loaders.pack_windows(
        np.asarray(_stream(docs), np.int32), 16, TOK.pad_id)]
    assert len(set(windows)) == len(windows)
    for epoch in (epoch0, epoch1):  # each epoch: distinct windows, all but the remainder
        assert len({tuple(w) for w in epoch}) == len(epoch) == len(windows) // 4 * 4
        assert {tuple(w) for w in epoch} <= set(windows)


def _sft_rows():
    return [{"prompt": "Review the hotel:", "response": " The room was lovely."},
            {"prompt": "I found the", "response": " staff rude." * 6},
            {"prompt": "Write a review of the film:", "response": " Terrible."},
            {"prompt": "Tell us about the cafe:", "response": " great coffee" * 2}]


def test_sft_loss_mask_is_response_and_eos_only():
    rows = _sft_rows()
    batch = loaders.sft_batches(rows, TOK, 48, batch_size=4, seed=0, shuffle=False)[0]
    assert all(v.shape == (4, 48) and v.dtype == np.int32 for v in batch.values())
    for b, row in enumerate(rows):
        tokens, attn, loss = batch["tokens"][b], batch["attention_mask"][b], batch["loss_mask"][b]
        prompt, response = TOK.encode(row["prompt"]), TOK.encode(row["response"])
        if len(prompt) + len(response) + 1 <= 48:
            full = prompt + response + [TOK.eos_id]
            assert tokens[:len(full)].tolist() == full
            assert (tokens[len(full):] == TOK.pad_id).all() and attn.sum() == len(full)
            assert loss[:len(prompt)].sum() == 0 and loss[len(full):].sum() == 0
            assert tokens[loss == 1].tolist() == response + [TOK.eos_id]
        elif len(response) + 1 <= 48:  # the prompt is cut from the left, response + EOS kept
            kept = prompt[len(prompt) + len(response) + 1 - 48:]
            assert tokens.tolist() == kept + response + [TOK.eos_id]
            assert tokens[loss == 1].tolist() == response + [TOK.eos_id]
        else:  # the response alone is too long: no prompt, response cut on the right, no EOS
            assert tokens.tolist() == response[:48] and loss.all()
        assert (loss <= attn).all()


def test_prompt_batches_are_left_padded():
    rows = _sft_rows()
    batches = loaders.prompt_batches(rows, TOK, max_prompt_len=24, batch_size=4, seed=0,
                                     shuffle=False)
    batch = batches[0]
    assert batch["prompt_tokens"].shape == (4, 24) and batch["index"].tolist() == [0, 1, 2, 3]
    for b, row in enumerate(rows):
        ids = TOK.encode(row["prompt"])[-24:]
        tokens, mask = batch["prompt_tokens"][b], batch["prompt_mask"][b]
        assert tokens[24 - len(ids):].tolist() == ids and mask[24 - len(ids):].all()
        assert (tokens[:24 - len(ids)] == TOK.pad_id).all() and mask[:24 - len(ids)].sum() == 0
        assert batch["prompt_positions"][b, -1] == len(ids) - 1
    assert loaders.prompt_texts(rows, batch["index"]) == [r["prompt"] for r in rows]


def test_preference_batches_end_in_eos():
    rows = [{"prompt": "Review the film:", "chosen": " Wonderful!", "rejected": " Awful plot.",
             "margin": 1.5}, {"prompt": "I", "chosen": " loved it.", "rejected": " no."}]
    batch = loaders.preference_batches(rows, TOK, 40, batch_size=2, seed=0, shuffle=False)[0]
    for side in ("chosen", "rejected"):
        tokens, mask = batch[f"{side}_tokens"], batch[f"{side}_mask"]
        assert tokens.shape == mask.shape == (2, 40)
        last = mask.sum(-1) - 1
        assert (tokens[np.arange(2), last] == TOK.eos_id).all()
        for b, row in enumerate(rows):
            assert TOK.decode(tokens[b][mask[b] == 1]) == row["prompt"] + row[side]
    assert batch["margin"].tolist() == [1.5, 0.0]


def test_batches_are_pure_functions_of_seed_and_step(tmp_path):
    sources = load_dataset(datasets.reviews_sft(num_train=64, num_validation=8),
                           str(tmp_path / "d"))
    make = lambda seed: loaders.sft_batches(sources["train"], TOK, 64, 8, seed)  # noqa: E731
    a, b, c = make(0), make(0), make(1)
    for step in (0, 5, 123):  # 123 is in a later epoch: a resumed run asks for batches[step]
        for key in a[step]:
            np.testing.assert_array_equal(a[step][key], b[step][key])
    assert not np.array_equal(a[0]["tokens"], c[0]["tokens"])
    prompts = loaders.prompt_batches(sources["train"], TOK, 32, 8, seed=0)
    assert prompts[3]["index"].tolist() == loaders.prompt_batches(
        sources["train"], TOK, 32, 8, seed=0)[3]["index"].tolist()
    assert "tensorflow" not in sys.modules


def test_eval_pass_is_one_ordered_pass():
    rows = [{"prompt": f"p{i}", "response": f" r{i}"} for i in range(10)]
    batches = loaders.prompt_batches(rows, TOK, 8, batch_size=4, seed=0, shuffle=False)
    assert len(batches) == 2  # 10 // 4; the partial batch is dropped
    seen = [i for step in range(len(batches)) for i in batches[step]["index"].tolist()]
    assert seen == list(range(8))
    with pytest.raises(ValueError, match="cannot fill one batch"):
        loaders.sft_batches(rows[:3], TOK, 8, batch_size=4, seed=0)


def test_unigram_entropy():
    # Stream 'a', 'b', EOS, 'a', 'b', EOS: three equally likely tokens.
    assert loaders.unigram_entropy([{"text": "ab"}, {"text": "ab"}], TOK) == pytest.approx(
        math.log(3))
    entropy = loaders.unigram_entropy(reviews.generate_reviews(0, 200), TOK)
    assert 2.5 < entropy < 4.0
