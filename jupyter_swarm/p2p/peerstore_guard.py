"""Keep a host's own entry in its py-libp2p peerstore.

py-libp2p 0.8's peerstore holds at most ``max_peers`` (1,000) peers and, past that, evicts peers with no addresses
first. A host keeps its own keys there but no addresses of its own, so once it has met 1,000 peers it evicts
itself. Its identify handler then fails (``host.get_public_key()``: "peer ID not found") inside py-libp2p's
connection service, which takes the whole host down: a client in a 1,000-kill soak lost every connection
mid-generation, and a long-lived bootstrap node would go the same way. :func:`keep_own_entry` leaves the host's own
entry out of the eviction.
"""

from __future__ import annotations

import logging
from typing import Any

logger = logging.getLogger(__name__)


def keep_own_entry(peerstore: Any, own_id: Any) -> bool:
    """Make ``peerstore`` never evict ``own_id``. Returns False, changing nothing, when the installed py-libp2p's
    peerstore has no such eviction (a newer version may not need this)."""
    enforce = getattr(peerstore, "_enforce_peer_limit", None)
    data = getattr(peerstore, "peer_data_map", None)
    if enforce is None or not isinstance(data, dict):
        logger.info("py-libp2p's peerstore has changed; its eviction is left as it is")
        return False

    def enforce_sparing_own_entry() -> None:
        own = data.pop(own_id, None)
        try:
            enforce()
        finally:
            if own is not None:
                data[own_id] = own

    peerstore._enforce_peer_limit = enforce_sparing_own_entry
    return True
