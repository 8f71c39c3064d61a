"""Length-prefixed frames over a libp2p stream: one frame = one message.

A closed or reset stream surfaces as :class:`PeerUnavailableError` at once, so callers treat a dead
peer as a failure immediately instead of waiting for a timeout.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable

from libp2p.abc import INetStream
from libp2p.exceptions import BaseLibp2pError

from jupyter_swarm.errors import PeerUnavailableError, ProtocolError, SwarmError

DEFAULT_MAX_FRAME_BYTES = 512 * 1024 * 1024  # the cap; each protocol sets its own, smaller limit
_HEADER_BYTES = 4
_READ_CHUNK = 64 * 1024


class FrameTooLargeError(ProtocolError):
    """The peer announced a frame over this stream's limit; the stream cannot be read any further."""


class FramedStream:
    """A libp2p stream carrying whole messages (frames) rather than bytes.

    ``max_frame_bytes`` bounds what the peer may send (each protocol sets its own); what we send is bounded only by
    DEFAULT_MAX_FRAME_BYTES, since a reply may be larger than the request its protocol allows.
    """

    def __init__(self, stream: INetStream, max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES,
                 throttle: Callable[[int], Awaitable[None]] | None = None):
        """``throttle(size)`` is awaited before a frame of ``size`` bytes is read (the peer's byte rate)."""
        self._stream = stream
        self.max_frame_bytes = max_frame_bytes
        self._throttle = throttle
        self.remote_peer = str(stream.muxed_conn.peer_id)
        self._buffer = bytearray()

    async def send(self, payload: bytes) -> None:
        """Write one frame."""
        if len(payload) > DEFAULT_MAX_FRAME_BYTES:
            raise ProtocolError(f"message of {len(payload)} bytes exceeds the {DEFAULT_MAX_FRAME_BYTES}-byte limit")
        try:
            await self._stream.write(len(payload).to_bytes(_HEADER_BYTES, "big") + payload)
        except (BaseLibp2pError, OSError, EOFError) as e:
            raise PeerUnavailableError(f"connection to peer {self.remote_peer} closed while sending: {e!r}") from e

    async def recv(self) -> bytes:
        """Read one frame; raises PeerUnavailableError if the stream ends first."""
        await self._fill(_HEADER_BYTES)
        size = int.from_bytes(self._buffer[:_HEADER_BYTES], "big")
        if size > self.max_frame_bytes:
            raise FrameTooLargeError(
                f"peer {self.remote_peer} announced a {size}-byte message, over the {self.max_frame_bytes}-byte limit")
        if self._throttle is not None:
            await self._throttle(_HEADER_BYTES + size)  # before reading it: flow control then slows the peer down
        await self._fill(_HEADER_BYTES + size)
        payload = bytes(self._buffer[_HEADER_BYTES:_HEADER_BYTES + size])
        del self._buffer[:_HEADER_BYTES + size]
        return payload

    async def frames(self) -> AsyncIterator[bytes]:
        """Every frame the peer sends, until the stream ends (a server's request loop). An over-limit frame raises
        :class:`FrameTooLargeError`, so the server can tell the peer why it stops reading."""
        while True:
            try:
                payload = await self.recv()
            except FrameTooLargeError:
                raise
            except SwarmError:
                return
            yield payload

    async def _fill(self, size: int) -> None:
        """Buffer at least ``size`` bytes. Reads take whatever has arrived (header and body together), since
        every read of a yamux stream costs a window-update frame and a wake-up of the sender."""
        try:
            while len(self._buffer) < size:
                chunk = await self._stream.read(max(_READ_CHUNK, size - len(self._buffer)))
                if not chunk:
                    raise EOFError("end of stream")
                self._buffer += chunk
        except (BaseLibp2pError, OSError, EOFError) as e:
            raise PeerUnavailableError(f"connection to peer {self.remote_peer} closed: {e!r}") from e

    async def close(self) -> None:
        """Close our side; errors from an already-dead stream are ignored."""
        try:
            await self._stream.close()
        except Exception:  # noqa: BLE001 - closing a broken stream has nothing left to report
            pass

    async def reset(self) -> None:
        """Abort the stream (both directions)."""
        try:
            await self._stream.reset()
        except Exception:  # noqa: BLE001
            pass
