"""Dense bf16 peak FLOP/s of the GPUs people train on: the denominator of MFU (the trainer's metrics) and of the
planner's time estimates. Dense, not the "with sparsity" figure the datasheets print first (twice as large).

Sources, NVIDIA's datasheets (BF16 Tensor Core, with sparsity / 2):
  H100 SXM5 1,979 -> 989 TFLOP/s; H100 PCIe 1,513 -> 756; H100 NVL 1,671 -> 835 (H100 datasheet, 2023)
  H200 SXM 1,979 -> 989; H200 NVL 1,671 -> 835 (H200 datasheet, 2024)
  A100 SXM4 and PCIe 624 -> 312 (A100 datasheet, 2021); L40S 733 -> 366 (L40S datasheet)
  RTX A6000 309.7 -> 155 (RTX A6000 datasheet)
"""

from __future__ import annotations

import os

#: (what ``torch.cuda.get_device_name()`` contains, dense bf16 TFLOP/s): the first match wins, so the PCIe and NVL
#: variants come before the plain name (their SXM sibling): "NVIDIA H100 PCIe" is not an SXM5 part
DENSE_BF16_TFLOPS: tuple[tuple[str, float], ...] = (
    ("H100 PCIe", 756.0),
    ("H100 NVL", 835.0),
    ("H200 NVL", 835.0),
    ("H100", 989.0),  # "NVIDIA H100 80GB HBM3": SXM5
    ("H200", 989.0),  # "NVIDIA H200": SXM
    ("H800", 989.0),
    ("A100", 312.0),
    ("A800", 312.0),
    ("L40S", 366.0),
    ("A6000", 155.0),
)


def peak_flops(device_name: str) -> float | None:
    """Dense bf16 FLOP/s of the device named ``device_name`` (None: unknown, or a CPU); ``DWMTRAIN_PEAK_TFLOPS``
    overrides it."""
    if os.environ.get("DWMTRAIN_PEAK_TFLOPS"):
        return float(os.environ["DWMTRAIN_PEAK_TFLOPS"]) * 1e12
    for key, tflops in DENSE_BF16_TFLOPS:
        if key in device_name:
            return tflops * 1e12
    return None
