"""Peak throughputs of the accelerators the benchmarks may run on (no torch import: tests read it cheaply)."""
from __future__ import annotations

# Dense (no sparsity) bf16 tensor-core peaks in FLOP/s, from the vendors' datasheets. The first key found in
# the
# device name wins, so the specific names come before the general ones.
PEAK_BF16 = {"H100 PCIe": 756e12, "H100 NVL": 835e12, "H100": 989e12, "H200 NVL": 835e12, "H200": 989e12,
             "GH200": 989e12, "A100": 312e12, "L40S": 362e12, "A10": 125e12, "RTX 4090": 165e12}


def peak_bf16(device_name: str) -> tuple[float | None, str]:
    "`(peak FLOP/s, the key it was read under)` for a CUDA device name; `(None, '')` when unknown (CPUs)."
    for key, value in PEAK_BF16.items():
        if key in device_name:
            return value, key
    return None, ""
