"""Preference labelers: simulated annotator statistics, VADER gold, function labelers and the
terminal labeler driven by scripted keystrokes in a subprocess (quit, EOF, kill, resume)."""

import json
import math
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from rlhf_jax.people import labelers as LB

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ---------------------------------------------------------------- simulated annotator


def _table_gold(table):
    return lambda prompt, response: table[response]


def test_zero_temperature_always_picks_higher_gold():
    gold = _table_gold({"good": 0.9, "bad": -0.4})
    label = LB.simulated_annotator(gold, 0.0, np.random.default_rng(0))
    for _ in range(200):
        assert label("p", "good", "bad")["choice"] == 0
        assert label("p", "bad", "good")["choice"] == 1
    out = label("p", "good", "bad")
    assert out == {"choice": 0, "p_a": 1.0, "gold_a": 0.9, "gold_b": -0.4}
    # Ties are broken at random, not always towards one side.
    ties = [label("p", "good", "good")["choice"] for _ in range(200)]
    assert 50 < sum(ties) < 150
    # A tiny temperature behaves like zero, even for a tiny gap (no overflow).
    gold = _table_gold({"a": 1e-3, "b": 0.0})
    sharp = LB.simulated_annotator(gold, 1e-9, np.random.default_rng(1))
    assert all(sharp("p", "a", "b")["choice"] == 0 for _ in range(100))
    with pytest.raises(ValueError):
        LB.simulated_annotator(_table_gold({}), -1.0, np.random.default_rng(0))


def test_large_temperature_is_a_coin_flip():
    gold = _table_gold({"good": 1.0, "bad": -1.0})
    label = LB.simulated_annotator(gold, 1e6, np.random.default_rng(2))
    picks = [label("p", "good", "bad")["choice"] for _ in range(4000)]
    assert abs(np.mean(picks) - 0.5) < 0.04


@pytest.mark.parametrize("diff,temperature", [(1.0, 0.5), (0.3, 1.0), (-0.5, 0.25), (0.0, 0.1)])
def test_empirical_preference_matches_bradley_terry(diff, temperature):
    gold = _table_gold({"a": diff, "b": 0.0})
    label = LB.simulated_annotator(gold, temperature, np.random.default_rng(3))
    n = 20000
    prefers_a = np.mean([label("p", "a", "b")["choice"] == 0 for _ in range(n)])
    expected = 1.0 / (1.0 + math.exp(-diff / temperature))
    assert label("p", "a", "b")["p_a"] == pytest.approx(expected)
    assert abs(prefers_a - expected) < 4 * math.sqrt(expected * (1 - expected) / n) + 1e-3


def test_simulated_annotator_is_reproducible():
    gold = _table_gold({"a": 0.2, "b": 0.0})
    # Two annotators with equal seeds draw the same labels.
    label1 = LB.simulated_annotator(gold, 1.0, np.random.default_rng(7))
    label2 = LB.simulated_annotator(gold, 1.0, np.random.default_rng(7))
    assert [label1("p", "a", "b")["choice"] for _ in range(50)] == [
        label2("p", "a", "b")["choice"] for _ in range(50)
    ]


# ---------------------------------------------------------------- VADER and function labelers


def test_vader_positive_review_scores_higher():
    pos = LB.vader_gold_score("Review:", "This movie was wonderful, I loved it. Great acting!")
    neg = LB.vader_gold_score("Review:", "Terrible film. Boring, awful and a waste of time.")
    assert -1.0 <= neg < 0.0 < pos <= 1.0
    assert isinstance(pos, float)
    label = LB.simulated_annotator(LB.vader_gold_score, 0.0, np.random.default_rng(0))
    assert label("Review:", "awful, boring", "great, lovely")["choice"] == 1


def test_load_function_and_errors():
    assert LB.load_function("math:sqrt")(9.0) == 3.0
    assert LB.load_function("os.path:join")("a", "b") == os.path.join("a", "b")
    assert LB.load_function("math.sqrt") is math.sqrt
    assert LB.load_function("rlhf_jax.people.labelers:vader_gold_score") is LB.vader_gold_score
    with pytest.raises(ImportError, match="no_such_pkg_xyz.mod:f"):
        LB.load_function("no_such_pkg_xyz.mod:f")
    with pytest.raises(AttributeError, match="math:no_such_fn"):
        LB.load_function("math:no_such_fn")
    with pytest.raises(TypeError, match="math:pi"):
        LB.load_function("math:pi")
    with pytest.raises(ValueError):
        LB.load_function("nocolon")


def test_function_labeler_and_label_pairs():
    label = LB.function_labeler(lambda prompt, r: len(r))
    assert label("p", "long answer", "short")["choice"] == 0
    assert label("p", "short", "long answer")["choice"] == 1
    tie = label("p", "abc", "xyz")
    assert tie["choice"] == 0 and tie["p_a"] == 0.5
    by_path = LB.function_labeler("rlhf_jax.people.labelers:vader_gold_score")
    assert by_path("p", "horrible", "excellent")["choice"] == 1

    pairs = [
        {"id": "x", "prompt": "p", "response_a": "hi", "response_b": "hello"},
        {"id": "y", "prompt": "q", "response_a": "hello", "response_b": "hi"},
    ]
    prefs = LB.label_pairs(pairs, label, labeler_name="length")
    assert [(p["chosen"], p["rejected"]) for p in prefs] == [("hello", "hi"), ("hello", "hi")]
    assert prefs[0]["metadata"]["labeler"] == "length" and prefs[0]["metadata"]["id"] == "x"
    assert prefs[0]["metadata"]["choice"] == 1 and prefs[1]["metadata"]["choice"] == 0


# ---------------------------------------------------------------- terminal labeler


def _make_pairs(data_dir, n=5):
    pairs = [
        {"id": f"pair-{i}", "prompt": f"prompt {i}", "response_a": f"A{i}", "response_b": f"B{i}"}
        for i in range(n)
    ]
    LB.write_pairs(str(data_dir), pairs)
    return pairs


_SCRIPT = (
    "import sys; from rlhf_jax.people.labelers import label_in_terminal; "
    "n = label_in_terminal(sys.argv[1]); print('NEW=%d' % n)"
)


def _labeler_proc(data_dir):
    return subprocess.Popen(
        [sys.executable, "-u", "-c", _SCRIPT, str(data_dir)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=REPO,
    )


def _run_session(data_dir, keystrokes):
    proc = _labeler_proc(data_dir)
    out, err = proc.communicate(keystrokes, timeout=60)
    assert proc.returncode == 0, err
    return out


def _labels(data_dir):
    """The answers in the label store, in the terminal labeler's old record form."""
    from rlhf_jax.people.label_store import STORE_FILE, LabelStore

    if not os.path.exists(os.path.join(data_dir, STORE_FILE)):
        return []
    return [{"id": a.pair_id, "choice": {"a": 0, "b": 1}.get(a.choice), "labeler": a.annotator, "time": a.time,
             "shown": a.shown} for a in LabelStore(os.path.join(data_dir, STORE_FILE)).answers()]


def test_terminal_labeler_resumes_after_eof_and_kill(tmp_path):
    pairs = _make_pairs(tmp_path, 5)

    # Session 1: an invalid answer, then 1; an empty answer, then 2; then stdin closes (Ctrl-D).
    out = _run_session(tmp_path, "x\n1\n\n2\n")
    assert out.count("Unrecognised answer") == 2
    assert "Interrupted" in out and "NEW=2" in out
    assert [(r["id"], r["choice"]) for r in _labels(tmp_path)] == [("pair-0", 0), ("pair-1", 1)]
    assert "prompt 1" in out and "A1" in out and "B1" in out

    # Session 2: skip one pair, then the process is killed while waiting for the next answer.
    proc = _labeler_proc(tmp_path)
    proc.stdin.write("s\n")
    proc.stdin.flush()
    deadline = time.time() + 60
    while len(_labels(tmp_path)) < 3:
        assert time.time() < deadline and proc.poll() is None, "labeler did not record the skip"
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    proc.stdin.close()
    proc.stdout.close()
    proc.stderr.close()

    # Session 3: resumes at pair-3, answers the rest.
    out = _run_session(tmp_path, "1\nfoo\n2\n")
    assert "pair-0" not in out and "pair-2" not in out and "id pair-3" in out
    assert out.count("Unrecognised answer") == 1 and "NEW=2" in out and "Done" in out

    labels = _labels(tmp_path)
    ids = [r["id"] for r in labels]
    assert ids == [p["id"] for p in pairs]  # every pair answered exactly once, in order
    assert len(set(ids)) == len(ids)
    assert [r["choice"] for r in labels] == [0, 1, None, 0, 1]
    assert all(r["labeler"] == "human" and r["time"] and r["shown"] == "ab" for r in labels)

    # Session 4: nothing left to ask.
    out = _run_session(tmp_path, "1\n")
    assert "already labeled" in out and "NEW=0" in out
    assert len(_labels(tmp_path)) == 5

    prefs = LB.labels_to_preferences(str(tmp_path))
    assert [(p["prompt"], p["chosen"], p["rejected"]) for p in prefs] == [
        ("prompt 0", "A0", "B0"),
        ("prompt 1", "B1", "A1"),
        ("prompt 3", "A3", "B3"),
        ("prompt 4", "B4", "A4"),
    ]
    assert prefs[0]["metadata"]["id"] == "pair-0" and prefs[0]["metadata"]["labeler"] == "human"


def test_terminal_labeler_quit_and_keyboard_interrupt(tmp_path):
    _make_pairs(tmp_path, 3)
    out = _run_session(tmp_path, "2\nquit\n1\n")
    assert "NEW=1" in out and "Stopped" in out
    assert [(r["id"], r["choice"]) for r in _labels(tmp_path)] == [("pair-0", 1)]

    # In process, with a scripted input function that ends with Ctrl-C.
    answers = iter(["skip", "Q?"])

    def fake_input(prompt):
        try:
            return next(answers)
        except StopIteration:
            raise KeyboardInterrupt

    printed = []
    n = LB.label_in_terminal(
        str(tmp_path),
        input_fn=fake_input,
        print_fn=lambda *a: printed.append(" ".join(map(str, a))),
    )
    assert n == 1
    assert any("Unrecognised answer 'q?'" in line for line in printed)
    assert any("Interrupted" in line for line in printed)
    assert [(r["id"], r["choice"]) for r in _labels(tmp_path)] == [("pair-0", 1), ("pair-1", None)]
    n = LB.label_in_terminal(str(tmp_path), input_fn=lambda prompt: "1", print_fn=lambda *a: None)
    assert n == 1
    assert [r["id"] for r in _labels(tmp_path)] == ["pair-0", "pair-1", "pair-2"]
    prefs = LB.labels_to_preferences(str(tmp_path))
    assert [p["metadata"]["id"] for p in prefs] == ["pair-0", "pair-2"]


def test_main_reports_missing_pairs(tmp_path, capsys):
    assert LB.main([f"--data={tmp_path}"]) == 2
    assert "pairs.jsonl" in capsys.readouterr().out


def test_terminal_labeler_imports_an_old_labels_jsonl_once(tmp_path):
    """A data folder labelled before the label store existed keeps its answers (a torn last line,
    left by a kill of the old labeler, is dropped) and its pairs are not asked again."""
    _make_pairs(tmp_path, 3)
    with open(os.path.join(tmp_path, LB.LABELS_FILE), "w") as f:
        f.write(json.dumps({"id": "pair-0", "choice": 1, "labeler": "human", "time": "t0"}) + "\n")
        f.write(json.dumps({"id": "pair-1", "choice": None, "labeler": "human", "time": "t1"}) + "\n")
        f.write('{"id": "pair-2", "cho')
    printed = []
    n = LB.label_in_terminal(str(tmp_path), input_fn=lambda prompt: "t", print_fn=printed.append)
    assert n == 1 and any("id pair-2" in line for line in printed)
    assert [(r["id"], r["choice"], r["time"]) for r in _labels(tmp_path)][:2] == [("pair-0", 1, "t0"),
                                                                                 ("pair-1", None, "t1")]
    assert LB.label_in_terminal(str(tmp_path), input_fn=lambda prompt: "1", print_fn=printed.append) == 0
    assert len(_labels(tmp_path)) == 3  # the second start imported nothing twice
    prefs = LB.labels_to_preferences(str(tmp_path))  # pair-1 skipped, pair-2 a tie
    assert [(p["chosen"], p["rejected"]) for p in prefs] == [("B0", "A0")]
