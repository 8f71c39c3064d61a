"""JupyterLab and Notebook 7 in a real browser (Playwright driving Debian's Chromium): the quickstart as a user
runs it, with the real SmolLM2 model.

Screenshots go to test-artifacts/browser/ (look at them: they are what a user sees).
Skipped when Chromium or Playwright is missing (the README's test command installs both).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
ARTIFACTS = ROOT / "test-artifacts" / "browser"
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
TOKEN = "swarm-browser-test"
NOTEBOOK = ".jp-NotebookPanel:visible .jp-Notebook"  # the notebook in the current tab

pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(CHROMIUM is None, reason="needs Debian's chromium (apt-get install -y chromium)"),
]


@pytest.fixture
def jp_asyncio_loop():
    """No-op: pytest-jupyter's autouse loop fixture (active once tests/notebook loads the plugin) would close the
    event loop Playwright's sync API is running."""
    yield None


@pytest.fixture
def jp_server_cleanup():
    """No-op: these tests run their own JupyterLab process, not pytest-jupyter's in-process server."""
    yield


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _jupyter(tmp_path_factory: pytest.TempPathFactory, app: str):
    """A Jupyter server (``app``: "lab" for JupyterLab, "notebook" for Notebook 7) on 127.0.0.1 with the example
    notebooks in its root directory; yields (url, tmp) and stops it (which stops its kernels)."""
    tmp = tmp_path_factory.mktemp(app)
    root = tmp / "root"
    root.mkdir()
    for name in ("quickstart.ipynb", "contribute.ipynb"):
        shutil.copy(ROOT / "examples" / name, root / name)
    settings = tmp / "settings"
    (settings / "@jupyterlab" / "apputils-extension").mkdir(parents=True)
    (settings / "@jupyterlab" / "apputils-extension" / "notification.jupyterlab-settings").write_text(
        json.dumps({"fetchNews": "false", "checkForUpdates": False}))
    port = _free_port()
    env = {**os.environ, "JUPYTERLAB_SETTINGS_DIR": str(settings), "JUPYTER_RUNTIME_DIR": str(tmp / "runtime"),
           "JUPYTER_SWARM_STATE_DIR": str(tmp / "swarm-state")}
    log = open(tmp / f"{app}.log", "w")
    no_update_check = ["--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate"] if app == "lab" else []
    proc = subprocess.Popen(
        [sys.executable, "-m", "jupyter", app, "--no-browser", "--allow-root", "--ServerApp.ip=127.0.0.1",
         f"--ServerApp.port={port}", "--ServerApp.port_retries=0", f"--IdentityProvider.token={TOKEN}",
         f"--ServerApp.root_dir={root}", *no_update_check,
         "--ServerApp.jpserver_extensions={'jupyter_swarm_server': True}"],
        stdout=log, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 90
    while True:
        try:
            urllib.request.urlopen(f"{url}/api/status?token={TOKEN}", timeout=2)
            break
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                raise RuntimeError(f"jupyter {app} did not start:\n" + (tmp / f"{app}.log").read_text()[-3000:])
            time.sleep(0.5)
    yield url, tmp
    # shutting the server down shuts the kernel down, which must stop its local swarm and served blocks
    proc.terminate()
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        proc.kill()
    log.close()


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory):
    """JupyterLab with the example notebooks."""
    yield from _jupyter(tmp_path_factory, "lab")


@pytest.fixture(scope="module")
def notebook7(tmp_path_factory: pytest.TempPathFactory):
    """Notebook 7 (the `notebook` package) with the example notebooks."""
    yield from _jupyter(tmp_path_factory, "notebook")


@pytest.fixture(scope="module")
def browser():
    sync_api = pytest.importorskip("playwright.sync_api")
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=[
            "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
            "--disable-component-update", "--disable-sync"])
        yield browser
        browser.close()


def open_notebook(browser, lab, name: str):
    page = browser.new_page(viewport={"width": 1500, "height": 1000})
    page.set_default_timeout(60_000)
    page.goto(f"{lab[0]}/lab/tree/{name}?reset&token={TOKEN}")  # reset: only this notebook open
    page.wait_for_selector("#jp-main-dock-panel")
    page.wait_for_selector("#jupyterlab-splash", state="detached")
    page.wait_for_selector("#jp-main-statusbar:has-text('| Idle')", timeout=90_000)
    return page


@pytest.fixture(scope="module")
def page(browser, lab):
    page = open_notebook(browser, lab, "quickstart.ipynb")
    yield page
    page.close()


def shot(page, name: str) -> None:
    page.screenshot(path=str(ARTIFACTS / f"{name}.png"))


def _run_cell_containing(page, text: str, notebook: str = NOTEBOOK) -> None:
    """Click into the code cell whose source contains ``text`` and run it with Shift+Enter."""
    cell = page.locator(notebook + " .jp-CodeCell", has=page.locator(".cm-content", has_text=text)).first
    cell.scroll_into_view_if_needed()
    cell.locator(".cm-content").click()
    page.keyboard.press("Shift+Enter")


def test_quickstart_in_jupyterlab(page, lab, smollm2_dir) -> None:
    nb = page.locator(NOTEBOOK)
    # ---- the sidebar and status bar know nothing yet ------------------------------------------------------
    page.wait_for_selector("#jp-main-statusbar .jp-SwarmStatus:has-text('Swarm: not connected')")

    # ---- run the quickstart cells like a user: Shift+Enter, one after another --------------------------------
    for text in ("%load_ext jupyter_swarm", "%swarm connect demo --local"):
        _run_cell_containing(page, text)
    summary = nb.locator(".jupyter-swarm-summary")
    summary.filter(has_text="all blocks covered").wait_for(timeout=180_000)
    assert summary.locator(".jupyter-swarm-block").count() == 30  # SmolLM2-135M-Instruct
    # the server extension sees this kernel's swarm, under the kernel's own id (the sidebar follows the notebook)
    [kernel] = _api(lab, "GET", "/api/kernels")
    deadline = time.monotonic() + 30
    while not (states := [k for k in _api(lab, "GET", "/swarm/state")["kernels"] if k.get("num_blocks")]):
        assert time.monotonic() < deadline, "the kernel's swarm state never reached the server"
        time.sleep(0.5)
    assert states[0]["kernel_id"] == kernel["id"] and states[0]["num_blocks"] == 30
    shot(page, "01-connected")

    for text in ("%swarm status", "%swarm peers", "%swarm route", '%swarm generate "Tell me a short story'):
        _run_cell_containing(page, text)
    nb.locator(".jp-OutputArea-output", has_text="tokens/s").first.wait_for(timeout=120_000)
    assert nb.locator(".jupyter-swarm-table tr").count() == 4  # header + 3 servers
    assert nb.locator(".jupyter-swarm-route").first.inner_text().startswith("client")
    shot(page, "02-magics")

    # ---- the generation widget streams tokens, stops cleanly and can generate again ----------------------
    _run_cell_containing(page, "%swarm widget")
    gen = nb.locator(".jupyter-swarm-generation")
    gen.wait_for(timeout=60_000)
    gen.scroll_into_view_if_needed()
    output = gen.locator(".jupyter-swarm-output")
    gen.locator("button.jupyter-swarm-generate").click()
    lengths = []
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        text = output.inner_text()
        if not lengths or len(text) != lengths[-1]:
            lengths.append(len(text))
        if len(lengths) >= 4:
            break
        time.sleep(0.05)
    assert len(lengths) >= 4, f"tokens did not stream (output lengths seen: {lengths})"
    shot(page, "03-generation-streaming")
    gen.locator("button.jupyter-swarm-stop").click()
    gen.locator(".jupyter-swarm-stats", has_text="(stopped)").wait_for(timeout=60_000)
    assert gen.locator("button.jupyter-swarm-generate").is_enabled()
    shot(page, "04-generation-stopped")
    gen.locator(".jupyter-swarm-prompt textarea").fill("What is the capital of France?")
    gen.locator("button.jupyter-swarm-generate").click()
    # (the stopped run's stats also say "ms per token": wait for the new run's, which is not stopped)
    gen.locator(".jupyter-swarm-stats", has_text=re.compile(r"ms per token(?!.*stopped)")).wait_for(timeout=120_000)
    assert gen.locator(".jupyter-swarm-route").inner_text().startswith("route: client")
    assert "Paris" in gen.locator(".jupyter-swarm-output").inner_text()  # the real model's answer
    shot(page, "05-generation-done")

    # ---- the live swarm map: 30 blocks, a coverage heatmap and a routing graph ----------------------------
    _run_cell_containing(page, "%swarm map")
    swarm_map = nb.locator(".jupyter-swarm-map")
    swarm_map.locator(".jupyter-swarm-coverage").wait_for(timeout=60_000)
    assert swarm_map.locator(".jupyter-swarm-block").count() == 30
    swarm_map.locator(".js-plotly-plot .main-svg").first.wait_for(timeout=60_000)
    assert swarm_map.locator(".js-plotly-plot").count() == 2
    swarm_map.scroll_into_view_if_needed()
    shot(page, "06-swarm-map")

    # ---- the Swarm sidebar: coverage, servers, and one click to serve from the kernel ---------------------
    page.locator(".jp-SideBar.jp-mod-left .lm-TabBar-tab[data-id='jupyter-swarm-panel']").click()
    panel = page.locator("#jupyter-swarm-panel")
    panel.locator(".jp-SwarmPanel-count").first.wait_for(timeout=30_000)
    assert panel.locator(".jp-SwarmPanel-count").count() == 30
    assert panel.locator(".jp-SwarmPanel-server").count() == 3
    assert panel.locator(".jp-SwarmPanel-server td:nth-child(4)").all_inner_texts() == ["none"] * 3  # quant type
    # how the kernel reaches each server (a local swarm: directly; across NATs: hole-punched or relayed)
    reach = panel.locator(".jp-SwarmPanel-reach")
    assert reach.count() == 3 and set(reach.all_inner_texts()) <= {"direct", "local"}, reach.all_inner_texts()
    page.wait_for_selector("#jp-main-statusbar .jp-SwarmStatus:has-text('SmolLM2-135M-Instruct')")
    shot(page, "07-sidebar")
    button = panel.locator(".jp-SwarmPanel-serveButton")
    assert button.inner_text() in ("Contribute this machine", "Contribute this GPU")
    button.click()
    # the kernel starts serving in the background; the new server shows up in the sidebar and the live map
    panel.locator(".jp-SwarmPanel-server", has_text="(you)").wait_for(timeout=180_000)
    assert panel.locator(".jp-SwarmPanel-server").count() == 4
    panel.locator(".jp-SwarmPanel-serveStatus", has_text="Serving blocks").wait_for(timeout=60_000)
    assert panel.locator(".jp-SwarmPanel-serveButton").inner_text() == "Stop serving"
    swarm_map.locator(".js-plotly-plot", has_text="(you)").first.wait_for(timeout=60_000)
    swarm_map.scroll_into_view_if_needed()
    shot(page, "08-serving")

    # ---- and the kernel keeps working while it serves: the next cell runs through the swarm --------------
    _run_cell_containing(page, "swarm.model.generate")
    nb.locator(".jp-OutputArea-output", has_text="Paris").first.wait_for(timeout=120_000)
    button.click()  # Stop serving
    panel.locator(".jp-SwarmPanel-serveStatus", has_text="Not serving").wait_for(timeout=60_000)
    panel.locator(".jp-SwarmPanel-server", has_text="(you)").wait_for(state="detached", timeout=60_000)
    shot(page, "09-stopped-serving")


def _api(lab, method: str, path: str) -> object:
    request = urllib.request.Request(f"{lab[0]}{path}", method=method, headers={"Authorization": f"token {TOKEN}"})
    with urllib.request.urlopen(request, timeout=30) as response:
        body = response.read()
    return json.loads(body) if body else None


def test_contribute_fills_a_hole(browser, lab, page) -> None:
    """A swarm with a hole; one click on the notebook's serve panel fills it; shutting the kernel down cleans up."""
    for kernel in _api(lab, "GET", "/api/kernels"):  # the quickstart's kernel: shut down, it takes its swarm along
        _api(lab, "DELETE", f"/api/kernels/{kernel['id']}")
    page.close()
    page = open_notebook(browser, lab, "contribute.ipynb")
    nb = page.locator(NOTEBOOK)
    for text in ("%load_ext jupyter_swarm", "%swarm connect tiny --local --spans 0:4", "%swarm status", "%swarm panel"):
        _run_cell_containing(page, text)
    summary = nb.locator(".jupyter-swarm-summary")
    summary.filter(has_text="missing blocks [4, 5, 6, 7]").wait_for(timeout=180_000)
    assert summary.locator(".jupyter-swarm-block[data-servers='0']").count() == 4
    panel = nb.locator(".jupyter-swarm-serve-panel")
    button = panel.locator("button.jupyter-swarm-serve")
    button.wait_for(timeout=60_000)
    assert button.inner_text().strip() in ("Contribute this machine", "Contribute this GPU")
    panel.scroll_into_view_if_needed()
    shot(page, "10-contribute-hole")
    button.click()
    panel.locator(".jupyter-swarm-serve-status", has_text="serving blocks").wait_for(timeout=180_000)
    panel.locator(".jupyter-swarm-serve-stats", has_text="requests served").wait_for(timeout=30_000)
    summary.filter(has_text="all blocks covered").wait_for(timeout=60_000)
    assert summary.locator(".jupyter-swarm-block[data-servers='0']").count() == 0
    assert panel.locator("button.jupyter-swarm-stop-serving").is_enabled()
    page.locator(".jp-SideBar.jp-mod-left .lm-TabBar-tab[data-id='jupyter-swarm-panel']").click()
    page.locator("#jupyter-swarm-panel .jp-SwarmPanel-server", has_text="(you)").wait_for(timeout=60_000)
    assert page.locator("#jupyter-swarm-panel .jp-SwarmPanel-count.jp-mod-hole").count() == 0
    shot(page, "11-contribute-serving")
    # the hole is filled by this kernel: generating through the whole model works
    _run_cell_containing(page, '%swarm generate "Thanks to the new server,"')
    nb.locator(".jp-OutputArea-output", has_text="tokens/s").first.wait_for(timeout=120_000)
    page.wait_for_timeout(1500)  # one panel refresh
    assert "0 inference steps" not in panel.locator(".jupyter-swarm-serve-stats").inner_text()
    shot(page, "12-contribute-generated")
    panel.locator("button.jupyter-swarm-stop-serving").click()
    summary.filter(has_text="missing blocks").wait_for(timeout=60_000)
    sidebar = page.locator("#jupyter-swarm-panel")
    sidebar.locator(".jp-SwarmPanel-serveStatus", has_text="Not serving").wait_for(timeout=60_000)
    sidebar.locator(".jp-SwarmPanel-count.jp-mod-hole").first.wait_for(timeout=60_000)
    summary.scroll_into_view_if_needed()
    shot(page, "13-contribute-stopped")
    # shutting the kernel down removes its state: the sidebar goes back to "not connected"
    for kernel in _api(lab, "GET", "/api/kernels"):
        _api(lab, "DELETE", f"/api/kernels/{kernel['id']}")
    page.wait_for_selector("#jp-main-statusbar .jp-SwarmStatus:has-text('Swarm: not connected')", timeout=60_000)
    page.close()


def test_quickstart_in_notebook7(browser, notebook7, smollm2_dir) -> None:
    """The same notebook in Notebook 7: the chat widget streams the real model's answer; the Swarm panel shows."""
    page = browser.new_page(viewport={"width": 1400, "height": 1000})
    page.set_default_timeout(60_000)
    try:
        page.goto(f"{notebook7[0]}/notebooks/quickstart.ipynb?token={TOKEN}")
        page.wait_for_selector(".jp-NotebookPanel .jp-Notebook .jp-CodeCell")
        nb = page.locator(".jp-NotebookPanel .jp-Notebook")
        _run_until_it_counts(page, "%load_ext jupyter_swarm")  # the first Shift+Enter may come before the kernel
        _run_cell_containing(page, "%swarm connect demo --local", notebook=".jp-NotebookPanel .jp-Notebook")
        nb.locator(".jupyter-swarm-summary").filter(has_text="all blocks covered").wait_for(timeout=180_000)
        _run_cell_containing(page, "%swarm widget", notebook=".jp-NotebookPanel .jp-Notebook")
        gen = nb.locator(".jupyter-swarm-generation")
        gen.wait_for(timeout=60_000)
        gen.scroll_into_view_if_needed()
        gen.locator(".jupyter-swarm-prompt textarea").fill("What is the capital of France?")
        gen.locator("button.jupyter-swarm-generate").click()
        output = gen.locator(".jupyter-swarm-output")
        seen = []
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and len(seen) < 3:
            text = output.inner_text()
            if len(text) > len("What is the capital of France?") + 2 and (not seen or text != seen[-1]):
                seen.append(text)
            time.sleep(0.02)
        assert len(seen) >= 3, f"the answer did not stream: {seen}"
        shot(page, "nb7-01-chat-streaming")
        gen.locator(".jupyter-swarm-stats", has_text="ms per token").wait_for(timeout=120_000)
        assert "The capital of France is Paris." in output.inner_text()
        shot(page, "nb7-02-chat-answered")
        # the Swarm panel, in Notebook 7's left area, opened from the command palette
        page.keyboard.press("Control+Shift+C")
        page.keyboard.type("Show the Swarm panel")
        page.keyboard.press("Enter")
        panel = page.locator("#jupyter-swarm-panel")
        panel.locator(".jp-SwarmPanel-count").first.wait_for(timeout=30_000)
        assert panel.locator(".jp-SwarmPanel-count").count() == 30
        assert panel.locator(".jp-SwarmPanel-server").count() == 3
        assert "all blocks covered" in panel.locator(".jp-SwarmPanel-header").inner_text()
        shot(page, "nb7-03-swarm-panel")
    finally:
        page.close()


def _run_until_it_counts(page, text: str, notebook: str = ".jp-NotebookPanel .jp-Notebook") -> None:
    """Run the cell with ``text`` until its prompt shows an execution count (the kernel may not be ready yet)."""
    cell = page.locator(notebook + " .jp-CodeCell", has=page.locator(".cm-content", has_text=text)).first
    for _ in range(6):
        _run_cell_containing(page, text, notebook=notebook)
        try:
            cell.locator(".jp-InputPrompt", has_text=re.compile(r"\[\d+\]")).wait_for(timeout=15_000)
            return
        except Exception:  # noqa: BLE001 - playwright's TimeoutError: not run yet, press again
            continue
    raise AssertionError(f"the cell {text!r} never ran")
