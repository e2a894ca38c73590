"""The engine's state: flat per-bucket buffers, changed only by committed steps.

Every stateful tensor of a bucket (the error-feedback residual, DGC's momentum, the two-phase
owner's server residual) is a :class:`TxBuffer`: a committed tensor plus a working tensor.  A
step writes only working tensors; :meth:`BucketState.commit` swaps them in once every rank's
every member of the step was finite, :meth:`BucketState.rollback` drops them.  So a step that
GradScaler skips leaves no trace (AMP).

Buffers are flat over the bucket; :meth:`BucketState.member_views` cuts them per member, which is
how ``state_dict`` keys them (by parameter name: a checkpoint survives a change of bucket cap).
"""
from __future__ import annotations

import torch

#: where a state buffer lives (a method declares each of its buffers so): laid out like the
#: bucket, saved per parameter; or one per bucket, saved per bucket
MEMBER, BUCKET = "member", "bucket"


class TxBuffer:
    """A committed fp32 tensor and the working copy a step writes."""

    def __init__(self, numel: int, device: torch.device) -> None:
        self.committed = torch.zeros(numel, dtype=torch.float32, device=device)
        self._spare: torch.Tensor | None = None
        self.working: torch.Tensor | None = None
        #: the committed tensor still holds its initial zeros (known on the host, so a route
        #: can initialize its state without reading the device)
        self.fresh = True

    def begin(self, copy: bool = True) -> torch.Tensor:
        """The working tensor of this step: a copy of the committed one (``copy=False``: its
        contents are undefined, for buffers the step writes in full)."""
        if self._spare is None:
            self._spare = torch.empty_like(self.committed)
        self.working = self._spare
        if copy:
            self.working.copy_(self.committed)
        return self.working

    def commit(self) -> None:
        if self.working is not None:
            self._spare, self.committed = self.committed, self.working
            self.working = None
            self.fresh = False

    def load(self, values: torch.Tensor, offset: int = 0) -> None:
        """Copy saved ``values`` into the committed tensor from ``offset`` (not on the hook
        path: reading whether they are all zero is allowed here)."""
        self.committed[offset:offset + values.numel()].copy_(values.reshape(-1))
        self.fresh = self.fresh and not bool(values.any())

    def rollback(self) -> None:
        self.working = None


class BucketState:
    """The named buffers of one bucket (created on first use, on the gradients' device)."""

    def __init__(self, numel: int) -> None:
        self.numel = numel
        self.buffers: dict[str, TxBuffer] = {}

    def buffer(self, name: str, device: torch.device, numel: int | None = None) -> TxBuffer:
        buf = self.buffers.get(name)
        n = self.numel if numel is None else numel
        if buf is None or buf.committed.numel() != n or buf.committed.device != device:
            buf = self.buffers[name] = TxBuffer(n, device)
        return buf

    def to(self, device: torch.device) -> None:
        """Move every committed buffer to ``device`` (a state loaded from a checkpoint on
        another device)."""
        for buf in self.buffers.values():
            if buf.committed.device != device:
                buf.committed = buf.committed.to(device)
                buf._spare = None

    def commit(self) -> None:
        for buf in self.buffers.values():
            buf.commit()

    def rollback(self) -> None:
        for buf in self.buffers.values():
            buf.rollback()
