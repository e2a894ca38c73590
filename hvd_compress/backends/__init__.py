"""Execution backends of the codecs: the CPU reference library and the CUDA kernels.

Both implement the numeric contract of ``kernels/hvdc_common.h``; neither needs Horovod.
"""
