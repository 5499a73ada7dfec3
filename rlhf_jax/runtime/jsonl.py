"""The one JSONL reader: metrics, samples, pairs, answers and data files all follow one rule.

Every row is a JSON object on its own line; blank lines are skipped. A line that is not UTF-8,
not JSON or not an object is an error naming the file and the line. The one exception is a last
line without its newline that does not parse in a file this code appends to (`appended=True`:
metrics, samples, labels): every writer here ends a row with '\n', so that is an append cut short
by a kill (or a full disk); it is left out, with a warning naming the line, and the next append
starts a fresh line. In a file written whole (pairs, data files) the same line is an error: the
file was not written to its end.
"""

from __future__ import annotations

import json
import os
import sys

from rlhf_jax.runtime.config import DataError


def decode_utf8(data: bytes, path: str, lineno: int = 1) -> str:
    """`data` as text; DataError naming the file and line of the first byte that is not UTF-8.
    `lineno` is the line `data` starts on."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = lineno + data.count(b"\n", 0, e.start)
        raise DataError(f"{path} line {line}: not valid UTF-8 (byte 0x{data[e.start]:02x}); "
                        "expected UTF-8 text") from None


def read_jsonl(path: str, with_where: bool = False, appended: bool = False) -> list:
    """The rows of a JSONL file ([] when it does not exist); with `with_where`, (where, row)
    pairs where `where` is '<path> line <n>' (1-based) for the caller's own messages.
    `appended`: the file is a log appended to row by row (a torn last row is skipped)."""
    if not os.path.exists(path):
        return []
    if os.path.isdir(path):
        raise DataError(f"{path}: is a folder; expected a JSONL file")
    with open(path, "rb") as f:
        lines = f.read().split(b"\n")
    rows = []
    for i, raw in enumerate(lines):
        lineno, where = i + 1, f"{path} line {i + 1}"
        text = decode_utf8(raw, path, lineno)
        if not text.strip():
            continue
        try:
            row = json.loads(text)
        except ValueError as e:  # (JSONDecodeError; also a number too long to convert)
            if i == len(lines) - 1 and not appended:
                raise DataError(f"{where} is cut short (no newline, not JSON): the file was not written to its end; "
                                "write it again") from None
            if i == len(lines) - 1:  # no newline after it: an append cut short
                print(f"warning: {where} is cut short (no newline, not JSON): left out as an unfinished write",
                      file=sys.stderr, flush=True)
                continue
            raise DataError(f"{where}: not valid JSON ({getattr(e, 'msg', e)}); expected one JSON object per line") \
                from None
        if not isinstance(row, dict):
            raise DataError(f"{where}: expected a JSON object, got {text.strip()[:80]}")
        rows.append((where, row) if with_where else row)
    return rows
