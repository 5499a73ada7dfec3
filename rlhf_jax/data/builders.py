"""TFDS builders that write `array_record` files, read back with random access and no TensorFlow.

    load_dataset(config, data_dir) -> {'train': source, 'validation': source, ...}
    write_preferences(records, data_dir, name) -> {'train': source, 'validation': source}

A *source* supports `len(source)` and `source[i] -> dict` (Text features come back as `str`,
not the `bytes` TFDS returns). Grain's `MapDataset.source` takes it as is (see loaders.py).

`config.name` picks the dataset (see configs/datasets.py for every field):

    'reviews'            embedded generated reviews: text, topic, sentiment       (reviews.py)
    'reviews_sft'        the same reviews as SFT pairs: prompt, response
    'arithmetic'         generated arithmetic problems as SFT pairs, with a verifier: prompt,
                         response; train/validation/test                      (arithmetic.py)
    'text_folder'        your own `.txt` files for pre-training: text, file
    'jsonl_sft'          JSONL file, one {"prompt": str, "response": str} per line
    'preferences_jsonl'  JSONL file, one {"prompt", "chosen", "rejected"} per line, optional
                         "margin" (number) and "metadata" (anything JSON); other keys are folded
                         into metadata
    'preferences'        preferences already written by `write_preferences(..., name)`;
                         `config.records_name` is that name
    'imdb_reviews'       TFDS's own IMDB builder (needs the network the first time): text, label

Each dataset is prepared once into `data_dir/<builder>/<config>/<version>/` and read from there
afterwards. Generated datasets are named by their parameters (`seed0_train20000_val1000`), file
datasets by a digest of the file contents, so changing the data gives a new dataset and never
silently reuses a stale one.

Splits: generated datasets have train/validation. File datasets take `config.path` as train and
`config.validation_path` as validation; when there is no validation_path, a
`validation_fraction` of the examples is held out, chosen by a hash of the prompt (or the document
text), so all pairs of one prompt land in the same split and the choice never depends on order.

Text folders: every `*.txt` file below `path` (recursively, sorted by path) is read as UTF-8.
With `split_paragraphs=False` each file is one document; with `split_paragraphs=True` each
blank-line-separated paragraph is one document. Empty documents are skipped.

A malformed JSONL line raises ValueError('<file> line <n>: ...') naming the 1-based line number
and the offending key.
"""

from __future__ import annotations

import glob
import hashlib
import json
import math
import os
import re
import shutil

import numpy as np
import tensorflow_datasets as tfds

from rlhf_jax.data import arithmetic as arithmetic_lib, reviews as reviews_lib
from rlhf_jax.runtime import checks, distributed
from rlhf_jax.runtime.config import DataError
from rlhf_jax.runtime.jsonl import decode_utf8, read_jsonl

VERSION = tfds.core.Version("1.0.0")
DATASET_NAMES = ("reviews", "reviews_sft", "arithmetic", "text_folder", "jsonl_sft", "preferences_jsonl",
                 "preferences", "imdb_reviews")


# ----------------------------------------------------------------------------------------------
# Sources: what load_dataset returns.


class Source:
    """Random-access view of a TFDS data source whose examples pass through `fn` (bytes -> str)."""

    def __init__(self, source, fn=None):
        self.source = source
        self.fn = fn or decode_text

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, index: int) -> dict:
        return self.fn(self.source[int(index)])

    def __getitems__(self, indices) -> list[dict]:
        return [self.fn(x) for x in self.source.__getitems__([int(i) for i in indices])]

    def __repr__(self) -> str:
        return f"Source({self.source!r})"


def decode_text(example: dict) -> dict:
    """bytes -> str, numpy scalars -> Python numbers."""
    out = {}
    for key, value in example.items():
        if isinstance(value, bytes):
            value = value.decode("utf-8")
        elif isinstance(value, np.generic):
            value = value.item()
        out[key] = value
    return out


# ----------------------------------------------------------------------------------------------
# Helpers shared by the builders.


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "_", text.lower()).strip("_")[:40] or "data"


def _digest(*parts: bytes | str) -> str:
    h = hashlib.sha256()
    for part in parts:
        h.update(part.encode("utf-8") if isinstance(part, str) else part)
        h.update(b"\0")
    return h.hexdigest()[:12]


def _file_digest(path: str) -> str:
    with open(path, "rb") as f:
        return _digest(f.read())


def in_validation(key: str, fraction: float) -> bool:
    """Deterministic hold-out: True for about `fraction` of all keys, by a hash of the key."""
    h = int(hashlib.sha256(key.encode("utf-8")).hexdigest()[:8], 16)
    return h < fraction * 2**32


def _split_by_hash(examples: list[dict], key: str, fraction: float) -> dict[str, list[dict]]:
    train = [e for e in examples if not in_validation(e[key], fraction)]
    validation = [e for e in examples if in_validation(e[key], fraction)]
    return {"train": train, "validation": validation}


def _indexed(examples: list[dict]):
    """(key, example) pairs as GeneratorBasedBuilder._generate_examples yields them."""
    for i, example in enumerate(examples):
        yield i, example


def check_record(row, fields, optional, where: str) -> dict:
    """`row` itself if it has every key in `fields` with the right type; ValueError otherwise."""
    if not isinstance(row, dict):
        raise DataError(f"{where}: expected a JSON object with keys {sorted(fields)}, "
                         f"got {type(row).__name__}")
    for key, types in list(fields.items()) + list(optional.items()):
        if key not in row:
            if key in fields:
                raise DataError(f"{where}: missing key {key!r}")
            continue
        value = row[key]
        if not isinstance(value, types) or (isinstance(value, bool) and bool not in types):
            names = " or ".join(t.__name__ for t in types)
            raise DataError(f"{where}: key {key!r} must be {names}, got "
                             f"{type(value).__name__} {value!r:.40}")
    return row


PREFERENCE_KEYS = ("prompt", "chosen", "rejected")


def preference_example(row: dict, where: str) -> dict:
    """Validate one preference record and put it in stored form (metadata as a JSON string)."""
    check_record(row, {k: (str,) for k in PREFERENCE_KEYS},
                 {"margin": (int, float), "metadata": (dict, str, list, int, float, bool)}, where)
    metadata = row.get("metadata", {})
    extra = {k: v for k, v in row.items() if k not in PREFERENCE_KEYS + ("margin", "metadata")}
    if extra:
        metadata = {**metadata, **extra} if isinstance(metadata, dict) else {"metadata": metadata,
                                                                             **extra}
    try:
        metadata_json = metadata if isinstance(metadata, str) else json.dumps(metadata,
                                                                             sort_keys=True)
    except TypeError as e:
        raise DataError(f"{where}: key 'metadata' is not JSON-serialisable ({e})") from None
    margin = float(row.get("margin", 0.0))
    if not math.isfinite(margin):
        raise DataError(f"{where}: key 'margin' must be a finite number, got {row['margin']!r}")
    return {"prompt": row["prompt"], "chosen": row["chosen"], "rejected": row["rejected"],
            "metadata": metadata_json, "margin": margin}


def check_pairs_differ(examples: list[dict], where: str) -> None:
    """Refuse preference data in which no pair prefers one text over another: a reward model
    trained on it learns nothing (its gradient is 0) and DPO has no signal either."""
    if examples and all(e["chosen"] == e["rejected"] for e in examples):
        raise DataError(f"{where}: in every one of the {len(examples)} pairs chosen == rejected: "
                        "there is no preference to learn")


def _info(builder, features: dict, description: str):
    # Defined outside TFDS, so DatasetInfo is built directly with builder=self.
    return tfds.core.DatasetInfo(builder=builder, description=description,
                                 features=tfds.features.FeaturesDict(features))


# ----------------------------------------------------------------------------------------------
# Builders. Each takes its parameters as keyword arguments, names its BuilderConfig after them,
# and passes the rest (data_dir, file_format) to GeneratorBasedBuilder. `code_path = None`: TFDS
# looks for a checksums file next to a builder's code through `importlib_resources`, a package
# TFDS 4.9 imports without declaring it on Python >= 3.9; our builders download nothing.


class _Builder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """What every builder here shares: version, no checksums file, examples keyed by index."""

    VERSION = VERSION
    code_path = None  # no checksums file; also avoids TFDS's import of importlib_resources

    def _generate_examples(self, examples):
        return _indexed(examples)


class ReviewsBuilder(_Builder, skip_registration=True):
    """Generated reviews (reviews.py): text, topic, sentiment in [-1, 1]."""

    name = "rlhf_reviews"

    def __init__(self, *, seed: int = 0, num_train: int = 20_000, num_validation: int = 1_000,
                 **kwargs):
        self.seed, self.num_train, self.num_validation = seed, num_train, num_validation
        config = tfds.core.BuilderConfig(
            name=f"seed{seed}_train{num_train}_val{num_validation}", version=VERSION)
        super().__init__(config=config, **kwargs)

    def _info(self):
        return _info(self, {"text": tfds.features.Text(), "topic": tfds.features.Text(),
                            "sentiment": np.float32}, "Generated reviews with latent sentiment.")

    def _split_generators(self, dl_manager):
        splits = reviews_lib.review_splits(self.seed, self.num_train, self.num_validation)
        return {name: self._generate_examples(examples) for name, examples in splits.items()}


class ReviewsSftBuilder(ReviewsBuilder, skip_registration=True):
    """The generated reviews as SFT pairs (reviews.sft_examples): prompt, response. Same
    parameters and config names as ReviewsBuilder."""

    name = "rlhf_reviews_sft"

    def _info(self):
        return _info(self, {"prompt": tfds.features.Text(), "response": tfds.features.Text()},
                     "Generated reviews as instruction and continuation SFT pairs.")

    def _split_generators(self, dl_manager):
        splits = reviews_lib.review_splits(self.seed, self.num_train, self.num_validation)
        return {name: self._generate_examples(
                    reviews_lib.sft_examples(examples, seed=f"{self.seed}/{name}"))
                for name, examples in splits.items()}


class ArithmeticSftBuilder(_Builder, skip_registration=True):
    """The arithmetic problems as SFT pairs: prompt, response; splits train/validation/test."""

    name = "rlhf_arithmetic"

    def __init__(self, *, seed: int = 0, num_train: int = 20_000, num_validation: int = 1_000,
                 num_test: int = 1_000, min_digits: int = 1, max_digits: int = 3,
                 operations="+-", mul_digits: int = 1, **kwargs):
        ops = arithmetic_lib.check_knobs(min_digits, max_digits, operations, mul_digits)
        self.split_args = dict(seed=seed, num_train=num_train, num_validation=num_validation,
                               num_test=num_test, min_digits=min_digits, max_digits=max_digits,
                               operations=ops, mul_digits=mul_digits)
        config = tfds.core.BuilderConfig(
            name=(f"seed{seed}_train{num_train}_val{num_validation}_test{num_test}"
                  f"_digits{min_digits}to{max_digits}_{'_'.join(arithmetic_lib.OP_NAMES[o] for o in ops)}"
                  f"_mul{mul_digits}"),
            version=VERSION)
        super().__init__(config=config, **kwargs)

    def _info(self):
        return _info(
            self, {"prompt": tfds.features.Text(), "response": tfds.features.Text()},
            "Generated integer arithmetic problems with worked solutions ending in '#### N'.")

    def _split_generators(self, dl_manager):
        splits = arithmetic_lib.arithmetic_splits(**self.split_args)
        return {name: self._generate_examples(examples) for name, examples in splits.items()}


def arithmetic_builder(config, **kwargs) -> ArithmeticSftBuilder:
    """The builder for a dataset config named 'arithmetic'; fields it lacks take the defaults."""
    get = config.get
    return ArithmeticSftBuilder(
        seed=get("seed", 0), num_train=get("num_train", 20_000),
        num_validation=get("num_validation", 1_000), num_test=get("num_test", 1_000),
        min_digits=get("min_digits", 1), max_digits=get("max_digits", 3),
        operations=get("operations", "+-"), mul_digits=get("mul_digits", 1), **kwargs)


def text_documents(path: str, split_paragraphs: bool) -> list[dict]:
    """Documents from every *.txt below `path` (or `path` itself if it is a file)."""
    if os.path.isfile(path):
        files = [path]
    else:
        files = sorted(glob.glob(os.path.join(path, "**", "*.txt"), recursive=True))
    if not files:
        raise DataError(f"text_folder: no .txt files under {path!r}")
    documents = []
    for file in files:
        with open(file, "rb") as f:
            text = decode_utf8(f.read(), file)
        pieces = re.split(r"\n\s*\n", text) if split_paragraphs else [text]
        rel = os.path.relpath(file, path) if os.path.isdir(path) else os.path.basename(file)
        documents += [{"text": p.strip(), "file": rel} for p in pieces if p.strip()]
    return documents


def _files_digest(path: str) -> str:
    if not path:
        return "none"
    if os.path.isfile(path):
        return _file_digest(path)
    files = sorted(glob.glob(os.path.join(path, "**", "*.txt"), recursive=True))
    return _digest(*[os.path.relpath(f, path) + ":" + _file_digest(f) for f in files])


def _file_config(path: str, validation_path: str, validation_fraction: float, *extra) -> str:
    digest = _digest(_files_digest(path), _files_digest(validation_path),
                     str(validation_fraction if not validation_path else ""), *map(str, extra))
    return f"{_slug(os.path.basename(os.path.normpath(path)))}_{digest}"


class TextFolderBuilder(_Builder, skip_registration=True):
    """Bring-your-own pre-training text: a folder of .txt files -> text, file."""

    name = "rlhf_text_folder"

    def __init__(self, *, path: str, validation_path: str = "", validation_fraction: float = 0.05,
                 split_paragraphs: bool = False, **kwargs):
        self.path, self.validation_path = path, validation_path
        self.validation_fraction, self.split_paragraphs = validation_fraction, split_paragraphs
        name = _file_config(path, validation_path, validation_fraction, split_paragraphs)
        super().__init__(config=tfds.core.BuilderConfig(name=name, version=VERSION), **kwargs)

    def _info(self):
        return _info(self, {"text": tfds.features.Text(), "file": tfds.features.Text()},
                     "Plain-text documents from a folder of .txt files.")

    def _split_generators(self, dl_manager):
        documents = text_documents(self.path, self.split_paragraphs)
        if self.validation_path:
            splits = {"train": documents,
                      "validation": text_documents(self.validation_path, self.split_paragraphs)}
        else:
            splits = _split_by_hash(documents, "text", self.validation_fraction)
            if not splits["train"]:
                raise DataError(f"text_folder: every one of the {len(documents)} documents under {self.path!r} fell "
                                f"in the held-out fraction validation_fraction={self.validation_fraction}; add "
                                "documents or lower data.validation_fraction")
        return {name: self._generate_examples(examples) for name, examples in splits.items()
                if examples or name == "train"}


class JsonlSftBuilder(_Builder, skip_registration=True):
    """SFT pairs from JSONL: one {"prompt": str, "response": str} object per line."""

    name = "rlhf_jsonl_sft"

    def __init__(self, *, path: str, validation_path: str = "", validation_fraction: float = 0.05,
                 **kwargs):
        self.path, self.validation_path = path, validation_path
        self.validation_fraction = validation_fraction
        name = _file_config(path, validation_path, validation_fraction)
        super().__init__(config=tfds.core.BuilderConfig(name=name, version=VERSION), **kwargs)

    def _info(self):
        return _info(self, {"prompt": tfds.features.Text(), "response": tfds.features.Text()},
                     "SFT pairs from a JSONL file.")

    def _read(self, path):
        fields = {"prompt": (str,), "response": (str,)}
        rows = [check_record(row, fields, {}, where) for where, row in read_jsonl(path, with_where=True)]
        return [{"prompt": r["prompt"], "response": r["response"]} for r in rows]

    def _split_generators(self, dl_manager):
        if self.validation_path:
            splits = {"train": self._read(self.path),
                      "validation": self._read(self.validation_path)}
        else:
            splits = _split_by_hash(self._read(self.path), "prompt", self.validation_fraction)
        return {name: self._generate_examples(examples) for name, examples in splits.items()
                if examples or name == "train"}


class PreferencesBuilder(_Builder, skip_registration=True):
    """Preference pairs: prompt, chosen, rejected, metadata (JSON string), margin (float, 0: none).

    From a JSONL file (`path`, optional `validation_path`) or from records in memory
    (`records`: a list of dicts, or {split: list of dicts}) under the config name `name`.
    """

    name = "rlhf_preferences"

    def __init__(self, *, path: str = "", validation_path: str = "",
                 validation_fraction: float = 0.1, records=None, name: str = "", **kwargs):
        self.path, self.validation_path = path, validation_path
        self.validation_fraction, self.records = validation_fraction, records
        if not name:
            name = _file_config(path, validation_path, validation_fraction)
        super().__init__(config=tfds.core.BuilderConfig(name=name, version=VERSION), **kwargs)

    def _info(self):
        text = tfds.features.Text
        return _info(self, {"prompt": text(), "chosen": text(), "rejected": text(),
                            "metadata": text(), "margin": np.float32},
                     "Pairwise preferences: prompt, chosen, rejected.")

    def _read(self, path):
        return [preference_example(row, where) for where, row in read_jsonl(path, with_where=True)]

    def _split_generators(self, dl_manager):
        if self.records is not None:
            records = self.records
            if isinstance(records, dict):
                splits = {s: [preference_example(r, f"records[{s!r}][{i}]")
                              for i, r in enumerate(rs)] for s, rs in records.items()}
            else:
                examples = [preference_example(r, f"records[{i}]") for i, r in enumerate(records)]
                splits = _split_by_hash(examples, "prompt", self.validation_fraction)
        elif self.validation_path:
            splits = {"train": self._read(self.path),
                      "validation": self._read(self.validation_path)}
        else:
            splits = _split_by_hash(self._read(self.path), "prompt", self.validation_fraction)
        check_pairs_differ(splits.get("train", []), f"preferences {self.path or self.builder_config.name!r}, train split")
        return {name: self._generate_examples(examples) for name, examples in splits.items()
                if examples or name == "train"}


# ----------------------------------------------------------------------------------------------
# Entry points.


class Splits(dict):
    """{split: Source}; asking for a split the dataset does not have is a DataError saying why
    (a small file dataset whose hash hold-out picked no example has no 'validation' split)."""

    def __init__(self, sources: dict, description: str, hint: str = ""):
        super().__init__(sources)
        self.description, self.hint = description, hint

    def __missing__(self, split):
        raise DataError(f"{self.description} has no {split!r} split (it has {sorted(self)}){self.hint}")


def prepare(builder) -> Splits:
    """Write the dataset unless it is already in builder.data_dir; return {split: Source}."""
    tfds.disable_progress_bar()  # Progress bars would flood the run logs; the datasets are small.
    try:
        builder.download_and_prepare()
    except DataError:
        raise
    except (OSError, RuntimeError) as e:  # A full disk, a quota, an unwritable data_dir: TFDS's
        # writer says so in a RuntimeError (array_record) or an OSError, deep in a traceback.
        raise DataError(f"preparing dataset {builder.name} in {builder.data_dir} failed "
                        f"({type(e).__name__}: {e}); nothing of it is kept, the next run prepares it again") from e
    sources = {split: Source(source) for split, source in builder.as_data_source().items()}
    hint = ""
    if getattr(builder, "path", "") and not getattr(builder, "validation_path", ""):
        hint = (f": none of its examples fell in the held-out fraction validation_fraction="
                f"{builder.validation_fraction}; set data.validation_path to held-out data or raise "
                "data.validation_fraction")
    where = getattr(builder, "path", "") or builder.data_dir
    return Splits(sources, f"dataset {builder.name} ({where})", hint)


def load_dataset(config, data_dir: str) -> dict[str, Source]:
    """{split: Source} for the dataset `config.name` (see the module docstring), preparing it
    into `data_dir` the first time. No network is used except by 'imdb_reviews'.

    In a run of several processes process 0 prepares it while the others wait (two writers of
    one TFDS folder would race); then every process opens it."""
    if distributed.is_main_process():
        sources = _load_dataset(config, data_dir)
        distributed.barrier(f"dataset {config.get('name')} prepared")
        return sources
    distributed.barrier(f"dataset {config.get('name')} prepared")
    return _load_dataset(config, data_dir)


def _load_dataset(config, data_dir: str) -> dict[str, Source]:
    data_dir = os.path.expanduser(data_dir)
    name = config.get("name")
    get = config.get
    common = dict(data_dir=data_dir, file_format="array_record")
    if name in ("reviews", "reviews_sft"):
        builder_cls = ReviewsBuilder if name == "reviews" else ReviewsSftBuilder
        return prepare(builder_cls(seed=get("seed", 0), num_train=get("num_train", 20_000),
                                   num_validation=get("num_validation", 1_000), **common))
    if name == "arithmetic":
        return prepare(arithmetic_builder(config, **common))
    if name in ("text_folder", "jsonl_sft", "preferences_jsonl"):
        path = get("path", "")
        if not path or not os.path.exists(path):
            raise DataError(f"dataset {name!r}: config.path={path!r} does not exist")
        files = dict(path=path, validation_path=get("validation_path", ""),
                     validation_fraction=get("validation_fraction", 0.05))
        if name == "text_folder":
            return prepare(TextFolderBuilder(split_paragraphs=get("split_paragraphs", False),
                                             **files, **common))
        if name == "jsonl_sft":
            return prepare(JsonlSftBuilder(**files, **common))
        return prepare(PreferencesBuilder(**files, **common))
    if name == "preferences":
        return load_preferences(data_dir, get("records_name", ""))
    if name == "imdb_reviews":
        return load_imdb_reviews(data_dir)
    raise DataError(f"unknown dataset name {name!r}; expected one of {DATASET_NAMES}")


def write_preferences(records, data_dir: str, name: str,
                      validation_fraction: float = 0.1) -> dict[str, Source]:
    """Store preference records as dataset `name` in `data_dir` (replacing any earlier one).

    records: a list of dicts with prompt, chosen, rejected (str), optional margin (number),
    metadata (dict or JSON string) and any other keys (folded into metadata); train/validation
    are split by a hash of the prompt. Or {split: list of dicts} to choose the splits yourself.
    Read it back later with load_preferences(data_dir, name) or config name='preferences'.
    In a multi-host run call this on one process only.
    """
    if not re.fullmatch(r"[a-z0-9_]+", name):
        raise DataError(f"preferences name {name!r}: use lowercase letters, digits and _")
    builder = PreferencesBuilder(records=records, name=name,
                                 validation_fraction=validation_fraction,
                                 data_dir=os.path.expanduser(data_dir), file_format="array_record")
    if os.path.exists(builder.data_dir):
        shutil.rmtree(builder.data_dir)
    return prepare(builder)


def load_preferences(data_dir: str, name: str) -> dict[str, Source]:
    """Preferences written earlier by write_preferences(records, data_dir, name)."""
    builder = PreferencesBuilder(name=name, data_dir=os.path.expanduser(data_dir),
                                 file_format="array_record")
    if not os.path.exists(os.path.join(builder.data_dir, "dataset_info.json")):
        raise DataError(f"no preferences named {name!r} in {data_dir!r} (looked in "
                                f"{builder.data_dir}); write them with write_preferences first")
    return prepare(builder)


def _imdb_example(example: dict) -> dict:
    example = decode_text(example)
    return {"text": example["text"], "label": int(example["label"]),
            "sentiment": 1.0 if int(example["label"]) == 1 else -1.0, "topic": "film"}


def load_imdb_reviews(data_dir: str) -> dict[str, Source]:
    """IMDB reviews through TFDS's own builder, as array_record: train and validation (= TFDS
    'test'), each example {'text', 'label' (1 positive), 'sentiment' (+-1), 'topic': 'film'}.

    The first call downloads about 80 MB from ai.stanford.edu; offline, prepare it on a machine
    with network (same call) and copy data_dir/imdb_reviews over.
    """
    builder = tfds.builder("imdb_reviews/plain_text", data_dir=os.path.expanduser(data_dir),
                           file_format="array_record")
    try:
        builder.download_and_prepare()
    except Exception as e:  # network errors come in many types (urllib, requests, OSError)
        raise DataError(
            f"imdb_reviews is not prepared in {data_dir!r} and could not be downloaded "
            f"({type(e).__name__}: {e}). It needs network access the first time: run "
            f"load_dataset(imdb_reviews(), data_dir) on a machine with network and copy "
            f"{os.path.join(data_dir, 'imdb_reviews')} here, or use the embedded 'reviews' "
            f"dataset.") from e
    sources = builder.as_data_source()
    return {"train": Source(sources["train"], _imdb_example),
            "validation": Source(sources["test"], _imdb_example)}


# ----------------------------------------------------------------------------- config checks (stages.registry.validate runs them)


def check_dataset_config(c, key: str = "data"):
    """A dataset config (configs/datasets.py)."""
    data = c.get(key)
    if data is checks.MISSING:
        return
    if data is None or not c.get(key + ".name"):
        c.fail(key, data, f"expected a dataset config (configs/datasets.py) with a name in {DATASET_NAMES}")
    c.choice(key + ".name", DATASET_NAMES)
    c.number(key + ".validation_fraction", 0.0, 1.0, high_open=True)
    if c.get(key + ".name") in ("text_folder", "jsonl_sft", "preferences_jsonl") and not c.get(key + ".path"):
        c.fail(key + ".path", c.get(key + ".path"), f"dataset {c.get(key + '.name')!r} reads a file: set its path")
    if c.get(key + ".name") == "preferences" and not c.get(key + ".records_name"):
        c.fail(key + ".records_name", c.get(key + ".records_name"), "expected the name given to write_preferences")
