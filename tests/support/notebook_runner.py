"""A notebook kernel run by nbclient, fed one cell at a time over stdin, so a test can run it inside a network
namespace and act between cells.

    python -m tests.support.notebook_runner      # then one JSON line per cell: {"cell": "%swarm ..."}

Each cell is appended to a notebook and executed by nbclient; the answer is one JSON line {"text": <its printed and
displayed text>, "error": null | "<the error>"}. {"cmd": "quit"} (or the end of stdin) shuts the kernel down.
"""

from __future__ import annotations

import json
import sys
import threading
from typing import Any


def _text(outputs: list[Any]) -> str:
    parts = []
    for output in outputs:
        if output.get("output_type") == "stream":
            parts.append(output.get("text", ""))
        elif "data" in output:
            parts.append(output["data"].get("text/plain", ""))
        elif output.get("output_type") == "error":
            parts.append(f"{output.get('ename')}: {output.get('evalue')}")
    return "".join(parts)


def main() -> None:
    import nbformat
    from nbclient import NotebookClient
    from nbclient.exceptions import CellExecutionError

    notebook = nbformat.v4.new_notebook()
    client = NotebookClient(notebook, timeout=600, kernel_name="python3", allow_errors=False)
    with client.setup_kernel():
        for line in sys.stdin:
            if not line.strip():
                continue
            request = json.loads(line)
            if request.get("cmd") == "quit":
                break
            cell = nbformat.v4.new_code_cell(request["cell"])
            notebook.cells.append(cell)
            error = None
            try:
                client.execute_cell(cell, len(notebook.cells) - 1)
            except CellExecutionError as e:
                error = str(e)[-2000:]
            sys.stdout.write(json.dumps({"text": _text(cell.outputs), "error": error}) + "\n")
            sys.stdout.flush()


class NotebookRunner:
    """The test's side: starts the runner with ``launcher`` (e.g. ``ip netns exec NS``) and runs cells in it."""

    def __init__(self, launcher: list[str], *, cwd: str, log_path: str | None = None):
        import subprocess

        self._log = open(log_path, "w") if log_path else subprocess.DEVNULL
        self.log_path = log_path
        self.process = subprocess.Popen([*launcher, sys.executable, "-m", "tests.support.notebook_runner"], cwd=cwd,
                                        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._log, text=True)
        self._lock = threading.Lock()

    def run(self, source: str) -> dict:
        """Execute one cell; returns {"text": ..., "error": ...}."""
        assert self.process.stdin is not None and self.process.stdout is not None
        with self._lock:
            self.process.stdin.write(json.dumps({"cell": source}) + "\n")
            self.process.stdin.flush()
            line = self.process.stdout.readline()
        if not line:
            raise RuntimeError(f"the notebook runner exited (code {self.process.poll()}); log: {self.log_path}")
        return json.loads(line)

    def close(self) -> None:
        if self.process.poll() is None:
            try:
                assert self.process.stdin is not None
                self.process.stdin.write(json.dumps({"cmd": "quit"}) + "\n")
                self.process.stdin.flush()
                self.process.wait(60)
            except Exception:  # noqa: BLE001
                self.process.kill()
        if hasattr(self._log, "close"):
            self._log.close()


if __name__ == "__main__":
    main()
