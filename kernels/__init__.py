"""Hand-written Triton kernels, installed as the subpackage `xjfast.kernels`."""
