"""What differs between ranks whose plan digests differ, in words every rank agrees on.

The step header carries a 63-bit digest of each rank's plan (world, bucket cap, every bucket's
members, routes and method settings).  When the digests differ, every rank has read the same
header rows, so every rank takes part in one more allgather: its member table (parameter names,
shapes, dtypes, method settings) as JSON.  :func:`describe_differences` compares each rank with
rank 0 and names what differs ("rank 1: has parameters rank 0 has not: extra.weight"), the same
text on every rank.
"""
from __future__ import annotations

import json
from typing import Any

import torch

#: differences listed per kind before "..."
_SHOWN = 5


def config_table(plan: Any, members: list[Any]) -> torch.Tensor:
    """This rank's table as a uint8 vector: 4 bytes of length (little-endian), then JSON."""
    table = {"world": plan.world, "bucket_cap": plan.cap_bytes,
             "members": {m.name: [list(m.shape), str(m.dtype).replace("torch.", ""), m.method.config()]
                         for m in members}}
    text = json.dumps(table, sort_keys=True).encode()
    return torch.tensor(list(len(text).to_bytes(4, "little")) + list(text), dtype=torch.uint8)


def _split(gathered: torch.Tensor) -> list[dict]:
    data, tables, at = bytes(gathered.tolist()), [], 0
    while at < len(data):
        n = int.from_bytes(data[at:at + 4], "little")
        tables.append(json.loads(data[at + 4:at + 4 + n]))
        at += 4 + n
    return tables


def _listed(items: list[str]) -> str:
    return ", ".join(items[:_SHOWN]) + (f" (+{len(items) - _SHOWN} more)" if len(items) > _SHOWN else "")


def describe_differences(gathered: torch.Tensor) -> str:
    """Every rank's differences from rank 0, one line each (from the allgathered tables)."""
    tables = _split(gathered)
    base, lines = tables[0], []
    for rank, table in enumerate(tables[1:], start=1):
        found = []
        mine, theirs = table["members"], base["members"]
        only_here = sorted(set(mine) - set(theirs))
        only_there = sorted(set(theirs) - set(mine))
        if only_here:
            found.append(f"has parameters rank 0 has not: {_listed(only_here)}")
        if only_there:
            found.append(f"lacks rank 0's parameters: {_listed(only_there)}")
        for what, i in (("shape", 0), ("dtype", 1), ("compressor", 2)):
            differ = [f"{name} {mine[name][i]} (rank 0: {theirs[name][i]})"
                      for name in sorted(set(mine) & set(theirs)) if mine[name][i] != theirs[name][i]]
            if differ:
                found.append(f"another {what}: {_listed(differ)}")
        for key in ("world", "bucket_cap"):
            if table[key] != base[key]:
                found.append(f"{key} {table[key]} (rank 0: {base[key]})")
        if found:
            lines.append(f"  rank {rank}: " + "; ".join(found))
    return "\n".join(lines) or "  (the member tables agree: the plans differ in routes, e.g. another link)"
