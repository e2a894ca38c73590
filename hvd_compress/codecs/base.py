"""The codec interface: pure tensor transforms, no communication, no Horovod.

A codec turns a dense gradient into a :class:`Payload` (the bytes that go on the wire) and sums
payloads of N workers back into a dense fp32 tensor.  Every codec has a CPU reference (the C
library, ``backends.cpu``) and a CUDA path (``backends.cuda``) that produce bit-identical
payloads and outputs for the same input and :class:`RandomKey`.

Error feedback (Seide et al. 2014; Karimireddy et al. 2019, "EF-SGD") is part of encoding:

    g' = g + r;   payload = C(g');   r <- g' - D(C(g'))

so ``encode(x, key, residual=r)`` reads g and r once and rewrites r in place.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Sequence

import torch


@dataclass(frozen=True)
class RandomKey:
    """Keys the Philox stream of one tensor at one step: draws are a pure function of
    (seed, step, tensor_id, element index), see ``kernels/hvdc_common.h``."""
    seed: int = 0
    step: int = 0
    tensor_id: int = 0

    def __post_init__(self) -> None:
        for name, bits in (("seed", 64), ("step", 32), ("tensor_id", 32)):
            value = getattr(self, name)
            if not 0 <= value < 2 ** bits:
                raise ValueError(f"RandomKey.{name}={value} outside [0, 2**{bits})")


@dataclass
class Payload:
    """What one worker sends for one tensor: named, contiguous 1-D tensors on one device.

    ``numel`` is the dense size; ``parts`` keep a fixed order (the wire order).  ``nbytes`` is
    exactly what a collective moves for this payload.  ``finite`` (not sent) is a 0-dim device
    bool: False when encoding overflowed on finite input (a norm or a sum beyond fp32).  On the
    host a codec raises ``FloatingPointError`` instead; on a device reading the flag would stall
    the caller, so it travels to the engine, which flags the bucket's members in the step header
    (see :func:`overflow_check`).
    """
    numel: int
    parts: dict[str, torch.Tensor] = field(default_factory=dict)
    finite: torch.Tensor | None = None

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.parts.values())

    @property
    def device(self) -> torch.device:
        return next(iter(self.parts.values())).device


class Codec(ABC):
    """Base of every codec.  Subclasses implement :meth:`_encode` and :meth:`decode_accumulate`
    on contiguous 1-D fp32 tensors; this class handles dtype, layout and validation."""

    #: short name used in specs, stats and benchmark tables
    name: str = "codec"
    #: True when the payload size depends only on numel (quantizers), not on the data
    #: (sparsifiers); the comm layer needs no length exchange and may use two-phase reduction.
    fixed_size: bool = False
    #: True when payloads of several workers can be summed element-wise by an allreduce.
    summable: bool = False

    def encode(self, x: torch.Tensor, key: RandomKey = RandomKey(), residual: torch.Tensor | None = None,
               name: str = "tensor", check_finite: bool = True) -> Payload:
        """Compress ``x`` (any float dtype, any shape, any strides).  With ``residual`` (fp32,
        ``x.numel()`` elements, same device) error feedback is applied and ``residual`` updated.
        ``check_finite=False`` skips the inf/NaN check for callers that made it already (the
        engine checks each bucket once)."""
        flat = as_fp32_flat(x, name, check_finite)
        if residual is not None:
            if residual.dtype != torch.float32 or residual.numel() != flat.numel() \
                    or residual.device != flat.device or not residual.is_contiguous():
                raise ValueError(f"{name}: residual must be a contiguous fp32 tensor of "
                                 f"{flat.numel()} elements on {flat.device}")
        return self._encode(flat, key, residual.view(-1) if residual is not None else None)

    @abstractmethod
    def _encode(self, x: torch.Tensor, key: RandomKey, residual: torch.Tensor | None) -> Payload:
        ...

    @abstractmethod
    def decode_accumulate(self, payloads: Sequence[Payload], out: torch.Tensor) -> torch.Tensor:
        """``out += sum_w D(payloads[w])``, adding workers in list order (deterministic)."""

    def __repr__(self) -> str:
        # Deterministic (no address): the Horovod layer compares it across ranks.
        args = ", ".join(f"{k}={v!r}" for k, v in sorted(vars(self).items()) if not k.startswith("_"))
        return f"{type(self).__name__}({args})"

    def payload_template(self, numel: int) -> Payload | None:
        """An (all-zero) payload with the parts, dtypes and lengths of any ``numel``-element
        payload when :attr:`fixed_size`, else None; cached per size."""
        if not self.fixed_size:
            return None
        cache = self.__dict__.setdefault("_templates", {})
        if numel not in cache:
            cache[numel] = self.encode(torch.zeros(numel))
        return cache[numel]

    def payload_nbytes(self, numel: int) -> int | None:
        """Wire bytes of a payload for ``numel`` elements when :attr:`fixed_size`, else None."""
        template = self.payload_template(numel)
        return None if template is None else template.nbytes

    def unpadded(self, payload: Payload) -> Payload:
        """The payload without the padding a device payload of a fixed capacity carries after
        its entries (top-k): the same bits on every backend, the numeric contract's object.
        Reads the count on the host: for tests and tools, not the hot path."""
        return payload

    def decode(self, payload: Payload) -> torch.Tensor:
        out = torch.zeros(payload.numel, dtype=torch.float32, device=payload.device)
        return self.decode_accumulate([payload], out)


def overflow_check(values: torch.Tensor, on_device: bool, message) -> torch.Tensor | None:
    """Whether every one of ``values`` (a codec's norms, ranges or scales) is finite: on the
    host, raise ``FloatingPointError(message())`` if not (and return None); on a device, return
    the 0-dim flag without reading it (:attr:`Payload.finite`)."""
    ok = torch.isfinite(values).all()
    if on_device:
        return ok
    if not bool(ok):
        raise FloatingPointError(message())
    return None


def as_fp32_flat(x: torch.Tensor, name: str, check_finite: bool = True) -> torch.Tensor:
    """Contiguous 1-D fp32 view or copy of ``x``; rejects non-float and (unless
    ``check_finite=False``) non-finite input with an error that names the tensor."""
    if not x.is_floating_point():
        raise TypeError(f"{name}: gradient compression needs a floating-point tensor, got {x.dtype}")
    flat = x.detach().reshape(-1).to(torch.float32).contiguous()
    # One min/max pass: NaN propagates into both, +-Inf shows up as the max or min.  (About 20x
    # cheaper than isfinite(x).all(); the full count runs only to word the error.)
    if check_finite and flat.numel() and not bool(torch.isfinite(torch.stack(torch.aminmax(flat))).all()):
        bad = int((~torch.isfinite(flat)).sum())
        raise FloatingPointError(f"{name}: {bad} of {flat.numel()} elements are NaN or Inf; "
                                 "refusing to compress a non-finite gradient")
    return flat


def check_segments(x: torch.Tensor, residual: torch.Tensor | None, segments: Sequence[tuple],
                   name: str = "input") -> None:
    """ValueError unless ``x`` (and ``residual``) is a contiguous fp32 tensor (on ``x``'s device,
    as long as ``x``) and the segments (offset, numel, ...) lie in it without overlapping: the
    batched calls of a bucket's tensors (``encode_many``, ``decode_many``) read and write
    through raw pointers, all segments at once."""
    for what, t in ((name, x), ("residual", residual)):
        if t is not None and (t.dtype != torch.float32 or not t.is_contiguous() or t.device != x.device
                              or t.numel() != x.numel()):
            raise ValueError(f"{what} must be a contiguous fp32 tensor of {x.numel()} elements on {x.device}, "
                             f"got {t.numel()} {t.dtype} on {t.device}")
    end = 0
    for o, n, *_ in sorted(segments, key=lambda seg: seg[0]):
        if o < 0 or n < 0 or o + n > x.numel():
            raise ValueError(f"segment [{o}, {o + n}) outside a {x.numel()}-element tensor")
        if o < end:
            raise ValueError(f"segment [{o}, {o + n}) overlaps the one before it")
        end = o + n


@lru_cache(maxsize=1024)
def device_constant(values: tuple, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """``values`` as a tensor on ``device`` (the tensors' ids of a bucket layout, a codec's
    constants), copied there once: no host-to-device copy per call."""
    return torch.tensor(values, dtype=dtype, device=device)
