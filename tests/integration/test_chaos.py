"""The chaos soak in CI: 200 SIGKILLs at random points of relayed and client-driven generation, same tokens."""

from __future__ import annotations

import pytest

from tests.integration.chaos import run_soak

KILLS = 200  # bench/bench_chaos.py runs 1,000


@pytest.mark.timeout(1200)
def test_chaos_soak_keeps_every_token(model_path, local_model, zygote, capsys):
    path = model_path("llama")
    cache: dict = {}

    def expected(prompt, new_tokens: int) -> list[int]:
        key = (tuple(prompt[0].tolist()), new_tokens)
        if key not in cache:
            cache[key] = local_model(path).generate(prompt, max_new_tokens=new_tokens, do_sample=False)[0].tolist()
        return cache[key]

    result = run_soak(zygote, path, expected, kills=KILLS)
    with capsys.disabled():
        print("\nchaos soak: " + result.summary())
    assert result.kills >= KILLS
    assert min(result.kills_during_generation.values()) >= KILLS // 4, result.kills_during_generation
    assert result.failovers >= KILLS // 2  # the kills hit the chains in use
    assert result.mismatches == []
