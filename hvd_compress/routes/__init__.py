"""Routes: how one bucket's payload travels between the ranks (dense allreduce, summable
allreduce, allgather, two-phase quantized, two-phase sparse).  See :mod:`.base`."""
