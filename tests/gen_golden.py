"""Regenerate the golden vectors of the quantizing codecs from the CPU path:

    PYTHONPATH=. python tests/gen_golden.py

Writes tests/data/{terngrad,qsgd,fp16sr}_golden.npz: the inputs, and for every configuration
of the test modules the payload bytes and decoded values (error feedback on).  Only needed when
a wire format or formula changes on purpose; the tests then pin the new bits on CPU and GPU."""
from __future__ import annotations

import test_fp16
import test_qsgd
import test_terngrad
from quant_contract import write_golden

if __name__ == "__main__":
    for module in (test_terngrad, test_qsgd, test_fp16):
        cls = next(v for k, v in vars(module).items() if k.startswith("Test"))
        write_golden(cls.golden_file, cls.cases)
        print("wrote", cls.golden_file)
