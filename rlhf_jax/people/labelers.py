"""Preference labelers: a person at a terminal, a simulated annotator, or any Python function.

Every automatic labeler is a callable ``label(prompt, response_a, response_b) -> dict`` with
keys ``choice`` (0 when ``response_a`` is preferred, 1 when ``response_b`` is), ``p_a`` (the
probability with which ``a`` was preferred), ``gold_a`` and ``gold_b`` (the scores behind the
decision), so a preference dataset records how each label came about.

The person labels pairs in a data directory:

* ``<data_dir>/pairs.jsonl``: unlabeled pairs, one JSON object per line,
  ``{"id", "prompt", "response_a", "response_b"}``.
* ``<data_dir>/labels.sqlite``: the label store (rlhf_jax.people.label_store), shared with the web
  app: every answer with its annotator, time and shown order, committed as soon as it is given,
  so an interrupted session loses nothing and a new session resumes where the last one stopped.
  An older ``labels.jsonl`` (``{"id", "choice": 0 | 1 | null, "labeler", "time"}``) is imported.

``labels_to_preferences`` turns the store into ``(prompt, chosen, rejected, metadata)`` records.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import os
from typing import Any, Callable, Iterable, Optional

import numpy as np
from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

from rlhf_jax.people import label_store
from rlhf_jax.runtime import config as config_lib
from rlhf_jax.runtime.config import DataError, UserError
from rlhf_jax.runtime.jsonl import read_jsonl

PAIRS_FILE = label_store.PAIRS_FILE
load_function = config_lib.load_function  # (lives with the config values that name functions)
LABELS_FILE = label_store.LABELS_FILE  # the terminal labeler's old answer file; imported, no longer written

ScoreFn = Callable[[str, str], float]
Labeler = Callable[[str, str, str], dict]

__all__ = [
    "PAIRS_FILE",
    "LABELS_FILE",
    "vader_gold_score",
    "simulated_annotator",
    "load_function",
    "function_labeler",
    "label_pairs",
    "write_pairs",
    "read_pairs",
    "open_store",
    "label_in_terminal",
    "labels_to_preferences",
    "main",
]


# --------------------------------------------------------------------------------------------
# Scores and automatic labelers
# --------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=1)
def _vader_analyzer():
    return SentimentIntensityAnalyzer()


def vader_gold_score(prompt: str, response: str) -> float:
    """VADER compound sentiment of ``response`` in [-1, 1] (the prompt is ignored).

    The "gold" reward of the sentiment task: positive continuations score high.
    """
    del prompt
    return float(_vader_analyzer().polarity_scores(response)["compound"])


def _sigmoid(x: float) -> float:
    # Stable for large |x|.
    if x >= 0:
        return 1.0 / (1.0 + math.exp(-x))
    z = math.exp(x)
    return z / (1.0 + z)


def simulated_annotator(gold_fn: ScoreFn, temperature: float, rng: np.random.Generator) -> Labeler:
    """A noisy annotator following the Bradley–Terry model on a gold score.

    ``P(a preferred) = sigmoid((gold(a) - gold(b)) / temperature)``. ``temperature == 0`` is a
    perfect annotator: always the higher gold score, ties broken at random with ``rng``.

    Args:
      gold_fn: ``gold_fn(prompt, response) -> float``.
      temperature: >= 0; larger is noisier (at infinity labels are coin flips).
      rng: source of randomness (``np.random.default_rng(seed)``), so labels are reproducible.
    Returns:
      ``label(prompt, a, b) -> {"choice", "p_a", "gold_a", "gold_b"}``.
    """
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")

    def label(prompt: str, response_a: str, response_b: str) -> dict:
        gold_a = float(gold_fn(prompt, response_a))
        gold_b = float(gold_fn(prompt, response_b))
        diff = gold_a - gold_b
        if temperature == 0:
            p_a = 1.0 if diff > 0 else 0.0 if diff < 0 else 0.5
        else:
            p_a = _sigmoid(diff / temperature)
        choice = 0 if rng.random() < p_a else 1
        return {"choice": choice, "p_a": p_a, "gold_a": gold_a, "gold_b": gold_b}

    return label


def function_labeler(fn: ScoreFn | str) -> Labeler:
    """Deterministic labeler preferring the response with the higher ``fn(prompt, response)``.

    ``fn`` may be an import path (see ``load_function``). Ties go to ``a`` (choice 0) with
    ``p_a = 0.5`` recorded, so the tie is visible in the metadata.
    """
    if isinstance(fn, str):
        fn = load_function(fn)

    def label(prompt: str, response_a: str, response_b: str) -> dict:
        gold_a = float(fn(prompt, response_a))
        gold_b = float(fn(prompt, response_b))
        p_a = 1.0 if gold_a > gold_b else 0.0 if gold_a < gold_b else 0.5
        choice = 0 if gold_a >= gold_b else 1
        return {"choice": choice, "p_a": p_a, "gold_a": gold_a, "gold_b": gold_b}

    return label


def label_pairs(pairs: Iterable[dict], labeler: Labeler, labeler_name: str = "auto") -> list[dict]:
    """Label pairs automatically into ``(prompt, chosen, rejected, metadata)`` records.

    Same record format as ``labels_to_preferences``; ``metadata`` holds the pair id (when
    present), the labeler's name and everything the labeler returned.
    """
    out = []
    for pair in pairs:
        result = labeler(pair["prompt"], pair["response_a"], pair["response_b"])
        out.append(_preference(pair, int(result["choice"]), {"labeler": labeler_name, **result}))
    return out


def _preference(pair: dict, choice: int, extra: dict) -> dict:
    a, b = pair["response_a"], pair["response_b"]
    chosen, rejected = (a, b) if choice == 0 else (b, a)
    metadata = {"id": pair.get("id"), **extra, "choice": choice}
    return {"prompt": pair["prompt"], "chosen": chosen, "rejected": rejected, "metadata": metadata}


# --------------------------------------------------------------------------------------------
# Files
# --------------------------------------------------------------------------------------------


def read_pairs(data_dir: str) -> list[dict]:
    """The pairs of ``<data_dir>/pairs.jsonl`` (first occurrence of each id)."""
    pairs, seen = [], set()
    path = os.path.join(data_dir, PAIRS_FILE)
    if not os.path.isfile(path):
        raise DataError(f"{path} does not exist: --data must be the folder holding the pairs to label")
    for p in read_jsonl(path):
        missing = {"id", "prompt", "response_a", "response_b"} - set(p) if isinstance(p, dict) else ["a JSON object"]
        if missing:
            raise DataError(f"{path}: pair {str(p)[:80]} lacks {sorted(missing)}")
        if p["id"] not in seen:
            seen.add(p["id"])
            pairs.append(p)
    return pairs


def write_pairs(data_dir: str, pairs: Iterable[dict]) -> str:
    """Write pairs to ``<data_dir>/pairs.jsonl`` (ids ``"0"``, ``"1"``... where missing)."""
    os.makedirs(data_dir, exist_ok=True)
    path = os.path.join(data_dir, PAIRS_FILE)
    with open(path, "w", encoding="utf-8") as f:
        for i, p in enumerate(pairs):
            record = {
                "id": str(p.get("id", i)),
                "prompt": p["prompt"],
                "response_a": p["response_a"],
                "response_b": p["response_b"],
            }
            extra = {k: v for k, v in p.items() if k not in record}
            f.write(json.dumps({**record, **extra}, ensure_ascii=False) + "\n")
        f.flush()
        os.fsync(f.fileno())
    return path


def open_store(data_dir: str, answers_per_pair: int = 1) -> "label_store.LabelStore":
    """The label store of a labelling folder, with its pairs.jsonl (and an old labels.jsonl)
    imported. A folder with neither pairs.jsonl nor a store is an error naming pairs.jsonl."""
    if not os.path.exists(os.path.join(data_dir, label_store.STORE_FILE)):
        path = os.path.join(data_dir, PAIRS_FILE)
        if not os.path.isfile(path):
            raise DataError(f"{path} does not exist: --data must be the folder holding the pairs to label")
    if os.path.exists(os.path.join(data_dir, PAIRS_FILE)):
        read_pairs(data_dir)  # a damaged pairs.jsonl is reported before anything is written
    return label_store.open_data_dir(data_dir, answers_per_pair=answers_per_pair)


# --------------------------------------------------------------------------------------------
# The terminal labeler
# --------------------------------------------------------------------------------------------

_HELP = "Please answer 1 (first is better), 2 (second is better), t (tie), s (skip) or q (quit)."


def shown(text) -> str:
    """Model text made safe for a terminal: control characters (ESC sequences that clear the
    screen or set the title, carriage returns, bells, ...) are shown escaped (`\\x1b`), so
    the person sees exactly what the model wrote and their terminal is left alone. Newlines
    and tabs stay as they are."""
    out = []
    for ch in str(text):
        code = ord(ch)
        if ch in "\n\t" or not (code < 32 or 127 <= code < 160 or ch in "\u2028\u2029"):
            out.append(ch)
        else:
            out.append(ch.encode("unicode_escape").decode("ascii"))
    return "".join(out)


def label_in_terminal(
    data_dir: str,
    input_fn: Callable[[str], str] = input,
    print_fn: Callable[..., Any] = print,
    annotator: str = "human",
    answers_per_pair: int = 1,
) -> int:
    """Ask a person to label the pairs of the label store in ``<data_dir>`` they have not answered.

    The store is ``<data_dir>/labels.sqlite`` (rlhf_jax.people.label_store), shared with the web app
    (``rlhf-jax serve``); ``pairs.jsonl`` and an older ``labels.jsonl`` are imported first. Shows
    the prompt and the two responses (always in the pair's order: [1] is response_a) and reads
    ``1``, ``2``, ``t``/``tie``, ``s``/``skip`` or ``q``/``quit``; anything else re-asks. Each
    answer is committed to the store at once (durable), so a session can be resumed after ``q``,
    Ctrl-D, Ctrl-C or a kill. Pairs this annotator answered (skips included) are not asked again.

    Returns:
      the number of new answers (skips included) written in this session.
    """
    store = open_store(data_dir, answers_per_pair)
    done, total = store.progress(annotator)
    if total == 0:
        print_fn(f"No pairs in {os.path.join(data_dir, PAIRS_FILE)}.")
        return 0
    if done == total:
        print_fn(f"All {total} pairs are already labeled in {store.path}.")
        return 0
    print_fn(
        f"{total - done} of {total} pairs to label. "
        "Type 1 or 2 for the better response, t for a tie, s to skip, q to quit (progress is saved)."
    )
    n_new = 0
    try:
        while True:
            lease = store.next_pair(annotator, shown="ab")
            if lease is None:
                break
            pair = lease.pair
            print_fn("")
            print_fn(f"=== Pair {done + n_new + 1}/{total} (id {shown(pair.id)}) ===")
            print_fn(f"PROMPT:\n{shown(pair.prompt)}")
            print_fn(f"\n[1]\n{shown(lease.left)}")
            print_fn(f"\n[2]\n{shown(lease.right)}")
            while True:
                answer = input_fn("Which is better? [1/2/t/s/q]: ").strip().lower()
                if answer in ("1", "2", "t", "tie", "s", "skip"):
                    break
                if answer in ("q", "quit"):
                    print_fn(f"Stopped. {n_new} new answers saved.")
                    return n_new
                print_fn(f"Unrecognised answer {answer!r}. {_HELP}")
            position = {"1": "left", "2": "right", "t": "tie", "tie": "tie"}.get(answer, "skip")
            store.answer(pair.id, annotator, position, lease.shown, metadata={"via": "terminal"})
            n_new += 1
    except (EOFError, KeyboardInterrupt):
        print_fn(f"\nInterrupted. {n_new} new answers saved; run again to resume.")
        return n_new
    print_fn(f"Done. {n_new} new answers saved; all pairs labeled.")
    return n_new


def labels_to_preferences(data_dir: str) -> list[dict]:
    """The labelled pairs of ``<data_dir>``'s store as ``{"prompt", "chosen", "rejected", "metadata"}``.

    Unanswered, skipped, tied and evenly split pairs are dropped; with several annotators the
    majority decides (LabelStore.preferences). Records follow the order pairs were added;
    ``metadata`` holds ``id``, ``labeler``, ``time``, ``choice``, the votes and annotators.
    """
    return open_store(data_dir).preferences()


def main(argv: Optional[list[str]] = None) -> int:
    """``label --data=<dir>``: run the terminal labeler; returns an exit status."""
    parser = argparse.ArgumentParser(
        prog="rlhf-jax label", description="Label preference pairs in the terminal."
    )
    parser.add_argument("--data", required=True, help="directory holding pairs.jsonl / labels.sqlite")
    parser.add_argument("--annotator", default="human", help="your name, recorded with each answer")
    args = parser.parse_args(argv)

    try:
        n = label_in_terminal(args.data, annotator=args.annotator)
    except UserError as e:
        print(f"error: {e}")
        return 2
    print(f"{n} new answers saved in {os.path.join(args.data, label_store.STORE_FILE)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
