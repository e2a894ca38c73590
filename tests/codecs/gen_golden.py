"""Regenerate the golden vectors of the fixed-size codecs from the CPU path:

    PYTHONPATH=. python tests/codecs/gen_golden.py

Writes tests/data/{terngrad,qsgd,fp16sr,sign,randk,sketch,sparse_adaptive,laq}_golden.npz: the
inputs, and for every configuration of the test modules the payload bytes and decoded values
(error feedback on where the codec has it); and esgd_golden.npz, eSGD's element-wise step
(test_esgd.py).  ``python tests/codecs/gen_golden.py sign`` rewrites only the files of the modules named
(test_sign.py here).  Only needed when a wire format or formula changes on purpose; the
tests then pin the new bits on CPU and GPU."""
from __future__ import annotations

import sys

import test_esgd
import test_fp16
import test_laq
import test_qsgd
import test_randk
import test_sign
import test_sketch
import test_sparse_adaptive
import test_terngrad
from quant_contract import write_golden

if __name__ == "__main__":
    for module in (test_terngrad, test_qsgd, test_fp16, test_sign, test_randk, test_sketch,
                   test_sparse_adaptive, test_laq):
        if len(sys.argv) > 1 and module.__name__.removeprefix("test_") not in sys.argv[1:]:
            continue
        for name, cls in vars(module).items():
            if name.startswith("Test") and getattr(cls, "golden_file", ""):
                write_golden(cls.golden_file, cls.cases, error_feedback=cls().error_feedback)
                print("wrote", cls.golden_file)
    if len(sys.argv) == 1 or "esgd" in sys.argv[1:]:
        test_esgd.write_golden()
        print("wrote", test_esgd.GOLDEN)
