"""Video in and out for `eovseg predict`, with PyAV (its wheels carry FFmpeg: no system install needed)."""

from __future__ import annotations

from collections.abc import Iterator
from fractions import Fraction
from pathlib import Path

import numpy as np
from PIL import Image

__all__ = ["VideoOverlayWriter", "read_video_frames"]

DEFAULT_FPS = 25.0


def read_video_frames(path: str, batch_size: int) -> Iterator[tuple[float, list[Image.Image]]]:
    """`(frames per second, frames)` in batches of up to `batch_size` RGB images, in order."""
    import av

    with av.open(str(path)) as container:
        if not container.streams.video:
            raise ValueError("the file has no video stream")
        stream = container.streams.video[0]
        fps = float(stream.average_rate) if stream.average_rate else DEFAULT_FPS
        batch = []
        for frame in container.decode(stream):
            batch.append(frame.to_image())
            if len(batch) == batch_size:
                yield fps, batch
                batch = []
        if batch:
            yield fps, batch


class VideoOverlayWriter:
    """Writes frames (PIL images of one size) to an H.264 MP4; the file appears only when all frames are written.

    The encoder runs on one thread, so the same frames give the same bytes (split runs write the files of one run).
    """

    def __init__(self, path: Path):
        self.path = Path(path)
        self.partial = self.path.with_name(self.path.name + ".partial")
        self.container = self.stream = None

    def __enter__(self) -> "VideoOverlayWriter":
        return self

    def _open(self, width: int, height: int, fps: float) -> None:
        import av

        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.container = av.open(str(self.partial), mode="w", format="mp4")
        self.stream = self.container.add_stream("libx264", rate=Fraction(fps).limit_denominator(1001))
        # yuv420p (what players expect) needs an even width and height.
        self.stream.width, self.stream.height = width + width % 2, height + height % 2
        self.stream.pix_fmt = "yuv420p"
        self.stream.thread_count = 1
        self.stream.options = {"crf": "18", "preset": "fast"}

    def add(self, image: Image.Image, fps: float) -> None:
        import av

        if self.container is None:
            self._open(image.width, image.height, fps)
        array = np.asarray(image.convert("RGB"))
        pad = ((0, self.stream.height - array.shape[0]), (0, self.stream.width - array.shape[1]), (0, 0))
        frame = av.VideoFrame.from_ndarray(np.pad(array, pad, mode="edge"), format="rgb24")
        for packet in self.stream.encode(frame):
            self.container.mux(packet)

    def __exit__(self, exc_type, exc, traceback) -> None:
        if self.container is not None:
            try:
                if exc_type is None:
                    for packet in self.stream.encode():
                        self.container.mux(packet)
            finally:
                self.container.close()
        if exc_type is None and self.container is not None:
            self.partial.replace(self.path)
        elif self.partial.exists():
            self.partial.unlink()
