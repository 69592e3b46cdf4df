"""The compile options every launch of xjfast's kernels passes, and `python -m xjfast.tools.sass`
compiles with, so that what runs is what the SASS checks saw, whatever Triton's defaults are."""

# FMA contraction: the online softmax computes each exponent as one FMA (scale, bias and running
# max folded per row), and the dequantizations fold the same way. Left to Triton, it is on up to
# 3.9, which warns about it once per process, and off from 3.10 (TRITON_DEFAULT_FP_FUSION).
COMPILE_OPTIONS = dict(enable_fp_fusion=True)
