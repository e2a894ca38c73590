"""Which members of a bucket's input are finite, checked where the data lives.

A member with an inf or NaN on some rank is sent as zeros (so no codec ever sees a non-finite
value) and flagged in the step header; every rank then makes it NaN in its output and rolls
the step back (docs/design.md, "Non-finite gradients").  Two ways to the same bits:

* **on the host** (the C reference path): one min/max pass over the bucket,
  ``isfinite(min) and isfinite(max)`` read at once; per member only when that fails.  Reading
  a flag of host memory costs nothing.
* **on a device** (the CUDA path, and the emulated one): reading a flag would stall the
  backward hook until the device has drained.  Instead, per member m,

      ok_m = isfinite(min x_m) and isfinite(max x_m)     (device bool, no read)
      x <- x masked to 0 where the member's ok is false   (ok repeated over the member's elements)

  and the flags go into the step header on the device; they are read once, in the flush.
"""
from __future__ import annotations

import torch


def all_finite(t: torch.Tensor) -> bool:
    """One min/max pass (NaN propagates into both, +-inf is the max or the min), read on the host."""
    return not t.numel() or bool(torch.isfinite(torch.stack(torch.aminmax(t))).all())


def check_on_host(bucket, x: torch.Tensor, finite: list[bool]) -> None:
    """Zero the non-finite members of ``x`` and clear their entries of ``finite``."""
    if all_finite(x):
        return
    for m, offset in zip(bucket.members, bucket.offsets):
        part = x[offset:offset + m.numel]
        if not bool(torch.isfinite(part).all()):
            finite[m.index] = False
            part.zero_()


class DeviceFlags:
    """One step's per-member finite flags as an int32 device vector (1: finite), written
    bucket by bucket without a host read."""

    def __init__(self, n_members: int, device: torch.device) -> None:
        self.flags = torch.ones(n_members, dtype=torch.int32, device=device)
        self._layout: dict[int, tuple[torch.Tensor, torch.Tensor, list[tuple[int, int]]]] = {}

    def _of(self, bucket) -> tuple[torch.Tensor, torch.Tensor, list[tuple[int, int]]]:
        """(member indices, member lengths) on the device and the (offset, numel) of the
        non-empty members, made once per bucket."""
        layout = self._layout.get(bucket.index)
        if layout is None:
            parts = [(m.index, o, m.numel) for m, o in zip(bucket.members, bucket.offsets) if m.numel]
            device = self.flags.device
            layout = self._layout[bucket.index] = (
                torch.tensor([i for i, _, _ in parts], dtype=torch.int64).to(device),
                torch.tensor([n for _, _, n in parts], dtype=torch.int64).to(device),
                [(o, n) for _, o, n in parts])
        return layout

    def check(self, bucket, x: torch.Tensor) -> None:
        """Zero the non-finite members of ``x`` and clear their flags (device work only)."""
        index, lengths, parts = self._of(bucket)
        if not parts:
            return
        extremes = torch.stack([torch.stack(torch.aminmax(x[o:o + n])) for o, n in parts])
        ok = torch.isfinite(extremes).all(1)
        self.flags.index_copy_(0, index, ok.to(torch.int32))
        x.masked_fill_(~ok.repeat_interleave(lengths, output_size=x.numel()), 0.0)

    def restrict(self, bucket, payload_flags: list[torch.Tensor]) -> None:
        """Flag every member of ``bucket`` non-finite where one of the payloads' overflow flags
        (:attr:`~hvd_compress.codecs.base.Payload.finite`) is False: the sum would carry the
        overflow, so the bucket's members become NaN on every rank and the step rolls back, as
        when the codec raises on the host."""
        if not payload_flags:
            return
        ok = torch.stack(payload_flags).all().to(torch.int32)
        index = self._of(bucket)[0]
        if index.numel():
            self.flags.index_copy_(0, index, self.flags.index_select(0, index) * ok)

    def reset(self) -> None:
        self.flags.fill_(1)
