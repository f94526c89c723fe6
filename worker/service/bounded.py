"""Reading stream entries with memory bounded by ``MAX_ENTRY_BYTES``, not by the entry.

redis-py reads a reply whole before it hands it over: an entry of 100 MB (a producer that
put a million ids in one ``ids`` field) was 100 MB in the worker, and more while parsed,
before ``decode_entry`` refused it for its size. So the client that reads entries
(``XREADGROUP``, ``XRANGE``, ``XAUTOCLAIM``) parses replies with :class:`BoundedParser`,
redis-py's own RESP parser that keeps, of each array, no more than ``MAX_ENTRY_BYTES`` of
strings: past that, a string keeps its head (what a dead letter shows of it) and the rest
is read off the socket and dropped, as are the strings after it. What is dropped is
counted (:class:`~worker.service.layout.Unread`), so the entry is refused with its true size
and dead-lettered as before. Only for that client: other replies (``HMGET`` of the last
errors, say) may be larger than one entry, and must be read whole.
"""

from __future__ import annotations

from asyncio import IncompleteReadError
from typing import Any

from redis._parsers.resp3 import _AsyncRESP3Parser
from redis.exceptions import ConnectionError as RedisConnectionError

from worker.service.layout import MAX_ENTRY_BYTES, Unread

HEAD = 8 * 1024
"""The bytes kept of a string past the bound: more than a dead letter shows (2,000
characters, escaped from at most 8,004 bytes)."""
_CHUNK = 64 * 1024
_COST = 64
"""What a string costs beyond its bytes (the object, its place in the list): an entry of
400,000 one-byte fields is bounded too."""
_ARRAYS = (b"*", b"~", b">")
_STRINGS = (b"$", b"=", b"!")


class BoundedParser(_AsyncRESP3Parser):
    """RESP2 and RESP3, as redis-py's parser, but no array keeps more than ``bound`` bytes
    of strings: a string that would pass it keeps its first ``HEAD`` bytes, and the rest of
    the array is counted, not kept (one pair of :class:`Unread` stands for it)."""

    bound = MAX_ENTRY_BYTES

    def __init__(self, socket_read_size: int) -> None:
        super().__init__(socket_read_size)  # type: ignore[no-untyped-call]
        self._line: bytes | None = None
        self._dropped = False

    def on_connect(self, connection: Any) -> None:
        super().on_connect(connection)  # type: ignore[no-untyped-call]
        self._line, self._dropped = None, False

    async def read_response(
        self, disable_decoding: bool = False, push_request: bool = False
    ) -> Any:
        # redis-py resumes a reply cut off (by a timeout it was given) from the bytes it
        # kept; dropped bytes were not kept, so such a reply cannot be resumed.
        if self._dropped:
            raise RedisConnectionError("a bounded read was cut off; it cannot resume")
        response = await super().read_response(disable_decoding, push_request)
        self._dropped = False
        return response

    async def _readline(self) -> bytes:
        if self._line is not None:  # the line a value began with, handed back once
            line, self._line = self._line, None
            return line
        return await super()._readline()

    async def _read_response(
        self, disable_decoding: bool = False, push_request: bool = False
    ) -> Any:
        return await self._value(disable_decoding, push_request, room=None)

    async def _value(self, disable_decoding: bool, push_request: bool, room: int | None) -> Any:
        raw = await self._readline()
        kind, rest = raw[:1], raw[1:]
        if rest != b"-1":  # RESP2's null string and array, which redis-py's RESP3 reads too
            if kind in (b"*", b"~"):
                return await self._array(int(rest), disable_decoding, push_request)
            if kind == b"$" and room is not None and int(rest) > room:
                return await self._cut(int(rest))
        elif kind in (b"$", b"*"):
            return None
        self._line = raw  # anything else is redis-py's to read, from its first line
        return await super()._read_response(disable_decoding, push_request)

    async def _array(self, n: int, disable_decoding: bool, push_request: bool) -> list[Any]:
        items: list[Any] = []
        held = 0
        for index in range(n):
            if held > self.bound and index % 2 == 0:  # whole pairs, so fields stay fields
                size, pairs = await self._skip(n - index)
                items.append(Unread(b"...", size, pairs))
                items.append(Unread(b"(not read)", 0, 0))
                break
            item = await self._value(disable_decoding, push_request, room=self.bound - held)
            if isinstance(item, bytes):
                held += len(item) + _COST
            items.append(item)
        return items

    async def _cut(self, length: int) -> Unread:
        """A string of ``length`` bytes past the bound: its head, the rest dropped."""
        head = await self._take(min(length, HEAD))
        await self._drop(length - len(head) + 2)  # and its CRLF
        return Unread(head, length)

    async def _skip(self, n: int) -> tuple[int, int]:
        """Read ``n`` values off and keep none: the bytes of their strings, and ``n // 2``."""
        size = 0
        for _ in range(n):
            raw = await self._next_line()
            kind, rest = raw[:1], raw[1:]
            if rest == b"-1":
                continue
            if kind in _STRINGS:
                size += int(rest)
                await self._drop(int(rest) + 2)
            elif kind in _ARRAYS or kind == b"%":
                size += (await self._skip(int(rest) * (2 if kind == b"%" else 1)))[0]
        return size, n // 2

    async def _next_line(self) -> bytes:
        """The next line, as ``_readline`` reads it, but not kept for a resume."""
        found = self._buffer.find(b"\r\n", self._pos)
        if found >= 0:
            line, self._pos = self._buffer[self._pos : found], found + 2
            return line
        tail = self._buffer[self._pos :]
        self._pos = len(self._buffer)
        assert self._stream is not None
        self._dropped = True
        data = await self._stream.readline()
        if not data.endswith(b"\r\n"):
            raise RedisConnectionError("Connection closed by server.")
        return (tail + data)[:-2]

    async def _take(self, n: int) -> bytes:
        """``n`` bytes: what the buffer holds of them, then the socket's (not kept)."""
        have = self._buffer[self._pos : self._pos + n]
        self._pos += len(have)
        if len(have) == n:
            return have
        assert self._stream is not None
        self._dropped = True
        try:
            return have + await self._stream.readexactly(n - len(have))
        except IncompleteReadError as exc:
            raise RedisConnectionError("Connection closed by server.") from exc

    async def _drop(self, n: int) -> None:
        while n > 0:
            n -= len(await self._take(min(n, _CHUNK)))
