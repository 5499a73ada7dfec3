"""Tokenizers: byte-level by default (needs no files), Hugging Face `tokenizer.json` for imports.

Both expose the same small surface:
    tok.encode(text) -> list[int]        (no special tokens added)
    tok.encode_prompt(text) -> list[int] a prompt, as the model reads it: `format_prompt(text)` encoded
    tok.format_prompt(text) -> str       the text itself, or with `tokenizer.chat_template=True` the
                                         tokenizer's chat template around one user message
    tok.decode(ids) -> str               (stops at nothing; special ids are dropped)
    tok.vocab_size, tok.pad_id, tok.eos_id, tok.bos_id
pad and EOS are always distinct ids.

Chat templates (instruction-tuned checkpoints, e.g. Qwen's or Llama 3's): the Jinja template of
`chat_template.jinja` or tokenizer_config.json's `chat_template`, rendered the way transformers'
`apply_chat_template(messages, add_generation_prompt=True, tokenize=False)` renders it (sandboxed
Jinja with trim_blocks and lstrip_blocks, the special tokens as variables), so the prompt ends
where the assistant's answer begins. Responses and documents are encoded as they are.
"""

from __future__ import annotations

import datetime
import json
import os
from dataclasses import dataclass

import jinja2
import jinja2.ext
from jinja2.sandbox import ImmutableSandboxedEnvironment

from tokenizers import Tokenizer


@dataclass(frozen=True)
class ByteTokenizer:
    """UTF-8 bytes are ids 0..255; then pad, EOS and BOS. Vocab padded to a multiple of 8."""

    pad_id: int = 256
    eos_id: int = 257
    bos_id: int = 258
    vocab_size: int = 264

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def format_prompt(self, text: str) -> str:
        return text

    def encode_prompt(self, text: str) -> list[int]:
        return self.encode(text)

    def decode(self, ids) -> str:
        return bytes(int(i) for i in ids if 0 <= int(i) < 256).decode("utf-8", errors="replace")


class HFTokenizer:
    """A Hugging Face `tokenizer.json`, read with the `tokenizers` package (no network)."""

    def __init__(self, path: str, pad_token: str | None = None, eos_token: str | None = None,
                 chat_template: bool = False):
        file = os.path.join(path, "tokenizer.json") if os.path.isdir(path) else path
        if not os.path.exists(file):
            raise FileNotFoundError(f"no tokenizer.json at {file!r}")
        self._tok = Tokenizer.from_file(file)
        special = _special_tokens(os.path.dirname(file))
        self._special = special  # the template sees bos_token, eos_token, ... as transformers passes them
        self._chat_template = _read_chat_template(os.path.dirname(file)) if chat_template else None
        eos = eos_token or special.get("eos_token") or "<|endoftext|>"
        pad = pad_token or special.get("pad_token")
        self.eos_id = self._tok.token_to_id(eos)
        if self.eos_id is None:
            raise ValueError(f"{file}: EOS token {eos!r} is not in the vocabulary")
        bos = special.get("bos_token")
        self.bos_id = self._tok.token_to_id(bos) if bos else self.eos_id
        base = self._tok.get_vocab_size(with_added_tokens=True)
        pad_id = self._tok.token_to_id(pad) if pad else None
        if pad_id is None or pad_id == self.eos_id:
            # GPT-2 style vocabularies have no pad token: add one past the end so pad != EOS.
            pad_id = base
        self.pad_id = pad_id
        self.vocab_size = max(base, pad_id + 1)

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def format_prompt(self, text: str) -> str:
        if self._chat_template is None:
            return text
        return self._chat_template.render(messages=[{"role": "user", "content": text}], tools=None, documents=None,
                                          add_generation_prompt=True, **self._special)

    def encode_prompt(self, text: str) -> list[int]:
        # The template writes its special tokens as text; encode() turns them into their ids.
        return self.encode(self.format_prompt(text))

    def decode(self, ids) -> str:
        keep = [int(i) for i in ids if int(i) not in (self.pad_id, self.eos_id) and int(i) < self._tok.get_vocab_size(True)]
        return self._tok.decode(keep)


def _special_tokens(folder: str) -> dict:
    out = {}
    for name in ("special_tokens_map.json", "tokenizer_config.json"):
        p = os.path.join(folder, name)
        if os.path.exists(p):
            with open(p) as f:
                d = json.load(f)
            for k in ("eos_token", "pad_token", "bos_token", "unk_token"):
                v = d.get(k)
                if isinstance(v, dict):
                    v = v.get("content")
                if isinstance(v, str) and k not in out:
                    out[k] = v
    return out


def _read_chat_template(folder: str):
    """The compiled chat template of a tokenizer folder: chat_template.jinja (what transformers >= 4.50
    writes) before tokenizer_config.json's `chat_template` (a string, or named templates: 'default')."""
    file = os.path.join(folder, "chat_template.jinja")
    if os.path.exists(file):
        with open(file, encoding="utf-8") as f:
            return _compile_chat_template(f.read())
    config_file = os.path.join(folder, "tokenizer_config.json")
    template = None
    if os.path.exists(config_file):
        with open(config_file, encoding="utf-8") as f:
            template = json.load(f).get("chat_template")
    if isinstance(template, list):
        template = {t.get("name"): t.get("template") for t in template}.get("default")
    if not isinstance(template, str) or not template:
        raise ValueError(f"{config_file}: no chat_template (nor a chat_template.jinja beside it), but "
                         "tokenizer.chat_template=True")
    return _compile_chat_template(template)


def _compile_chat_template(source: str):
    """Jinja set up as transformers' `_compile_jinja_template`: sandboxed, trim_blocks, lstrip_blocks,
    loop controls, raise_exception, strftime_now, a tojson that keeps non-ASCII, and a no-op
    {% generation %} block (transformers uses it to find the assistant's tokens)."""
    class GenerationBlock(jinja2.ext.Extension):
        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return jinja2.nodes.CallBlock(self.call_method("_render"), [], [], body).set_lineno(lineno)

        def _render(self, caller):
            return caller()

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[GenerationBlock, jinja2.ext.loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.datetime.now().strftime(fmt)
    return env.from_string(source)


def make_tokenizer(config, model_vocab_size: int | None = None) -> ByteTokenizer | HFTokenizer:
    """`config.kind` is 'byte' (default) or 'hf' with `config.path` a folder holding tokenizer.json;
    `config.chat_template` (hf only) formats prompts with the tokenizer's chat template.

    With `model_vocab_size`, refuse a tokenizer whose ids do not fit the model's embedding.
    """
    kind = config.get("kind", "byte") if config is not None else "byte"
    if kind == "byte":
        tokenizer = ByteTokenizer()
    elif kind == "hf":
        tokenizer = HFTokenizer(config.path, chat_template=bool(config.get("chat_template", False)))
    else:
        raise ValueError(f"tokenizer.kind={kind!r}: expected 'byte' or 'hf'")
    if kind == "byte" and config is not None and config.get("chat_template", False):
        raise ValueError("tokenizer.chat_template=True needs tokenizer.kind='hf' (a tokenizer with a chat template)")
    if model_vocab_size is not None and tokenizer.vocab_size > model_vocab_size:
        raise ValueError(f"the tokenizer has {tokenizer.vocab_size} ids but model.vocab_size is {model_vocab_size}")
    return tokenizer
