"""Random-k sparsification with a shared mask: the "structured update, random mask" of Konečný,
McMahan, Yu, Richtárik, Suresh, Bacon ("Federated Learning: Strategies for Improving
Communication Efficiency", 2016) and random-k of Stich, Cordonnier, Jaggi ("Sparsified SGD with
Memory", NeurIPS 2018).

With k = max(1, ceil(ratio * n)) and S = {pi(0), ..., pi(k-1)}, pi the permutation of [0, n) that
the **shared key** selects (the same on every rank):

    C(v) = (v_i * c for i in S, in the order of j),   D(C(v))_i = C(v)_j if i = pi(j) else 0,

c = n / k with ``unbiased=True`` (P[i in S] = k / n, so E[D(C(v))] = v; no error feedback), else
c = 1 with error feedback (``residual``: r <- v off S and 0 on S; Stich et al.'s memory: random-k
is a k/n-contraction).  Because every rank keeps the same S, payloads are element-wise summable:
an allreduce of the ``values`` parts gives C of the sum, and :meth:`RandomKCodec.decode_accumulate`
of the summed payload scatters it once.

**Selection** (``kernels/feistel.h``): pi is a keyed Feistel permutation of [0, 2^bits), bits =
ceil(log2 n), walked back into [0, n) (cycle walking), the round functions Philox words of the
shared key, max(6, 32 - 4 bits) rounds (small domains need many: with 4, the 2-subsets of [0, 5)
were far from uniform over keys).  Chosen over the alternatives because it is exact-k (a permutation: k distinct
indices, never more or fewer, unlike Bernoulli(k/n) masks), costs O(k), not O(n) (no pass over
the tensor, no sort: each index is computed on its own from j), and is integer arithmetic only,
so CPU and GPU agree by construction.  "The k smallest Philox words' positions" is exact too but
needs n words and a selection over them every step.  Nothing here is a torch op: the C reference
(``csrc/randk.c``) and the CUDA kernels (``kernels/randk.cu``) compute pi themselves; the
indices are never stored or sent (decode recomputes them).

Wire: ``values``, k fp32 (4k bytes; no indices).  The per-rank ``key`` of :meth:`encode` is not
used: random-k draws nothing per rank.  The caller gives the shared key with
:meth:`RandomKCodec.with_shared_key` (for example (seed, step, tensor_id) without the rank);
workers that used different keys must not be summed.
"""
from __future__ import annotations

import ctypes
import dataclasses
from typing import Sequence, TypeVar

import numpy as np
import torch

from ..backends import cpu, kernel_backend
from . import _quant as q
from .base import Codec, Payload, RandomKey, check_segments, device_constant
from .topk import ceil_ratio

_P, _I64, _U64, _U32, _INT, _F32 = (ctypes.c_void_p, ctypes.c_int64, ctypes.c_uint64, ctypes.c_uint32,
                                    ctypes.c_int, ctypes.c_float)
cpu.register("hvdc_perm_indices", _P, _I64, _I64, _INT, _U64, _U32, _U32, _INT)
cpu.register("hvdc_randk_gather", _P, _INT, _I64, _I64, _INT, _F32, _U64, _U32, _U32, _P, _INT)
cpu.register("hvdc_randk_scatter_acc", _P, _INT, _I64, _I64, _INT, _U64, _U32, _U32, _P, _INT)
cpu.register("hvdc_randk_gather_many", _P, _INT, _I64, _P, _I64, _P, _U64, _U32, _P, _P, _INT)
cpu.register("hvdc_randk_scatter_many", _P, _INT, _I64, _P, _I64, _U64, _U32, _P, _P, _INT)

#: the CUDA source of the random-k kernels (and of hvdc_perm_indices)
SOURCE = "randk.cu"
#: the Feistel permutation works on up to 62 bits (kernels/feistel.h)
_MAX_N = 1 << 62

_Self = TypeVar("_Self", bound="SharedKeyCodec")


class SharedKeyCodec(Codec):
    """A codec whose selection or rotation must be the same on every rank: it is keyed by
    ``shared_key`` (set with :meth:`with_shared_key`), not by the per-rank key of ``encode``."""

    shared_key: RandomKey | None = None

    def with_shared_key(self: _Self, key: RandomKey) -> _Self:
        """This codec keyed by ``key`` (the same on every rank, for example (seed, step,
        tensor_id) without the rank; a fresh one per step).  Encode and decode use it."""
        if not isinstance(key, RandomKey):
            raise TypeError(f"shared key must be a RandomKey, got {key!r}")
        return dataclasses.replace(self, shared_key=key)

    def _shared(self) -> RandomKey:
        if self.shared_key is None:
            raise ValueError(f"{type(self).__name__} needs the key shared by every rank: "
                             f"codec.with_shared_key(RandomKey(seed, step, tensor_id))")
        return self.shared_key


def permutation_bits(n: int) -> int:
    """bits = ceil(log2 n) of the Feistel domain [0, 2^bits) that holds [0, n) (0 for n = 1)."""
    return (n - 1).bit_length()


def random_indices(n: int, k: int, key: RandomKey, device: torch.device | str = "cpu") -> torch.Tensor:
    """pi(0), ..., pi(k-1) of the permutation of [0, n) that ``key`` selects, as int64: k distinct
    indices in [0, n), a pure function of (key, n, k) (a prefix of the k + 1 indices), the same
    from the C reference and the CUDA kernel (or the emulator inside ``backends.emulate()``)."""
    if not 0 <= k <= n < _MAX_N:
        raise ValueError(f"random_indices needs 0 <= k <= n < 2**62, got k={k}, n={n}")
    device = torch.device(device)
    out = torch.empty(k, dtype=torch.int64, device=device)
    if k == 0:
        return out
    kernels = kernel_backend(device)
    if kernels is not None:
        kernels.launch(kernels.kernel(SOURCE, "hvdc_perm_indices", device),
                       kernels.grid_size(k, q.BLOCK, device), q.BLOCK,
                       (out, np.int64(k), np.int64(n), np.int32(permutation_bits(n)), *q.cuda_key(key)))
    else:
        cpu.call("hvdc_perm_indices", q.ptr(out), k, n, permutation_bits(n), key.seed, key.step,
                 key.tensor_id, cpu.threads())
    return out


@dataclasses.dataclass(frozen=True)
class RandomKCodec(SharedKeyCodec):
    """Random-k with a mask shared by every rank; summable payloads of k fp32 values.

    Args:
        ratio: fraction of elements sent, k = max(1, ceil(ratio * n)) (ratio read as the decimal
            it prints as, like :class:`~hvd_compress.codecs.topk.TopKCodec`).
        unbiased: scale the sent values by n / k (an unbiased estimator, no error feedback);
            False (default) sends them as they are and relies on error feedback.
        shared_key: the selection's key, the same on every rank (:meth:`with_shared_key`).
    """

    fixed_size = True
    summable = True

    ratio: float = 0.01
    unbiased: bool = False
    shared_key: RandomKey | None = None
    name = "randomk"

    def __post_init__(self) -> None:
        if not isinstance(self.ratio, (int, float)) or not 0.0 < self.ratio <= 1.0:
            raise ValueError(f"ratio must lie in (0, 1], got {self.ratio!r}")

    def k(self, n: int) -> int:
        """Elements sent: k = max(1, ceil(ratio * n)) for n > 0 (0 for n = 0)."""
        return max(1, ceil_ratio(self.ratio, n)) if n else 0

    def indices(self, n: int, device: torch.device | str = "cpu") -> torch.Tensor:
        """The k positions the shared key selects, in wire order (value j belongs to index j)."""
        return random_indices(n, self.k(n), self._shared(), device)

    def scale(self, n: int) -> float:
        """c: n / k rounded to fp32 with ``unbiased``, else 1."""
        return float(np.float32(n / self.k(n))) if self.unbiased and n else 1.0

    def payload_template(self, numel: int) -> Payload:
        return Payload(numel, {"values": torch.zeros(self.k(numel), dtype=torch.float32)})

    def _encode(self, x: torch.Tensor, key: RandomKey, residual: torch.Tensor | None) -> Payload:
        shared = self._shared()
        if residual is not None and self.unbiased:
            raise ValueError("RandomKCodec(unbiased=True) has no error feedback (the n/k scaling "
                             "would make the residual grow); use unbiased=False with a residual")
        n = x.numel()
        if n >= _MAX_N:
            raise ValueError(f"random-k: {n} elements is too many for the permutation")
        k = self.k(n)
        values = torch.empty(k, dtype=torch.float32, device=x.device)
        if residual is not None:
            residual.add_(x)                   # r <- g + r: one exact fp32 addition, CPU == GPU
        if k:
            src, clear = (residual, 1) if residual is not None else (x, 0)
            bits, c = permutation_bits(n), self.scale(n)
            kernels = kernel_backend(x.device)
            if kernels is not None:
                kernels.launch(kernels.kernel(SOURCE, "hvdc_randk_gather", x.device),
                               kernels.grid_size(k, q.BLOCK, x.device), q.BLOCK,
                               (src, np.int32(clear), np.int64(k), np.int64(n), np.int32(bits),
                                np.float32(c), *q.cuda_key(shared), values))
            else:
                cpu.call("hvdc_randk_gather", q.ptr(src), clear, k, n, bits, c, shared.seed,
                         shared.step, shared.tensor_id, q.ptr(values), cpu.threads())
        return Payload(n, {"values": values})

    def decode_accumulate(self, payloads: Sequence[Payload], out: torch.Tensor) -> torch.Tensor:
        """``out[pi(j)] += values_0[j] + values_1[j] + ...`` (workers in list order; one payload
        when an allreduce summed them already).  Payloads must come from this shared key."""
        n = payloads[0].numel if payloads else 0
        shared = self._shared()
        k = self.k(n)
        flat = q.accumulate_target(payloads, out, {"values": (torch.float32, k)})
        if k == 0:
            return out
        kernels = kernel_backend(flat.device)
        values = q.ptr_array([p.parts["values"] for p in payloads], kernels)
        if kernels is not None:
            kernels.launch(kernels.kernel(SOURCE, "hvdc_randk_scatter_acc", flat.device),
                           kernels.grid_size(k, q.BLOCK, flat.device), q.BLOCK,
                           (values, np.int32(len(payloads)), np.int64(k), np.int64(n),
                            np.int32(permutation_bits(n)), *q.cuda_key(shared), flat))
        else:
            cpu.call("hvdc_randk_scatter_acc", values, len(payloads), k, n, permutation_bits(n),
                     shared.seed, shared.step, shared.tensor_id, q.ptr(flat), cpu.threads())
        return out

    def _for_tensor(self, key: RandomKey) -> "RandomKCodec":
        """This codec keyed for one tensor of a bucket: the shared key with ``key``'s tensor id
        (what the routes' ``codec_for`` gives that tensor)."""
        shared = self._shared()
        return self.with_shared_key(RandomKey(shared.seed, shared.step, key.tensor_id))

    def _batch_layout(self, segments: Sequence[tuple]) -> tuple | None:
        """(layout, ks, ids) when the segments go in one call: several, non-empty, tiling a range."""
        layout = tuple((o, n) for o, n, *_ in segments)
        if len(layout) < 2 or not q.tiled(layout) or not all(0 < n < _MAX_N for _, n in layout):
            return None
        return layout, tuple(self.k(n) for _, n in layout), tuple(key.tensor_id for _, _, key in segments)

    def encode_many(self, x: torch.Tensor, segments: Sequence[tuple[int, int, RandomKey]],
                    residual: torch.Tensor | None) -> list[Payload]:
        """The payloads of the segments ``x[offset:offset + numel]`` (a bucket's tensors; ``x``
        contiguous fp32, checked for inf/NaN already), tensor s selected by the shared key with its key's
        tensor id (the ranks' keys are not used): bit for bit what :meth:`encode` of
        ``_for_tensor(key)`` gives each, in one C call (``hvdc_randk_gather_many``) or one
        launch (``hvdc_seg_randk_gather``)."""
        check_segments(x, residual, segments)
        batch = self._batch_layout(segments)
        if batch is None:
            return [self._for_tensor(key).encode(x[o:o + n], key, check_finite=False,
                                                 residual=None if residual is None else residual[o:o + n])
                    for o, n, key in segments]
        if residual is not None and self.unbiased:
            raise ValueError("RandomKCodec(unbiased=True) has no error feedback (the n/k scaling "
                             "would make the residual grow); use unbiased=False with a residual")
        layout, ks, ids = batch
        shared, dev, nseg = self._shared(), x.device, len(layout)
        lo, hi = layout[0][0], layout[-1][0] + layout[-1][1]
        table = q.segment_table(tuple((o - lo, n) for o, n in layout), dev, ks)
        nitems = table.total(q.ITEM)
        scales = device_constant(tuple(self.scale(n) for _, n in layout), torch.float32, dev)
        ids_t = device_constant(ids, torch.int64, dev)
        values = torch.empty(nitems, dtype=torch.float32, device=dev)
        if residual is not None:
            residual[lo:hi].add_(x[lo:hi])     # r <- g + r: one exact fp32 addition, CPU == GPU
        src, clear = (residual[lo:hi], 1) if residual is not None else (x[lo:hi], 0)
        kernels = kernel_backend(dev)
        if kernels is not None:
            kernels.launch(kernels.kernel(SOURCE, "hvdc_seg_randk_gather", dev),
                           kernels.grid_size(nitems, q.BLOCK, dev), q.BLOCK,
                           (src, np.int32(clear), table.seg, np.int32(nseg), np.int64(nitems), scales,
                            np.uint64(shared.seed), np.uint32(shared.step), ids_t, values))
        else:
            cpu.call("hvdc_randk_gather_many", q.ptr(src), clear, nseg, q.ptr(table.seg), nitems, q.ptr(scales),
                     shared.seed, shared.step, q.ptr(ids_t), q.ptr(values), cpu.threads())
        f = table.bounds[q.ITEM]
        return [Payload(n, {"values": values[f[s]:f[s + 1]]}) for s, (_, n) in enumerate(layout)]

    def decode_many(self, payloads: Sequence[Sequence[Payload]], out: torch.Tensor,
                    segments: Sequence[tuple[int, int, RandomKey]]) -> torch.Tensor:
        """``out[offset:offset + numel] +=`` the payloads of each segment (offset, numel, key),
        workers in list order, tensor s selected as in :meth:`encode_many`: what
        :meth:`decode_accumulate` of ``_for_tensor(key)`` gives each, bit for bit, in one call;
        every payload is checked before anything is written."""
        if not all(len(seg) == 3 and isinstance(seg[2], RandomKey) for seg in segments):
            raise ValueError("random-k's decode_many needs (offset, numel, key) segments: the keys select")
        flat = q.decode_target(payloads, out, segments, lambda n: {"values": (torch.float32, self.k(n))})
        batch = self._batch_layout(segments)
        if batch is None or len({len(ps) for ps in payloads}) != 1:
            for (o, n, key), ps in zip(segments, payloads):
                self._for_tensor(key).decode_accumulate(ps, flat[o:o + n])
            return out
        layout, ks, ids = batch
        shared, dev, nseg, nworkers = self._shared(), out.device, len(layout), len(payloads[0])
        lo = layout[0][0]
        table = q.segment_table(tuple((o - lo, n) for o, n in layout), dev, ks)
        nitems = table.total(q.ITEM)
        kernels = kernel_backend(dev)
        values = q.ptr_array([p.parts["values"] for ps in payloads for p in ps], kernels)
        ids_t = device_constant(ids, torch.int64, dev)
        target = flat[lo:layout[-1][0] + layout[-1][1]]
        if kernels is not None:
            kernels.launch(kernels.kernel(SOURCE, "hvdc_seg_randk_scatter_acc", dev),
                           kernels.grid_size(nitems, q.BLOCK, dev), q.BLOCK,
                           (values, np.int32(nworkers), table.seg, np.int32(nseg), np.int64(nitems),
                            np.uint64(shared.seed), np.uint32(shared.step), ids_t, target))
        else:
            cpu.call("hvdc_randk_scatter_many", values, nworkers, nseg, q.ptr(table.seg), nitems, shared.seed,
                     shared.step, q.ptr(ids_t), q.ptr(target), cpu.threads())
        return out
