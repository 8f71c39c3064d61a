"""The magics and widgets in a real IPython kernel (jupyter_client), against a local swarm on loopback."""

from __future__ import annotations

import os
import queue
import time

import pytest

pytest.importorskip("ipykernel")
pytest.importorskip("ipywidgets")
from jupyter_client.manager import start_new_kernel  # noqa: E402

pytestmark = pytest.mark.integration


class Kernel:
    """A kernel we run code in, collecting every output message of each execution."""

    def __init__(self) -> None:
        self.km, self.kc = start_new_kernel(kernel_name="python3")

    def run(self, code: str, timeout: float = 180.0, on_output=None) -> list[dict]:
        outputs: list[dict] = []

        def hook(msg: dict) -> None:
            kind = msg["msg_type"]
            if kind in ("stream", "display_data", "execute_result", "error", "update_display_data"):
                outputs.append({"type": kind, **msg["content"]})
                if on_output is not None:
                    on_output(outputs)

        self.kc.execute_interactive(code, timeout=timeout, output_hook=hook)
        return outputs

    def stdout(self, outputs: list[dict]) -> str:
        return "".join(o["text"] for o in outputs if o["type"] == "stream" and o["name"] == "stdout")

    def stderr(self, outputs: list[dict]) -> str:
        return "".join(o["text"] for o in outputs if o["type"] == "stream" and o["name"] == "stderr")

    def value(self, expr: str) -> str:
        """The printed value of ``expr`` in the kernel."""
        return self.stdout(self.run(f"print({expr})")).strip()

    def shutdown(self) -> None:
        self.kc.stop_channels()
        self.km.shutdown_kernel(now=False)


def errors(outputs: list[dict]) -> list[dict]:
    return [o for o in outputs if o["type"] == "error"]


def plain(outputs: list[dict]) -> str:
    return "\n".join(o.get("data", {}).get("text/plain", "") for o in outputs if "data" in o)


@pytest.fixture(scope="module")
def kernel():
    k = Kernel()
    out = k.run("%load_ext jupyter_swarm")
    assert not errors(out)
    yield k
    k.shutdown()


def test_help_and_bad_arguments_print_usage_not_tracebacks(kernel: Kernel) -> None:
    out = kernel.run("%swarm --help")
    assert "connect MODEL" in kernel.stdout(out) and not errors(out)
    out = kernel.run("%swarm generate --help")
    assert "--max-new-tokens" in kernel.stdout(out) and not errors(out)
    for line, expected in [("%swarm frobnicate", "invalid choice"), ("%swarm generate --max-new-tokens x", "invalid int"),
                           ("%swarm connect", "required: model"), ('%swarm generate "unclosed', "cannot parse"),
                           ("%swarm status", "not connected"), ("%swarm connect demo", "--peers"),
                           ("%swarm connect tiny --peers not-an-address", "does not parse"),
                           ("%%swarm status\nx", "only as")]:
        out = kernel.run(line)
        assert not errors(out), (line, out)
        assert expected in kernel.stderr(out), (line, kernel.stderr(out))


def test_connect_status_peers_route(kernel: Kernel) -> None:
    out = kernel.run("%swarm connect tiny --local", timeout=240)
    assert not errors(out), out
    text = kernel.stdout(out)
    assert "starting a local swarm: 3 server(s)" in text and "swarm.model" in text
    assert any("application/vnd.jupyter.widget-view+json" in o.get("data", {}) for o in out)  # live summary
    out = kernel.run("%swarm status")
    assert "8 blocks, 3 server(s) online, all blocks covered" in plain(out)
    assert any("text/html" in o.get("data", {}) for o in out)
    out = kernel.run("%swarm peers")
    assert plain(out).count("online") == 3
    out = kernel.run("%swarm route")
    assert plain(out).startswith("client -> ") and "[0:4]" in plain(out)
    assert kernel.value("type(swarm.model).__name__") == "DistributedModelForCausalLM"
    # what the Jupyter server's /swarm/state shows for this kernel
    assert kernel.value("swarm.snapshot()['kernel_id']")  # under a Jupyter server: its kernel id (browser test)
    assert kernel.value("swarm.snapshot()['coverage']") == "[1, 1, 2, 2, 2, 2, 2, 2]"


def test_generate_streams_tokens(kernel: Kernel) -> None:
    out = kernel.run('%swarm generate "Once upon a time" --max-new-tokens 20')
    assert not errors(out)
    pieces = [o for o in out if o["type"] == "stream" and o["name"] == "stdout"]
    assert len(pieces) >= 10, "tokens should arrive one message at a time"
    assert "20 tokens in" in kernel.stdout(out) and "route: client ->" in kernel.stdout(out)
    out = kernel.run("%%swarm generate --max-new-tokens 5 --num-beams 2\nHello there")
    assert "5 tokens in" in kernel.stdout(out) and not errors(out)
    out = kernel.run("%%swarm generate --max-new-tokens 6 --temperature 0.9 --top-p 0.8\nHello there")
    assert "6 tokens in" in kernel.stdout(out) and not errors(out)
    # --verify 1: every step of blocks 4:8 (two servers hold them) is re-run on the other one, for this call only
    checked = int(kernel.value("swarm.model.swarm.verifier.stats.checked"))
    out = kernel.run('%swarm generate "Once upon a time" --max-new-tokens 4 --verify 1')
    assert "4 tokens in" in kernel.stdout(out) and not errors(out) and "wrong outputs" not in kernel.stderr(out)
    assert int(kernel.value("swarm.model.swarm.verifier.stats.checked")) >= checked + 4
    assert float(kernel.value("swarm.model.verify")) == 0.01
    out = kernel.run('%swarm generate "Once upon a time" --verify 2')
    assert "verify must be a probability between 0 and 1" in kernel.stderr(out) and not errors(out)


def test_speculative_generation_from_the_magic_and_the_widget(kernel: Kernel) -> None:
    # the model drafting for itself: every guess holds
    out = kernel.run("%%swarm generate --max-new-tokens 12 --speculative draft:{swarm.model_path}\nHello there")
    text = kernel.stdout(out)
    assert "12 tokens in" in text and "speculative draft:" in text and "100% of" in text and not errors(out), out
    out = kernel.run("%%swarm generate --max-new-tokens 12 --speculative lookup:4\nHello there Hello there Hello")
    assert "12 tokens in" in kernel.stdout(out) and "speculative lookup:4: " in kernel.stdout(out), out
    for line, expected in [('%swarm generate "x" --speculative sometimes', "unknown speculative mode 'sometimes'"),
                           ('%swarm generate "x" --speculative lookup --num-beams 2', "works with one beam")]:
        out = kernel.run(line)
        assert expected in kernel.stderr(out) and not errors(out), (line, out)
    out = kernel.run(
        "from jupyter_swarm.notebook import GenerationWidget\n"
        "w = GenerationWidget(prompt='Once')\n"
        "w.max_new_tokens.value = 10\n"
        "w.speculative.value = 'draft:' + swarm.model_path\n"
        "w.generate(); assert w.done.wait(120)\n"
        "print(w.result.tokens, w.result.error, w.result.acceptance_rate, '100% of' in w.stats.value)")
    assert kernel.stdout(out).split("\n")[0] == "10 None 1.0 True", out


def test_openai_api_from_the_kernel(kernel: Kernel) -> None:
    import httpx

    out = kernel.run("%swarm api --port 0")
    assert not errors(out), out
    url = kernel.stdout(out).split(" on ", 1)[1].split(" ", 1)[0]
    assert url.startswith("http://127.0.0.1:") and url.endswith("/v1"), url
    reply = httpx.post(f"{url}/completions", json={"model": "tiny-llama", "prompt": "Once upon a time",
                                                   "max_tokens": 5, "temperature": 0}, timeout=120)
    assert reply.status_code == 200, reply.text
    assert reply.json()["usage"]["completion_tokens"] == 5
    out = kernel.run("%swarm api")
    assert "already runs on" in kernel.stderr(out)
    out = kernel.run("%swarm api --stop")
    assert "stopped the API" in kernel.stdout(out)
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"{url}/models", timeout=5)


def test_interrupt_stops_only_the_generation(kernel: Kernel) -> None:
    interrupted = []

    def on_output(outputs: list[dict]) -> None:
        if not interrupted and len(outputs) > 5:
            interrupted.append(True)
            kernel.km.interrupt_kernel()

    out = kernel.run('%swarm generate "Long story" --max-new-tokens 2000', on_output=on_output)
    assert interrupted and "[interrupted: generation stopped]" in kernel.stdout(out) and not errors(out)
    out = kernel.run('%swarm generate "Again" --max-new-tokens 4')  # the model is still usable
    assert "4 tokens in" in kernel.stdout(out) and not errors(out)


def test_generation_widget_streams_stops_and_is_reusable(kernel: Kernel) -> None:
    out = kernel.run(
        "from jupyter_swarm.notebook import GenerationWidget\n"
        "w = GenerationWidget(prompt='Once')\n"
        "w.max_new_tokens.value = 12\n"
        "w.generate(); assert w.done.wait(120)\n"
        "print(w.result.tokens, w.result.error, w.result.stopped, len(w.result.route))\n"
        "print('tokens/s' in w.stats.value, 'route: client' in w.route.value, w.generate_button.disabled)")
    assert kernel.stdout(out).split("\n")[:2] == ["12 None False 2", "True True False"], out
    out = kernel.run(
        "w.max_new_tokens.value = 256\n"
        "w.generate()\n"
        "import time\n"
        "while w.result is None and len(w.text) < 5: time.sleep(0.01)\n"
        "assert w.stop_button.disabled is False\n"
        "w.stop(); assert w.done.wait(60)\n"
        "print(w.result.stopped, w.result.tokens < 256, '(stopped)' in w.stats.value)\n"
        "w.max_new_tokens.value = 3\n"
        "w.generate(); assert w.done.wait(60)\n"
        "print(w.result.tokens, w.result.stopped, w.result.error)")
    assert kernel.stdout(out).split("\n")[:2] == ["True True True", "3 False None"], out


def test_swarm_map_updates_live_and_stops_when_closed(kernel: Kernel) -> None:
    out = kernel.run(
        "from jupyter_swarm.notebook import SwarmMapWidget\n"
        "import time\n"
        "m = SwarmMapWidget()\n"
        "while m.refreshes < 2: time.sleep(0.1)\n"
        "heat = m.coverage_fig.data[0]\n"
        "print(len(heat.x), len(heat.y), m.strip.value.count('jupyter-swarm-block'), 'all 8 blocks covered' in m.header.value)\n"
        "print([label.split()[1] for label in heat.y])\n"
        "print(len(m.graph_fig.data[1].x) >= 3, len(m.graph_fig.data[2].x))\n"
        "m.close(); n = m.refreshes; time.sleep(4.5)\n"
        "print(m.live, m.refreshes == n)")
    assert kernel.stdout(out).split("\n")[:4] == ["8 3 8 True", "['none', 'none', 'none']", "True 4", "False True"], out


def test_serve_from_the_kernel_and_the_panel(kernel: Kernel) -> None:
    out = kernel.run("%swarm serve --blocks 4:8 --quant-type int8")
    assert "in the background" in kernel.stdout(out) and not errors(out)
    out = kernel.run("from jupyter_swarm.notebook import ServePanel\n"
                     "p = ServePanel()\n"
                     "print(swarm.wait_serving(120), swarm.serve_blocks, swarm.serve_error)")
    assert kernel.stdout(out).strip() == "serving (4, 8) None", out
    assert "(this kernel)  4:8  online  float32  int8" in _peers_once_listed(kernel, "(this kernel)")
    out = kernel.run("import time; time.sleep(1.5)\n"
                     "print(p.serve_button.disabled, p.stop_button.disabled, 'serving blocks 4:8, quant type int8' in "
                     "p.status.value, 'requests served' in p.stats.value, 'cache in use' in p.stats.value, "
                     "p.quant_type.disabled)")
    assert kernel.stdout(out).strip() == "True False True True True True", out
    out = kernel.run("%swarm serve")
    assert "already serving" in kernel.stderr(out)
    out = kernel.run("%swarm stop")
    assert "stopped serving" in kernel.stdout(out)
    out = kernel.run("import time; time.sleep(1.5)\n"
                     "print(p.serve_button.disabled, p.stop_button.disabled, 'not serving' in p.status.value)")
    assert kernel.stdout(out).strip() == "False True True", out
    out = kernel.run("p.quant_type.value = 'nf4'; p.start('4:8')\n"  # the panel's quant type choice
                     "print(swarm.wait_serving(120), swarm.snapshot()['serve']['quant_type'])")
    assert kernel.stdout(out).strip() == "serving nf4", out
    row = "(this kernel)  4:8  online  float32  nf4"
    assert row in _peers_once_listed(kernel, row)
    out = kernel.run("%swarm stop\np.close()")
    assert "stopped serving" in kernel.stdout(out)
    out = kernel.run("%swarm serve --quant-type q4")
    assert "invalid choice: 'q4'" in kernel.stderr(out)


def _peers_once_listed(kernel: Kernel, text: str, timeout: float = 30.0) -> str:
    """`%swarm peers`, run until its table shows ``text`` (records take an update period to arrive) or time is up."""
    deadline = time.monotonic() + timeout
    while True:
        table = plain(kernel.run("%swarm peers"))
        if text in table or time.monotonic() > deadline:
            return table
        time.sleep(1)


def test_serve_errors_show_in_the_panel(kernel: Kernel) -> None:
    out = kernel.run("%swarm serve --blocks 6:12\n"
                     "print(swarm.wait_serving(60))\n"
                     "from jupyter_swarm.notebook import ServePanel\n"
                     "p = ServePanel(); import time; time.sleep(1.5)\n"
                     "print('could not serve' in p.status.value, 'outside the model' in p.status.value)\n"
                     "p.close()")
    assert kernel.stdout(out).split("\n")[-3:-1] == ["error", "True True"], out
    out = kernel.run("swarm.serve('auto', model='/nonexistent/model')\nprint(swarm.wait_serving(60), swarm.serve_error)\n"
                     "%swarm stop")
    assert kernel.stdout(out).startswith("error ") and "nonexistent" in kernel.stdout(out), out


def test_kernel_shutdown_stops_the_local_swarm() -> None:
    k = Kernel()
    try:
        k.run("%load_ext jupyter_swarm")
        out = k.run("%swarm connect tiny --local --spans 0:8", timeout=240)
        assert not errors(out)
        pids = [int(p) for p in k.value("' '.join(str(s.process.pid) for s in swarm.local_swarm.servers)").split()]
        assert len(pids) == 1
    finally:
        k.shutdown()
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and any(_alive(p) for p in pids):
        time.sleep(0.2)
    assert not any(_alive(p) for p in pids), "local swarm servers outlived the kernel"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie (exited, not yet reaped by the dead kernel's parent) counts as gone
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ", 1)[1][0] != "Z"
    except OSError:
        return False


_ = queue  # (imported for type readers)
