"""Live notebook widgets: generation, swarm map (coverage + routing graph), serve panel, connection summary.

Each live widget refreshes itself from a background thread (never blocking the kernel) and stops refreshing
when it is closed (``widget.close()``, its Close button, or disconnecting).
"""

from __future__ import annotations

import html
import logging
import threading
import time
from typing import Any

import ipywidgets as widgets

from jupyter_swarm.client.status import connection_label, reachability_text
from jupyter_swarm.notebook.generation import GenerationResult
from jupyter_swarm.notebook.kernel_swarm import KernelSwarm, get_kernel_swarm

logger = logging.getLogger(__name__)

RED, GREEN, GREY, ORANGE = "#c62828", "#2e7d32", "#9e9e9e", "#ef6c00"


def _mib(n: float | None) -> str:
    return "-" if n is None else f"{n / 2**20:.1f} MiB"


class _Refresher:
    """Calls ``refresh()`` every ``period`` seconds in a daemon thread until :meth:`stop_refreshing`."""

    period = 2.0

    def _start_refreshing(self) -> None:
        self._halt = threading.Event()
        self.refreshes = 0
        self._thread = threading.Thread(target=self._loop, name=f"jupyter-swarm-{type(self).__name__}", daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while not self._halt.is_set():
            try:
                self.refresh()
                self.refreshes += 1
            except Exception as e:  # noqa: BLE001 - shown in the widget; the next refresh tries again
                self.show_error(e)
            self._halt.wait(self.period)

    def refresh(self) -> None:
        raise NotImplementedError

    def show_error(self, error: Exception) -> None:
        logger.debug("refresh failed", exc_info=error)

    @property
    def live(self) -> bool:
        return not self._halt.is_set()

    def stop_refreshing(self) -> None:
        self._halt.set()


def coverage_strip(coverage: list[int]) -> str:
    """One coloured cell per block with its server count; holes are red."""
    cells = "".join(
        f"<span class='jupyter-swarm-block' data-block='{b}' data-servers='{n}' title='block {b}: {n} server(s)' "
        f"style='display:inline-block;min-width:20px;height:20px;margin:1px;text-align:center;font-size:11px;"
        f"line-height:20px;color:white;border-radius:2px;background:{RED if n == 0 else GREEN}'>{n}</span>"
        for b, n in enumerate(coverage))
    return f"<div class='jupyter-swarm-coverage'>{cells}</div>"


class SwarmSummary(widgets.HTML, _Refresher):
    """Live one-line summary shown by ``%swarm connect``: model, blocks, servers online, coverage."""

    period = 2.0

    def __init__(self, swarm: KernelSwarm | None = None, **kwargs: Any):
        super().__init__(**kwargs)
        self.swarm = swarm or get_kernel_swarm()
        self.add_class("jupyter-swarm-summary")
        self._start_refreshing()

    def refresh(self) -> None:
        if not self.swarm.connected:
            self.value = "<i>disconnected</i>"
            self.stop_refreshing()
            return
        swarm_map = self.swarm.connection.read_map(max_age=1.0)
        missing = swarm_map.missing_blocks()
        state = (f"<span style='color:{GREEN}'>all blocks covered</span>" if not missing
                 else f"<span style='color:{RED}'>missing blocks {missing}</span>")
        self.value = (f"<b>{html.escape(swarm_map.model_prefix)}</b>: {swarm_map.num_blocks} blocks, "
                      f"{len(swarm_map.online())} server(s) online, {state} "
                      f"<span style='color:{GREY}'>(live, {time.strftime('%H:%M:%S')})</span>"
                      + coverage_strip(swarm_map.coverage()))

    def show_error(self, error: Exception) -> None:
        self.value = f"<span style='color:{RED}'>cannot read the swarm map: {html.escape(str(error))}</span>"

    def close(self) -> None:
        self.stop_refreshing()
        super().close()


class GenerationWidget(widgets.VBox):
    """Prompt, sampling controls, Generate/Stop, tokens streaming live, speed and the route taken."""

    def __init__(self, swarm: KernelSwarm | None = None, prompt: str = "Once upon a time", **kwargs: Any):
        self.swarm = swarm or get_kernel_swarm()
        style = {"description_width": "110px"}
        self.prompt = widgets.Textarea(value=prompt, description="Prompt", layout=widgets.Layout(width="98%"),
                                       style=style)
        self.max_new_tokens = widgets.IntSlider(32, 1, 256, description="Max new tokens", style=style)
        self.temperature = widgets.FloatSlider(0.0, min=0.0, max=2.0, step=0.05, description="Temperature",
                                               style=style)
        self.top_p = widgets.FloatSlider(1.0, min=0.05, max=1.0, step=0.05, description="Top-p", style=style)
        self.num_beams = widgets.IntSlider(1, 1, 8, description="Beams", style=style)
        self.speculative = widgets.Combobox(value="off", options=["off", "lookup", "draft:"], description="Speculative",
                                            placeholder="off, lookup[:K] or draft:PATH", ensure_option=False,
                                            style=style)
        self.generate_button = widgets.Button(description="Generate", button_style="primary", icon="play")
        self.stop_button = widgets.Button(description="Stop", button_style="danger", icon="stop", disabled=True)
        self.output = widgets.HTML("")
        self.stats = widgets.HTML("")
        self.route = widgets.HTML("")
        for w, name in ((self.generate_button, "generate"), (self.stop_button, "stop"), (self.output, "output"),
                        (self.stats, "stats"), (self.route, "route"), (self.prompt, "prompt"),
                        (self.speculative, "speculative")):
            w.add_class(f"jupyter-swarm-{name}")
        self.generate_button.on_click(lambda _: self.generate())
        self.stop_button.on_click(lambda _: self.stop())
        self.text = ""
        self.result: GenerationResult | None = None
        self.done = threading.Event()
        self.done.set()
        self._began = 0.0
        super().__init__([
            widgets.HTML("<b>Generate through the swarm</b>"), self.prompt,
            widgets.HBox([widgets.VBox([self.max_new_tokens, self.temperature]),
                          widgets.VBox([self.top_p, self.num_beams]), self.speculative]),
            widgets.HBox([self.generate_button, self.stop_button]), self.output, self.stats, self.route], **kwargs)
        self.add_class("jupyter-swarm-generation")

    def _render_output(self, cursor: bool) -> None:
        from jupyter_swarm.client.chat import has_chat_template

        # a chat model answers the prompt (on its own line); a plain model continues it
        gap = "\n\n" if has_chat_template(self.swarm.tokenizer) else ""
        self.output.value = (
            "<pre style='white-space:pre-wrap;border:1px solid #ddd;padding:6px;min-height:3em;margin:4px 0'>"
            f"<span style='color:{GREY}'>{html.escape(self.prompt.value + gap)}</span>{html.escape(self.text)}"
            + ("<span style='color:#1976d2'>&#9612;</span>" if cursor else "") + "</pre>")

    def generate(self) -> None:
        """Start generating with the current controls (returns at once)."""
        self.text, self.result = "", None
        self.done.clear()
        self._began = time.perf_counter()
        self._tokens = 0
        self._times: list[float] = []
        self.generate_button.disabled, self.stop_button.disabled = True, False
        self.stats.value = "<i>waiting for the first token...</i>"
        self.route.value = ""
        self._render_output(True)
        try:
            self.swarm.generation.start_generation(
                self.prompt.value, on_text=self._on_text, on_done=self._on_done,
                max_new_tokens=self.max_new_tokens.value, temperature=self.temperature.value,
                top_p=self.top_p.value, num_beams=self.num_beams.value, speculative=self.speculative.value)
        except Exception as e:  # noqa: BLE001 - shown in the widget
            self._on_done(GenerationResult(error=str(e)))

    def _on_text(self, piece: str) -> None:
        self.text += piece
        result = self.swarm.generation.current
        tokens = result.tokens if result is not None else self._tokens + 1  # several when accepted together
        self._times.extend([time.perf_counter()] * (tokens - self._tokens))
        self._tokens = tokens
        elapsed = time.perf_counter() - self._began
        self._render_output(True)
        recent = self._times[-16:]
        speed = (f", {(len(recent) - 1) / (recent[-1] - recent[0]):.1f} tokens/s"
                 if len(recent) > 1 and recent[-1] > recent[0] else "")
        self.stats.value = f"{self._tokens} tokens, {elapsed:.1f} s{speed} (generating...)"

    def _on_done(self, result: GenerationResult) -> None:
        self.result = result
        self.text = result.text
        self._render_output(False)
        if result.route:  # before the stats: whoever sees "tokens/s" also sees the route
            hops = "".join(f" &rarr; <code>{html.escape(p[-8:])}</code> [{a}:{b}]" for p, a, b in result.route)
            self.route.value = f"route: client{hops} &rarr; client"
        if result.error:
            self.stats.value = f"<span style='color:{RED}'>error: {html.escape(result.error)}</span>"
        else:
            speed = (f", <b>{result.tokens_per_second:.1f} tokens/s</b>, {1000 * result.seconds_per_token:.1f} ms per "
                     "token" if result.tokens > 1 else "")
            summary = result.speculation_summary()
            self.stats.value = (f"{result.tokens} tokens in {result.seconds:.2f} s{speed}"
                                + (f"; {html.escape(summary)}" if summary else "")
                                + (" <b>(stopped)</b>" if result.stopped else ""))
        self.generate_button.disabled, self.stop_button.disabled = False, True
        self.done.set()

    def stop(self) -> None:
        """Stop the running generation; the widget (and the model's session) can be used again."""
        self.swarm.generation.stop_generation()


class SwarmMapWidget(widgets.VBox, _Refresher):
    """Block coverage (blocks x servers, coloured by throughput, holes in red) and the routing graph, live."""

    period = 2.0

    def __init__(self, swarm: KernelSwarm | None = None, **kwargs: Any):
        import plotly.graph_objects as go

        self.swarm = swarm or get_kernel_swarm()
        self.header = widgets.HTML("<b>Swarm map</b> <i>loading...</i>")
        self.strip = widgets.HTML("")
        self.coverage_fig = go.FigureWidget(
            data=[go.Heatmap(z=[[None]], x=[0], y=[""], colorscale="Viridis", colorbar={"title": "steps/s"},
                             hovertemplate="server %{y}<br>block %{x}<br>throughput %{z:.1f}<br>%{text}"
                                           "<extra></extra>",
                             xgap=2, ygap=2)],
            layout=go.Layout(title={"text": "Block coverage (colour: throughput)", "font": {"size": 13}},
                             height=260, margin={"l": 110, "r": 20, "t": 40, "b": 40},
                             xaxis={"title": "block", "dtick": 1}, yaxis={"title": ""}))
        self.graph_fig = go.FigureWidget(
            data=[go.Scatter(x=[], y=[], mode="lines", line={"color": "#cfd8dc", "width": 1}, hoverinfo="skip",
                             name="links"),
                  go.Scatter(x=[], y=[], mode="lines", line={"color": ORANGE, "width": 4}, hoverinfo="skip",
                             name="current chain"),
                  go.Scatter(x=[], y=[], mode="markers+text", textposition="top center",
                             marker={"size": 18, "color": [], "line": {"width": 1, "color": "#333"}},
                             hoverinfo="text", name="peers")],
            layout=go.Layout(title={"text": "Routing graph (orange: the chain requests take)", "font": {"size": 13}},
                             height=300, showlegend=False, margin={"l": 20, "r": 20, "t": 40, "b": 20},
                             xaxis={"visible": False}, yaxis={"visible": False}))
        self.close_button = widgets.Button(description="Close", icon="times")
        self.close_button.on_click(lambda _: self.close())
        self._route_key: tuple[Any, ...] | None = None
        self._route: list[tuple[str, int, int]] = []
        super().__init__([widgets.HBox([self.header, self.close_button]), self.strip, self.coverage_fig,
                          self.graph_fig], **kwargs)
        self.add_class("jupyter-swarm-map")
        self._start_refreshing()

    def _chain(self, swarm_map: Any) -> list[tuple[str, int, int]]:
        online = tuple(sorted((r.peer_id, r.start, r.end) for r in swarm_map.online()))
        result = self.swarm.generation.last_result
        if result is not None and result.route and all(p in swarm_map.servers for p, _, _ in result.route):
            key: tuple[Any, ...] = ("last", id(result), online)
            if key != self._route_key:
                self._route_key, self._route = key, list(result.route)
        elif online != (self._route_key or (None,))[-1]:
            try:
                self._route = self.swarm.connection.next_route()
            except Exception:  # noqa: BLE001 - holes: no chain
                self._route = []
            self._route_key = ("next", online)
        return self._route

    def refresh(self) -> None:
        if not self.swarm.connected:
            self.header.value = "<b>Swarm map</b> <i>disconnected: updates stopped</i>"
            self.stop_refreshing()
            return
        swarm_map = self.swarm.connection.read_map(max_age=1.0)
        records = sorted(swarm_map.servers.values(), key=lambda r: (r.start, r.end, r.peer_id))
        own = self.swarm.serving.own_peer_id()
        labels = [f"{r.peer_id[-8:]} {r.quant_type}" + (" (you)" if r.peer_id == own else "") for r in records]
        n = swarm_map.num_blocks
        z = [[(r.throughput if r.start <= b < r.end and r.state.value == "online" else
               (0.0 if r.start <= b < r.end else None)) for b in range(n)] for r in records]
        text = [[(f"{r.state.value}, {r.dtype} {r.quant_type}" if r.start <= b < r.end else "") for b in range(n)]
                for r in records]
        missing = swarm_map.missing_blocks()
        chain = self._chain(swarm_map)
        with self.coverage_fig.batch_update():
            heat = self.coverage_fig.data[0]
            heat.z, heat.x, heat.y, heat.text = z or [[None] * n], list(range(n)), labels or ["(no servers)"], text
            self.coverage_fig.layout.shapes = [
                {"type": "rect", "xref": "x", "yref": "paper", "x0": b - 0.5, "x1": b + 0.5, "y0": 0, "y1": 1,
                 "fillcolor": RED, "opacity": 0.35, "line": {"width": 0}} for b in missing]
            self.coverage_fig.layout.xaxis.range = [-0.5, n - 0.5]
        self._draw_graph(records, chain, own, self.swarm.connection.links())
        state = (f"<span style='color:{GREEN}'>all {n} blocks covered</span>" if not missing
                 else f"<span style='color:{RED}'>holes at blocks {missing}</span>")
        self.header.value = (f"<b>Swarm map of {html.escape(swarm_map.model_prefix)}</b>: {len(swarm_map.online())} "
                             f"server(s) online, {state} <span style='color:{GREY}'>(live, "
                             f"{time.strftime('%H:%M:%S')})</span>")
        self.strip.value = coverage_strip(swarm_map.coverage())

    def _draw_graph(self, records: list[Any], chain: list[tuple[str, int, int]], own: str | None,
                    links: dict[str, str | None]) -> None:
        pos: dict[str, tuple[float, float]] = {"client": (-1.5, 0.0)}
        for i, r in enumerate(records):  # x: where its span lies; y: one row per server
            pos[r.peer_id] = ((r.start + r.end) / 2, 1.0 + i * 0.8)
        xs, ys, labels, colors, hovers = [], [], [], [], []
        for key, (x, y) in pos.items():
            record = next((r for r in records if r.peer_id == key), None)
            xs.append(x)
            ys.append(y)
            if record is None:
                labels.append("client (this kernel)")
                colors.append("#1976d2")
                hovers.append("client")
            else:
                reach = connection_label(record.reachability, links.get(key))
                labels.append(f"{key[-6:]} [{record.start}:{record.end}] {record.quant_type}"
                              + (" (you)" if key == own else f" {reach}"))
                colors.append(ORANGE if any(p == key for p, _, _ in chain) else
                              (GREEN if record.state.value == "online" else GREY))
                hovers.append(f"{key}<br>blocks {record.start}:{record.end}<br>{record.state.value}<br>"
                              f"{record.dtype}, quant type {record.quant_type}<br>"
                              f"{record.throughput:.1f} steps/s<br>{record.cache_tokens_left} cache tokens free<br>"
                              f"{html.escape(reachability_text(record, links))}")
        link_x: list[Any] = []
        link_y: list[Any] = []
        for r in records:  # every server reachable from the client
            link_x += [pos["client"][0], pos[r.peer_id][0], None]
            link_y += [pos["client"][1], pos[r.peer_id][1], None]
        hops = ["client"] + [p for p, _, _ in chain if p in pos] + ["client"] if chain else []
        chain_x: list[Any] = [pos[h][0] for h in hops]
        chain_y: list[Any] = [pos[h][1] for h in hops]
        annotations = []
        by_id = {r.peer_id: r for r in records}
        client_pings = self.swarm.connection.client_pings()
        for a, b in zip(hops, hops[1:]):
            if a in by_id and b in by_id:  # server -> server: the server's published ping
                rtt = by_id[a].next_pings.get(b)
            else:  # client <-> server: the client's own measurement
                rtt = client_pings.get(b if a == "client" else a)
            label = f"{1000 * rtt:.1f} ms" if rtt is not None else ""
            if label:
                annotations.append({"x": (pos[a][0] + pos[b][0]) / 2, "y": (pos[a][1] + pos[b][1]) / 2,
                                    "text": label, "showarrow": False, "bgcolor": "white", "opacity": 0.9,
                                    "font": {"size": 11, "color": ORANGE}})
        result = self.swarm.generation.last_result
        if result is not None and result.tokens > 1 and chain:
            annotations.append({"x": -2.5, "y": -0.45, "xanchor": "left", "showarrow": False, "font": {"size": 11},
                                "text": f"last request: {1000 * result.seconds_per_token:.1f} ms per token "
                                        f"through {len(chain)} server(s)"})
        with self.graph_fig.batch_update():
            self.graph_fig.data[0].x, self.graph_fig.data[0].y = link_x, link_y
            self.graph_fig.data[1].x, self.graph_fig.data[1].y = chain_x, chain_y
            nodes = self.graph_fig.data[2]
            nodes.x, nodes.y, nodes.text, nodes.hovertext = xs, ys, labels, hovers
            nodes.marker.color = colors
            self.graph_fig.layout.annotations = annotations
            self.graph_fig.layout.yaxis.range = [-0.7, 1.6 + 0.8 * max(0, len(records) - 1)]
            self.graph_fig.layout.xaxis.range = [-2.6, max([1] + [r.end for r in records]) + 1]

    def show_error(self, error: Exception) -> None:
        self.header.value = (f"<b>Swarm map</b> <span style='color:{RED}'>cannot read the swarm: "
                             f"{html.escape(str(error))}</span>")

    def close(self) -> None:
        self.stop_refreshing()
        for child in (self.coverage_fig, self.graph_fig):
            child.close()
        super().close()


class ServePanel(widgets.VBox, _Refresher):
    """One click to serve blocks from this kernel: progress, blocks, requests, throughput, cache, memory, Stop."""

    period = 1.0

    def __init__(self, swarm: KernelSwarm | None = None, **kwargs: Any):
        from jupyter_swarm.notebook.serving import gpu_available

        self.swarm = swarm or get_kernel_swarm()
        label = "Contribute this GPU" if gpu_available() else "Contribute this machine"
        self.serve_button = widgets.Button(description=label, button_style="success", icon="share-alt",
                                           layout=widgets.Layout(width="auto"))
        self.stop_button = widgets.Button(description="Stop serving", button_style="danger", icon="stop",
                                          disabled=True)
        from jupyter_swarm.options import QUANT_TYPE_HELP, QUANT_TYPES

        self.quant_type = widgets.Dropdown(options=list(QUANT_TYPES), value="auto", description="quant type",
                                           tooltip=QUANT_TYPE_HELP, layout=widgets.Layout(width="220px"))
        self.progress = widgets.IntProgress(value=0, min=0, max=4, description="", bar_style="info",
                                            layout=widgets.Layout(visibility="hidden"))
        self.status = widgets.HTML("")
        self.stats = widgets.HTML("")
        for w, name in ((self.serve_button, "serve"), (self.stop_button, "stop-serving"), (self.status, "serve-status"),
                        (self.stats, "serve-stats"), (self.quant_type, "serve-quant-type")):
            w.add_class(f"jupyter-swarm-{name}")
        self.serve_button.on_click(lambda _: self.start())
        self.stop_button.on_click(lambda _: self.stop())
        super().__init__([widgets.HTML("<b>Serve blocks from this kernel</b>"),
                          widgets.HBox([self.serve_button, self.quant_type, self.stop_button]), self.progress,
                          self.status, self.stats],
                         **kwargs)
        self.add_class("jupyter-swarm-serve-panel")
        self._start_refreshing()

    def start(self, blocks: str = "auto") -> None:
        try:
            self.swarm.serve(blocks, quant_type=self.quant_type.value)
        except Exception as e:  # noqa: BLE001 - shown in the panel
            self.status.value = f"<span style='color:{RED}'>{html.escape(str(e))}</span>"
            return
        self.refresh()

    def stop(self) -> None:
        self.stop_button.disabled = True
        threading.Thread(target=self.swarm.stop_serving, daemon=True).start()

    def refresh(self) -> None:
        s = self.swarm.serving.stats()
        state = s["state"]
        busy = state in ("starting", "serving", "stopping")
        self.serve_button.disabled = self.quant_type.disabled = busy
        self.stop_button.disabled = state not in ("starting", "serving")
        self.progress.layout.visibility = "visible" if state == "starting" else "hidden"
        self.progress.value = s["progress_step"]
        blocks = f"blocks {s['blocks'][0]}:{s['blocks'][1]}" if s.get("blocks") else "blocks: choosing"
        blocks += f", quant type {s.get('quant_type', 'auto')}"
        if state == "starting":
            self.status.value = f"starting ({blocks}, {s['device']}): {s['progress']}..."
        elif state == "serving":
            self.status.value = (f"<span style='color:{GREEN}'>&#9679; serving {blocks}</span> on {s['device']} "
                                 f"as <code>{html.escape(str(s.get('peer_id', ''))[-12:])}</code>")
        elif state == "stopping":
            self.status.value = "stopping..."
        elif state == "error":
            self.status.value = f"<span style='color:{RED}'>could not serve: {html.escape(str(s['error']))}</span>"
        else:
            self.status.value = (f"<span style='color:{GREY}'>not serving</span>"
                                 + ("" if self.swarm.connected else " (connect to a swarm first)"))
        if "requests" in s or "weights_bytes" in s:
            cache = (f"{_mib(s.get('cache_used_bytes'))} of {_mib(s.get('cache_total_bytes'))}"
                     if "cache_total_bytes" in s else "-")
            rows = [("requests served", f"{s.get('requests', 0)} ({s.get('inference_steps', 0)} inference steps, "
                                        f"{s.get('forward_requests', 0)} forward, {s.get('sessions_opened', 0)} "
                                        f"sessions, {s.get('open_sessions', 0)} open)"),
                    ("throughput", f"{s.get('throughput', 0):.1f} steps/s per block"),
                    ("cache in use", cache),
                    ("memory", f"weights {_mib(s.get('weights_bytes'))}, kernel process "
                               f"{_mib(s.get('process_memory_bytes'))}"
                               + (f", GPU {_mib(s.get('gpu_memory_bytes'))}" if "gpu_memory_bytes" in s else ""))]
            self.stats.value = "<table>" + "".join(
                f"<tr><td style='padding-right:12px'>{k}</td><td>{v}</td></tr>" for k, v in rows) + "</table>"
        else:
            self.stats.value = ""

    def show_error(self, error: Exception) -> None:
        self.status.value = f"<span style='color:{RED}'>{html.escape(str(error))}</span>"

    def close(self) -> None:
        self.stop_refreshing()
        super().close()
