"""What the publisher keeps per published message (issue 18: soak memory flat).

The snapshot store keeps every volume message of the open series for late joiners; a
copied zmq.Frame holds its bytes twice (pyzmq keeps the Python bytes beside libzmq's
copy), so each stored volume message cost twice its size.
"""

from __future__ import annotations

import ctypes
import gc

import numpy as np
import pytest
import zmq

from rtsc.client import request_snapshot
from rtsc.output.publish import ZERO_COPY_BYTES, Publisher, frame_of


def _address(buffer) -> int:
    return np.frombuffer(buffer, np.uint8).ctypes.data


def test_frames_share_large_parts_and_copy_small_ones():
    large, small = bytes(range(256)) * 40, b"volume"
    shared, copied = frame_of(large), frame_of(small)
    assert _address(shared.buffer) == _address(large)   # libzmq sends the bytes themselves
    assert _address(copied.buffer) != _address(small)
    assert shared.bytes == large and copied.bytes == small
    assert frame_of(bytes(ZERO_COPY_BYTES)).buffer.nbytes == ZERO_COPY_BYTES


class _Mallinfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in (
        "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks",
        "uordblks", "fordblks", "keepcost")]


def _malloc_in_use() -> int:
    """Bytes malloc has handed out and not had back (all arenas, mmapped chunks too)."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallinfo2.restype = _Mallinfo2
    except (OSError, AttributeError):
        pytest.skip("glibc's mallinfo2 is not available")
    info = libc.mallinfo2()
    return info.uordblks + info.hblkhd


def test_snapshot_store_holds_each_volume_message_once():
    """200 volume messages (8 kB of carpet and a ~2 kB header each) grow what malloc
    holds by about their size, not twice it; the snapshot still has them all, intact."""
    from snapshot_server import SERIES, publish_run, volume_message

    rng = np.random.default_rng(3)
    with Publisher("tcp://127.0.0.1:*", "tcp://127.0.0.1:*") as pub:
        publish_run(pub, 10)
        extra = [volume_message(10 + i, rng) for i in range(200)]  # made before measuring
        gc.collect()
        before = _malloc_in_use()
        for message in extra:
            pub.publish(message, SERIES)
        gc.collect()
        grown = _malloc_in_use() - before
        stored = pub._snapshot._volumes[10:]
        payload = sum(frame.buffer.nbytes for frames in stored for frame in frames)
        snapshot = request_snapshot(pub.snapshot_endpoint)
    volumes = [s for s in snapshot if s.topic == "volume"]
    assert [v.header["index"] for v in volumes] == list(range(210))
    for got, message in zip(volumes[10:], extra):
        np.testing.assert_array_equal(got.arrays[0], message.arrays[0])
    print(f"\n200 volume messages: {payload / 2**20:.2f} MB of frames, malloc grew "
          f"{grown / 2**20:.2f} MB")
    assert payload > 200 * 9000
    # copied frames: >= 2 x payload; shared: the payload and the small objects around it
    assert grown < 1.3 * payload
