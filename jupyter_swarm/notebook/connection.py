"""Connecting a kernel to a swarm: the client model and tokenizer, an optional local swarm, the swarm map."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

logger = logging.getLogger(__name__)

LOCAL_SERVER_ARGS = ["--update-period", "5", "--torch-threads", "1"]


class SwarmConnection:
    """This kernel's link to one swarm: ``model`` (a distributed transformers model), ``tokenizer``, and the
    local swarm it started, if any."""

    def __init__(self) -> None:
        self.model: Any = None
        self.tokenizer: Any = None
        self.model_path: str | None = None
        self.initial_peers: list[str] = []
        self.swarm_key: Any = None  # the SwarmKey of a private swarm (None: open)
        self.local_swarm: Any = None
        self.last_map: Any = None
        self.last_map_time = 0.0
        self._map_lock = threading.Lock()

    @property
    def connected(self) -> bool:
        """True once a model is loaded and joined to a swarm."""
        return self.model is not None

    def connect(self, model: str, peers: Sequence[str] = (), *, local: bool = False,
                spans: Sequence[tuple[int, int]] | None = None, progress: Callable[[str], None] = print,
                swarm_key: str | None = None, verify: float | None = None) -> Any:
        """Join a swarm (or start a local one with ``local``) and load the client's parts of ``model``.

        ``model`` is a directory, a hub id, or a demo name (``demo``: SmolLM2-135M-Instruct; ``tiny``: a random
        8-block model). ``swarm_key``: the key file of a private swarm (default: ``$JUPYTER_SWARM_KEY``, else an
        open swarm); a local swarm's servers and this kernel's served blocks use it too. ``verify``: the share of
        inference steps re-run on a second server (see the model's ``verify``; None: its default).
        """
        from transformers import AutoTokenizer

        from jupyter_swarm.client.model import AutoDistributedModelForCausalLM
        from jupyter_swarm.demo import DEMO_NAMES, demo_model_path
        from jupyter_swarm.errors import ConfigurationError
        from jupyter_swarm.p2p.swarm_key import resolve_swarm_key

        if self.connected:
            self.disconnect()
        key = resolve_swarm_key(swarm_key)
        if model in DEMO_NAMES:
            progress(f"{model} model: {DEMO_NAMES[model]}")
        path = demo_model_path(model) or model
        if local:
            peers = self._start_local_swarm(path, spans, progress, swarm_key)
        if not peers:
            raise ConfigurationError("give the swarm's addresses with --peers /ip4/.../p2p/... "
                                     "(or use --local to start a swarm on this machine)")
        progress("joining the swarm and loading the model's embeddings and head...")
        try:
            options = {} if verify is None else {"verify": verify}
            self.model = AutoDistributedModelForCausalLM.from_pretrained(path, initial_peers=list(peers), swarm_key=key,
                                                                         **options)
            self.tokenizer = AutoTokenizer.from_pretrained(path)
        except BaseException:
            self.disconnect()
            raise
        self.model_path, self.initial_peers, self.swarm_key = path, list(peers), key
        return self.model

    def _start_local_swarm(self, path: str, spans: Sequence[tuple[int, int]] | None,
                           progress: Callable[[str], None], swarm_key: str | None) -> list[str]:
        from jupyter_swarm.errors import ConfigurationError
        from jupyter_swarm.local_swarm import LocalSwarm, default_spans
        from jupyter_swarm.models import load_model_config
        from jupyter_swarm.runtime.server import num_blocks_of

        total = num_blocks_of(load_model_config(path))
        spans = list(spans) if spans else default_spans(total)
        for start, end in spans:
            if not 0 <= start < end <= total:
                raise ConfigurationError(f"span {start}:{end} is outside the model's {total} blocks")
        progress(f"starting a local swarm: {len(spans)} server(s) for blocks "
                 + ", ".join(f"{a}:{b}" for a, b in spans) + " (loopback only)...")
        # own session: a kernel interrupt (SIGINT to the kernel's process group) must not stop the servers
        self.local_swarm = LocalSwarm(path, spans, extra_args=LOCAL_SERVER_ARGS, new_session=True,
                                      swarm_key=swarm_key)
        return self.local_swarm.initial_peers

    def disconnect(self) -> None:
        """Close the client and stop the local swarm (the caller stops generating and serving first)."""
        model, self.model = self.model, None
        if model is not None:
            try:
                model.close()
            except Exception:  # noqa: BLE001
                logger.exception("closing the client failed")
        swarm, self.local_swarm = self.local_swarm, None
        if swarm is not None:
            swarm.stop()
        self.last_map = None
        self.tokenizer = None

    def require_model(self) -> Any:
        """The connected model; raises ConfigurationError (saying how to connect) when there is none."""
        from jupyter_swarm.errors import ConfigurationError

        if self.model is None:
            raise ConfigurationError("not connected: run `%swarm connect MODEL --peers ...` "
                                     "(or `%swarm connect demo --local`) first")
        return self.model

    def read_map(self, max_age: float = 0.0) -> Any:
        """The connected model's swarm map (cached for ``max_age`` seconds)."""
        model = self.require_model()
        with self._map_lock:
            if self.last_map is None or time.monotonic() - self.last_map_time > max_age:
                self.last_map = model.swarm.read_map()
                self.last_map_time = time.monotonic()
            return self.last_map

    def forget_map(self) -> None:
        """Make the next :meth:`read_map` read the swarm again (e.g. after this kernel started serving)."""
        self.last_map_time = 0.0

    def next_route(self) -> list[tuple[str, int, int]]:
        """The chain of servers the next request would take: (peer id, start, end) per span."""
        from jupyter_swarm.client.routing import choose_chain

        model = self.require_model()
        swarm_map = self.read_map()
        chain = choose_chain(swarm_map, 0, swarm_map.num_blocks, banned=model.swarm.bans.banned(),
                             pings=self.client_pings())
        return [(r.peer_id, r.start, r.end) for r in chain]

    def links(self) -> dict[str, str | None]:
        """How this kernel reaches each server of the last swarm map: "direct", "hole-punched", "relayed", or None
        (no connection now)."""
        model, swarm_map = self.model, self.last_map
        if model is None or swarm_map is None:
            return {}
        node = model.swarm.node
        try:
            return node.call_sync(lambda: {p: node.link(p) for p in swarm_map.servers})
        except Exception:  # noqa: BLE001 - a closing connection: nothing to show
            return {}

    def client_pings(self) -> dict[str, float]:
        """The client's own smoothed round-trip times to servers (seconds), as its routing measured them."""
        pings = getattr(self.model.swarm, "pings", None) if self.model is not None else None
        try:
            return dict(pings.to_dict()) if pings is not None else {}
        except Exception:  # noqa: BLE001 - measurements are optional decoration
            return {}
