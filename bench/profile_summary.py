"""Turns the --profile records of bench_inference.py into a per-token breakdown (decode steps, one new token each)."""

from __future__ import annotations

import json
import statistics
from typing import Any


def _med(values: list[float]) -> float:
    return 1000 * statistics.median(values) if values else float("nan")


def _col(records: list[dict[str, float]], key: str) -> list[float]:
    return [r[key] for r in records if key in r]


def summarize(profile: Any, server_files: list[str], windows: list[tuple[float, float]], num_servers: int,
              new_tokens: int, local_runs: list[dict[str, Any]], swarm_runs: list[dict[str, Any]],
              swarm_cpu: dict[str, float]) -> dict[str, Any]:
    """Print and return median milliseconds per decode token, by part."""
    decode = lambda rs: [r for r in rs if r.get("seq") == 1]  # noqa: E731 - prefill steps are left out
    local_fwd = decode(profile.local_forward)
    fwd = decode(profile.forward)
    asteps = [r for r in decode(profile.astep) if not r.get("opened_chain")]
    per_token_local = 1000 / statistics.median([r["decode_tokens_per_s"] for r in local_runs])
    per_token_swarm = 1000 / statistics.median([r["decode_tokens_per_s"] for r in swarm_runs])

    servers: dict[int, list[dict[str, float]]] = {}
    missing: list[str] = []
    for path in server_files:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
        missing += data.get("not_instrumented", [])
        for r in data["records"]:
            if r.get("seq") == 1 and any(t0 <= r["wall"] <= t1 for t0, t1 in windows):
                servers.setdefault(int(r["start"]), []).append(r)

    out: dict[str, Any] = {"per_token_ms": {}, "spans": {}, "session_open_ms": _med(profile.session_open)}
    lines = []
    add = lines.append
    add(f"-- where one decode token's time goes ({num_servers} servers), median ms per token --")
    local_forward = _med(_col(local_fwd, "total"))
    add(f"local : per token {per_token_local:7.2f} = forward {local_forward:6.2f} "
        f"+ generate() loop {per_token_local - local_forward:5.2f}")
    forward = _med(_col(fwd, "total"))
    embed, step, logits = _med(_col(fwd, "embed")), _med(_col(fwd, "step")), _med(_col(fwd, "logits"))
    astep = _med(_col(asteps, "total"))
    add(f"swarm : per token {per_token_swarm:7.2f} = forward {forward:6.2f} "
        f"+ generate() loop {per_token_swarm - forward:5.2f}")
    add(f"        forward = embed {embed:5.2f} + session.step {step:6.2f} + logits {logits:5.2f} "
        f"+ rest {forward - embed - step - logits:5.2f}")
    add(f"        session.step = astep on the trio thread {astep:6.2f} + sync->trio portal {step - astep:5.2f}")
    span_total = 0.0
    compute_total = 0.0
    for start in sorted(profile.send_step):
        client = decode(profile.send_step[start])
        srv = servers.get(start, [])
        total = _med(_col(client, "total"))
        wait = _med(_col(client, "wait"))
        span_total += total
        entry = {"client_total": total, "encode": _med(_col(client, "encode")), "send": _med(_col(client, "send")),
                 "wait": wait, "decode": _med(_col(client, "decode"))}
        text = (f"        span from block {start}: {total:6.2f} = encode+pack {entry['encode']:4.2f} "
                f"+ send {entry['send']:4.2f} + wait for reply {wait:6.2f} + unpack+decode {entry['decode']:4.2f}")
        add(text)
        if srv:
            handle = _med(_col(srv, "handle"))
            compute = _med(_col(srv, "compute"))
            compute_total += compute
            hop_in, hop_out = _med(_col(srv, "hop_in")), _med(_col(srv, "hop_out"))
            send = _med(_col(srv, "send"))
            entry.update(server_handle=handle, server_compute=compute, server_hop_in=hop_in, server_hop_out=hop_out,
                         server_send=send, server_messages=_med(_col(srv, "messages")), transport=wait - handle,
                         server_steps=len(srv))
            add(f"          server (blocks {srv[0]['start']}:{srv[0]['end']}): handle {handle:6.2f} = compute "
                f"{compute:6.2f} + to_thread hop in {hop_in:4.2f} / out {hop_out:4.2f} + unpack/decode/check/"
                f"encode/pack {entry['server_messages']:4.2f} + send {send:4.2f}")
            add(f"          => loopback transport + libp2p + scheduling (wait - handle): {wait - handle:6.2f}")
        out["spans"][start] = entry
    add(f"        astep rest (routing checks, history, bookkeeping): {astep - span_total:5.2f}")
    overhead = per_token_swarm - per_token_local
    add(f"swarm - local per token: {overhead:6.2f} ms; server compute sum {compute_total:6.2f} vs local forward "
        f"{local_forward:6.2f} (client embed+logits {embed + logits:4.2f})")
    out["route_ms"], out["open_span_ms"] = _med(profile.route), _med(profile.open_span)
    add(f"opening a session, once per generate(): {out['session_open_ms']:.2f} ms = route (swarm map) "
        f"{out['route_ms']:.2f} + {num_servers} x open a stream and a server session {out['open_span_ms']:.2f}; "
        f"{out['session_open_ms'] / new_tokens:.2f} ms per token over {new_tokens} tokens")
    if swarm_cpu:
        tokens = new_tokens * len(swarm_runs)
        per = {k: 1000 * v / tokens for k, v in sorted(swarm_cpu.items())}
        out["cpu_ms_per_token"] = per
        add(f"CPU ms per token during the swarm calls, by process/thread (all: {sum(per.values()):.2f}):")
        add("        " + ", ".join(f"{k} {v:.2f}" for k, v in per.items() if v >= 0.005))
    if missing:
        add(f"WARNING: the servers could not instrument {sorted(set(missing))}")
    print("\n".join(lines), flush=True)
    out["per_token_ms"] = {"local": per_token_local, "local_forward": local_forward, "swarm": per_token_swarm,
                           "swarm_forward": forward, "embed": embed, "session_step": step, "logits": logits,
                           "astep": astep, "portal": step - astep, "spans_total": span_total,
                           "server_compute_total": compute_total, "overhead": overhead}
    out["text"] = lines
    return out
