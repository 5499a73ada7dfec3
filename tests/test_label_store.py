"""The label store: append-only answers, the N-annotator queue under concurrency from several
connections and processes, agreement numbers computed by hand, JSONL import / export, and the
TFDS export read back by the reward stage's loader."""

import json
import os
import sqlite3
import subprocess
import sys

import pytest

from rlhf_jax.data import builders, loaders
from rlhf_jax.models.tokenizer import make_tokenizer
from rlhf_jax.people import label_store as LS
from rlhf_jax.runtime.config import DataError


def pairs(n, split="train"):
    return [{"id": f"{split}-{i}", "prompt": f"prompt {i}", "response_a": f"A{i}", "response_b": f"B{i}",
             "split": split} for i in range(n)]


def store_at(tmp_path, n=1, **kwargs):
    return LS.LabelStore(str(tmp_path / LS.STORE_FILE), answers_per_pair=n, seed=0, **kwargs)


def test_wal_mode_and_answers_are_append_only(tmp_path):
    store = store_at(tmp_path)
    store.add_pairs(pairs(2))
    lease = store.next_pair("alice")
    store.answer(lease.pair_id, "alice", "left", lease.shown)
    db = sqlite3.connect(store.path)
    assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    with pytest.raises(sqlite3.IntegrityError, match="append-only"):
        db.execute("UPDATE answers SET choice = 'b'")
    with pytest.raises(sqlite3.IntegrityError, match="append-only"):
        db.execute("DELETE FROM answers")
    db.close()
    # The store itself refuses a second answer of one annotator, an unknown pair, a bad position.
    with pytest.raises(LS.AnswerRefused, match="already answered"):
        store.answer(lease.pair_id, "alice", "right", lease.shown)
    with pytest.raises(LS.UnknownPair, match="nope"):
        store.answer("nope", "alice", "left", "ab")
    with pytest.raises(LS.AnswerRefused, match="position"):
        store.answer("train-1", "alice", "up", "ab")
    with pytest.raises(LS.AnswerRefused, match="annotator"):
        store.answer("train-1", "", "left", "ab")
    assert len(store.answers()) == 1


def test_shown_order_is_recorded_and_translated(tmp_path):
    store = store_at(tmp_path)
    store.add_pairs(pairs(2))
    first = store.next_pair("alice", shown="ba")
    assert (first.left, first.right) == ("B0", "A0")
    # Picking the left response when b was shown on the left is a vote for b.
    answer = store.answer(first.pair_id, "alice", "left", first.shown, request_id="req-1")
    assert (answer.choice, answer.shown, answer.position) == ("b", "ba", "left")
    # The same request again (a page resubmitted) returns that answer and writes nothing.
    again = store.answer(first.pair_id, "alice", "left", first.shown, request_id="req-1")
    assert again == answer and len(store.answers()) == 1
    second = store.next_pair("alice", shown="ab")
    assert store.answer(second.pair_id, "alice", "right", "ab").choice == "b"
    assert [(p["chosen"], p["rejected"]) for p in store.preferences()] == [("B0", "A0"), ("B1", "A1")]


def test_queue_asks_each_pair_of_n_annotators_and_resumes(tmp_path):
    store = store_at(tmp_path, n=2)
    store.add_pairs(pairs(3))
    a = store.next_pair("alice")
    assert store.next_pair("alice").pair_id == a.pair_id  # a reload shows the same pair, same order
    assert store.next_pair("alice").shown == a.shown
    b = store.next_pair("bob")
    c = store.next_pair("carol")
    assert a.pair_id == b.pair_id == "train-0" and c.pair_id == "train-1"  # two leases fill pair 0
    # A skip frees the place: the pair is asked of someone else.
    store.answer(b.pair_id, "bob", "skip", b.shown)
    assert store.next_pair("dave").pair_id == "train-0"
    # An expired lease (closed tab) gives the pair back.
    late = LS.LabelStore(store.path, answers_per_pair=2, lease_seconds=0.0)
    assert late.next_pair("erin").pair_id == "train-0"
    assert store.progress("alice") == (0, 3)


# Run in a fresh interpreter that imports only the store (no JAX): a separate process with its
# own SQLite connection, as a second server or a terminal labeler beside the web app would be.
_GRAB = """
import json, sys
from rlhf_jax.people.label_store import LabelStore
store, name, got = LabelStore(sys.argv[1], answers_per_pair=2), sys.argv[2], []
while (lease := store.next_pair(name)) is not None:
    store.answer(lease.pair_id, name, "left", lease.shown, request_id=name + lease.pair_id)
    got.append(lease.pair_id)
print(json.dumps(got))
"""


def test_concurrent_annotators_in_processes_never_exceed_n(tmp_path):
    """Four processes label at once from their own connections: every pair gets exactly N = 2
    answers, no annotator answers a pair twice, nothing is lost."""
    store = store_at(tmp_path, n=2)
    store.add_pairs(pairs(40))
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {**os.environ, "PYTHONPATH": repo}
    procs = [subprocess.Popen([sys.executable, "-c", _GRAB, store.path, f"p{i}"], stdout=subprocess.PIPE,
                              env=env, text=True) for i in range(4)]
    got = [json.loads(p.communicate(timeout=120)[0]) for p in procs]
    assert all(p.returncode == 0 for p in procs)
    answers = store.answers()
    assert len(answers) == 80 and sum(map(len, got)) == 80
    per_pair = {}
    for a in answers:
        per_pair.setdefault(a.pair_id, []).append(a.annotator)
    assert all(len(v) == 2 and len(set(v)) == 2 for v in per_pair.values()) and len(per_pair) == 40


def test_agreement_numbers_by_hand(tmp_path):
    """Three annotators, four pairs.
        pair 0: alice a, bob a, carol b      pairs of annotators: (a,b) agree, (a,c) no, (b,c) no
        pair 1: alice b, bob b               agree
        pair 2: alice a, bob tie, carol skip (a,b) disagree; carol's skip does not count
        pair 3: alice a                      one rating: not compared
    pairwise agreement = (1 + 1 + 0) / (3 + 1 + 1) = 2 / 5.
    Fleiss' kappa over pairs 0-2 (n_i = 3, 2, 2): P_0 = (2^2 + 1 - 3) / 6 = 1/3, P_1 = 1, P_2 = 0;
    P = 4/9. Ratings of those pairs: a 3, b 3, tie 1 of 7: P_e = (9 + 9 + 1) / 49 = 19/49.
    kappa = (4/9 - 19/49) / (1 - 19/49) = 0.0926..."""
    store = store_at(tmp_path, n=3)
    store.add_pairs(pairs(4))
    votes = {"train-0": {"alice": "left", "bob": "left", "carol": "right"},
             "train-1": {"alice": "right", "bob": "right"},
             "train-2": {"alice": "left", "bob": "tie", "carol": "skip"},
             "train-3": {"alice": "left"}}
    for pair_id, by_name in votes.items():
        for name, position in by_name.items():
            store.answer(pair_id, name, position, "ab")
    stats = store.stats()
    assert stats.pairwise_agreement == pytest.approx(2 / 5)
    assert stats.fleiss_kappa == pytest.approx((4 / 9 - 19 / 49) / (1 - 19 / 49))
    assert stats.agreement_by_pair_of_annotators == {"alice|bob": (2, 3), "alice|carol": (0, 1),
                                                     "bob|carol": (0, 1)}
    assert stats.answers_per_annotator["alice"] == {"a": 3, "b": 1, "tie": 0, "skip": 0, "total": 4}
    assert stats.answers_per_annotator["carol"]["skip"] == 1
    assert stats.num_pairs == 4 and stats.num_complete == 1  # only pair 0 has 3 non-skip answers
    # Majority: pair 0 -> a (2 to 1), pair 1 -> b, pair 2 -> a (tie does not vote), pair 3 -> a.
    prefs = store.preferences()
    assert [(p["metadata"]["id"], p["metadata"]["choice"], p["metadata"]["votes"]) for p in prefs] == [
        ("train-0", 0, {"a": 2, "b": 1}), ("train-1", 1, {"a": 0, "b": 2}), ("train-2", 0, {"a": 1, "b": 0}),
        ("train-3", 0, {"a": 1, "b": 0})]
    assert LS.fleiss_kappa([["a"], ["b"]]) is None and LS.fleiss_kappa([["a", "a"]]) is None


def test_jsonl_import_export_and_bad_files(tmp_path):
    with open(tmp_path / LS.PAIRS_FILE, "w") as f:
        for p in pairs(2):
            f.write(json.dumps(p) + "\n")
    with open(tmp_path / LS.LABELS_FILE, "w") as f:
        f.write(json.dumps({"id": "train-0", "choice": 1, "labeler": "ann", "time": "t"}) + "\n")
    store = LS.open_data_dir(str(tmp_path))
    assert store.import_jsonl(str(tmp_path)) == (0, 0)  # a second import adds nothing
    out = str(tmp_path / "export.jsonl")
    assert store.export_jsonl(out) == 1
    row = json.loads(open(out).read())
    assert (row["pair_id"], row["annotator"], row["choice"], row["prompt"]) == ("train-0", "ann", "b", "prompt 0")
    # The same id with other texts is refused, naming the id.
    with pytest.raises(DataError, match="train-0.*different texts"):
        store.add_pairs([{**pairs(1)[0], "response_a": "changed"}])
    with pytest.raises(DataError, match="split"):
        store.add_pairs([{**pairs(1)[0], "id": "x", "split": "test"}])
    with pytest.raises(DataError, match="lacks"):
        store.add_pairs([{"id": "y", "prompt": "p"}])
    with open(tmp_path / LS.LABELS_FILE, "a") as f:
        f.write(json.dumps({"id": "unknown", "choice": 0}) + "\n")
    with pytest.raises(DataError, match="line 2.*unknown"):
        store.import_jsonl(str(tmp_path))


def test_tfds_export_is_read_by_the_reward_loader(tmp_path):
    store = store_at(tmp_path)
    store.add_pairs(pairs(6) + pairs(2, "validation"))
    for p in store.pairs():
        store.answer(p.id, "alice", "right", "ab")
    tfds_dir = str(tmp_path / "tfds")
    sources = store.export_preferences(tfds_dir)
    assert len(sources["train"]) == 6 and len(sources["validation"]) == 2
    # What the reward / DPO stage reads: the dataset config 'preferences' in data_dir, then batches.
    again = builders.load_dataset({"name": "preferences", "records_name": "preferences"}, tfds_dir)
    rows = loaders.read_all(again["train"])
    assert sorted((r["prompt"], r["chosen"], r["rejected"]) for r in rows) == [
        (f"prompt {i}", f"B{i}", f"A{i}") for i in range(6)]
    assert all(json.loads(r["metadata"])["annotators"] == ["alice"] for r in rows)
    batch = loaders.preference_batches(again["train"], make_tokenizer(None), 32, 2, 0)[0]
    assert batch["chosen_tokens"].shape[0] == 2
    with pytest.raises(DataError, match="no labelled pairs"):
        store_at(tmp_path / "empty").export_preferences(str(tmp_path / "t2"))


def test_undo_appends_an_answer_that_supersedes_and_counts_skip_as_no_label(tmp_path):
    store = store_at(tmp_path)
    store.add_pairs(pairs(3))
    first = store.next_pair("alice", shown="ba")
    store.answer(first.pair_id, "alice", "skip", first.shown)
    assert store.progress("alice") == (0, 2) and store.num_skipped("alice") == 1  # a skip is no label
    reopened = store.reopen("alice")
    assert (reopened.pair_id, reopened.shown) == (first.pair_id, "ba")  # back, in the order it was shown
    assert store.next_pair("alice").pair_id == first.pair_id
    new = store.answer(first.pair_id, "alice", "left", "ba")
    assert new.supersedes == store.answers(superseded=True)[0].seq and new.choice == "b"
    assert [a.choice for a in store.answers()] == ["b"] and store.progress("alice") == (1, 3)
    assert store.stats().answers_per_annotator["alice"]["skip"] == 0
    with pytest.raises(LS.AnswerRefused, match="already answered"):  # no second answer without an undo
        store.answer(first.pair_id, "alice", "right", "ba")
    assert store.next_pair("alice").pair_id == "train-1"


def test_a_store_from_before_undo_is_upgraded_keeping_every_answer(tmp_path):
    path = str(tmp_path / LS.STORE_FILE)
    db = sqlite3.connect(path)
    db.executescript("""
        CREATE TABLE pairs (id TEXT PRIMARY KEY, prompt TEXT NOT NULL, response_a TEXT NOT NULL,
            response_b TEXT NOT NULL, split TEXT NOT NULL DEFAULT 'train', source TEXT NOT NULL DEFAULT '',
            metadata TEXT NOT NULL DEFAULT '{}', added TEXT NOT NULL, rank INTEGER NOT NULL,
            queued INTEGER NOT NULL DEFAULT 1);
        CREATE TABLE answers (seq INTEGER PRIMARY KEY AUTOINCREMENT, pair_id TEXT NOT NULL REFERENCES pairs(id),
            annotator TEXT NOT NULL, choice TEXT NOT NULL, shown TEXT NOT NULL, position TEXT NOT NULL,
            time TEXT NOT NULL, metadata TEXT NOT NULL DEFAULT '{}', request_id TEXT UNIQUE,
            UNIQUE (pair_id, annotator));
        CREATE TRIGGER answers_no_delete BEFORE DELETE ON answers BEGIN SELECT RAISE(ABORT, 'append-only'); END;
        CREATE TABLE leases (pair_id TEXT NOT NULL, annotator TEXT NOT NULL, shown TEXT NOT NULL, since REAL NOT NULL,
            PRIMARY KEY (pair_id, annotator));
        INSERT INTO pairs VALUES ('p0', 'prompt', 'A', 'B', 'train', '', '{}', 't', 0, 1);
        INSERT INTO answers VALUES (7, 'p0', 'alice', 'a', 'ab', 'left', 't', '{}', 'req-7');
    """)
    db.close()
    os.chmod(path, 0o644)
    store = LS.LabelStore(path)
    assert oct(os.stat(path).st_mode & 0o777) == "0o600"  # people's answers: the owner's only
    [old] = store.answers()
    assert (old.seq, old.request_id, old.choice) == (7, "req-7", "a")
    store.reopen("alice")
    assert store.answer("p0", "alice", "right", "ab").supersedes == 7
    with pytest.raises(sqlite3.IntegrityError, match="append-only"):
        sqlite3.connect(path).execute("DELETE FROM answers")


def test_pair_ids_and_names_follow_one_rule(tmp_path):
    store = store_at(tmp_path)
    for bad in ("", "   ", "x" * 201, "tab\there", ["list"], None):
        with pytest.raises(DataError, match="pair 0 from the caller: pair id"):
            store.add_pairs([{**pairs(1)[0], "id": bad}])
    store.add_pairs([{**pairs(1)[0], "id": 5}])  # an integer id is its text, as before
    assert store.pair("5").prompt == "prompt 0"
    for name in ("Zoë", "李雷", "o'brien"):
        assert LS.annotator_error(LS.normalise_name(name)) is None
    for name in ("", " alice", "a\x00b", "a\u202eb", "x" * 65, "Zoe\u0308"):
        assert LS.annotator_error(name) is not None, name
