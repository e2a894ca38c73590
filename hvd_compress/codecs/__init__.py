"""Codecs: pure tensor transforms (encode to a payload, decode-and-accumulate payloads).

Importable with no GPU, no CuPy and no Horovod.
"""
from .base import Codec, Payload, RandomKey

__all__ = ["Codec", "Payload", "RandomKey"]
