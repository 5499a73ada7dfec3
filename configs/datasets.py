"""Dataset configs for rlhf_jax.data.load_dataset(config, data_dir).

Every function returns a ConfigDict with *all* dataset fields, so any of them can be overridden
on the command line (`--config.data.name=text_folder --config.data.path=/my/texts`).

    name                 which dataset: reviews, reviews_sft, arithmetic, text_folder, jsonl_sft,
                         preferences_jsonl, preferences, imdb_reviews
    seed                 generated datasets: the generator seed
    num_train            generated datasets: number of training reviews
    num_validation       generated datasets: number of validation reviews
    path                 file datasets: the training .jsonl file or .txt folder
    validation_path      file datasets: validation file/folder ('' = hold out a fraction of path)
    validation_fraction  file datasets: fraction held out (by a hash of the prompt or text)
    split_paragraphs     text_folder: one document per blank-line paragraph instead of per file
    records_name         preferences: the name given to write_preferences
"""

from ml_collections import ConfigDict


def _dataset(name: str, **fields) -> ConfigDict:
    config = ConfigDict(dict(name=name, seed=0, num_train=20_000, num_validation=1_000, path="",
                             validation_path="", validation_fraction=0.05, split_paragraphs=False,
                             records_name=""))
    config.update(fields)
    return config


def reviews(seed: int = 0, num_train: int = 20_000, num_validation: int = 1_000) -> ConfigDict:
    """Embedded generated reviews (text, topic, sentiment) for pre-training; no network."""
    return _dataset("reviews", seed=seed, num_train=num_train, num_validation=num_validation)


def reviews_sft(seed: int = 0, num_train: int = 20_000, num_validation: int = 1_000) -> ConfigDict:
    """The embedded reviews as (prompt, response) pairs for SFT, and prompts for sampling/PPO."""
    return _dataset("reviews_sft", seed=seed, num_train=num_train, num_validation=num_validation)


def arithmetic(seed: int = 0, num_train: int = 20_000, num_validation: int = 1_000, num_test: int = 1_000,
               min_digits: int = 1, max_digits: int = 3, operations: str = "+-", mul_digits: int = 1) -> ConfigDict:
    """Generated arithmetic problems with worked solutions ending in '#### N' (SFT pairs; the
    answer is checked by rlhf_jax.data.arithmetic:arithmetic_reward); train/validation/test.
    Its own fields: num_test, min_digits / max_digits (operand sizes), operations (a subset of
    '+-*'), mul_digits (digits of the second factor of '*')."""
    return _dataset("arithmetic", seed=seed, num_train=num_train, num_validation=num_validation, num_test=num_test,
                    min_digits=min_digits, max_digits=max_digits, operations=operations, mul_digits=mul_digits)


def text_folder(path: str = "", validation_path: str = "", validation_fraction: float = 0.05,
                split_paragraphs: bool = False) -> ConfigDict:
    """Your own .txt files for pre-training (one document per file, or per paragraph)."""
    return _dataset("text_folder", path=path, validation_path=validation_path,
                    validation_fraction=validation_fraction, split_paragraphs=split_paragraphs)


def jsonl_sft(path: str = "", validation_path: str = "",
              validation_fraction: float = 0.05) -> ConfigDict:
    """SFT pairs from JSONL: {"prompt": ..., "response": ...} per line."""
    return _dataset("jsonl_sft", path=path, validation_path=validation_path,
                    validation_fraction=validation_fraction)


def preferences_jsonl(path: str = "", validation_path: str = "",
                      validation_fraction: float = 0.1) -> ConfigDict:
    """Preferences from JSONL: {"prompt", "chosen", "rejected", optional "margin", "metadata"}."""
    return _dataset("preferences_jsonl", path=path, validation_path=validation_path,
                    validation_fraction=validation_fraction)


def preferences(records_name: str = "preferences") -> ConfigDict:
    """Preferences stored earlier by rlhf_jax.data.write_preferences(records, data_dir, name)."""
    return _dataset("preferences", records_name=records_name)


def imdb_reviews() -> ConfigDict:
    """TFDS imdb_reviews (text, label); needs the network the first time it is prepared."""
    return _dataset("imdb_reviews")
