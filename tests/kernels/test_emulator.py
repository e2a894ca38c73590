"""The SIMT emulator itself (tests/emu_kernels/simt.h, tests/emulator.py): warp
collectives against their CUDA definitions, block geometry, argument passing and checking, and
the mistakes it must catch: races (a missing __syncthreads() in the real top-k kernels and in a
small probe), barrier divergence, deadlock, inconsistent warp collectives, out-of-bounds and
const writes, uninitialised shared memory, faults.  The codec kernels themselves run on the
emulator in the ``[emu]`` variants of the GPU tests (conftest.py)."""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import hvd_compress
from hvd_compress.backends import cuda, emulate, kernel_backend
from emulator import SCHEDULES, EmulatedBackend, EmulatorError, kernel_names
from warp_cases import PROBE_DIR, WARP_CASES, expected_warp_op, sequential_sums, warp_input
from hvd_compress.codecs import (OneBitCodec, QSGDCodec, RandomKCodec, RandomKey, ScaledSignCodec,
                                  SignCodec, SketchCodec, StochasticFP16Codec, TernGradCodec, TopKCodec)
from hvd_compress.codecs.base import Payload
from hvd_compress.codecs.esgd import momentum_step
from hvd_compress.codecs.laq import InnovationCodec
from hvd_compress.codecs.rng import random_u32
from hvd_compress.codecs.ternary import AdaCompCodec, STCCodec
from hvd_compress.codecs.topk import GradDropCodec

pytestmark = pytest.mark.emu

POLICIES = [s for s in SCHEDULES if s != "mixed"]


def probe(name: str, grid, block, args, seed: int = 0, **options) -> EmulatedBackend:
    backend = EmulatedBackend(seed, kernel_dir=PROBE_DIR, **options)
    backend.launch(backend.kernel("probe.cu", name), grid, block, args)
    return backend


# ---- semantics --------------------------------------------------------------------------------


@pytest.mark.parametrize("schedule", POLICIES)
@pytest.mark.parametrize("op, arg, width", WARP_CASES)
def test_warp_collectives(op, arg, width, schedule):
    v = warp_input(op)
    out = torch.empty_like(v)
    probe("probe_warp_ops", 2, 256, (v, out, np.int32(op), np.int32(arg), np.int32(width)),
          seed=op, schedule=schedule)
    assert np.array_equal(out.numpy(), expected_warp_op(v.numpy(), op, arg, width))


def test_shuffles_of_64_bit_and_float_values():
    gen = torch.Generator().manual_seed(0)
    d = torch.randn(32, dtype=torch.float64, generator=gen)
    u = torch.randint(-2 ** 62, 2 ** 62, (32,), generator=gen)
    f = torch.randn(32, generator=gen)
    f_in = f.clone()
    d_out, u_out = torch.empty_like(d), torch.empty_like(u)
    probe("probe_shfl_types", 1, 32, (d, u, f, d_out, u_out))
    lanes = np.arange(32)
    assert np.array_equal(d_out.numpy(), d.numpy()[lanes ^ 5])
    assert np.array_equal(u_out.numpy(), np.where(lanes + 3 < 32, u.numpy()[np.minimum(lanes + 3, 31)], u.numpy()))
    assert np.array_equal(f.numpy(), f_in.numpy()[31 - lanes])


@pytest.mark.parametrize("grid, block", [((3, 2, 2), (4, 3, 2)), ((5,), (33,)), ((1, 4), (64, 1, 2))])
def test_block_and_grid_coordinates(grid, block):
    g3, b3 = (*grid, 1, 1)[:3], (*block, 1, 1)[:3]
    total = int(np.prod(g3) * np.prod(b3))
    out = torch.full((6 * total,), -1, dtype=torch.int32)
    probe("probe_dims", grid, block, (out,))
    rows = out.view(-1, 6).numpy()
    tz, ty, tx = np.meshgrid(*(np.arange(b) for b in b3[::-1]), indexing="ij")
    bz, by, bx = np.meshgrid(*(np.arange(g) for g in g3[::-1]), indexing="ij")
    threads = np.stack([tx.ravel(), ty.ravel(), tz.ravel()], 1)
    blocks = np.stack([bx.ravel(), by.ravel(), bz.ravel()], 1)
    expected = np.concatenate([np.tile(threads, (len(blocks), 1)), np.repeat(blocks, len(threads), 0)], 1)
    assert np.array_equal(rows, expected)


def test_scalar_arguments_arrive_intact():
    out = torch.zeros(7, dtype=torch.int64)
    probe("probe_scalars", 1, 1, (np.int64(-2 ** 40 - 3), np.int32(-7), np.float32(-1.5),
                                  np.uint64(2 ** 64 - 5), np.uint8(250), np.int16(-300),
                                  np.float64(2.25), out))
    assert out.tolist() == [-2 ** 40 - 3, -7, int(np.float32(-1.5).view(np.int32)), -5, 250, -300, 9]


def test_pointer_arrays_are_staged_and_left_unchanged():
    backend = EmulatedBackend(kernel_dir=PROBE_DIR)
    parts = [torch.randn(1000) for _ in range(3)]
    before = [p.clone() for p in parts]
    out = torch.empty(1000)
    backend.launch(backend.kernel("probe.cu", "probe_pointer_array"), 4, 256,
                   (backend.ptr_array(parts), np.int32(3), np.int64(1000), out))
    assert torch.equal(out, parts[0] + parts[1] + parts[2])
    assert all(torch.equal(a, b) for a, b in zip(parts, before))


def test_atomics():
    count, bits = torch.zeros(1, dtype=torch.int32), torch.zeros(1, dtype=torch.int32)
    probe("probe_atomics", 3, 100, (count, bits))
    assert count.item() == 300 and bits.item() == -1


def test_shared_memory_in_templates_runs_one_block_at_a_time():
    backend = EmulatedBackend(5, kernel_dir=PROBE_DIR)
    kernel = backend.kernel("probe.cu", "probe_template_shared")
    assert any("probe_tile_sum" in name for name in kernel.module.private_statics)
    assert kernel.module.shared_bytes >= 4 * 256           # the other kernels' arrays
    x, out = torch.randn(6 * 128), torch.empty(6)
    backend.launch(kernel, 6, 128, (x, out))
    assert np.array_equal(out.numpy(), sequential_sums(x, 128))


def test_every_schedule_is_drawn():
    backend = EmulatedBackend(7, kernel_dir=PROBE_DIR)
    v, out = torch.zeros(64, dtype=torch.int32), torch.empty(64, dtype=torch.int32)
    for _ in range(30):
        backend.launch(backend.kernel("probe.cu", "probe_warp_ops"), 1, 64,
                       (v, out, np.int32(7), np.int32(0), np.int32(32)))
    assert set(backend.schedules) == set(POLICIES)
    assert backend.stats["warp_ops"] == 30 * 64 and backend.stats["blocks"] == 30


def test_ucontext_fallback(monkeypatch, tmp_path):
    """The portable context switch (ucontext) gives the same results as the x86-64 one."""
    monkeypatch.setenv("HVD_COMPRESS_EMU_UCONTEXT", "1")
    monkeypatch.setenv("HVD_COMPRESS_EMU_CACHE", str(tmp_path))
    backend = EmulatedBackend(3, kernel_dir=PROBE_DIR)
    kernel = backend.kernel("probe.cu", "probe_block_sum")
    assert kernel.module.ucontext
    x, out = torch.randn(4 * 256), torch.empty(4)
    backend.launch(kernel, 4, 256, (x, out, np.int32(1)))
    assert np.array_equal(out.numpy(), sequential_sums(x, 256))


# ---- argument checks ----------------------------------------------------------------------------

def test_rejects_mistyped_arguments():
    backend = EmulatedBackend(kernel_dir=PROBE_DIR)
    k = backend.kernel("probe.cu", "probe_oob")                     # (float *out, long long n, long long offset)
    out = torch.zeros(4)
    with pytest.raises(TypeError, match=r"argument 1 \(long long int\): needs np.int64, got np.int32"):
        backend.launch(k, 1, 32, (out, np.int32(4), np.int64(0)))
    with pytest.raises(TypeError, match="numpy scalar"):
        backend.launch(k, 1, 32, (out, 4, np.int64(0)))
    with pytest.raises(TypeError, match=r"torch.int32 tensor does not fit"):
        backend.launch(k, 1, 32, (out.int(), np.int64(4), np.int64(0)))
    with pytest.raises(TypeError, match="takes 3 arguments"):
        backend.launch(k, 1, 32, (out, np.int64(4)))
    with pytest.raises(TypeError, match="tensor for a scalar"):
        backend.launch(k, 1, 32, (out, out, np.int64(0)))
    with pytest.raises(TypeError, match="null pointer"):
        backend.launch(backend.kernel("probe.cu", "probe_const_write"), 1, 32, (np.uint64(12345), out))
    with pytest.raises(ValueError, match="at least one tensor"):
        backend.launch(k, 1, 32, (np.uint64(0), np.int64(4), np.int64(0)))
    with pytest.raises(ValueError, match="contiguous"):
        backend.launch(k, 1, 32, (torch.zeros(4, 2)[:, 0], np.int64(4), np.int64(0)))
    with pytest.raises(KeyError, match="no kernel 'nope'"):
        backend.kernel("probe.cu", "nope")


def test_rejects_bad_launch_geometry():
    backend = EmulatedBackend(kernel_dir=PROBE_DIR)
    out = torch.zeros(2048, dtype=torch.int32)
    bounded = backend.kernel("probe.cu", "probe_bounded")
    backend.launch(bounded, 1, 64, (out,))
    with pytest.raises(ValueError, match=r"__launch_bounds__\(64\)"):
        backend.launch(bounded, 1, 128, (out,))
    with pytest.raises(ValueError, match="invalid block"):
        backend.launch(backend.kernel("probe.cu", "probe_dims"), 1, 2048, (out,))
    with pytest.raises(NotImplementedError, match="dynamic shared memory"):
        backend.launch(bounded, 1, 64, (out,), shared_mem=16)


@pytest.mark.parametrize("source", sorted(p.name for p in cuda.kernel_dir().glob("*.cu")))
def test_kernel_names_sees_every_global(source):
    text = (cuda.kernel_dir() / source).read_text()
    found = kernel_names(text)
    plain = re.sub(r"__launch_bounds__\([^)]*\)", "", re.sub(r"/\*.*?\*/", "", text, flags=re.S))
    assert [n for n, _, _ in found] == re.findall(r"__global__\s+void\s+(\w+)\s*\(", plain)
    assert all(params.count("(") == params.count(")") for _, _, params in found)
    if source == "topk.cu":
        assert dict((n, b) for n, b, _ in found)["hvdc_topk_count"] == "TOPK_THREADS"


# ---- mistakes it must catch ---------------------------------------------------------------------

@pytest.mark.parametrize("schedule", POLICIES)
def test_missing_barrier_gives_a_wrong_sum(schedule):
    """probe_block_sum without its __syncthreads(): thread 0 sums shared slots other threads
    have not written yet (0xFF = NaN in a fresh block) under every schedule, for most seeds."""
    x = torch.randn(4 * 256)
    wrong = 0
    for seed in range(8):
        good, bad = torch.empty(4), torch.empty(4)
        probe("probe_block_sum", 4, 256, (x, good, np.int32(1)), seed=seed, schedule=schedule)
        probe("probe_block_sum", 4, 256, (x, bad, np.int32(0)), seed=seed, schedule=schedule)
        assert np.array_equal(good.numpy(), sequential_sums(x, 256))
        wrong += not torch.equal(bad, good)
    assert wrong >= 6, f"the race showed for {wrong} of 8 seeds"


def test_barrier_divergence_is_reported():
    with pytest.raises(EmulatorError, match=r"barrier divergence"):
        probe("probe_divergent_barrier", 1, 256, (torch.zeros(256, dtype=torch.int32), np.int32(100)))
    probe("probe_divergent_barrier", 1, 256, (torch.zeros(256, dtype=torch.int32), np.int32(256)))


def test_deadlock_is_reported():
    with pytest.raises(EmulatorError, match=r"deadlock: \d+ thread\(s\) wait at __syncthreads\(\), \d+ at warp "
                                            r"collectives \(thread \d+ at __syncwarp"):
        probe("probe_deadlock", 1, 64, (torch.zeros(64, dtype=torch.int32),))


@pytest.mark.parametrize("name, message", [
    ("probe_mismatch", r"(__ballot_sync|__shfl_xor_sync) \(mask 0xffffffff\) while lanes 0x[0-9a-f]+ of its warp "
                       r"wait at (__shfl_xor_sync|__ballot_sync)"),
    ("probe_outside_mask", r"__shfl_sync \(mask 0x0000ffff\) reads lane 20, which is not in the mask"),
    ("probe_exited_lane", r"(exited while lanes 0x[0-9a-f]+ of its warp wait for it at __shfl_xor_sync"
                          r"|waits for lanes 0x80000000 that exited)"),
])
def test_inconsistent_warp_collectives_are_reported(name, message):
    for seed in range(3):
        with pytest.raises(EmulatorError, match=message):
            probe(name, 1, 64, (torch.zeros(64, dtype=torch.int32),), seed=seed)


@pytest.mark.parametrize("offset, where", [(0, "past the end of"), (5, "past the end of"),
                                           (-17, "before")])
def test_out_of_bounds_writes_are_reported(offset, where):
    out = torch.zeros(16)
    with pytest.raises(EmulatorError, match=f"wrote 4 byte\\(s\\) {where} probe_oob argument 0 \\(float\\*\\)"):
        probe("probe_oob", 1, 32, (out, np.int64(16), np.int64(offset)))
    assert torch.equal(out, torch.zeros(16))


def test_writes_through_const_pointers_are_reported():
    x = torch.ones(32)
    with pytest.raises(EmulatorError, match=r"wrote through a const pointer: probe_const_write argument 0"):
        probe("probe_const_write", 1, 32, (x, torch.empty(32)))
    assert torch.equal(x, torch.ones(32))


def test_uninitialised_shared_memory_reads_nan():
    out = torch.zeros(3 * 256)
    probe("probe_uninit_shared", 3, 256, (out,))
    out = out.view(3, 256)
    assert bool((out[:, :128] == 1).all()) and bool(out[:, 128:].isnan().all())


def test_faults_are_reported_not_fatal():
    with pytest.raises(EmulatorError, match=r"thread \(0,0,0\): invalid memory access \(SIGSEGV\)"):
        probe("probe_wild", 1, 32, (torch.zeros(4, dtype=torch.int32), np.int64(2 ** 40)))
    with pytest.raises(EmulatorError, match=r"the thread's stack overflowed"):
        probe("probe_stack", 1, 2, (torch.zeros(2, dtype=torch.int32), np.int32(1000)))
    out = torch.zeros(2, dtype=torch.int32)                     # and the emulator still works
    probe("probe_stack", 1, 2, (out, np.int32(3)))
    assert out.tolist() == [6, 6]


# ---- the real kernels with a barrier removed -----------------------------------------------------

def kernels_without_barrier(tmp_path: Path, source: str, which: int) -> Path:
    """A copy of kernels/ in which the which-th __syncthreads(); of `source` is removed."""
    for f in cuda.kernel_dir().iterdir():
        if f.suffix in (".cu", ".h", ".cuh"):
            shutil.copy(f, tmp_path)
    text = (tmp_path / source).read_text()
    spots = [m.start() for m in re.finditer(r"__syncthreads\(\);", text)]
    at = spots[which]
    (tmp_path / source).write_text(text[:at] + "/* removed */" + text[at + len("__syncthreads();"):])
    return tmp_path


TOPK_BARRIERS = len(re.findall(r"__syncthreads\(\);", (cuda.kernel_dir() / "topk.cu").read_text()))


#: Runs the top-k encoder under the emulator with the kernels of argv[1] for seeds 0..argv[2]-1;
#: prints, per seed, "match", "differs" or the emulator's error.  In a child process: a kernel
#: with a race may write anywhere.
TOPK_RUN = """
import json, sys, torch
from hvd_compress.backends import emulate
from emulator import EmulatedBackend, EmulatorError
from hvd_compress.codecs import RandomKey, TopKCodec
kernel_dir, seeds = sys.argv[1] if sys.argv[1] != "-" else None, int(sys.argv[2])
key, codec = RandomKey(1, 2, 3), TopKCodec(ratio=0.02)
g = torch.randn(100_000, generator=torch.Generator().manual_seed(1))
r0 = torch.randn(100_000, generator=torch.Generator().manual_seed(99)) * 0.1
r_ref = r0.clone()
ref = codec.encode(g, key, residual=r_ref)
outcomes = []
for seed in range(seeds):
    r = r0.clone()
    try:
        with emulate(EmulatedBackend(seed, kernel_dir=kernel_dir)):
            p = codec.unpadded(codec.encode(g, key, residual=r))
        same = all(torch.equal(ref.parts[k], p.parts[k]) for k in ref.parts) and torch.equal(r, r_ref)
        outcomes.append("match" if same else "differs")
    except EmulatorError as e:
        outcomes.append("error: " + str(e).split(" [")[0][:300])
print(json.dumps(outcomes))
"""


def run_topk(kernel_dir: Path | None, seeds: int, cwd: Path) -> list[str]:
    """TOPK_RUN in a child process that imports the hvd_compress this session tests."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        filter(None, [str(Path(hvd_compress.__file__).resolve().parents[1]), str(Path(__file__).resolve().parents[1]),
                      os.environ.get("PYTHONPATH")])))
    result = subprocess.run([sys.executable, "-c", TOPK_RUN, str(kernel_dir or "-"), str(seeds)],
                            capture_output=True, text=True, timeout=240, cwd=cwd, env=env)
    assert result.returncode == 0, result.stdout + result.stderr
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_topk_intact_matches_for_every_seed(tmp_path):
    assert run_topk(None, 8, tmp_path) == ["match"] * 8


@pytest.mark.parametrize("which", range(TOPK_BARRIERS))
def test_topk_without_a_barrier_fails(tmp_path, which):
    """Each __syncthreads() of kernels/topk.cu matters: without it the emulated top-k differs from
    the C reference (or the emulator reports an out-of-bounds write or a fault) for some of 8
    seeds, while the intact kernels match it for all of them (test above)."""
    outcomes = run_topk(kernels_without_barrier(tmp_path, "topk.cu", which), 8, tmp_path)
    print(f"topk.cu without __syncthreads() #{which}:", *outcomes, sep="\n  ")
    assert outcomes.count("match") < 8, f"removing barrier {which} of topk.cu went unnoticed"


# ---- coverage: every kernel runs on the emulator ---------------------------------------------------

def test_every_kernel_runs_on_the_emulator():
    """Every __global__ function of kernels/*.cu is launched by the codecs' CUDA path under the
    emulator.  A new kernel fails this test until a workload here (and an [emu] test comparing it
    with the C reference) launches it."""
    declared = {name for src in sorted(cuda.kernel_dir().glob("*.cu"))
                for name, _, _ in kernel_names(src.read_text())}
    g, r = torch.randn(20_000), torch.randn(20_000) * 0.1
    with emulate(EmulatedBackend(seed=1)) as backend:
        assert kernel_backend("cpu") is backend and kernel_backend("cuda") is cuda
        random_u32(1000, RandomKey(1, 2, 3))
        for codec in (TernGradCodec(), TernGradCodec(bucket_size=64, clip=None), QSGDCodec(),
                      StochasticFP16Codec(), TopKCodec(), TopKCodec(mode="exact"), OneBitCodec(),
                      ScaledSignCodec(bucket_size=64), SignCodec(),
                      RandomKCodec().with_shared_key(RandomKey(7, 5, 6)),
                      SketchCodec(ratio=0.5).with_shared_key(RandomKey(7, 5, 6))):
            ef = not isinstance(codec, (SignCodec, SketchCodec))
            p = codec.encode(g, RandomKey(4, 5, 6), residual=r.clone() if ef else None)
            codec.decode_accumulate([p, p], torch.zeros(20_000))
        for codec in (AdaCompCodec(), STCCodec(),
                      GradDropCodec().with_layout([torch.Size([100, 100]), torch.Size([10_000])])):
            p = codec.encode(g, RandomKey(4, 5, 6), residual=r.clone())
            codec.decode_accumulate([p, p], torch.zeros(20_000))
        segments = [(0, 12_000, RandomKey(4, 5, 6)), (12_000, 8000, RandomKey(4, 5, 7))]
        for codec in (TernGradCodec(), OneBitCodec(), RandomKCodec().with_shared_key(RandomKey(7, 5, 6))):
            many = codec.encode_many(g, segments, r.clone())
            codec.decode_many([[p, p] for p in many], torch.zeros(20_000), segments)
        laq = InnovationCodec()
        laq.decode_accumulate([laq.encode(g)] * 2, torch.zeros(20_000))
        momentum_step(g, r, r.abs(), 0.9, g.abs().mean().reshape(1), RandomKey(4, 5, 6), torch.empty(20_000))
        bad = Payload(3, {"indices": torch.tensor([2, 1], dtype=torch.int32),
                          "values": torch.ones(2, dtype=torch.float16)})
        with pytest.raises(IndexError):
            TopKCodec().decode_accumulate([bad], torch.zeros(3))
    assert kernel_backend("cpu") is None
    missing = declared - set(backend.launched)
    assert not missing, f"kernels never launched under the emulator: {sorted(missing)}"
