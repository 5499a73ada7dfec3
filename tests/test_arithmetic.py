"""The embedded arithmetic task: generation, splits, worked solutions, the strict verifier."""

import re
import sys

import pytest
from ml_collections import ConfigDict

from rlhf_jax.data import arithmetic as A, builders

P = "What is 347 + 85?"  # answer 432


# ------------------------------------------------------------------------------------ verifier


@pytest.mark.parametrize("response", [
    " 347+80=427, 427+5=432\n#### 432",  # the data's own format
    "\n#### 432",
    " #### 432",                           # the answer line alone, after the leading space
    "#### 432",
    "work\r\n#### 432",
    " 347+80=427, 427+5=432\n#### 432\n",  # trailing ASCII whitespace is allowed
    " 347+80=427, 427+5=432\n#### 432  \t\r\n",
    " first 431, then 433, really\n#### 432",  # numbers in the work are not read
])
def test_verifier_accepts_one_right_answer(response):
    assert A.arithmetic_reward(P, response) == 1.0
    assert A.extract_answer(response) == "432"


@pytest.mark.parametrize("response, why", [
    ("", "empty"),
    (" ", "blank"),
    (" 347+80=427, 427+5=432", "no answer line"),
    (" the answer is 432", "no marker"),
    (" 347+80=427, 427+5=432\n#### 431", "wrong"),
    (" 347+80=427, 427+5=432\n#### 4320", "wrong (extra digit)"),
    (" 347+80=427, 427+5=432\n#### -432", "wrong sign"),
    ("\n#### 432\n#### 432", "two markers, both right"),
    ("\n#### 431\n#### 432", "two markers"),
    ("\n#### 432\n#### 431", "two markers"),
    ("\n#### 432 #### 432", "two markers on one line"),
    ("\n##### 432", "five hashes"),
    ("\n### 432", "three hashes"),
    ("# note\n#### 432", "stray hash in the work"),
    ("\n#### 432 #", "stray hash after"),
    ("\n#### 432 or 433", "several candidates"),
    ("\n#### 431 or 432", "several candidates"),
    ("\n#### 432, 433", "several candidates"),
    ("\n#### 432/433", "several candidates"),
    ("\n#### 432.", "trailing junk"),
    ("\n#### 432.0", "decimal"),
    ("\n#### 432 (I think)", "trailing junk"),
    ("\n#### 432\nbecause", "text after the answer line"),
    ("\n#### 12a", "malformed"),
    ("\n#### 43a2", "malformed"),
    ("\n####", "empty answer"),
    ("\n#### ", "empty answer"),
    ("\n####432", "no space"),
    ("\n####  432", "two spaces"),
    ("\n####\t432", "tab instead of space"),
    ("\n#### +432", "leading plus"),
    ("\n#### 0432", "leading zero"),
    ("\n#### 4,32", "separator"),
    ("\n#### 4_32", "underscore (int() would accept it)"),
    ("\n#### 4 32", "space inside"),
    ("\n#### 4.32e2", "exponent"),
    ("\n#### \u0664\u0663\u0662", "Arabic-Indic digits (int() would accept them)"),
    ("\n#### \uff14\uff13\uff12", "fullwidth digits (int() would accept them)"),
    ("\n#### 4\u0663\u0662", "mixed unicode digits"),
    ("\n#### \u2074\u00b3\u00b2", "superscripts"),
    ("\n#### 432\u00a0", "non-breaking space after"),
    ("\n#### 432\u200b", "zero-width space after"),
    ("The answer is #### 432", "marker not at the start of a line"),
    ("  #### 432", "two leading spaces"),
    ("\n#### " + "4" * 5000, "absurdly long numeral"),
])
def test_verifier_rejects(response, why):
    assert A.arithmetic_reward(P, response) == 0.0, why


def test_verifier_rejects_negative_zero_and_handles_negative_answers():
    assert A.extract_answer("\n#### -0") is None
    assert A.arithmetic_reward("What is 3 - 5?", "\n#### -2") == 1.0
    assert A.arithmetic_reward("What is 3 - 5?", "\n#### 2") == 0.0
    assert A.arithmetic_reward("What is 3 - 3?", "\n#### 0") == 1.0
    assert A.arithmetic_reward("What is 3 - 3?", "\n#### -0") == 0.0
    assert A.arithmetic_reward("What is 12 * 9?", " 10*9=90, 2*9=18, 90+18=108\n#### 108") == 1.0


def test_verifier_recomputes_the_answer_from_the_prompt():
    # The same response is right for one prompt and wrong for another.
    response = "\n#### 432"
    assert A.arithmetic_reward("What is 347 + 85?", response) == 1.0
    assert A.arithmetic_reward("What is 347 - 85?", response) == 0.0
    assert A.solve("What is 347 - 85?") == 262 and A.solve("What is 347 * 6?") == 2082
    for prompt in ["What is 347 + 85", "what is 347 + 85?", "What is 347 +85?",
                   "What is 0347 + 85?", "What is \u0663 + 1?", "What is 347 + 85? #### 1",
                   "Write a review of the hotel:", "", "What is 347 / 85?"]:
        with pytest.raises(ValueError, match="not an arithmetic prompt"):
            A.arithmetic_reward(prompt, response)


def test_batch_rewards():
    prompts = ["What is 1 + 2?", "What is 9 - 4?", "What is 7 * 8?"]
    assert A.arithmetic_rewards(prompts, [" #### 3", "\n#### 4", "\n#### 56\n#### 56"]) == [
        1.0, 0.0, 0.0]
    with pytest.raises(ValueError):
        A.arithmetic_rewards(prompts, [" #### 3"])


def test_reward_is_loadable_as_a_reward_function():
    from rlhf_jax.people.labelers import load_function

    fn = load_function("rlhf_jax.data.arithmetic:arithmetic_reward")
    assert fn(P, " #### 432") == 1.0 and isinstance(fn(P, ""), float)


# ------------------------------------------------------------------------------------ data


KNOBS = [dict(), dict(max_digits=2), dict(operations="+-*", max_digits=3),
         dict(operations=("*",), min_digits=2, max_digits=4, mul_digits=2),
         dict(operations="-", min_digits=3, max_digits=3)]


@pytest.mark.parametrize("knobs", KNOBS)
def test_worked_solutions_pass_the_verifier_and_their_steps_are_right(knobs):
    splits = A.arithmetic_splits(0, 1500, 200, 200, **knobs)
    step = re.compile(r"(-?\d+)([-+*])(\d+)=(-?\d+)", re.ASCII)
    for records in splits.values():
        for r in records:
            assert A.arithmetic_reward(r["prompt"], r["response"]) == 1.0, r
            assert not r["prompt"].endswith(" ") and r["response"].startswith(" ")
            work, answer_line = r["response"].rsplit("\n", 1)
            assert answer_line == f"#### {A.solve(r['prompt'])}"
            steps = work.strip().split(", ")
            for s in steps:
                a, op, b, c = step.fullmatch(s).groups()
                assert A._apply(int(a), op, int(b)) == int(c), (r, s)
            # The last step's result is the answer.
            assert steps[-1].split("=")[-1] == answer_line[5:]


@pytest.mark.parametrize("knobs", KNOBS)
def test_splits_are_disjoint_sized_and_deterministic(knobs):
    splits = A.arithmetic_splits(3, 1000, 150, 120, **knobs)
    assert {k: len(v) for k, v in splits.items()} == {"train": 1000, "validation": 150,
                                                      "test": 120}
    assert splits == A.arithmetic_splits(3, 1000, 150, 120, **knobs)
    assert splits != A.arithmetic_splits(4, 1000, 150, 120, **knobs)

    def keys(records):  # problems up to commuting + and *
        out = []
        for r in records:
            a, op, b = A.parse_prompt(r["prompt"])
            out.append(A._problem_key(a, op, b))
        return out

    k = {name: keys(records) for name, records in splits.items()}
    for name in k:
        assert len(set(k[name])) == len(k[name]), f"duplicate problems in {name}"
    assert not set(k["train"]) & set(k["validation"])
    assert not set(k["train"]) & set(k["test"])
    assert not set(k["validation"]) & set(k["test"])
    # The held-out splits do not move when train grows.
    bigger = A.arithmetic_splits(3, 1500, 150, 120, **knobs)
    assert bigger["test"] == splits["test"] and bigger["validation"] == splits["validation"]
    assert bigger["train"][:1000] == splits["train"]


def test_knobs_shape_the_problems():
    def stats(**knobs):
        problems = [A.parse_prompt(r["prompt"])
                    for r in A.arithmetic_splits(0, 2000, 0, 0, **knobs)["train"]]
        return problems, {op for _, op, _ in problems}

    problems, ops = stats(max_digits=2)
    assert ops == {"+", "-"} and max(max(a, b) for a, _, b in problems) <= 99
    assert all(a >= b for a, op, b in problems if op == "-")  # answers >= 0
    problems, ops = stats(operations="+-*")
    assert ops == {"+", "-", "*"}
    assert max(b for _, op, b in problems if op == "*") <= 9
    problems, ops = stats(operations="*", min_digits=3, max_digits=3, mul_digits=2)
    assert ops == {"*"} and all(100 <= a <= 999 and b <= 99 for a, _, b in problems)
    assert any(b >= 10 for _, _, b in problems)
    problems, _ = stats(min_digits=4, max_digits=4)
    assert all(1000 <= a <= 9999 and 1000 <= b <= 9999 for a, _, b in problems)


@pytest.mark.parametrize("knobs, words", [
    (dict(operations="+/"), "operations"),
    (dict(operations=""), "operations"),
    (dict(min_digits=0), "min_digits"),
    (dict(min_digits=3, max_digits=2), "max_digits"),
    (dict(mul_digits=0), "mul_digits"),
])
def test_bad_knobs_raise(knobs, words):
    with pytest.raises(ValueError, match=words):
        A.arithmetic_splits(0, 10, 1, 1, **knobs)


def test_too_many_problems_for_the_knobs_raises():
    # One-digit + only: 55 problems up to commuting.
    assert len(A.arithmetic_splits(0, 45, 5, 5, max_digits=1, operations="+")["train"]) == 45
    with pytest.raises(ValueError, match="distinct arithmetic problems"):
        A.arithmetic_splits(0, 50, 5, 5, max_digits=1, operations="+")


def test_builder_round_trip(tmp_path):
    config = ConfigDict(dict(name="arithmetic", seed=2, num_train=60, num_validation=10,
                             num_test=12, max_digits=2, operations="+-*"))
    sources = builders.load_dataset(config, str(tmp_path))
    assert {k: len(v) for k, v in sources.items()} == {"train": 60, "validation": 10, "test": 12}
    expected = A.arithmetic_splits(2, 60, 10, 12, max_digits=2, operations="+-*")
    for split, records in expected.items():
        got = sorted((r["prompt"], r["response"]) for r in
                     (sources[split][i] for i in range(len(sources[split]))))
        assert got == sorted((r["prompt"], r["response"]) for r in records)
    assert set(sources["train"][0]) == {"prompt", "response"}
    assert isinstance(sources["train"][0]["response"], str)
    assert "tensorflow" not in sys.modules
