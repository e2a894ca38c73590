"""Codecs: pure tensor transforms (encode to a payload, decode-and-accumulate payloads).

Importable with no GPU, no CuPy and no Horovod.
"""
from .base import Codec, Payload, RandomKey
from .fp16 import StochasticFP16Codec
from .qsgd import QSGDCodec
from .terngrad import TernGradCodec
from .topk import TopKCodec

__all__ = ["Codec", "Payload", "RandomKey", "QSGDCodec", "StochasticFP16Codec", "TernGradCodec",
           "TopKCodec"]
