"""hvd_compress.simulate: N workers in one process give, bit for bit, the weights of a real
``horovodrun`` job of the same training (compressed routes; 2 workers with the defaults, whose
dense buckets sum two ranks in either order alike, and 3 workers with every tensor compressed)."""
from __future__ import annotations

import pytest
import torch

from harness import run_job

STEPS = 4
LINK = {"HVD_COMPRESS_LINK_GBPS": "1"}


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(40, 64), torch.nn.ReLU(), torch.nn.Linear(64, 10))


def _batch(rank: int, step: int):
    gen = torch.Generator().manual_seed(100 * rank + step)
    return torch.randn(16, 40, generator=gen), torch.randint(0, 10, (16,), generator=gen)


def _loss(model, batch):
    return torch.nn.functional.cross_entropy(model(batch[0]), batch[1])


def _real_job(spec: str):
    import horovod.torch as hvd
    import hvd_compress
    torch.set_num_threads(1)
    model = _model()
    compression = hvd_compress.from_spec(spec)
    momentum = 0.0 if getattr(compression, "owns_momentum", False) else 0.9
    opt = hvd.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1, momentum=momentum),
                                   named_parameters=model.named_parameters(), compression=compression)
    for step in range(STEPS):
        opt.zero_grad()
        _loss(model, _batch(hvd.rank(), step)).backward()
        opt.step()
    return [p.detach().clone() for p in model.parameters()], compression.stats()


def _simulated(spec: str, workers: int):
    import hvd_compress
    from hvd_compress.simulate import DataParallel
    threads = torch.get_num_threads()
    torch.set_num_threads(1)          # the real ranks' setting: same kernels, same bits
    try:
        model = _model()
        compression = hvd_compress.from_spec(spec)
        momentum = 0.0 if getattr(compression, "owns_momentum", False) else 0.9
        sim = DataParallel(model, torch.optim.SGD(model.parameters(), lr=0.1, momentum=momentum),
                           compression, workers)
        for step in range(STEPS):
            sim.step(_loss, [_batch(rank, step) for rank in range(workers)])
        return [p.detach().clone() for p in model.parameters()], sim.stats()
    finally:
        torch.set_num_threads(threads)


@pytest.mark.horovod
@pytest.mark.parametrize("spec,np", [
    ("terngrad:route='compressed'", 2), ("topk:ratio=0.05,route='compressed'", 2),
    ("dgc:ratio=0.05,route='compressed'", 2), ("qsgd:route='two_phase',min_numel=0", 3),
    ("topk:ratio=0.05,route='sparse_two_phase',min_numel=0", 3)])
def test_simulator_is_bit_identical_to_a_real_job(spec, np):
    real = run_job(_real_job, np=np, args=(spec,), timeout=120, env=LINK)
    params, stats = _simulated(spec, np)
    for a, b in zip(params, real[0][0]):
        assert torch.equal(a, b)
    assert stats["bytes_sent"] == real[0][1]["bytes_sent"] and stats["steps"] == STEPS


def test_simulator_runs_many_workers_and_rejects_bad_input():
    params, stats = _simulated("topk:ratio=0.05,route='compressed'", 16)
    assert stats["steps"] == STEPS and all(bool(torch.isfinite(p).all()) for p in params)
    import hvd_compress
    from hvd_compress.simulate import DataParallel
    model = _model()
    sim = DataParallel(model, torch.optim.SGD(model.parameters(), lr=0.1), hvd_compress.TopK(), 4)
    with pytest.raises(ValueError, match="one batch per worker"):
        sim.step(_loss, [_batch(0, 0)])


def test_simulator_plans_for_the_compressors_declared_link(monkeypatch):
    """The plan (each bucket's route) depends on the link, so the simulation takes the one the
    real job would declare: the compressor's ``link=``, else the environment, else 1 Gbit/s."""
    import hvd_compress
    from hvd_compress.simulate import DEFAULT_LINK, DataParallel
    monkeypatch.delenv("HVD_COMPRESS_LINK_GBPS", raising=False)

    def link(compression, **kwargs):
        model = _model()
        return DataParallel(model, torch.optim.SGD(model.parameters(), lr=0.1), compression, 2, **kwargs).link

    fast = hvd_compress.Link.gbps(100.0, 2.0)
    assert link(hvd_compress.TernGrad()) == DEFAULT_LINK == hvd_compress.Link.gbps(1.0)
    assert link(hvd_compress.TernGrad(link=fast)) == fast
    spec = hvd_compress.from_spec("terngrad:clip=2.5", link=fast, clip=1.0)   # the spec's own keys win
    assert spec.codec.clip == 2.5 and link(spec) == fast
    assert link(hvd_compress.TernGrad(link=fast), link=DEFAULT_LINK) == DEFAULT_LINK
    monkeypatch.setenv("HVD_COMPRESS_LINK_GBPS", "10")
    assert link(hvd_compress.TernGrad()) == hvd_compress.Link.gbps(10.0)
