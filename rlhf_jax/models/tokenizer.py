"""Tokenizers: byte-level by default (needs no files), Hugging Face `tokenizer.json` for imports.

Both expose the same small surface:
    tok.encode(text) -> list[int]        (no special tokens added)
    tok.decode(ids) -> str               (stops at nothing; special ids are dropped)
    tok.vocab_size, tok.pad_id, tok.eos_id, tok.bos_id
pad and EOS are always distinct ids.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

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

    def decode(self, ids) -> str:
        return bytes(int(i) for i in ids if 0 <= int(i) < 256).decode("utf-8", errors="replace")


class HFTokenizer:
    """A Hugging Face `tokenizer.json`, read with the `tokenizers` package (no network)."""

    def __init__(self, path: str, pad_token: str | None = None, eos_token: str | None = None):
        file = os.path.join(path, "tokenizer.json") if os.path.isdir(path) else path
        if not os.path.exists(file):
            raise FileNotFoundError(f"no tokenizer.json at {file!r}")
        self._tok = Tokenizer.from_file(file)
        special = _special_tokens(os.path.dirname(file))
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
            for k in ("eos_token", "pad_token", "bos_token"):
                v = d.get(k)
                if isinstance(v, dict):
                    v = v.get("content")
                if isinstance(v, str) and k not in out:
                    out[k] = v
    return out


def make_tokenizer(config, model_vocab_size: int | None = None) -> ByteTokenizer | HFTokenizer:
    """`config.kind` is 'byte' (default) or 'hf' with `config.path` a folder holding tokenizer.json.

    With `model_vocab_size`, refuse a tokenizer whose ids do not fit the model's embedding.
    """
    kind = config.get("kind", "byte") if config is not None else "byte"
    if kind == "byte":
        tokenizer = ByteTokenizer()
    elif kind == "hf":
        tokenizer = HFTokenizer(config.path)
    else:
        raise ValueError(f"tokenizer.kind={kind!r}: expected 'byte' or 'hf'")
    if model_vocab_size is not None and tokenizer.vocab_size > model_vocab_size:
        raise ValueError(f"the tokenizer has {tokenizer.vocab_size} ids but model.vocab_size is {model_vocab_size}")
    return tokenizer
