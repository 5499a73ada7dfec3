"""Chat templates: prompts rendered as transformers' apply_chat_template(add_generation_prompt=True)
renders them (expected_chat.json, stored by scripts/make_hf_fixtures.py), and the switch's checks."""

import json
import os
import shutil

import ml_collections
import pytest

from configs import stages
from rlhf_jax.data import loaders
from rlhf_jax.models import model, sampling
from rlhf_jax.models.tokenizer import ByteTokenizer, make_tokenizer
from rlhf_jax.runtime import checks, config as config_lib

FOLDER = os.path.join(os.path.dirname(__file__), "fixtures", "hf_chat_tokenizer")


def tokenizer_config(**fields):
    return ml_collections.ConfigDict(dict(kind="hf", path=FOLDER, chat_template=True) | fields)


def expected():
    with open(os.path.join(FOLDER, "expected_chat.json"), encoding="utf-8") as f:
        return json.load(f)


def test_prompts_render_and_encode_as_transformers_does():
    tok = make_tokenizer(tokenizer_config())
    for case in expected():
        assert tok.format_prompt(case["prompt"]) == case["text"]
        assert tok.encode_prompt(case["prompt"]) == case["ids"]
    # The special tokens are single ids, and the prompt ends where the assistant's answer begins.
    ids = tok.encode_prompt("Hi")
    assert ids.count(tok.eos_id) == 2 and ids[-3:] == tok.encode("assistant\n")[-3:]


def test_without_the_switch_prompts_are_plain_text():
    tok = make_tokenizer(tokenizer_config(chat_template=False))
    assert tok.format_prompt("Hello!") == "Hello!" and tok.encode_prompt("Hello!") == tok.encode("Hello!")
    assert make_tokenizer(None).encode_prompt("Hi") == ByteTokenizer().encode("Hi")


def test_prompt_batches_and_reward_rows_use_the_template():
    tok = make_tokenizer(tokenizer_config())
    case = expected()[0]
    source = [dict(prompt=case["prompt"], response=" fine", chosen=" yes", rejected=" no")]
    width = len(case["ids"]) + 2
    batch = loaders.prompt_batches(source, tok, width, 1, 0, shuffle=False)[0]
    assert batch["prompt_tokens"][0, 2:].tolist() == case["ids"]
    tokens, mask = sampling.encode_prompt_responses(tok, [case["prompt"]], [" fine"], width + 8)
    assert tokens[0, :len(case["ids"])].tolist() == case["ids"]
    pairs = loaders.preference_batches(source, tok, width + 8, 1, 0, shuffle=False)[0]
    assert pairs["chosen_tokens"][0, :len(case["ids"])].tolist() == case["ids"]
    assert sampling.encode_prompts(tok, [case["prompt"]], width)[0][0, 2:].tolist() == case["ids"]


def test_chat_template_jinja_file_comes_first(tmp_path):
    shutil.copytree(FOLDER, tmp_path, dirs_exist_ok=True)
    template = "[{{ messages[0]['content'] }}]{% if add_generation_prompt %}>{% endif %}"
    (tmp_path / "chat_template.jinja").write_text(template)
    assert make_tokenizer(tokenizer_config(path=str(tmp_path))).format_prompt("x") == "[x]>"


def test_a_tokenizer_without_a_template_is_refused(tmp_path):
    shutil.copy(os.path.join(FOLDER, "tokenizer.json"), tmp_path)
    with open(os.path.join(FOLDER, "tokenizer_config.json")) as f:
        hf = json.load(f)
    del hf["chat_template"]
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(hf))
    with pytest.raises(ValueError, match=r"tokenizer_config.json: no chat_template") as error:
        make_tokenizer(tokenizer_config(path=str(tmp_path)))
    assert "\n" not in str(error.value)
    # Without the switch the same folder is fine.
    make_tokenizer(tokenizer_config(path=str(tmp_path), chat_template=False))


def test_the_switch_needs_an_hf_tokenizer():
    config = stages.language_model_stage("sft", num_steps=10)
    config.tokenizer.chat_template = True
    with pytest.raises(config_lib.ConfigError, match=r"tokenizer.chat_template=True: needs tokenizer.kind='hf'"):
        model.check_model_config(checks.Checks(config, ""))
    with pytest.raises(ValueError, match="chat_template=True needs tokenizer.kind='hf'"):
        make_tokenizer(config.tokenizer)
    config.tokenizer.update(kind="hf", path=FOLDER)
    model.check_model_config(checks.Checks(config, ""))
