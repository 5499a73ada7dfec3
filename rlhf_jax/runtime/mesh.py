"""One device mesh per run, built from the config, and the shardings every stage uses.

Axes: `data` (batch split, parameters replicated) and `fsdp` (batch split too, parameters and
optimizer state split along their largest divisible dimension). Batches are sharded on both
axes together. The same code runs on 1 CPU, 8 fake CPU devices
(`XLA_FLAGS=--xla_force_host_platform_device_count=8`), one GPU, or many hosts after
`jax.distributed.initialize()`.
"""

from __future__ import annotations

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from rlhf_jax.runtime import checks

BATCH_AXES = ("data", "fsdp")


def make_mesh(config) -> Mesh:
    """`config.data` and `config.fsdp` are axis sizes; -1 takes all remaining devices.

    Explicit sizes whose product is smaller than the device count use the first devices
    (e.g. data=1, fsdp=1 runs on one device: the reference for multi-device tests).
    """
    n = jax.device_count()
    data, fsdp = int(config.data), int(config.fsdp)
    if data > 0 and fsdp > 0 and data * fsdp < n:
        devices = jax.devices()[: data * fsdp]
        return jax.make_mesh((data, fsdp), BATCH_AXES, axis_types=(AxisType.Auto, AxisType.Auto), devices=devices)
    if data == -1 and fsdp == -1:
        raise ValueError("mesh: at most one of mesh.data and mesh.fsdp may be -1")
    if data == -1:
        data = n // fsdp
    if fsdp == -1:
        fsdp = n // data
    if data * fsdp != n:
        raise ValueError(f"mesh: data={config.data} x fsdp={config.fsdp} does not cover the {n} devices")
    # Auto axes: shardings are given explicitly at the jit boundary (jax.make_mesh's default is Explicit).
    return jax.make_mesh((data, fsdp), BATCH_AXES, axis_types=(AxisType.Auto, AxisType.Auto))


def batch_size_per_mesh(mesh: Mesh) -> int:
    return mesh.shape["data"] * mesh.shape["fsdp"]


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Leading (batch) axis split across every device."""
    return NamedSharding(mesh, P(BATCH_AXES))


def stacked(shardings):
    """The same shardings for arrays stacked on a new, unsplit leading axis (e.g. seeds)."""
    return jax.tree.map(lambda s: NamedSharding(s.mesh, P(None, *s.spec)), shardings)


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def fsdp_spec(shape, fsdp_size: int) -> P:
    """Split the largest dimension divisible by the fsdp size; replicate small or odd arrays."""
    if fsdp_size == 1 or not shape:
        return P()
    order = sorted(range(len(shape)), key=lambda i: -shape[i])
    for i in order:
        if shape[i] % fsdp_size == 0 and shape[i] >= fsdp_size:
            spec = [None] * len(shape)
            spec[i] = "fsdp"
            return P(*spec)
    return P()


def param_shardings(mesh: Mesh, tree):
    """Shardings for params / optimizer state: replicated, or FSDP-split when mesh.fsdp > 1."""
    fsdp_size = mesh.shape["fsdp"]
    return jax.tree.map(lambda x: NamedSharding(mesh, fsdp_spec(np.shape(x), fsdp_size)), tree)


def shard_state(state, mesh: Mesh):
    """Place a train state on the mesh (replicated or FSDP-split); returns (state, shardings)."""
    shardings = param_shardings(mesh, state)
    return jax.device_put(state, shardings), shardings


def process_block(sharding: NamedSharding, shape) -> tuple[slice, ...]:
    """The block of a global array of `shape` that this process's devices hold under `sharding`:
    one slice per dimension. (One process: the whole array.) Raises when those devices do not
    hold one contiguous block, which `jax.make_array_from_process_local_data` needs."""
    indices = list(sharding.addressable_devices_indices_map(tuple(shape)).values())
    block = []
    for dim, size in enumerate(shape):
        parts = {idx[dim].indices(size)[:2] for idx in indices}
        start, stop = min(a for a, _ in parts), max(b for _, b in parts)
        covered = sum(b - a for a, b in parts)
        if covered != stop - start:
            raise ValueError(f"mesh: the devices of process {jax.process_index()} hold no contiguous block of "
                             f"dimension {dim} of an array {tuple(shape)}: order the mesh devices by process")
        block.append(slice(start, stop))
    return tuple(block)


def put_global(x, sharding: NamedSharding) -> jax.Array:
    """A global host array (the same on every process) as a jax.Array under `sharding`. Each
    process hands over only its own block; on one process this is `jax.device_put`."""
    x = np.asarray(x)
    return jax.make_array_from_process_local_data(sharding, x[process_block(sharding, x.shape)], x.shape)


def shard_batch(batch, mesh: Mesh):
    """Place a global host batch (pytree of arrays with a leading batch axis; the same on every
    process) on the mesh, split over every device. On several processes each keeps only its rows.
    """
    sharding = batch_sharding(mesh)
    n = batch_size_per_mesh(mesh)

    def put(x):
        x = np.asarray(x)
        if x.shape[0] % n:
            raise ValueError(f"batch dimension {x.shape[0]} is not divisible by the {n} devices of the mesh")
        return put_global(x, sharding)

    return jax.tree.map(put, batch)


def local_block(x: jax.Array) -> tuple[tuple[slice, ...], np.ndarray]:
    """(block, values): the block of a global array this process holds (mesh.process_block), on
    the host. Host-side Python (a reward function, decoding) works on these values, and
    `from_local_block` assembles its results into a global array again. One process: all of x."""
    block = process_block(x.sharding, x.shape)
    values = np.empty([b.stop - b.start for b in block], x.dtype)
    for shard in x.addressable_shards:  # (replicas of a part write the same values twice)
        at = tuple(slice(i.indices(n)[0] - b.start, i.indices(n)[1] - b.start)
                   for i, b, n in zip(shard.index, block, x.shape))
        values[at] = np.asarray(shard.data)
    return block, values


def from_local_block(values, like: jax.Array) -> jax.Array:
    """The global array shaped and sharded like `like` whose block on this process is `values`
    (values keep their own dtype: `like` gives the layout only)."""
    return jax.make_array_from_process_local_data(like.sharding, np.asarray(values), like.shape)


def host_copy(tree):
    """Every array of a pytree whole on this host: for host-side work (sampling a text table)
    that must not enter a collective. Replicated arrays are read locally, others gathered."""
    def get(x):
        if not isinstance(x, jax.Array) or x.is_fully_addressable:
            return x
        if x.is_fully_replicated:
            return np.asarray(x.addressable_data(0))

        return np.asarray(multihost_utils.process_allgather(x, tiled=True))

    return jax.tree.map(get, tree)


# ----------------------------------------------------------------------------- config checks (stages.registry.validate runs them)


def mesh_devices(c) -> int | None:
    """Check config.mesh against the devices there are; returns how many the mesh spans."""
    data, fsdp = c.get("mesh.data"), c.get("mesh.fsdp")
    if data is checks.MISSING or fsdp is checks.MISSING:
        return None
    n = jax.device_count()
    for key, size in (("mesh.data", data), ("mesh.fsdp", fsdp)):
        if not isinstance(size, int) or isinstance(size, bool) or not (size == -1 or size >= 1):
            c.fail(key, size, "expected -1 (all remaining devices) or an integer >= 1")
    if data == -1 and fsdp == -1:
        c.fail("mesh.fsdp", fsdp, "at most one of mesh.data and mesh.fsdp may be -1")
    if data > 0 and fsdp > 0:
        if data * fsdp > n:
            c.fail("mesh.data", data, f"mesh.data x mesh.fsdp = {data * fsdp} is more than the {n} devices there are")
        return data * fsdp
    key, size = ("mesh.fsdp", fsdp) if data == -1 else ("mesh.data", data)
    if n % size:
        c.fail(key, size, f"expected a divisor of the {n} devices there are (the other axis takes the rest)")
    return n


def check_batch_split(c):
    """The batch is split over every device of the mesh."""
    devices, batch_size = mesh_devices(c), c.get("batch_size")
    if devices and batch_size is not checks.MISSING and batch_size % devices:
        c.fail("batch_size", batch_size, f"expected a multiple of the {devices} devices of the mesh")
