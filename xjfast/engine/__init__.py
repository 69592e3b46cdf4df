"""The streaming engine: StreamGenerator and its cache configuration."""
from xjfast.engine.generator import CacheConfig, Frame, StreamGenerator

__all__ = ["CacheConfig", "Frame", "StreamGenerator"]
