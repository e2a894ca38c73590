"""Compressors from command-line strings: ``"topk:ratio=0.01"`` -> ``TopK(ratio=0.01)``."""
from __future__ import annotations

import ast
from typing import Any

import torch

from .base import REGISTRY, Method


def parse_spec(spec: str) -> tuple[str, dict[str, Any]]:
    """``"name:key=value,key=value"`` -> (lower-case name, keyword arguments).  Values are Python
    literals (anything else is kept as a string); ``value_dtype=float32`` names a torch dtype."""
    name, _, arg_text = spec.strip().partition(":")
    if ":" in arg_text:
        raise ValueError(f"spec {spec!r}: one ':' separates the name from its options, which are "
                         f"separated by ',' (e.g. {name.strip()}:{arg_text.replace(':', ',')})")
    kwargs: dict[str, Any] = {}
    for item in filter(None, (a.strip() for a in arg_text.split(","))):
        key, eq, value = item.partition("=")
        key = key.strip()
        if not eq or not key.isidentifier():
            raise ValueError(f"spec {spec!r}: expected key=value, got {item!r}")
        if key in kwargs:
            raise ValueError(f"spec {spec!r}: {key} is given twice")
        if key == "value_dtype":
            dtype = getattr(torch, value.strip(), None)
            if not isinstance(dtype, torch.dtype):
                raise ValueError(f"spec {spec!r}: value_dtype must name a torch dtype (float16, "
                                 f"float32), got {value.strip()!r}")
            kwargs[key] = dtype
            continue
        try:
            kwargs[key] = ast.literal_eval(value.strip())
        except (ValueError, SyntaxError):
            kwargs[key] = value.strip()
    return name.strip().lower(), kwargs


def from_spec(spec: str, **defaults: Any) -> Method:
    """Build a compressor from ``"name"`` or ``"name:key=value,key=value"``, e.g.
    ``"topk:ratio=0.001"``, ``"qsgd:bits=8,bucket_size=1024"``, ``"terngrad:clip=None"``
    (see :func:`parse_spec`); ``defaults`` are keyword arguments for what the spec does not set
    (e.g. ``link=Link.gbps(1)``, which a spec cannot spell)."""
    name, parsed = parse_spec(spec)
    kwargs = {**defaults, **parsed}
    method = REGISTRY.get(name)
    if method is None:
        raise ValueError(f"unknown compressor {name!r} in spec {spec!r}; known: {', '.join(sorted(REGISTRY))}")
    try:
        return method(**kwargs)
    except (TypeError, ValueError) as e:
        raise ValueError(f"spec {spec!r}: {e}") from None
