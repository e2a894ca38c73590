"""The warp-level probe kernels' cases and their expected results, which the emulator tests and
the same probes on a real GPU (test_emulator_hardware.py) share."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch


PROBE_DIR = Path(__file__).resolve().parents[1] / "emu_kernels"


def sequential_sums(x: torch.Tensor, block: int) -> np.ndarray:
    """fp32 sums of consecutive groups of ``block`` elements, added left to right."""
    return np.add.accumulate(x.view(-1, block).numpy(), axis=1, dtype=np.float32)[:, -1]


def expected_warp_op(v: np.ndarray, op: int, arg: int, width: int) -> np.ndarray:
    """CUDA's definitions (Programming Guide, warp shuffle and vote functions), per warp."""
    out = np.empty_like(v)
    for base in range(0, len(v), 32):
        w = v[base:base + 32]
        for lane in range(32):
            seg = lane & ~(width - 1)
            if op == 0:
                src = seg + (arg & (width - 1))
            elif op == 1:
                src = lane ^ arg if (lane ^ arg) < seg + width else lane
            elif op == 2:
                src = lane - arg if lane - arg >= seg else lane
            elif op == 3:
                src = lane + arg if lane + arg < seg + width else lane
            if op <= 3:
                out[base + lane] = w[src]
            elif op == 4:
                out[base + lane] = np.int32(np.uint32(sum(int(x & 1) << j for j, x in enumerate(w))))
            elif op == 5:
                out[base + lane] = int((w == arg).any())
            elif op == 6:
                out[base + lane] = int((w != arg).all())
            else:
                out[base + lane] = w[lane]
    return out


#: (op, arg, width) of probe_warp_ops: shfl, shfl_xor, shfl_up, shfl_down, ballot, any, all, syncwarp
WARP_CASES = [(0, 5, 32), (0, 35, 8), (1, 1, 32), (1, 16, 32), (1, 4, 8), (1, 19, 16), (2, 1, 32),
              (2, 3, 16), (3, 2, 32), (3, 7, 8), (4, 0, 32), (5, 5, 32), (6, 5, 32), (7, 0, 32)]


def warp_input(op: int) -> torch.Tensor:
    return torch.randint(0, 40, (512,), generator=torch.Generator().manual_seed(op), dtype=torch.int32)
