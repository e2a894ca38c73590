"""eSGD (stateful: importance and momentum residual follow the decoded aggregate)."""
from __future__ import annotations

from typing import Any

import torch

from ..codecs.base import Codec, RandomKey
from ..engine.buckets import Bucket
from ..engine.plan import COMPRESSED
from ..engine.state import BUCKET, MEMBER
from .base import _AggregateMethod, register


@register
class ESGD(_AggregateMethod):
    """eSGD (Tao & Li, "eSGD: Communication Efficient Distributed Deep Learning on the Edge",
    USENIX HotEdge 2018): each step every worker sends ``ratio`` of its bucket's
    coordinates (k = ceil(ratio n)), chosen by importance, with a momentum residual for the rest.

    * **Importance updating** (the paper's Algorithm 1): at the first two steps the k
      coordinates are drawn at random; afterwards, when the worker's loss fell since the last
      step (l_t < l_{t-1}) it keeps the previous selection S and raises the importance of the
      selected coordinates, H_i <- H_i + 1 for i in S; otherwise it draws k coordinates at random
      weighted by w_i = 1 + H_i (Efraimidis & Spirakis 2006: the k largest keys log2~(u_i) / w_i,
      u_i uniform in (0, 1) from the rank's Philox stream, log2~ a fixed fp32 polynomial that is
      the same bits on CPU and GPU, ties to the lower index; :mod:`hvd_compress.codecs.esgd`).
    * **Momentum residual accumulation** (Algorithm 2, beta = ``beta``): every coordinate
      accumulates a_i = beta r_i + g_i; unselected coordinates whose |a_i| exceeds the threshold
      (the mean of |g| over the bucket, summed in the numeric contract's order) replace the selected coordinates of lowest H (up to k of
      them, the largest |a_i| first; the replaced ones stay unsent); the worker sends a_i on the
      final selection and keeps r_i = a_i elsewhere (r_i = 0 where sent).  A coordinate selected
      step after step thus sends its gradient, a newly selected one its accumulated residual.

    The increment of H (one per step the coordinate was kept while the loss fell) is our reading:
    the seed describes the rule, not the amount.  Defaults: ``ratio=0.125`` (the paper's MNIST
    run that dropped 87.5% of the gradients and reached 81.5% accuracy), ``beta=0.9``.

    **The loss**: call ``compression.observe_loss(loss)`` every step before ``backward()`` (a
    tensor or a float; it is only stored, and read when the step's buckets are prepared).
    Without it eSGD cannot tell whether the loss fell: every step then redraws the selection
    weighted by H, which never grows, i.e. uniform random-k with the momentum residual (a
    one-time warning says so, from ``synchronize()``).

    Wire: the selected entries as (int32 index, fp32 value), ascending (8 bytes per entry, at
    most k per bucket), allgathered.  State (per bucket, checkpointed): H, the selection, the
    residual, the step count and the last loss.
    """

    name = "esgd"
    nan_buffers = ("esgd",)

    def __init__(self, ratio: float = 0.125, beta: float = 0.9, *, route: str = COMPRESSED, **options: Any) -> None:
        from ..codecs.sparse import NonzeroCodec
        if not 0.0 < ratio <= 1.0 or not 0.0 <= beta < 1.0:
            raise ValueError(f"eSGD needs 0 < ratio <= 1 and 0 <= beta < 1, got ratio={ratio}, beta={beta}")
        self.ratio, self.beta = ratio, beta
        self._losses: dict[int | None, torch.Tensor | float] = {}
        self._warned = False
        super().__init__(NonzeroCodec(), route=route, **options)

    def state_names(self) -> dict[str, str]:
        return {"esgd": BUCKET, "importance": MEMBER, "selected": MEMBER, "memory": MEMBER}

    def __repr__(self) -> str:
        return f"ESGD(ratio={self.ratio}, beta={self.beta}, {self._options()})"

    def observe_loss(self, loss: torch.Tensor | float, rank: int | None = None) -> None:
        """This step's loss on this worker (call before ``backward()``); stored, never read here.
        ``rank`` is for simulators that run several workers through one compressor object
        (:mod:`hvd_compress.simulate` passes it); a Horovod job leaves it None."""
        self._losses[rank] = loss.detach() if isinstance(loss, torch.Tensor) else float(loss)

    def _observed(self, rank: int) -> float | None:
        loss = self._losses.get(rank, self._losses.get(None))
        return None if loss is None else float(loss)

    def k(self, n: int) -> int:
        from ..codecs.topk import ceil_ratio
        return max(1, ceil_ratio(self.ratio, n)) if n else 0

    def payload_bytes(self, bucket: Bucket, codec: Codec, padded: bool = False) -> float:
        return 8 * sum(self.k(seg.numel) for seg in bucket.segments(self.scope))

    def prepare(self, bucket, grads, x, state, comm):
        x = super().prepare(bucket, grads, x, state, comm)
        if not self.compressed(bucket, comm):
            return x
        from ..codecs.esgd import momentum_step
        from ..codecs.sign import ScaledSignCodec
        from ..codecs.rng import rank_seed
        device, n, k = x.device, x.numel(), self.k(x.numel())
        meta = state.buffer("esgd", device, 2)
        t, last = meta.committed.tolist()
        meta.begin()
        loss = self._observed(comm.rank)
        keep = t >= 2 and loss is not None and loss < last    # (last is NaN when unknown)
        importance = state.buffer("importance", device)
        h = importance.begin()
        selected = state.buffer("selected", device)
        try:                            # mean |g| with the sum in the numeric contract's order
            threshold = ScaledSignCodec().local_scales(x)
        except FloatingPointError:
            return x                    # the engine flags the non-finite gradient (and rolls back)
        memory = state.buffer("memory", device)
        a = memory.begin(copy=False)
        key = None if keep else RandomKey(rank_seed(self.seed, comm.rank), int(t) & 0xFFFFFFFF, bucket.tensor_id)
        keys, over = momentum_step(x, memory.committed, importance.committed, self.beta, threshold, key, a)
        if keep:
            mask = selected.committed.bool()
            h.add_(selected.committed)
        else:
            mask = torch.zeros(n, dtype=torch.bool, device=device)
            mask[_largest(keys, k)] = True
        candidates = (~mask) & over
        count = min(int(candidates.sum()), k)
        if count:
            cand = candidates.nonzero().view(-1)
            sel = mask.nonzero().view(-1)
            mask[sel[_largest(-h[sel], count)]] = False         # the lowest H leave ...
            mask[cand[_largest(a[cand].abs(), count)]] = True   # ... for the largest residuals
        torch.where(mask, a, torch.zeros((), device=device), out=x)
        a.masked_fill_(mask, 0.0)
        selected.begin(copy=False).copy_(mask)
        return x

    def after_decode(self, bucket, out, state, comm):
        if not self.compressed(bucket, comm):
            return
        loss = self._observed(comm.rank)
        if loss is None and not self._warned:
            import warnings
            warnings.warn("hvd_compress eSGD: no loss observed (call compression.observe_loss(loss) "
                          "before backward() every step); eSGD falls back to random-k selection with "
                          "its momentum residual", RuntimeWarning, stacklevel=2)
            self._warned = True
        meta = state.buffers["esgd"].working
        meta[0] += 1
        meta[1] = float("nan") if loss is None else loss


def _largest(values: torch.Tensor, k: int) -> torch.Tensor:
    """Positions of the k largest values, ties to the lower position (a stable sort)."""
    return torch.sort(values, descending=True, stable=True).indices[:k]
