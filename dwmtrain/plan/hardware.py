"""The accelerators the planner knows: memory per device and dense bf16 peak."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass

from dwmtrain.accelerators import peak_flops
from dwmtrain.procs import host_memory

GIB = 2**30


@dataclass(frozen=True)
class Device:
    name: str
    memory_bytes: int  #: what one process may use: the device's memory (CPU ranks: the host's, shared by its ranks)
    peak_flops: float | None  #: dense bf16 FLOP/s (None: unknown; no time estimate)
    accelerator: str  #: cuda | cpu: decides the training dtype (resolve_precision) and the runtime's footprint


#: --gpu name -> (the name shown, memory as nvidia-smi reports it in MiB, dense bf16 peak: dwmtrain.accelerators)
GPUS = {
    "h100": ("H100 80GB", 81_559, peak_flops("H100 SXM5")),
    "h100-pcie": ("H100 PCIe 80GB", 81_559, peak_flops("H100 PCIe")),
    "h200": ("H200 141GB", 143_771, peak_flops("H200")),
    "a100": ("A100 80GB", 81_920, peak_flops("A100")),
}

#: per process, beyond tensors: the CUDA context, cuBLAS/NCCL workspaces and the caching allocator's slack (a
#: common rule of thumb, not measured here: no GPU was lent); on CPU ranks the resident Python + torch + DeepSpeed +
#: transformers stack with gloo (measured here: 0.39 GiB) plus DeepSpeed's shared-memory all-reduce buffer (66 MB)
RUNTIME_BYTES = {"cuda": int(2.0 * GIB), "cpu": int(0.39 * GIB) + 66 * 2**20}


def host_memory_bytes() -> int:
    """This machine's RAM (MemTotal)."""
    return host_memory("MemTotal") or os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def parse_device(spec: str, ranks_per_node: int = 1) -> Device:
    """``h100`` (SXM5) | ``h100-pcie`` | ``h200`` | ``a100`` | ``cpu`` (this host's RAM shared by its ranks) | a
    memory size (``48``, ``48GiB``, ``40GB``: an unnamed GPU of that much, no time estimate)."""
    from dwmtrain.errors import ConfigError

    s = spec.strip().lower()
    if s in GPUS:
        name, mib, peak = GPUS[s]
        return Device(name, mib * 2**20, peak, "cuda")
    if s == "cpu":
        return Device("CPU ranks", host_memory_bytes() // max(ranks_per_node, 1), None, "cpu")
    m = re.fullmatch(r"(\d+(?:\.\d+)?)\s*(gib|gb|g)?", s)
    if not m:
        raise ConfigError(f"--gpu {spec}: not {', '.join(GPUS)}, cpu or a memory size (80, 80GiB, 141GB)")
    scale = 1e9 if m.group(2) == "gb" else GIB
    return Device(f"GPU of {spec}", int(float(m.group(1)) * scale), None, "cuda")
