"""Every test process sees 8 fake CPU devices, so data-parallel and FSDP steps can be compared
with a 1-device mesh (`mesh.data=1, mesh.fsdp=1`) on the same global batch."""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
