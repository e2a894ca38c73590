"""The step header: what every rank tells every other rank once per step, in one allgather.

Each rank's header is one int32 vector of any length (ranks with different models still meet in
it; the configuration check then says how they differ)::

    [length, digest_lo, digest_hi, failed, trial_variant, trial_us, host, local_rank, local_size,
     finite flag of member 0, member 1, ...]

``length`` counts the whole vector; the digest is the plan's 63-bit digest in two 31-bit words.
Packing and reading live here and nowhere else.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .topology import Placement

_FIELDS = 8     # words after the length, before the flags


@dataclass(frozen=True)
class Header:
    digest: int
    failed: bool
    trial_variant: int            # variant of the previous step (0: not a trial step)
    trial_us: int                 # its wall time in microseconds
    placement: Placement
    finite: tuple[bool, ...]      # per member: this rank's input was finite

    def pack(self, device_flags: torch.Tensor | None = None) -> torch.Tensor:
        """The int32 vector; with ``device_flags`` (an int32 vector on a device, one word per
        member, 0 where the device found a member non-finite) the vector is made on that
        device, each flag the product of both, with no host read."""
        words = [self.digest & 0x7FFFFFFF, (self.digest >> 31) & 0x7FFFFFFF, int(self.failed),
                 self.trial_variant, self.trial_us, self.placement.host, self.placement.local_rank,
                 self.placement.local_size, *map(int, self.finite)]
        packed = torch.tensor([1 + len(words)] + words, dtype=torch.int32)
        if device_flags is None:
            return packed
        packed = packed.to(device_flags.device, non_blocking=True)
        packed[1 + _FIELDS:].mul_(device_flags)
        return packed

    @classmethod
    def unpack_all(cls, gathered: torch.Tensor) -> list["Header"]:
        """Every rank's header from the allgathered vectors, in rank order."""
        flat, out = gathered.tolist(), []
        while flat:
            w = flat[1:flat[0]]
            out.append(cls(w[0] | (w[1] << 31), bool(w[2]), w[3], w[4], Placement(*w[5:8]),
                           tuple(bool(f) for f in w[_FIELDS:])))
            flat = flat[flat[0]:]
        return out
