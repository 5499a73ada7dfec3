"""Device mesh configs: axis sizes, -1 = all remaining devices."""

import ml_collections


def data_parallel():
    """Every device holds a full copy of the parameters; the batch is split."""
    return ml_collections.ConfigDict(dict(data=-1, fsdp=1))


def fsdp():
    """Parameters and optimizer state split on the `fsdp` axis, the batch split on all devices."""
    return ml_collections.ConfigDict(dict(data=1, fsdp=-1))
