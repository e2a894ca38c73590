"""Job bodies that run on real ranks (``harness.run_job``) and more than one test module uses:
AMP overflow on one rank, resume from checkpoints, rank-dependent graphs, one compressor for
two optimizers, and the in-process simulation a multi-host job is compared with."""
from __future__ import annotations

import torch

import hvd_compress
from hvd_compress import methods
from hvd_compress.routes.base import Link


def _amp(spec: str, wrapper: bool):
    """Horovod's AMP recipe with torch.amp.GradScaler("cpu"); rank 1 injects an inf into one
    gradient at step 2."""
    import horovod.torch as hvd
    import hvd_compress
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 48), torch.nn.ReLU(), torch.nn.Linear(48, 10))
    compression = hvd_compress.from_spec(spec)
    momentum = 0.0 if getattr(compression, "owns_momentum", False) else 0.9
    make = hvd_compress.DistributedOptimizer if wrapper else hvd.DistributedOptimizer
    opt = make(torch.optim.SGD(model.parameters(), lr=0.05, momentum=momentum),
               named_parameters=model.named_parameters(), compression=compression)
    hvd.broadcast_parameters(model.state_dict(), root_rank=0)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 8)
    state = {"inject": False}
    model[0].weight.register_hook(lambda g: g * float("inf") if state["inject"] else g)
    gen = torch.Generator().manual_seed(hvd.rank())
    scales, weights = [], []
    for step in range(5):
        state["inject"] = step == 2 and hvd.rank() == 1
        x, y = torch.randn(16, 64, generator=gen), torch.randint(0, 10, (16,), generator=gen)
        opt.zero_grad()
        scaler.scale(torch.nn.functional.cross_entropy(model(x), y)).backward()
        opt.synchronize()
        scaler.unscale_(opt)
        with opt.skip_synchronize():
            scaler.step(opt)
        scaler.update()
        scales.append(scaler.get_scale())
        weights.append(model[0].weight.detach().clone())
    return scales, weights, compression.stats()


def _rank_dependent_graph(spec: str):
    """Horovod's test_force_allreduce network: on odd ranks the loss does not reach fc2 (its
    gradients are None and come in synchronize(), after every other hook), and the hooks fire in
    a different order."""
    import horovod.torch as hvd
    import hvd_compress

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1 = torch.nn.Linear(64, 64)
            self.fc2 = torch.nn.Linear(64, 64)
            self.fc3 = torch.nn.Linear(64, 64)

        def forward(self, x):
            x = self.fc1(x)
            return self.fc3(x) if hvd.rank() % 2 else self.fc3(self.fc2(x))
    torch.manual_seed(0)
    model = Net()
    comp = hvd_compress.from_spec(spec)
    opt = hvd.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1),
                                   named_parameters=model.named_parameters(), compression=comp)
    for step in range(3):
        opt.zero_grad()
        model(torch.ones(4, 64) * (hvd.rank() + step)).sum().backward()
        opt.step()
    return [p.detach().clone() for p in model.parameters()]


def _two_optimizers(shapes_g, shapes_d):
    """One compressor object for a GAN's two optimizers whose parameter names collide."""
    import horovod.torch as hvd
    import hvd_compress
    comp = hvd_compress.TopK(ratio=0.05, route="compressed")
    g = {"weight": torch.nn.Parameter(torch.zeros(shapes_g))}
    d = {"weight": torch.nn.Parameter(torch.zeros(shapes_d))}
    opt_g = hvd.DistributedOptimizer(torch.optim.SGD(g.values(), lr=1.0), named_parameters=list(g.items()),
                                     compression=comp)
    opt_d = hvd.DistributedOptimizer(torch.optim.SGD(d.values(), lr=1.0), named_parameters=list(d.items()),
                                     compression=comp)
    for step in range(3):
        for opt, params, grad in ((opt_d, d, 0.0), (opt_g, g, 1.0)):   # D always gets zero gradients
            opt.zero_grad()
            (params["weight"] * torch.full(params["weight"].shape, grad + hvd.rank())).sum().backward()
            opt.step()
    return d["weight"].detach().clone(), g["weight"].detach().clone(), comp.state_dict()


def _simulate(spec: str, workers: int, local_size: int, steps: int = 3, inject: int | None = None):
    from hvd_compress.simulate import DataParallel
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(40, 64), torch.nn.ReLU(), torch.nn.Linear(64, 10))
    sim = DataParallel(model, torch.optim.SGD(model.parameters(), lr=0.1), methods.from_spec(spec),
                       workers, local_size=local_size, link=Link.gbps(1))
    for step in range(steps):
        batches = [(torch.randn(16, 40, generator=torch.Generator().manual_seed(100 * r + step)),
                    torch.randint(0, 10, (16,), generator=torch.Generator().manual_seed(7 * r + step)))
                   for r in range(workers)]
        sim.step(lambda m, b: torch.nn.functional.cross_entropy(m(b[0]), b[1]), batches)
    return sim


#: resume tests: steps of the whole run, and the step the checkpoint is taken at
STEPS, STOP = 6, 3


def _train(spec: str, steps: range, ckpt: str | None, mode: str):
    """Train ``steps`` of a small MLP; load the checkpoint first when steps start after 0, save
    one at the end when ``ckpt`` is given and the run stops early."""
    import horovod.torch as hvd
    import hvd_compress
    from hvd_compress.horovod.checkpoint import gather_state, scatter_state
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(40, 64), torch.nn.ReLU(), torch.nn.Linear(64, 10))
    compression = hvd_compress.from_spec(spec)
    momentum = 0.0 if getattr(compression, "owns_momentum", False) else 0.9
    make = hvd_compress.DistributedOptimizer if mode == "wrapper" else hvd.DistributedOptimizer
    opt = make(torch.optim.SGD(model.parameters(), lr=0.05, momentum=momentum),
               named_parameters=model.named_parameters(), compression=compression)
    rank = hvd.rank()
    if steps.start:
        if mode == "gather":    # one file, written by rank 0
            saved = torch.load(f"{ckpt}/all.pt", weights_only=False) if rank == 0 else None
            # (named: broadcast_object names itself after the object's type, None on other ranks)
            model.load_state_dict(hvd.broadcast_object(saved and saved["model"], 0, name="model"))
            opt.load_state_dict(hvd.broadcast_object(saved and saved["opt"], 0, name="opt"))
            scatter_state(compression, saved and saved["compression"])
        else:                   # a file per rank
            saved = torch.load(f"{ckpt}/rank{rank}.pt", weights_only=False)
            model.load_state_dict(saved["model"])
            opt.load_state_dict(saved["opt"])
            if mode != "wrapper":       # the wrapper's optimizer state holds the compressor's
                compression.load_state_dict(saved["compression"])
    for step in steps:
        gen = torch.Generator().manual_seed(100 * rank + step)
        x, y = torch.randn(16, 40, generator=gen), torch.randint(0, 10, (16,), generator=gen)
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    if ckpt and steps.stop < STEPS:
        if mode == "gather":
            states = gather_state(compression)
            if rank == 0:
                torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "compression": states},
                           f"{ckpt}/all.pt")
        else:
            torch.save({"model": model.state_dict(), "opt": opt.state_dict(),
                        "compression": compression.state_dict()}, f"{ckpt}/rank{rank}.pt")
    return [p.detach().clone() for p in model.parameters()], compression.stats()


def _hier_job(spec: str, steps: int = 3):
    import horovod.torch as hvd
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(40, 64), torch.nn.ReLU(), torch.nn.Linear(64, 10))
    compression = hvd_compress.from_spec(spec)
    opt = hvd.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1),
                                   named_parameters=model.named_parameters(), compression=compression)
    for step in range(steps):
        x = torch.randn(16, 40, generator=torch.Generator().manual_seed(100 * hvd.rank() + step))
        y = torch.randint(0, 10, (16,), generator=torch.Generator().manual_seed(7 * hvd.rank() + step))
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    return ([p.detach().clone() for p in model.parameters()], compression.stats(), compression.plan(),
            (hvd.local_rank(), hvd.cross_rank()))
