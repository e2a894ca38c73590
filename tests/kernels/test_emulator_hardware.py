"""The emulator's semantics against the hardware: the probe kernels of tests/emu_kernels/probe.cu
on a real GPU give what tests/kernels/test_emulator.py expects of them on the emulator (warp shuffles,
votes, geometry, scalars, atomics), so both follow CUDA's definitions and not just each other."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from hvd_compress.backends import cuda
from warp_cases import PROBE_DIR, WARP_CASES, expected_warp_op, sequential_sums, warp_input

PROBE = str(PROBE_DIR / "probe.cu")


def test_probe_kernels_compile_with_nvrtc():
    """probe.cu is plain CUDA: NVRTC compiles it with the runtime options (no GPU needed)."""
    try:
        cuda.nvrtc_version()
    except ImportError:
        pytest.skip("no NVRTC binding")
    cubin, _ = cuda.compile_cubin(PROBE, "90")
    assert cubin[:4] == b"\x7fELF"


@pytest.mark.gpu
def test_probe_kernels_on_the_gpu():
    warp_ops = cuda.kernel(PROBE, "probe_warp_ops", "cuda")
    for op, arg, width in WARP_CASES:
        v = warp_input(op)
        out = torch.empty(512, dtype=torch.int32, device="cuda")
        cuda.launch(warp_ops, 2, 256, (v.cuda(), out, np.int32(op), np.int32(arg), np.int32(width)))
        assert np.array_equal(out.cpu().numpy(), expected_warp_op(v.numpy(), op, arg, width)), (op, arg, width)

    x = torch.randn(4 * 256)
    sums = torch.empty(4, device="cuda")
    cuda.launch(cuda.kernel(PROBE, "probe_block_sum", "cuda"), 4, 256, (x.cuda(), sums, np.int32(1)))
    assert np.array_equal(sums.cpu().numpy(), sequential_sums(x, 256))

    out = torch.zeros(7, dtype=torch.int64, device="cuda")
    cuda.launch(cuda.kernel(PROBE, "probe_scalars", "cuda"), 1, 1,
                (np.int64(-2 ** 40 - 3), np.int32(-7), np.float32(-1.5), np.uint64(2 ** 64 - 5),
                 np.uint8(250), np.int16(-300), np.float64(2.25), out))
    assert out.tolist() == [-2 ** 40 - 3, -7, int(np.float32(-1.5).view(np.int32)), -5, 250, -300, 9]

    count = torch.zeros(1, dtype=torch.int32, device="cuda")
    bits = torch.zeros(1, dtype=torch.int32, device="cuda")
    cuda.launch(cuda.kernel(PROBE, "probe_atomics", "cuda"), 3, 100, (count, bits))
    assert count.item() == 300 and bits.item() == -1

    grid, block = (3, 2, 2), (4, 3, 2)
    dims = torch.full((6 * 12 * 24,), -1, dtype=torch.int32, device="cuda")
    cuda.launch(cuda.kernel(PROBE, "probe_dims", "cuda"), grid, block, (dims,))
    rows = dims.view(-1, 6).cpu().numpy()
    assert rows[:, :3].max(0).tolist() == [3, 2, 1] and rows[:, 3:].max(0).tolist() == [2, 1, 1]
    assert len({tuple(r) for r in rows}) == len(rows)
