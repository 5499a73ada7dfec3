"""The label store: one SQLite database (WAL mode) that every labeler writes to.

    store = LabelStore(os.path.join(data_dir, STORE_FILE), answers_per_pair=1)
    store.add_pairs(pairs)                       # [{'id', 'prompt', 'response_a', 'response_b', ...}]
    pair = store.next_pair("alice")              # a Lease: the pair and the order it is shown in
    store.answer(pair.pair_id, "alice", "left", shown=pair.shown, request_id=...)
    store.stats()                                # per-annotator counts, inter-annotator agreement
    store.export_preferences(tfds_dir)           # the TFDS dataset the reward and DPO stages read

Why a database and not JSONL: several people label at once (the web app runs many requests in
parallel, the terminal labeler may run beside it) and each pair can be asked of N annotators, so
"which pair next" must be decided atomically across processes; SQLite's write lock does that.
WAL mode lets readers (progress counts, exports) run while an annotator writes, and
`synchronous=FULL` makes an answer durable once its transaction commits: a kill -9 right after
the page confirms an answer loses nothing.

Tables:
    pairs    one row per pair to label: id, prompt, response_a, response_b, split ('train' or
             'validation'), source (where it came from: a pairs.jsonl, 'chat', a round), metadata
             (JSON), time added. Never changed once added (a different text under a known id is
             an error).
    answers  append-only (UPDATE and DELETE are refused by triggers): pair id, annotator, choice
             ('a' | 'b' | 'tie' | 'skip', in terms of the pair's own responses), shown ('ab' when
             response_a was shown first / on the left, 'ba' otherwise), the position picked as
             given ('left' | 'right' | 'tie' | 'skip'), time, metadata (JSON), request_id.
             One live answer per (pair, annotator); a repeated request_id is the same answer
             again (a page resubmitted after a lost confirmation) and writes nothing. Undo
             (`reopen`) writes no row: it gives the annotator their last pair back, and the
             answer they give then is a new row whose `supersedes` names the row it replaces;
             every count, statistic and export reads `live_answers` (rows nothing supersedes).
    leases   which annotator is being shown which pair, in which order, since when. A pair is
             handed out while (answers by others + live leases of others) < N, so concurrent
             annotators never get a pair more than N times; a lease expires after
             `lease_seconds` (the person closed the tab) and the pair goes back into the queue.
             Leases are bookkeeping, not labels: they may be replaced and deleted.

Ids, names, files: a pair id follows `pair_id_error` (the web API checks ids with the same
rule), an annotator name `annotator_error` (any script, NFC-normalised, no control
characters). The database, its WAL files and exported answers are readable by their owner only.

Imported data: `import_jsonl(data_dir)` reads the files the terminal labeler used to write
(pairs.jsonl, labels.jsonl; each answer becomes annotator = its 'labeler' field), so an existing
data directory keeps its answers. `export_jsonl(path)` writes every answer joined with its pair.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import json
import os
import random
import sqlite3
import time
import unicodedata
from typing import Iterable, Optional

from rlhf_jax.data import builders
from rlhf_jax.runtime.config import DataError
from rlhf_jax.runtime.jsonl import read_jsonl

STORE_FILE = "labels.sqlite"
PAIRS_FILE = "pairs.jsonl"
LABELS_FILE = "labels.jsonl"
CHOICES = ("a", "b", "tie", "skip")
POSITIONS = ("left", "right", "tie", "skip")
SHOWN_ORDERS = ("ab", "ba")
SPLITS = ("train", "validation")
PAIR_FIELDS = ("id", "prompt", "response_a", "response_b")
MAX_ID_CHARS = 200
MAX_NAME_CHARS = 64

# Append-only. `supersedes`: the earlier answer of the same person to the same pair that this one
# replaces (after an undo); each answer is superseded at most once.
_ANSWERS = """
CREATE TABLE IF NOT EXISTS answers (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    pair_id TEXT NOT NULL REFERENCES pairs(id),
    annotator TEXT NOT NULL,
    choice TEXT NOT NULL CHECK (choice IN ('a', 'b', 'tie', 'skip')),
    shown TEXT NOT NULL CHECK (shown IN ('ab', 'ba')),
    position TEXT NOT NULL CHECK (position IN ('left', 'right', 'tie', 'skip')),
    time TEXT NOT NULL,
    metadata TEXT NOT NULL DEFAULT '{}',
    request_id TEXT UNIQUE,
    supersedes INTEGER UNIQUE REFERENCES answers(seq)
);
"""

_SCHEMA = """
CREATE TABLE IF NOT EXISTS pairs (
    id TEXT PRIMARY KEY,
    prompt TEXT NOT NULL,
    response_a TEXT NOT NULL,
    response_b TEXT NOT NULL,
    split TEXT NOT NULL DEFAULT 'train' CHECK (split IN ('train', 'validation')),
    source TEXT NOT NULL DEFAULT '',
    metadata TEXT NOT NULL DEFAULT '{}',
    added TEXT NOT NULL,
    rank INTEGER NOT NULL,
    queued INTEGER NOT NULL DEFAULT 1
);
{answers}
CREATE TRIGGER IF NOT EXISTS answers_no_update BEFORE UPDATE ON answers
BEGIN SELECT RAISE(ABORT, 'answers are append-only'); END;
CREATE TRIGGER IF NOT EXISTS answers_no_delete BEFORE DELETE ON answers
BEGIN SELECT RAISE(ABORT, 'answers are append-only'); END;
CREATE INDEX IF NOT EXISTS answers_by_pair ON answers (pair_id, annotator);
CREATE VIEW IF NOT EXISTS live_answers AS
    SELECT * FROM answers x WHERE NOT EXISTS (SELECT 1 FROM answers y WHERE y.supersedes = x.seq);
CREATE TABLE IF NOT EXISTS leases (
    pair_id TEXT NOT NULL REFERENCES pairs(id),
    annotator TEXT NOT NULL,
    shown TEXT NOT NULL CHECK (shown IN ('ab', 'ba')),
    since REAL NOT NULL,
    reopened INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (pair_id, annotator)
);
CREATE TABLE IF NOT EXISTS imported (path TEXT PRIMARY KEY, time TEXT NOT NULL);
""".replace("{answers}", _ANSWERS.strip())


class AnswerRefused(DataError):
    """An answer the store does not take (unknown pair, second answer of one annotator, ...)."""


class UnknownPair(AnswerRefused):
    """No pair with this id."""


@dataclasses.dataclass(frozen=True)
class Pair:
    id: str
    prompt: str
    response_a: str
    response_b: str
    split: str = "train"
    source: str = ""
    metadata: dict = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class Lease:
    """A pair handed to one annotator, and the order its responses are shown in."""

    pair: Pair
    annotator: str
    shown: str  # 'ab': response_a on the left (first); 'ba': response_b on the left

    @property
    def pair_id(self) -> str:
        return self.pair.id

    @property
    def left(self) -> str:
        return self.pair.response_a if self.shown == "ab" else self.pair.response_b

    @property
    def right(self) -> str:
        return self.pair.response_b if self.shown == "ab" else self.pair.response_a


@dataclasses.dataclass(frozen=True)
class Answer:
    seq: int
    pair_id: str
    annotator: str
    choice: str
    shown: str
    position: str
    time: str
    metadata: dict
    request_id: Optional[str]
    supersedes: Optional[int] = None  # the seq of the earlier answer this one replaces (after an undo)


@dataclasses.dataclass(frozen=True)
class Stats:
    """What the labelling so far amounts to.

    answers_per_annotator   {annotator: {'a', 'b', 'tie', 'skip', 'total'}} counts
    num_pairs               pairs in the store
    num_complete            pairs with N non-skip answers
    pairwise_agreement      over every two annotators who both gave a non-skip answer to one
                            pair: the fraction that gave the same answer (None when no pair has two)
    fleiss_kappa            Fleiss' kappa over the pairs with >= 2 non-skip answers (categories
                            a / b / tie); None when undefined
    agreement_by_pair_of_annotators   {'alice|bob': (agreeing, compared)}
    """

    answers_per_annotator: dict
    num_pairs: int
    num_complete: int
    pairwise_agreement: Optional[float]
    fleiss_kappa: Optional[float]
    agreement_by_pair_of_annotators: dict


def now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat()


def choice_of(position: str, shown: str) -> str:
    """The response picked ('a' / 'b' / 'tie' / 'skip') from the position clicked and the order shown."""
    if position not in POSITIONS:
        raise AnswerRefused(f"position {position!r}: expected one of {POSITIONS}")
    if shown not in SHOWN_ORDERS:
        raise AnswerRefused(f"shown {shown!r}: expected one of {SHOWN_ORDERS}")
    if position in ("tie", "skip"):
        return position
    left, right = shown[0], shown[1]
    return left if position == "left" else right


class LabelStore:
    """The label store at `path` (created with its tables when missing).

    answers_per_pair: N, how many annotators are asked each pair. lease_seconds: how long a pair
    shown to an annotator stays reserved for them. Every method opens its own connection, so one
    store object may be used from many threads (the web server's worker pool) and many processes
    may open the same file.
    """

    def __init__(self, path: str, answers_per_pair: int = 1, lease_seconds: float = 600.0,
                 seed: Optional[int] = None):
        if answers_per_pair < 1:
            raise ValueError(f"answers_per_pair={answers_per_pair}: expected an integer >= 1")
        self.path = path
        self.answers_per_pair = int(answers_per_pair)
        self.lease_seconds = float(lease_seconds)
        self._rng = random.Random(seed)  # the shown order; seeded in tests
        parent = os.path.dirname(os.path.abspath(path))
        os.makedirs(parent, exist_ok=True)
        _make_private(path)
        with self._connect() as db:
            # WAL is a property of the file: set once, every later connection uses it.
            mode = db.execute("PRAGMA journal_mode=WAL").fetchone()[0]
            if mode.lower() != "wal":
                raise DataError(f"{path}: SQLite could not switch to WAL mode (got {mode!r}); "
                                "is it on a network file system?")
            _upgrade(db)
            db.executescript(_SCHEMA)
        for suffix in ("-wal", "-shm"):  # SQLite gives them the database's mode; older stores may differ
            if os.path.exists(path + suffix):
                _make_private(path + suffix)

    @contextlib.contextmanager
    def _connect(self):
        try:
            db = sqlite3.connect(self.path, timeout=30.0, isolation_level=None)
        except sqlite3.Error as e:
            raise DataError(f"cannot open the label store {self.path}: {e}") from None
        try:
            db.execute("PRAGMA synchronous=FULL")  # committed = on disk, even in WAL mode
            db.execute("PRAGMA foreign_keys=ON")
            yield db
        except sqlite3.DatabaseError as e:
            if isinstance(e, sqlite3.IntegrityError):
                raise
            raise DataError(f"label store {self.path}: {e}") from e
        finally:
            db.close()

    @contextlib.contextmanager
    def _write(self):
        """One write transaction; BEGIN IMMEDIATE takes the write lock up front, so the read that
        decides what to write (the next pair, a duplicate check) sees what the write will."""
        with self._connect() as db:
            db.execute("BEGIN IMMEDIATE")
            try:
                yield db
            except BaseException:
                db.execute("ROLLBACK")
                raise
            db.execute("COMMIT")

    # ------------------------------------------------------------------------- pairs

    def add_pairs(self, pairs: Iterable[dict], source: str = "", queued: bool = True,
                  where: Optional[list[str]] = None) -> int:
        """Add pairs (dicts with id, prompt, response_a, response_b, optional split, other keys
        kept as metadata). A pair already in the store with the same texts is left alone; the
        same id with different texts is a DataError. Returns the number added.

        queued=False: the pair is not handed out by next_pair (a chat comparison, asked only of
        the person who chatted, through hold()). where: how to name each pair in an error (the file
        and line it came from)."""
        pairs = list(pairs)
        where = where or [f"pair {i} from {source or 'the caller'}" for i in range(len(pairs))]
        rows = [_pair_row(p, w) for p, w in zip(pairs, where)]
        added = 0
        with self._write() as db:
            rank = db.execute("SELECT COALESCE(MAX(rank), -1) + 1 FROM pairs").fetchone()[0]
            for row in rows:
                old = db.execute("SELECT prompt, response_a, response_b FROM pairs WHERE id = ?",
                                 (row.id,)).fetchone()
                if old is not None:
                    if tuple(old) != (row.prompt, row.response_a, row.response_b):
                        raise DataError(f"pair id {row.id!r} from {source or 'the caller'} is already in "
                                        f"{self.path} with different texts")
                    continue
                db.execute("INSERT INTO pairs (id, prompt, response_a, response_b, split, source, metadata,"
                           " added, rank, queued) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                           (row.id, row.prompt, row.response_a, row.response_b, row.split, source,
                            json.dumps(row.metadata, sort_keys=True), now(), rank, int(queued)))
                rank += 1
                added += 1
        return added

    def pair(self, pair_id: str) -> Pair:
        with self._connect() as db:
            row = db.execute("SELECT id, prompt, response_a, response_b, split, source, metadata FROM pairs "
                             "WHERE id = ?", (pair_id,)).fetchone()
        if row is None:
            raise UnknownPair(f"no pair with id {pair_id!r} in {self.path}")
        return _pair_from_row(row)

    def pairs(self, source: Optional[str] = None) -> list[Pair]:
        query = "SELECT id, prompt, response_a, response_b, split, source, metadata FROM pairs"
        with self._connect() as db:
            if source is None:
                rows = db.execute(query + " ORDER BY rank").fetchall()
            else:
                rows = db.execute(query + " WHERE source = ? ORDER BY rank", (source,)).fetchall()
        return [_pair_from_row(r) for r in rows]

    # ------------------------------------------------------------------------- the queue

    def next_pair(self, annotator: str, shown: Optional[str] = None, now_seconds: Optional[float] = None,
                  source: Optional[str] = None) -> Optional[Lease]:
        """The pair `annotator` should label next, reserved for them, or None when none is left.

        A pair they already hold (a reload, a restarted server) comes back in the same order.
        Otherwise the first pair (in the order added) they have not answered whose answers by
        others plus live leases of others are below N. The order shown is random (or `shown`).
        `source` limits the queue to pairs of one source (a round's pairs).
        """
        _check_annotator(annotator)
        t = _time_seconds(now_seconds)
        with self._write() as db:
            # A chat comparison (not queued) is asked of its one person only: its lease stays until
            # they answer, so a reload offers it again (held_comparisons).
            db.execute("DELETE FROM leases WHERE since < ? AND pair_id IN (SELECT id FROM pairs WHERE queued = 1)",
                       (t - self.lease_seconds,))
            held = db.execute(
                "SELECT l.pair_id, l.shown FROM leases l JOIN pairs p ON p.id = l.pair_id WHERE l.annotator = ?"
                " AND p.queued = 1 AND (l.reopened = 1 OR"
                " NOT EXISTS (SELECT 1 FROM live_answers x WHERE x.pair_id = l.pair_id AND x.annotator = ?))"
                + (" AND p.source = ?" if source is not None else "") + " ORDER BY l.reopened DESC, p.rank LIMIT 1",
                (annotator, annotator) + ((source,) if source is not None else ())).fetchone()
            if held is not None:
                db.execute("UPDATE leases SET since = ? WHERE pair_id = ? AND annotator = ?",
                           (t, held[0], annotator))
                pair_id, order = held
            else:
                row = db.execute(
                    "SELECT p.id FROM pairs p WHERE p.queued = 1 AND"
                    " NOT EXISTS (SELECT 1 FROM live_answers x WHERE x.pair_id = p.id AND x.annotator = :who)"
                    " AND (SELECT COUNT(*) FROM live_answers x WHERE x.pair_id = p.id AND x.choice != 'skip')"
                    "   + (SELECT COUNT(*) FROM leases l WHERE l.pair_id = p.id AND l.annotator != :who) < :n"
                    + (" AND p.source = :source" if source is not None else "") + " ORDER BY p.rank LIMIT 1",
                    {"who": annotator, "n": self.answers_per_pair, "source": source}).fetchone()
                if row is None:
                    return None
                pair_id = row[0]
                order = shown or self._rng.choice(SHOWN_ORDERS)
                if order not in SHOWN_ORDERS:
                    raise ValueError(f"shown={order!r}: expected one of {SHOWN_ORDERS}")
                db.execute("INSERT OR REPLACE INTO leases (pair_id, annotator, shown, since) VALUES (?, ?, ?, ?)",
                           (pair_id, annotator, order, t))
            pair = _pair_from_row(db.execute(
                "SELECT id, prompt, response_a, response_b, split, source, metadata FROM pairs WHERE id = ?",
                (pair_id,)).fetchone())
        return Lease(pair=pair, annotator=annotator, shown=order)

    def hold(self, pair_id: str, annotator: str, shown: str, now_seconds: Optional[float] = None) -> Lease:
        """Reserve a given pair for `annotator`, shown in order `shown` (chat comparisons)."""
        _check_annotator(annotator)
        if shown not in SHOWN_ORDERS:
            raise ValueError(f"shown={shown!r}: expected one of {SHOWN_ORDERS}")
        pair = self.pair(pair_id)
        with self._write() as db:
            db.execute("INSERT OR REPLACE INTO leases (pair_id, annotator, shown, since) VALUES (?, ?, ?, ?)",
                       (pair_id, annotator, shown, _time_seconds(now_seconds)))
        return Lease(pair, annotator, shown)

    def held_comparisons(self, annotator: str) -> list[Lease]:
        """The pairs outside the queue (chat comparisons) held by `annotator` and not answered yet,
        oldest first: what a reloaded chat page offers again."""
        with self._connect() as db:
            rows = db.execute(
                "SELECT l.pair_id, l.shown FROM leases l JOIN pairs p ON p.id = l.pair_id WHERE l.annotator = ?"
                " AND p.queued = 0 AND (l.reopened = 1 OR"
                " NOT EXISTS (SELECT 1 FROM live_answers x WHERE x.pair_id = l.pair_id AND x.annotator = ?))"
                " ORDER BY p.rank", (annotator, annotator)).fetchall()
        return [Lease(self.pair(pair_id), annotator, shown) for pair_id, shown in rows]

    def reopen(self, annotator: str, now_seconds: Optional[float] = None) -> Optional[Lease]:
        """Undo: give `annotator` the pair of their last answer in the queue back, in the order it was
        shown, or None when they have none. Writes no answer: the old one counts until they answer
        again, and that answer supersedes it (answers stay append-only)."""
        _check_annotator(annotator)
        with self._write() as db:
            row = db.execute("SELECT x.pair_id, x.shown FROM live_answers x JOIN pairs p ON p.id = x.pair_id"
                             " WHERE x.annotator = ? AND p.queued = 1 ORDER BY x.seq DESC LIMIT 1",
                             (annotator,)).fetchone()
            if row is None:
                return None
            db.execute("INSERT OR REPLACE INTO leases (pair_id, annotator, shown, since, reopened)"
                       " VALUES (?, ?, ?, ?, 1)", (row[0], annotator, row[1], _time_seconds(now_seconds)))
        return Lease(self.pair(row[0]), annotator, row[1])

    def last_answer(self, annotator: str) -> Optional[Answer]:
        """`annotator`'s latest live answer to a queued pair (what the queue page confirms), or None."""
        with self._connect() as db:
            row = db.execute(_ANSWER_QUERY + " WHERE annotator = ? AND pair_id IN (SELECT id FROM pairs"
                             " WHERE queued = 1) ORDER BY seq DESC LIMIT 1", (annotator,)).fetchone()
        return None if row is None else _answer_from_row(row)

    def lease(self, pair_id: str, annotator: str) -> Optional[Lease]:
        """The live lease of `annotator` on `pair_id` (what they were shown), or None."""
        with self._connect() as db:
            row = db.execute("SELECT shown FROM leases WHERE pair_id = ? AND annotator = ?",
                             (pair_id, annotator)).fetchone()
        return None if row is None else Lease(self.pair(pair_id), annotator, row[0])

    # ------------------------------------------------------------------------- answers

    def answer(self, pair_id: str, annotator: str, position: str, shown: str, *, request_id: Optional[str] = None,
               metadata: Optional[dict] = None, time: Optional[str] = None) -> Answer:
        """Append one answer: `position` ('left' | 'right' | 'tie' | 'skip') picked in the order
        `shown` ('ab' | 'ba'). Durable when this returns. An unknown pair or a second answer of the
        same annotator to a pair is AnswerRefused (nothing written) unless they reopened it (undo):
        then the new answer supersedes their earlier one. A `request_id` seen before returns that
        earlier answer and writes nothing (a resubmitted form)."""
        _check_annotator(annotator)
        choice = choice_of(position, shown)
        meta = json.dumps(metadata or {}, sort_keys=True)
        with self._write() as db:
            if request_id is not None:
                old = db.execute(_ALL_ANSWERS_QUERY + " WHERE request_id = ?", (request_id,)).fetchone()
                if old is not None:
                    old = _answer_from_row(old)
                    if (old.pair_id, old.annotator) != (pair_id, annotator):
                        raise AnswerRefused(f"request id {request_id!r} was used for another answer")
                    return old
            if db.execute("SELECT 1 FROM pairs WHERE id = ?", (pair_id,)).fetchone() is None:
                raise UnknownPair(f"no pair with id {pair_id!r} in {self.path}")
            earlier = db.execute("SELECT seq FROM live_answers WHERE pair_id = ? AND annotator = ?",
                                 (pair_id, annotator)).fetchone()
            if earlier is not None and not db.execute(
                    "SELECT 1 FROM leases WHERE pair_id = ? AND annotator = ? AND reopened = 1",
                    (pair_id, annotator)).fetchone():
                raise AnswerRefused(f"{annotator!r} has already answered pair {pair_id!r} (undo it first)")
            cursor = db.execute(
                "INSERT INTO answers (pair_id, annotator, choice, shown, position, time, metadata, request_id,"
                " supersedes) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (pair_id, annotator, choice, shown, position, time or now(), meta, request_id,
                 None if earlier is None else earlier[0]))
            db.execute("DELETE FROM leases WHERE pair_id = ? AND annotator = ?", (pair_id, annotator))
            row = db.execute(_ALL_ANSWERS_QUERY + " WHERE seq = ?", (cursor.lastrowid,)).fetchone()
        return _answer_from_row(row)

    def answer_by_request(self, request_id: str) -> Optional[Answer]:
        """The answer written by request `request_id` (superseded since or not), or None."""
        with self._connect() as db:
            row = db.execute(_ALL_ANSWERS_QUERY + " WHERE request_id = ?", (request_id,)).fetchone()
        return None if row is None else _answer_from_row(row)

    def answers(self, annotator: Optional[str] = None, superseded: bool = False) -> list[Answer]:
        """The live answers (or, with `superseded`, every row ever written), in the order written."""
        query = _ALL_ANSWERS_QUERY if superseded else _ANSWER_QUERY
        with self._connect() as db:
            if annotator is None:
                rows = db.execute(query + " ORDER BY seq").fetchall()
            else:
                rows = db.execute(query + " WHERE annotator = ? ORDER BY seq", (annotator,)).fetchall()
        return [_answer_from_row(r) for r in rows]

    def progress(self, annotator: str, source: Optional[str] = None) -> tuple[int, int]:
        """(pairs this annotator labelled, pairs they could label: labelled + still open to them).
        A skip is no label: the pair counts in neither (num_skipped counts those)."""
        filt = " AND p.source = :source" if source is not None else ""
        with self._connect() as db:
            done = db.execute("SELECT COUNT(*) FROM live_answers x JOIN pairs p ON p.id = x.pair_id"
                              " WHERE x.annotator = :who AND x.choice != 'skip' AND p.queued = 1"
                              + filt, {"who": annotator, "source": source}).fetchone()[0]
            open_ = db.execute(
                "SELECT COUNT(*) FROM pairs p WHERE p.queued = 1 AND"
                " NOT EXISTS (SELECT 1 FROM live_answers x WHERE x.pair_id = p.id AND x.annotator = :who)"
                " AND (SELECT COUNT(*) FROM live_answers x WHERE x.pair_id = p.id AND x.choice != 'skip') < :n" + filt,
                {"who": annotator, "n": self.answers_per_pair, "source": source}).fetchone()[0]
        return done, done + open_

    def num_skipped(self, annotator: str) -> int:
        """Queued pairs `annotator` skipped (their live answer is a skip)."""
        with self._connect() as db:
            return db.execute("SELECT COUNT(*) FROM live_answers x JOIN pairs p ON p.id = x.pair_id"
                              " WHERE x.annotator = ? AND x.choice = 'skip' AND p.queued = 1",
                              (annotator,)).fetchone()[0]

    def num_answered(self) -> int:
        """Pairs with at least one answer (skips included)."""
        with self._connect() as db:
            return db.execute("SELECT COUNT(DISTINCT pair_id) FROM live_answers").fetchone()[0]

    def num_labeled(self, source: Optional[str] = None) -> int:
        """Pairs with at least one answer that is a preference (a or b)."""
        filt = " AND p.source = ?" if source is not None else ""
        with self._connect() as db:
            return db.execute("SELECT COUNT(DISTINCT x.pair_id) FROM live_answers x JOIN pairs p ON p.id = x.pair_id "
                              "WHERE x.choice IN ('a', 'b')" + filt,
                              (source,) if source is not None else ()).fetchone()[0]

    # ------------------------------------------------------------------------- statistics

    def stats(self) -> Stats:
        answers = self.answers()
        per_annotator: dict = {}
        by_pair: dict = {}
        for a in answers:
            counts = per_annotator.setdefault(a.annotator, {c: 0 for c in CHOICES} | {"total": 0})
            counts[a.choice] += 1
            counts["total"] += 1
            if a.choice != "skip":
                by_pair.setdefault(a.pair_id, {})[a.annotator] = a.choice
        agreeing = compared = 0
        by_annotators: dict = {}
        for votes in by_pair.values():
            names = sorted(votes)
            for i, x in enumerate(names):
                for y in names[i + 1:]:
                    same = votes[x] == votes[y]
                    agreeing += same
                    compared += 1
                    key = f"{x}|{y}"
                    ok, n = by_annotators.get(key, (0, 0))
                    by_annotators[key] = (ok + same, n + 1)
        with self._connect() as db:
            num_pairs = db.execute("SELECT COUNT(*) FROM pairs").fetchone()[0]
        num_complete = sum(len(v) >= self.answers_per_pair for v in by_pair.values())
        return Stats(answers_per_annotator=per_annotator, num_pairs=num_pairs, num_complete=num_complete,
                     pairwise_agreement=agreeing / compared if compared else None,
                     fleiss_kappa=fleiss_kappa([list(v.values()) for v in by_pair.values()]),
                     agreement_by_pair_of_annotators=by_annotators)

    # ------------------------------------------------------------------------- import / export

    def import_jsonl(self, data_dir: str) -> tuple[int, int]:
        """Pairs of <data_dir>/pairs.jsonl and answers of <data_dir>/labels.jsonl (the terminal
        labeler's old files) into the store; returns (pairs added, answers added). Safe to call
        on every start: known pairs and already imported answers are skipped. In labels.jsonl
        `choice` 0 / 1 / null is response_a / response_b / skipped, shown in the order a, b."""
        pairs_path = os.path.join(data_dir, PAIRS_FILE)
        rows = read_jsonl(pairs_path, with_where=True)
        n_pairs = self.add_pairs([row for _, row in rows], source=PAIRS_FILE, where=[where for where, _ in rows])
        labels_path = os.path.join(data_dir, LABELS_FILE)
        n_answers = 0
        imported = {a.request_id for a in self.answers(superseded=True)}
        for i, r in enumerate(read_jsonl(labels_path, appended=True)):
            # request_id: the file and line, so importing the same file again adds nothing.
            request_id = f"import:{os.path.abspath(labels_path)}:{i}"
            if request_id in imported:
                continue
            where = f"{labels_path} line {i + 1}"
            if not isinstance(r, dict) or r.get("choice") not in (0, 1, None) or "id" not in r:
                raise DataError(f"{where}: expected {{'id', 'choice': 0 | 1 | null, ...}}, got {str(r)[:80]}")
            annotator = normalise_name(str(r.get("labeler") or "human"))
            position = {0: "left", 1: "right", None: "skip"}[r["choice"]]
            try:
                self.answer(str(r["id"]), annotator, position, "ab", time=r.get("time"), request_id=request_id,
                            metadata={k: v for k, v in r.items() if k not in ("id", "choice", "labeler", "time")})
                n_answers += 1
            except UnknownPair:
                raise DataError(f"{where}: pair id {r['id']!r} is not in {pairs_path}") from None
            except AnswerRefused:
                continue  # answered already (an earlier import, or an older answer of the same id)
        return n_pairs, n_answers

    def export_jsonl(self, path: str) -> int:
        """Every answer joined with its pair, one JSON object per line; returns the count."""
        pairs = {p.id: p for p in self.pairs()}
        answers = self.answers()
        tmp = path + ".tmp"
        with os.fdopen(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "w", encoding="utf-8") as f:
            for a in answers:
                p = pairs[a.pair_id]
                f.write(json.dumps({**dataclasses.asdict(a), "prompt": p.prompt, "response_a": p.response_a,
                                    "response_b": p.response_b, "split": p.split, "source": p.source},
                                   ensure_ascii=False) + "\n")
        os.replace(tmp, path)
        return len(answers)

    def preferences(self, source: Optional[str] = None) -> list[dict]:
        """{prompt, chosen, rejected, metadata} per pair whose a / b answers have a strict majority
        (ties and skips do not vote; a split vote is dropped). metadata: id, split, source, the
        votes, annotators, choice (0 = response_a), the pair's own metadata, labeler 'store'."""
        votes: dict = {}
        for a in self.answers():
            if a.choice in ("a", "b"):
                votes.setdefault(a.pair_id, []).append(a)
        records = []
        for p in self.pairs(source):
            vs = votes.get(p.id, [])
            n_a = sum(v.choice == "a" for v in vs)
            n_b = len(vs) - n_a
            if n_a == n_b:
                continue
            choice = 0 if n_a > n_b else 1
            chosen, rejected = (p.response_a, p.response_b) if choice == 0 else (p.response_b, p.response_a)
            labelers = sorted({v.annotator for v in vs})
            metadata = {**p.metadata, "id": p.id, "split": p.split, "source": p.source, "choice": choice,
                        "votes": {"a": n_a, "b": n_b}, "annotators": labelers,
                        "labeler": labelers[0] if len(labelers) == 1 else "store",
                        "time": max(v.time for v in vs)}
            records.append({"prompt": p.prompt, "chosen": chosen, "rejected": rejected, "metadata": metadata})
        return records

    def export_preferences(self, tfds_dir: str, name: str = "preferences", source: Optional[str] = None,
                           records: Optional[list[dict]] = None) -> dict:
        """Write the preferences (self.preferences(), or `records`) as the TFDS dataset the reward
        and DPO stages read (config.data = datasets.preferences(name), data_dir = tfds_dir),
        split by each pair's split; returns {split: source}."""
        records = self.preferences(source) if records is None else records
        if not records:
            raise DataError(f"{self.path}: no labelled pairs to export (every pair is unanswered, skipped, "
                            "tied or split evenly)")
        by_split = {s: [r for r in records if r["metadata"]["split"] == s] for s in SPLITS}
        by_split = {s: rs for s, rs in by_split.items() if rs or s == "train"}
        return builders.write_preferences(by_split, tfds_dir, name)


# ----------------------------------------------------------------------------- helpers

_COLUMNS = "seq, pair_id, annotator, choice, shown, position, time, metadata, request_id, supersedes"
_ANSWER_QUERY = f"SELECT {_COLUMNS} FROM live_answers"  # what counts: rows no later answer supersedes
_ALL_ANSWERS_QUERY = f"SELECT {_COLUMNS} FROM answers"


def _answer_from_row(row) -> Answer:
    return Answer(seq=row[0], pair_id=row[1], annotator=row[2], choice=row[3], shown=row[4], position=row[5],
                  time=row[6], metadata=json.loads(row[7]), request_id=row[8], supersedes=row[9])


def _pair_from_row(row) -> Pair:
    return Pair(id=row[0], prompt=row[1], response_a=row[2], response_b=row[3], split=row[4], source=row[5],
                metadata=json.loads(row[6]))


def _pair_row(p, where: str) -> Pair:
    if not isinstance(p, dict):
        raise DataError(f"{where}: expected a JSON object with {list(PAIR_FIELDS)}, got {str(p)[:80]}")
    missing = [k for k in PAIR_FIELDS if k not in p]
    if missing:
        raise DataError(f"{where}: pair {str(p)[:80]} lacks {missing}")
    # An integer id is taken as its text; whatever else the web API would refuse to take an
    # answer for (and so leave the queue stuck on this pair) is refused here.
    pair_id = str(p["id"]) if isinstance(p["id"], int) and not isinstance(p["id"], bool) else p["id"]
    error = pair_id_error(pair_id)
    if error:
        raise DataError(f"{where}: pair id {str(p['id'])[:80]!r}: {error}")
    for k in PAIR_FIELDS[1:]:
        if not isinstance(p[k], str):
            raise DataError(f"{where}: {k} of pair {p['id']!r} is a {type(p[k]).__name__}, expected text")
    split = p.get("split", "train")
    if split not in SPLITS:
        raise DataError(f"{where}: split {split!r} of pair {p['id']!r}: expected one of {SPLITS}")
    metadata = {k: v for k, v in p.items() if k not in PAIR_FIELDS + ("split",)}
    return Pair(id=pair_id, prompt=p["prompt"], response_a=p["response_a"], response_b=p["response_b"],
                split=split, metadata=metadata)


def pair_id_error(pair_id) -> Optional[str]:
    """What is wrong with a pair id, or None: the one rule for ids, applied when a pair is added and
    by the web API to every id it is sent."""
    if not isinstance(pair_id, str):
        return f"expected text, got {type(pair_id).__name__}"
    if not pair_id.strip() or len(pair_id) > MAX_ID_CHARS:
        return f"expected 1 to {MAX_ID_CHARS} characters, not all blank (got {len(pair_id)})"
    if any(unicodedata.category(c).startswith("C") for c in pair_id):
        return "contains a control or unassigned character"
    return None


def normalise_name(name: str) -> str:
    """An annotator name as stored: NFC, so the same name typed on two keyboards is one person."""
    return unicodedata.normalize("NFC", name) if isinstance(name, str) else name


def annotator_error(name) -> Optional[str]:
    """What is wrong with an (already normalised) annotator name, or None. Any script is fine; no
    control, format or unassigned characters (they hide in a page and in a table), no spaces at
    either end."""
    if not isinstance(name, str):
        return f"expected text, got {type(name).__name__}"
    if not name.strip() or len(name) > MAX_NAME_CHARS:
        return f"expected 1 to {MAX_NAME_CHARS} characters, not all blank"
    if name != name.strip():
        return "starts or ends with a space"
    if any(unicodedata.category(c).startswith("C") for c in name):
        return "contains a control, format or unassigned character"
    if name != normalise_name(name):
        return "not in Unicode normal form NFC"
    return None


def _check_annotator(annotator) -> None:
    error = annotator_error(annotator)
    if error:
        raise AnswerRefused(f"annotator {str(annotator)[:80]!r}: {error}")


def _make_private(path: str) -> None:
    """Create `path` (or narrow an existing one) readable and writable by its owner only: it holds
    people's answers. SQLite gives the -wal and -shm files the database's mode."""
    os.close(os.open(path, os.O_RDWR | os.O_CREAT, 0o600))
    if os.stat(path).st_mode & 0o077:
        os.chmod(path, 0o600)


def _upgrade(db) -> None:
    """A store written before undo existed: its answers table has UNIQUE (pair_id, annotator) and no
    `supersedes` column, its leases no `reopened`. SQLite cannot drop a constraint, so the table is
    rebuilt in one transaction, every row and seq kept (the append-only triggers are dropped for the
    copy and recreated by the schema)."""
    columns = {r[1] for r in db.execute("PRAGMA table_info(answers)")}
    lease_columns = {r[1] for r in db.execute("PRAGMA table_info(leases)")}
    if (not columns or "supersedes" in columns) and (not lease_columns or "reopened" in lease_columns):
        return
    db.execute("BEGIN IMMEDIATE")
    try:
        if columns and "supersedes" not in columns:
            old = ", ".join(c for c in _COLUMNS.split(", ") if c != "supersedes")
            db.execute("DROP VIEW IF EXISTS live_answers")
            db.execute("DROP TRIGGER IF EXISTS answers_no_update")
            db.execute("DROP TRIGGER IF EXISTS answers_no_delete")
            db.execute("ALTER TABLE answers RENAME TO answers_before_undo")
            db.execute(_ANSWERS)
            db.execute(f"INSERT INTO answers ({old}) SELECT {old} FROM answers_before_undo ORDER BY seq")
            db.execute("DROP TABLE answers_before_undo")
        if lease_columns and "reopened" not in lease_columns:
            db.execute("ALTER TABLE leases ADD COLUMN reopened INTEGER NOT NULL DEFAULT 0")
    except BaseException:
        db.execute("ROLLBACK")
        raise
    db.execute("COMMIT")


def _time_seconds(now_seconds: Optional[float]) -> float:
    return time.time() if now_seconds is None else float(now_seconds)


def fleiss_kappa(ratings: list[list[str]]) -> Optional[float]:
    """Fleiss' kappa over items rated by >= 2 raters (a varying number per item allowed):
    P_i = (sum_j n_ij^2 - n_i) / (n_i (n_i - 1)), P = mean P_i, p_j = share of all ratings in
    category j, P_e = sum p_j^2, kappa = (P - P_e) / (1 - P_e). None when no item has two ratings
    or every rating is in one category (P_e = 1)."""
    items = [r for r in ratings if len(r) >= 2]
    if not items:
        return None
    totals: dict = {}
    p_items = []
    for r in items:
        counts: dict = {}
        for c in r:
            counts[c] = counts.get(c, 0) + 1
            totals[c] = totals.get(c, 0) + 1
        n = len(r)
        p_items.append((sum(v * v for v in counts.values()) - n) / (n * (n - 1)))
    n_all = sum(totals.values())
    p_e = sum((v / n_all) ** 2 for v in totals.values())
    if p_e >= 1.0:
        return None
    return (sum(p_items) / len(p_items) - p_e) / (1.0 - p_e)




def open_data_dir(data_dir: str, answers_per_pair: int = 1, **kwargs) -> LabelStore:
    """The store of a labelling directory (<data_dir>/labels.sqlite), with its pairs.jsonl and
    labels.jsonl imported (each start; known rows are skipped)."""
    if not os.path.isdir(data_dir):
        raise DataError(f"{data_dir} is not a directory: --data must be the folder holding the pairs to label")
    store = LabelStore(os.path.join(data_dir, STORE_FILE), answers_per_pair=answers_per_pair, **kwargs)
    store.import_jsonl(data_dir)
    return store
