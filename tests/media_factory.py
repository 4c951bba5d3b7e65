"""Media files the tests make at run time (nothing binary is committed)."""

import av
import numpy as np


def write_video(path, n=12, fps=6):
    """A 48x48 mpeg4 clip whose frame i is a flat grey of level (20 * i) % 255."""
    with av.open(str(path), "w") as container:
        stream = container.add_stream("mpeg4", rate=fps)
        stream.width, stream.height, stream.pix_fmt = 48, 48, "yuv420p"
        for i in range(n):
            arr = np.full((48, 48, 3), (i * 20) % 255, dtype=np.uint8)
            for packet in stream.encode(av.VideoFrame.from_ndarray(arr, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path
