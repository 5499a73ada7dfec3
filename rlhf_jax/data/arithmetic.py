"""An embedded verifiable task: integer arithmetic with one checkable answer, and its verifier.

    arithmetic_splits(seed, num_train, num_validation, num_test, **knobs)
        -> {'train': [{'prompt', 'response'}, ...], 'validation': [...], 'test': [...]}
    arithmetic_reward(prompt, response) -> 1.0 or 0.0      (a PPO/GRPO `reward_function`)
    arithmetic_rewards(prompts, responses) -> [float, ...]  (the same, over lists)
    solve(prompt) -> int          the right answer, computed from the prompt alone
    extract_answer(response) -> str | None                  the one final answer, or None

Records follow the SFT convention of reviews.py (the prompt never ends with a space, the
response starts with one, `prompt + response` is the full text). A worked solution adds the
second operand's place-value parts one at a time (or, for `*`, sums the partial products of
the first operand's parts) and ends in a final answer line `#### <integer>`:

    'What is 347 + 85?'  ->  ' 347+80=427, 427+5=432\\n#### 432'
    'What is 347 - 85?'  ->  ' 347-80=267, 267-5=262\\n#### 262'
    'What is 347 * 6?'   ->  ' 300*6=1800, 40*6=240, 1800+240=2040, 7*6=42, 2040+42=2082\\n#### 2082'

Difficulty knobs (all generation arguments):
    min_digits, max_digits  digits of each operand of + and -, and of the first factor of *;
                            each operand draws its digit count uniformly from the range, then a
                            number with that many digits uniformly (1 digit: 0..9)
    operations              which of '+', '-', '*' appear (a string such as '+-' or a tuple),
                            chosen uniformly per problem
    mul_digits              the second factor of * has 1..mul_digits digits
Subtraction is generated with the larger operand first, so every generated answer is >= 0 (the
verifier still handles negative answers: it computes them from the prompt). Response lengths in
bytes (answer line included, EOS not): at most 30 for max_digits=2 and 50 for max_digits=3
(95% <= 44) with '+-'; up to 68 with '*' at max_digits=3, 105 at 4. Size `max_new_tokens`
accordingly. Prompts are at most 18 bytes at max_digits=3.

Splits: one seeded stream of distinct problems is cut into test, then validation, then train
(so the held-out splits do not change when num_train does). Problems are distinct up to the
order of the operands of + and * ('3 + 5' and '5 + 3' are one problem), so no held-out problem
or its mirror image appears in train. Asking for more problems than the knobs allow raises
ValueError. Everything is a pure function of the arguments (`random.Random` seeded with a
string is stable across runs and platforms).

Verifier rules (`extract_answer`; `arithmetic_reward` is 1.0 exactly when the extracted answer
is the string of `solve(prompt)`, else 0.0):
  1. The response contains exactly four '#' characters, forming the one marker '####'. Two
     markers ('#### 12 ... #### 13'), a five-hash marker, or any stray '#' anywhere: 0.
  2. The marker starts a line: it follows a newline, or opens the response (after at most one
     space, the SFT convention's leading space).
  3. The marker is followed by exactly one ASCII space, then the answer, then nothing but ASCII
     whitespace (' ', '\\t', '\\r', '\\n') to the end of the response. Anything else after the
     answer ('#### 12 or 13', '#### 12.', '#### 12 (I think)') is trailing junk: 0.
  4. The answer is a canonical ASCII integer: optional '-', then '0' or a nonzero ASCII digit
     followed by ASCII digits. Rejected: a leading '+' ('#### +12'), leading zeros ('#### 012'),
     '-0', digit separators ('1,234', '1_234', '1 234'), decimals ('12.0'), exponents, any
     non-ASCII digit (Arabic-Indic '١٢', fullwidth '１２', superscripts; Python's `\\d` and
     `int()` accept some of these, so neither is used on the response), an empty answer
     ('####', '#### '), letters ('#### 12a').
  5. The work before the answer line is not read: only the marked answer counts, so writing
     several candidate numbers in the work cannot help, and a right answer in the work with
     a wrong or missing marker earns 0.
  6. The right answer comes from the prompt alone, which must be a prompt of this task
     ('What is A op B?' with canonical ASCII operands); any other prompt raises ValueError,
     since it means the reward function is wired to the wrong data set. The answer is compared
     as a string, so an absurdly long numeral in a response costs nothing to check.
"""

from __future__ import annotations

import random
import re

OPERATIONS = ("+", "-", "*")
OP_NAMES = {"+": "add", "-": "sub", "*": "mul"}
_NUMBER = r"(?:0|[1-9][0-9]*)"
_PROMPT_RE = re.compile(rf"What is ({_NUMBER}) ([-+*]) ({_NUMBER})\?", re.ASCII)
# (?s): the work before the marker may span lines. The marker opens the response (after at
# most one space) or a line; the answer is a canonical integer followed only by whitespace.
_RESPONSE_RE = re.compile(rf"(?s)(?:[ ]?|.*\n)#### (-?{_NUMBER})[ \t\r\n]*", re.ASCII)


# ----------------------------------------------------------------------------------------------
# Problems and worked solutions.


def format_prompt(a: int, op: str, b: int) -> str:
    return f"What is {a} {op} {b}?"


def _place_parts(n: int) -> list[int]:
    """Nonzero place-value parts of n >= 0, highest first: 347 -> [300, 40, 7]."""
    digits = str(n)
    return [int(d) * 10 ** (len(digits) - 1 - i) for i, d in enumerate(digits) if d != "0"]


def worked_solution(a: int, op: str, b: int) -> str:
    """The response for `a op b`: the steps, then '\\n#### <answer>', with a leading space."""
    steps = []
    if op in "+-":
        acc = a
        for part in _place_parts(b) or [0]:
            new = acc + part if op == "+" else acc - part
            steps.append(f"{acc}{op}{part}={new}")
            acc = new
    elif op == "*":
        acc = None
        for part in _place_parts(a) or [0]:
            product = part * b
            steps.append(f"{part}*{b}={product}")
            if acc is None:
                acc = product
            else:
                steps.append(f"{acc}+{product}={acc + product}")
                acc += product
    else:
        raise ValueError(f"unknown operation {op!r}; operations must be among {OPERATIONS}")
    answer = _apply(a, op, b)
    assert acc == answer, (a, op, b, acc)
    return " " + ", ".join(steps) + f"\n#### {answer}"


def _apply(a: int, op: str, b: int) -> int:
    return a + b if op == "+" else a - b if op == "-" else a * b


def check_knobs(min_digits, max_digits, operations, mul_digits) -> tuple[str, ...]:
    ops = tuple(operations)
    if not ops or any(op not in OPERATIONS for op in ops):
        raise ValueError(f"operations must be a non-empty selection of {OPERATIONS} "
                         f"(e.g. '+-'), got {operations!r}")
    if not (isinstance(min_digits, int) and isinstance(max_digits, int)
            and 1 <= min_digits <= max_digits):
        raise ValueError(f"digits: need integers 1 <= min_digits <= max_digits, got "
                         f"min_digits={min_digits!r}, max_digits={max_digits!r}")
    if not (isinstance(mul_digits, int) and mul_digits >= 1):
        raise ValueError(f"mul_digits must be an integer >= 1, got {mul_digits!r}")
    return tuple(dict.fromkeys(ops))  # deduplicated, order kept


def _number(rng: random.Random, digits: int) -> int:
    return rng.randint(0, 9) if digits == 1 else rng.randint(10 ** (digits - 1), 10**digits - 1)


def _problem_key(a: int, op: str, b: int) -> tuple:
    """Problems equal up to commuting + and *."""
    return (min(a, b), op, max(a, b)) if op in "+*" else (a, op, b)


def generate_problems(seed: int | str, num: int, *, min_digits: int = 1, max_digits: int = 3,
                      operations="+-", mul_digits: int = 1) -> list[tuple[int, str, int]]:
    """`num` distinct problems (a, op, b) from a stream seeded by `seed` and the knobs."""
    ops = check_knobs(min_digits, max_digits, operations, mul_digits)
    rng = random.Random(f"arithmetic/{seed}/{min_digits}/{max_digits}/{''.join(ops)}/{mul_digits}")
    seen, problems = set(), []
    attempts = 0
    while len(problems) < num:
        attempts += 1
        if attempts > 50 * num + 10_000:
            raise ValueError(
                f"only {len(problems)} distinct arithmetic problems found for {num} requested "
                f"(min_digits={min_digits}, max_digits={max_digits}, operations={operations!r}, "
                f"mul_digits={mul_digits}); raise max_digits, add operations, or ask for fewer")
        op = rng.choice(ops)
        a = _number(rng, rng.randint(min_digits, max_digits))
        if op == "*":
            b = _number(rng, rng.randint(1, mul_digits))
        else:
            b = _number(rng, rng.randint(min_digits, max_digits))
            if op == "-" and b > a:
                a, b = b, a
        key = _problem_key(a, op, b)
        if key in seen:
            continue
        seen.add(key)
        problems.append((a, op, b))
    return problems


def arithmetic_splits(seed: int = 0, num_train: int = 20_000, num_validation: int = 1_000,
                      num_test: int = 1_000, *, min_digits: int = 1, max_digits: int = 3,
                      operations="+-", mul_digits: int = 1) -> dict[str, list[dict]]:
    """{'train', 'validation', 'test'} lists of SFT records {'prompt', 'response'}, with
    distinct problems across (and within) the splits. See the module docstring for the knobs."""
    sizes = {"test": num_test, "validation": num_validation, "train": num_train}
    for name, size in sizes.items():
        if not (isinstance(size, int) and size >= 0):
            raise ValueError(f"num_{name} must be an integer >= 0, got {size!r}")
    problems = generate_problems(seed, sum(sizes.values()), min_digits=min_digits,
                                 max_digits=max_digits, operations=operations,
                                 mul_digits=mul_digits)
    splits, start = {}, 0
    for name, size in sizes.items():
        splits[name] = [{"prompt": format_prompt(*p), "response": worked_solution(*p)}
                        for p in problems[start:start + size]]
        start += size
    return {name: splits[name] for name in ("train", "validation", "test")}


# ----------------------------------------------------------------------------------------------
# Verifier.


def parse_prompt(prompt: str) -> tuple[int, str, int]:
    """(a, op, b) of a prompt of this task; ValueError for anything else."""
    m = _PROMPT_RE.fullmatch(prompt) if isinstance(prompt, str) else None
    if m is None:
        raise ValueError(f"not an arithmetic prompt (expected 'What is A op B?' with op in "
                         f"{OPERATIONS}): {prompt!r:.80}")
    return int(m.group(1)), m.group(2), int(m.group(3))


def solve(prompt: str) -> int:
    """The right answer to an arithmetic prompt, computed from the prompt alone."""
    return _apply(*parse_prompt(prompt))


def extract_answer(response: str) -> str | None:
    """The response's one final answer as a canonical ASCII numeral ('432', '-7'), or None when
    the response breaks any of the verifier's rules (module docstring)."""
    if response.count("#") != 4:
        return None
    m = _RESPONSE_RE.fullmatch(response)
    if m is None or m.group(1) == "-0":
        return None
    return m.group(1)


def arithmetic_reward(prompt: str, response: str) -> float:
    """1.0 if `response` states exactly one final answer in the format '#### <integer>' and
    it is `solve(prompt)`, else 0.0. Same signature as labelers.vader_gold_score, so it can be
    a `reward_function` ('rlhf_jax.data.arithmetic:arithmetic_reward')."""
    expected = str(solve(prompt))
    return 1.0 if extract_answer(response) == expected else 0.0


def arithmetic_rewards(prompts, responses) -> list[float]:
    """arithmetic_reward over paired lists."""
    prompts, responses = list(prompts), list(responses)
    if len(prompts) != len(responses):
        raise ValueError(f"{len(prompts)} prompts but {len(responses)} responses")
    return [arithmetic_reward(p, r) for p, r in zip(prompts, responses)]


# ----------------------------------------------------------------------------------------------
# TFDS builder (array_record), loaded by builders.load_dataset for config name 'arithmetic'.
