"""transformers/Petals compatibility, each checked side by side with local transformers on the same weights:
from_pretrained's hub arguments and dtypes, generate() in sessions (session=, None inputs), ModelOutput results,
and transformers' TextStreamer / TextIteratorStreamer."""

from __future__ import annotations

import shutil
import threading
from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer, TextIteratorStreamer, TextStreamer

from jupyter_swarm import AutoDistributedModelForCausalLM
from jupyter_swarm.dht.naming import model_prefix
from jupyter_swarm.errors import ConfigurationError
from jupyter_swarm.models import make_tiny_model
from tests.integration.conftest import start_swarm

pytestmark = pytest.mark.integration

PROMPT = torch.tensor([[1, 17, 42, 99, 7, 230, 11]])


@pytest.fixture(scope="module")
def swarm_and_path(model_path):
    path = model_path("llama")
    with start_swarm(path, [(0, 2), (2, 4)]) as swarm:
        yield swarm, path


@pytest.fixture
def model(swarm_and_path, connect):
    swarm, path = swarm_and_path
    return connect(path, swarm)


@pytest.fixture
def local(swarm_and_path, local_model):
    return local_model(swarm_and_path[1])


def _fake_hub_cache(root: Path, repo: str, revisions: dict[str, str]) -> Path:
    """A Hugging Face cache folder holding ``repo`` at each revision name -> model directory (read offline)."""
    folder = root / f"models--{repo.replace('/', '--')}"
    for i, (name, directory) in enumerate(revisions.items()):
        commit = f"{i + 1:040x}"
        shutil.copytree(directory, folder / "snapshots" / commit)
        (folder / "refs").mkdir(parents=True, exist_ok=True)
        (folder / "refs" / name).write_text(commit)
    return root


def test_from_pretrained_reads_the_named_revision_from_cache_dir(swarm_and_path, local, tmp_path, connect):
    swarm, path = swarm_and_path
    other = make_tiny_model(str(tmp_path / "other"), family="llama", hidden_size=64, num_layers=4, num_heads=4,
                            num_kv_heads=2, seed=99)  # same shape, other weights: what "main" holds
    cache = _fake_hub_cache(tmp_path / "hub", "acme/tiny", {"main": other, "v2": path})
    kwargs = dict(initial_peers=swarm.initial_peers, cache_dir=str(cache), local_files_only=True,
                  token="hf_not_used_offline", dht_prefix=model_prefix(path), torch_dtype="float32")
    v2 = AutoDistributedModelForCausalLM.from_pretrained("acme/tiny", revision="v2", **kwargs)
    main = AutoDistributedModelForCausalLM.from_pretrained("acme/tiny", **kwargs)
    try:
        expected = local.generate(PROMPT, max_new_tokens=12, do_sample=False)
        assert v2.generate(PROMPT, max_new_tokens=12, do_sample=False).tolist() == expected.tolist()
        assert not torch.equal(main.head.embeddings.weight, v2.head.embeddings.weight)  # main: the other weights
    finally:
        v2.close()
        main.close()


@pytest.mark.parametrize("dtype, expected", [("auto", torch.float32), ("bfloat16", torch.bfloat16),
                                             ("torch.float16", torch.float16), (torch.bfloat16, torch.bfloat16)])
def test_dtypes_as_names_or_auto(swarm_and_path, connect, dtype, expected):
    swarm, path = swarm_and_path
    assert connect(path, swarm, dtype=dtype).head.dtype == expected


def test_bad_arguments_say_what_is_accepted(swarm_and_path):
    swarm, path = swarm_and_path
    for kwargs, message in [({"dtype": "float7"}, "dtype must be a floating-point torch dtype"),
                            ({"dtype": "float16", "torch_dtype": "bfloat16"}, "disagree"),
                            ({"model_prefix": "a", "dht_prefix": "b"}, "two names for the same thing"),
                            ({"trust_remote_code": True}, "revision, token, cache_dir, local_files_only")]:
        with pytest.raises(ConfigurationError, match=message):
            AutoDistributedModelForCausalLM.from_pretrained(path, initial_peers=swarm.initial_peers, **kwargs)


def test_session_argument_and_none_inputs_continue_like_one_local_generate(model, local):
    expected = local.generate(PROMPT, max_new_tokens=24, do_sample=False)
    with model.inference_session(max_length=64):
        first = model.generate(PROMPT, max_new_tokens=8, do_sample=False)
        more = model.generate(None, max_new_tokens=8, do_sample=False)  # continue: no new inputs
    assert first.tolist() == expected[:, :PROMPT.shape[1] + 8].tolist()
    assert more.tolist() == expected[:, PROMPT.shape[1] + 8:PROMPT.shape[1] + 16].tolist()
    with model.inference_session(max_length=64) as session:  # Petals' style: the session passed explicitly
        a = model.generate(PROMPT, session=session, max_new_tokens=8, do_sample=False)
        b = model.generate(None, session=session, max_new_tokens=16, do_sample=False)
        assert torch.cat([a, b], dim=1).tolist() == expected.tolist()
        follow = torch.tensor([[5, 6]])
        c = model.generate(follow, session=session, max_new_tokens=6, do_sample=False)
    whole = local.generate(torch.cat([expected, follow], dim=1), max_new_tokens=6, do_sample=False)
    assert c.tolist() == whole[:, expected.shape[1]:].tolist()  # the new inputs and what followed them
    with pytest.raises(ConfigurationError, match="closed"):
        model.generate(PROMPT, session=session, max_new_tokens=2)


def test_model_output_results_keep_the_session_whole(model, local):
    kwargs = dict(do_sample=False, return_dict_in_generate=True, output_scores=True)
    expected = local.generate(PROMPT, max_new_tokens=16, **kwargs)
    with model.inference_session(max_length=64):
        first = model.generate(PROMPT, max_new_tokens=8, **kwargs)
        second = model.generate(None, max_new_tokens=8, **kwargs)
    assert type(first).__name__ == type(expected).__name__ == "GenerateDecoderOnlyOutput"
    assert torch.cat([first.sequences, second.sequences], dim=1).tolist() == expected.sequences.tolist()
    for got, want in zip([*first.scores, *second.scores], expected.scores):
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


def test_transformers_streamers_stream_the_local_text(swarm_and_path, model, local, capsys):
    tokenizer = AutoTokenizer.from_pretrained(swarm_and_path[1])
    prompt = tokenizer("Once upon a time", return_tensors="pt").input_ids
    local.generate(prompt, max_new_tokens=20, do_sample=False, streamer=TextStreamer(tokenizer, skip_prompt=True))
    expected = capsys.readouterr().out
    model.generate(prompt, max_new_tokens=20, do_sample=False, streamer=TextStreamer(tokenizer, skip_prompt=True))
    assert capsys.readouterr().out == expected and expected.strip()

    streamer = TextIteratorStreamer(tokenizer, skip_prompt=True, timeout=60)
    thread = threading.Thread(target=model.generate, args=(prompt,),
                              kwargs=dict(max_new_tokens=20, do_sample=False, streamer=streamer))
    thread.start()
    pieces = list(streamer)
    thread.join()
    assert "".join(pieces) == expected.rstrip("\n") and len(pieces) > 1
