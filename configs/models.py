"""Model sizes for experiment files: the presets live with the model code
(`rlhf_jax/models/presets.py`, every field documented there), so the library never imports configs/."""

from rlhf_jax.models.presets import tiny, small, gpt2_124m, llama_tiny  # noqa: F401
