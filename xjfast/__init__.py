"""xjfast: FP8 kernels and a streaming engine for real-time video generation."""
from xjfast.cache import StreamingKVCache
from xjfast.errors import BackendUnavailable
from xjfast.integrations.sdpa import sdpa
from xjfast.ops.denoise_step import denoise_step
from xjfast.ops.temporal_attention import temporal_attention

__version__ = "0.1.0"
__all__ = ["BackendUnavailable", "StreamingKVCache", "denoise_step", "sdpa", "temporal_attention", "__version__"]
