"""Exception types shared by every layer.

Each layer raises a subclass of :class:`SwarmError` whose message says what was wrong and what to do.
"""


class SwarmError(Exception):
    """Base class of every error jupyter-swarm raises on purpose."""


class ConfigurationError(SwarmError, ValueError):
    """A user-supplied option, path or address is invalid."""


class UnsupportedModelError(ConfigurationError):
    """The checkpoint is not a causal LM of a family jupyter-swarm can serve."""


class MissingDependencyError(ConfigurationError):
    """An optional feature needs a package that is not installed; the message says how to install it."""


class UnsupportedQuantTypeError(ConfigurationError):
    """The device (with the installed bitsandbytes) cannot run blocks quantized this way."""


class ProtocolError(SwarmError):
    """A peer sent a message that is not valid for the protocol."""


class InvalidRequestError(ProtocolError):
    """A request does not fit the server (a tensor's shape, dtype, size or values; a field out of range)."""


class RemoteError(SwarmError):
    """A server answered a request with an error; the message is the server's explanation.

    ``invalid_request`` is True when the server refused the request itself (another server would refuse
    it too), False when the server failed or was busy (another server may succeed).
    """

    def __init__(self, message: str, *, invalid_request: bool = False):
        super().__init__(message)
        self.invalid_request = invalid_request


class SessionEvictedError(RemoteError):
    """The server freed an idle inference session's cache to make room (memory pressure); the client replays the
    session's inputs, to that server or another, and carries on."""


class ServerBusyError(RemoteError):
    """The server's cache has no room for the session's next tokens right now; the client retries shortly (replaying
    the session, to that server or another) without holding it against the server."""


class PeerUnavailableError(SwarmError, ConnectionError):
    """A peer could not be reached, or its connection closed mid-request."""


class MissingBlocksError(SwarmError):
    """No online server covers some blocks of the model."""

    def __init__(self, missing: list[int], num_servers: int, message: str | None = None):
        self.missing = list(missing)
        self.num_servers = num_servers
        super().__init__(message or (
            f"no online server covers blocks {format_block_list(self.missing)} "
            f"({num_servers} server(s) online); start a server for them with "
            f"`jupyter-swarm serve MODEL --blocks A:B` or wait for one to join"))


def format_block_list(blocks: list[int]) -> str:
    """Render [0, 1, 2, 5, 7, 8] as '0-2, 5, 7-8'."""
    parts: list[str] = []
    blocks = sorted(set(blocks))
    i = 0
    while i < len(blocks):
        j = i
        while j + 1 < len(blocks) and blocks[j + 1] == blocks[j] + 1:
            j += 1
        parts.append(str(blocks[i]) if i == j else f"{blocks[i]}-{blocks[j]}")
        i = j + 1
    return ", ".join(parts)
