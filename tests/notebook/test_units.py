"""Pure pieces of the notebook layer: automatic block choice, state files, the magics' parser."""

from __future__ import annotations

import subprocess
import sys

import pytest

from jupyter_swarm.notebook import state as state_files


def test_state_files_round_trip(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("JUPYTER_SWARM_STATE_DIR", str(tmp_path))
    assert state_files.read_states() == []
    state_files.write_state({"connected": True})
    [state] = state_files.read_states()
    assert state["connected"] and state["updated"] > 0
    state_files.post_request(state["pid"], "serve", blocks="2:4")
    assert state_files.take_request()["params"] == {"blocks": "2:4"}
    state_files.remove_state()
    assert state_files.read_states() == []


def test_import_stays_light() -> None:
    code = "import sys, jupyter_swarm, jupyter_swarm.notebook; print('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True).stdout.strip() == "False"


def test_parser_usage_errors_do_not_exit() -> None:
    pytest.importorskip("IPython")
    from jupyter_swarm.notebook.magics import _ParserExit, build_parser

    parser = build_parser()
    with pytest.raises(_ParserExit, match="invalid choice"):
        parser.parse_args(["nope"])
    args = parser.parse_args(["generate", "hi", "--max-new-tokens", "3", "--num-beams", "2"])
    assert (args.prompt, args.max_new_tokens, args.num_beams) == ("hi", 3, 2)
