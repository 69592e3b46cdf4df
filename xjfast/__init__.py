"""xjfast: FP8 kernels and a streaming engine for real-time video generation."""
from xjfast.errors import BackendUnavailable

__version__ = "0.1.0"
__all__ = ["BackendUnavailable", "__version__"]
