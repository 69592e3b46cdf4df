"""MP4 writing (H.264, yuv420p: what common players open) and reading, through PyAV.

PyAV is optional at import time: `pip install xjfast[video]`.
"""
from __future__ import annotations

from fractions import Fraction

import numpy as np


def require_av():
    """The PyAV module, or an ImportError that says how to install it."""
    try:
        import av
    except ImportError as exc:
        raise ImportError("writing or reading MP4 needs PyAV: pip install 'xjfast[video]' (or pip install av)") \
            from exc
    return av


class Mp4Writer:
    """Append uint8 RGB frames [N, H, W, 3] (H and W even) to an H.264 MP4."""

    def __init__(self, path: str, fps: int, crf: int = 18):
        av = require_av()
        self.container = av.open(str(path), mode="w", format="mp4")  # whatever the file's extension
        self.stream = self.container.add_stream("libx264", rate=Fraction(fps))
        self.stream.pix_fmt = "yuv420p"
        self.stream.options = {"crf": str(crf), "preset": "veryfast"}
        self.size = None
        self.frames = 0

    def write(self, frames) -> None:
        av = require_av()
        frames = np.asarray(frames)
        if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
            raise ValueError(f"frames: expected uint8 [N, H, W, 3], got {frames.dtype} {frames.shape}")
        if self.size is None:
            h, w = frames.shape[1:3]
            if h % 2 or w % 2:
                raise ValueError(f"frames: H.264 in yuv420p needs even sizes, got {h}x{w}")
            self.stream.height, self.stream.width = self.size = (h, w)
        for frame in frames:
            for packet in self.stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                self.container.mux(packet)
            self.frames += 1

    def close(self) -> None:
        for packet in self.stream.encode():
            self.container.mux(packet)
        self.container.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def probe(path: str) -> dict:
    """Frame count, size and codec of a video, by decoding it."""
    av = require_av()
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        count = sum(1 for _ in container.decode(stream))
        return {"frames": count, "width": stream.width, "height": stream.height, "codec": stream.codec_context.name}
