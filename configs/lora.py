"""LoRA settings of a stage (`rlhf_jax/lora.py`): `c.lora = lora.off()` in every stage config,
switched on from an experiment or the command line, e.g. `--config.lora.rank=8`.

    rank     adapter rank r; 0 = off (every param trained)
    alpha    the adapters' output is scaled by alpha / rank
    targets  which projections get adapters, comma-separated subset of q,k,v,o,gate,up,down
             (gate exists only with the SwiGLU MLP)
"""

import ml_collections


def off() -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict(dict(rank=0, alpha=16.0, targets="q,k,v,o,gate,up,down"))


def rank(r: int, alpha: float = 16.0, targets: str = "q,k,v,o,gate,up,down") -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict(dict(rank=r, alpha=float(alpha), targets=targets))
