"""Reading a body that arrives in pieces, up to a limit."""

from __future__ import annotations

from formcraftd.core.streams import read_at_most


class Pieces:
    """A stream whose every read returns at most `size` bytes, as a socket may."""

    def __init__(self, data: bytes, size: int) -> None:
        self.data, self.size = data, size

    async def read(self, n: int = -1) -> bytes:
        take = self.size if n < 0 else min(n, self.size)
        chunk, self.data = self.data[:take], self.data[take:]
        return chunk


async def test_every_piece_is_read_until_the_stream_ends() -> None:
    assert await read_at_most(Pieces(b"x" * 1000, 7), 4096) == b"x" * 1000


async def test_reading_stops_at_the_limit() -> None:
    stream = Pieces(b"0123456789" * 10, 3)
    assert await read_at_most(stream, 25) == (b"0123456789" * 3)[:25]
    assert len(stream.data) == 75  # nothing read past the limit
