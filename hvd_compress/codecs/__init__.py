"""Codecs: pure tensor transforms (encode to a payload, decode-and-accumulate payloads).

Importable with no GPU, no CuPy and no Horovod.
"""
from .base import Codec, Payload, RandomKey
from .fp16 import StochasticFP16Codec
from .qsgd import QSGDCodec
from .randk import RandomKCodec
from .sign import MajorityVoteCodec, OneBitCodec, ScaledSignCodec, SignCodec, majority_vote
from .sketch import SketchCodec
from .ternary import AdaCompCodec, STCCodec
from .terngrad import TernGradCodec
from .topk import GradDropCodec, TopKCodec

__all__ = ["AdaCompCodec", "Codec", "GradDropCodec", "MajorityVoteCodec", "OneBitCodec", "Payload", "QSGDCodec", "RandomKCodec", "RandomKey",
           "ScaledSignCodec", "SignCodec", "SketchCodec", "STCCodec", "StochasticFP16Codec", "TernGradCodec",
           "TopKCodec", "majority_vote"]
