"""VM sizes: the shape of a node (GPUs, GPU model, vCPUs, memory).

The common Azure sizes are built in (GPU families NC, ND and NV up to the H100 sizes, and a
few CPU sizes); configuration may add sizes or override these (`[vm_sizes.<name>]`), and a
local cluster declares its own shape (`Local`: `[local] gpus_per_node` simulated GPUs, and this
machine's vCPUs and memory). Names are matched without regard to case, as Azure does.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True, slots=True)
class VmSize:
    name: str
    gpus: int
    gpu_model: str
    vcpus: int
    memory_mb: int
    max_nodes: int | None = None  # the most nodes a cluster of this size may have (None: any)


def _sizes(gpu_model: str, *rows: tuple[str, int, int, int]) -> list[VmSize]:
    return [VmSize(f"Standard_{n}", g, gpu_model if g else "", c, m * 1024) for n, g, c, m in rows]


BUILT_IN: tuple[VmSize, ...] = tuple([
    # NC: K80, P100 (v2), V100 (v3), T4, A100 80GB (A100 v4), H100 NVL (H100 v5)
    *_sizes("Tesla K80", ("NC6", 1, 6, 56), ("NC12", 2, 12, 112), ("NC24", 4, 24, 224),
            ("NC24r", 4, 24, 224)),
    *_sizes("Tesla P100", ("NC6s_v2", 1, 6, 112), ("NC12s_v2", 2, 12, 224),
            ("NC24s_v2", 4, 24, 448), ("NC24rs_v2", 4, 24, 448)),
    *_sizes("Tesla V100-PCIE-16GB", ("NC6s_v3", 1, 6, 112), ("NC12s_v3", 2, 12, 224),
            ("NC24s_v3", 4, 24, 448), ("NC24rs_v3", 4, 24, 448)),
    *_sizes("Tesla T4", ("NC4as_T4_v3", 1, 4, 28), ("NC8as_T4_v3", 1, 8, 56),
            ("NC16as_T4_v3", 1, 16, 110), ("NC64as_T4_v3", 4, 64, 440)),
    *_sizes("NVIDIA A100 80GB PCIe", ("NC24ads_A100_v4", 1, 24, 220),
            ("NC48ads_A100_v4", 2, 48, 440), ("NC96ads_A100_v4", 4, 96, 880)),
    *_sizes("NVIDIA H100 NVL", ("NC40ads_H100_v5", 1, 40, 320), ("NC80adis_H100_v5", 2, 80, 640)),
    # ND: P40, V100 32GB (v2), A100 40GB/80GB (v4), H100 80GB (v5), H200 (v5)
    *_sizes("Tesla P40", ("ND6s", 1, 6, 112), ("ND12s", 2, 12, 224), ("ND24s", 4, 24, 448),
            ("ND24rs", 4, 24, 448)),
    *_sizes("Tesla V100-SXM2-32GB", ("ND40rs_v2", 8, 40, 672)),
    *_sizes("NVIDIA A100-SXM4-40GB", ("ND96asr_v4", 8, 96, 900)),
    *_sizes("NVIDIA A100-SXM4-80GB", ("ND96amsr_A100_v4", 8, 96, 1900)),
    *_sizes("NVIDIA H100 80GB HBM3", ("ND96isr_H100_v5", 8, 96, 1900)),
    *_sizes("NVIDIA H200", ("ND96isr_H200_v5", 8, 96, 1850)),
    # NV: M60, M60 (v3)
    *_sizes("Tesla M60", ("NV6", 1, 6, 56), ("NV12", 2, 12, 112), ("NV24", 4, 24, 224),
            ("NV12s_v3", 1, 12, 112), ("NV24s_v3", 2, 24, 224), ("NV48s_v3", 4, 48, 448)),
    # CPU only: a job takes whole nodes
    *_sizes("", ("D2s_v3", 0, 2, 8), ("D4s_v3", 0, 4, 16), ("D8s_v3", 0, 8, 32),
            ("D16s_v3", 0, 16, 64), ("F16s_v2", 0, 16, 32)),
])  # fmt: skip


class Catalog:
    """VM sizes by name (case-insensitive)."""

    def __init__(self, sizes: tuple[VmSize, ...] = BUILT_IN) -> None:
        self._sizes = {s.name.lower(): s for s in sizes}

    def with_overrides(self, overrides: Mapping[str, Any]) -> Catalog:
        """A catalog with sizes from configuration added or replaced, e.g.
        `{"Standard_Lab4": {"gpus": 4, "gpu_model": "A40", "vcpus": 16, "memory_mb": 65536}}`;
        ValueError naming the size and field of a bad one."""
        sizes = dict(self._sizes)
        for name, shape in overrides.items():
            sizes[name.lower()] = _size(name, shape)
        return Catalog(tuple(sizes.values()))

    def with_size(self, size: VmSize) -> Catalog:
        return Catalog((*self._sizes.values(), size))

    def get(self, name: str) -> VmSize | None:
        return self._sizes.get(name.lower())

    def names(self) -> list[str]:
        return sorted(s.name for s in self._sizes.values())


CATALOG = Catalog()
LOCAL = "Local"  # the VM size of the local provider's nodes
# local nodes a cluster may have by default ([local] max_nodes): each is an agent process on
# this machine (about 40 MB), so a mistyped resize must not start thousands
DEFAULT_LOCAL_MAX_NODES = 64


def _size(name: str, shape: Any) -> VmSize:
    where = f"[vm_sizes.{name}]"
    if not isinstance(shape, Mapping):
        raise ValueError(f"{where}: must be a table of gpus, vcpus, memory_mb (and gpu_model)")
    unknown = sorted(set(shape) - {"gpus", "gpu_model", "vcpus", "memory_mb"})
    if unknown:
        raise ValueError(f"{where} {unknown[0]}: unknown (give gpus, gpu_model, vcpus, memory_mb)")
    numbers = {}
    for key, least in (("gpus", 0), ("vcpus", 1), ("memory_mb", 1)):
        value = shape.get(key)
        if isinstance(value, bool) or not isinstance(value, int) or value < least:
            raise ValueError(f"{where} {key}: must be a whole number of at least {least}")
        numbers[key] = value
    model = shape.get("gpu_model", "")
    if not isinstance(model, str):
        raise ValueError(f"{where} gpu_model: must be a string")
    return VmSize(name, numbers["gpus"], model, numbers["vcpus"], numbers["memory_mb"])


def local_size(gpus: int, max_nodes: int) -> VmSize:
    """The shape of a local node: `gpus` simulated GPUs, and this machine's CPUs and memory;
    a local cluster has at most `max_nodes` (each an agent process on this machine)."""
    return VmSize(LOCAL, gpus, "simulated" if gpus else "", os.cpu_count() or 1, memory_mb(),
                  max_nodes)  # fmt: skip


def memory_mb() -> int:
    """This machine's memory, in MiB (0: unknown)."""
    with contextlib.suppress(OSError, ValueError):
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") // (1024 * 1024)
    return 0
