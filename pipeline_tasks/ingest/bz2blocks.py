"""Parallel bzip2 decompression, block by block (single-stream and multistream files).

bzip2 is the slowest part of reading a Wikipedia dump (``bzcat`` runs at ~30 MB/s of output), and
a single ``bz2`` stream decodes on one core. But a bzip2 stream is a 4-byte header (``BZh1``..
``BZh9``), then blocks of at most 900 kB of input, each starting with the 48-bit magic
``0x314159265359`` at any *bit* offset, then an end-of-stream marker ``0x177245385090`` with the
stream CRC. Blocks are independent: one block becomes a valid stream of its own once wrapped as
header + block bits + end marker + the block's CRC (the stream CRC of a one-block stream is its
block CRC). This is how lbzip2 and pbzip2 decode in parallel; here the blocks go to the ingest
worker pool and come back in order.

A 48-bit magic can in principle also occur inside compressed data (about once per 30 TB): a block
that fails to decode is merged with the next piece and decoded again, and the block CRC that
``bz2`` checks rejects any wrong split. A file that ends inside a block raises ``EOFError`` after
every complete block has been returned, like :mod:`bz2` does.
"""

from __future__ import annotations

import abc
import bz2
import collections
import io
from collections.abc import Iterator
from typing import NamedTuple

BLOCK_MAGIC = 0x314159265359
EOS_MAGIC = 0x177245385090
READ_SIZE = 4 << 20
MAX_MERGES = 4


def _patterns(magic: int) -> list[tuple[int, bytes]]:
    """(bit shift, the 5 bytes fully covered by the magic at that shift) for shifts 0..7."""
    return [(shift, (magic << (8 - shift)).to_bytes(7, "big")[1:6]) for shift in range(8)]


PATTERNS = [(magic, shift, pattern) for magic in (BLOCK_MAGIC, EOS_MAGIC) for shift, pattern in _patterns(magic)]


def find_markers(data: bytes, start: int = 0, stop: int | None = None) -> list[tuple[int, bool]]:
    """Bit offsets of block starts and end-of-stream markers beginning in ``data[start:stop]``.

    Returns sorted ``(bit offset, is_end_of_stream)``; a marker needs 7 bytes from its first byte.
    """
    stop = len(data) - 6 if stop is None else min(stop, len(data) - 6)
    found = []
    for magic, shift, pattern in PATTERNS:
        pos = data.find(pattern, start + 1)
        while pos != -1 and pos - 1 < stop:
            first = pos - 1
            value = int.from_bytes(data[first : first + 7], "big")
            if (value >> (8 - shift)) & 0xFFFFFFFFFFFF == magic:
                found.append((first * 8 + shift, magic == EOS_MAGIC))
            pos = data.find(pattern, pos + 1)
    return sorted(found)


class Segment(NamedTuple):
    """The bytes holding one block: ``data`` starts at file byte ``base``; bits [first, end) are the block."""

    data: bytes
    base: int
    first: int
    end: int


def decode_segment(segment: Segment) -> bytes:
    """Decompress one block by wrapping it into a stream of its own."""
    data, base, first, end = segment
    nbits = end - first
    value = int.from_bytes(data, "big")
    value >>= len(data) * 8 - (end - base * 8)  # drop the bits after the block
    value &= (1 << nbits) - 1  # ... and before it
    crc = (value >> (nbits - 80)) & 0xFFFFFFFF  # the 32 bits after the 48-bit block magic
    pad = -(nbits + 80) % 8
    stream = ((value << 80) | (EOS_MAGIC << 32) | crc) << pad
    return bz2.decompress(b"BZh9" + stream.to_bytes((nbits + 80 + pad) // 8, "big"))


def merge(a: Segment, b: Segment) -> Segment:
    """One segment from two adjacent ones (used when a false block magic split a real block)."""
    return Segment(a.data[: b.base - a.base] + b.data, a.base, a.first, b.end)


def iter_segments(fh, read_size: int = READ_SIZE) -> Iterator[Segment]:
    """Split a bzip2 file into block segments while reading it (memory: one block + one read).

    Raises ``EOFError`` at the end when the file stops inside a block (a truncated download).
    """
    buf, base, scanned, eof = b"", 0, 0, False
    markers: collections.deque = collections.deque()
    while True:
        if not eof:
            chunk = fh.read(read_size)
            eof = not chunk
            buf += chunk
            limit = len(buf) - 6 if not eof else len(buf)
            markers.extend((bit + base * 8, eos) for bit, eos in find_markers(buf, scanned, limit))
            scanned = max(scanned, limit)
        while len(markers) >= 2:
            (first, first_eos), (end, _) = markers[0], markers[1]
            markers.popleft()
            if first_eos:
                continue
            start = first // 8 - base
            yield Segment(buf[start : (end + 7) // 8 - base], first // 8, first, end)
            keep = end // 8 - base
            buf, base, scanned = buf[keep:], base + keep, scanned - keep
        if eof:
            if markers and not markers[-1][1]:
                raise EOFError("compressed file ended inside a bzip2 block (the end-of-stream marker is missing)")
            return


class ChunkReader(io.RawIOBase):
    """A readable binary stream over chunks produced by :meth:`_next_chunk` (None at the end).

    Shared by the parallel bz2 reader here and the read-ahead thread in :mod:`wikidump`.
    """

    def __init__(self):
        super().__init__()
        self._buffer, self._pos, self._eof = b"", 0, False

    def readable(self) -> bool:
        return True

    @abc.abstractmethod
    def _next_chunk(self) -> bytes | None:
        """The next chunk of decompressed bytes, or None when the stream is exhausted."""

    def read(self, size: int = -1) -> bytes:
        while self._pos >= len(self._buffer):
            if self._eof:
                return b""
            chunk = self._next_chunk()
            if chunk is None:
                self._eof = True
                return b""
            self._buffer, self._pos = chunk, 0
        if size is None or size < 0:
            size = len(self._buffer) - self._pos
        data = self._buffer[self._pos : self._pos + size]
        self._pos += len(data)
        return data

    def readinto(self, buffer) -> int:
        data = self.read(len(buffer))
        buffer[: len(data)] = data
        return len(data)


class ParallelBz2Reader(ChunkReader):
    """Binary stream of a bzip2 file decompressed by ``pool`` workers, ``window`` blocks ahead."""

    def __init__(self, path, pool, window: int = 4):
        super().__init__()
        self._fh = open(path, "rb")
        self._segments = iter_segments(self._fh)
        self._pool, self._window = pool, window
        self._pending: collections.deque = collections.deque()
        self._exhausted, self._error = False, None

    def _fill(self) -> None:
        while not self._exhausted and len(self._pending) < self._window:
            try:
                segment = next(self._segments)
            except StopIteration:
                self._exhausted = True
            except EOFError as exc:  # raised once the complete blocks before it are consumed
                self._exhausted, self._error = True, exc
            else:
                self._pending.append((segment, self._pool.apply_async(decode_segment, (segment,))))

    def _next_chunk(self) -> bytes | None:
        self._fill()
        if not self._pending:
            if self._error is not None:
                error, self._error = self._error, None
                raise error
            return None
        segment, result = self._pending.popleft()
        for _ in range(MAX_MERGES):
            try:
                return result.get()
            except (OSError, ValueError, EOFError):  # a false magic inside a block: join with the next piece
                self._fill()
                if not self._pending:
                    break
                following, _ = self._pending.popleft()
                segment = merge(segment, following)
                result = self._pool.apply_async(decode_segment, (segment,))
        raise OSError(f"invalid bzip2 data in the block at byte {segment.base}")

    def close(self) -> None:
        self._fh.close()
        super().close()
