"""The chaos soak at full size: 1,000 SIGKILLs at random points of relayed and client-driven generation.

Real `jupyter-swarm serve` processes (forked by a pre-imported zygote, see tests/integration/server_zygote.py) on
loopback, a `jupyter-swarm bootstrap` node, three servers per span of a tiny 4-block Llama, and a client that
generates non-stop (relayed and client-driven steps alternating) while servers are SIGKILLed every 1-12 tokens and
replaced. Prints how many generations matched a local run token for token (it must be all of them) and the stall
distribution: the gap between tokens in which each kill fell, and every gap between tokens.

    python bench/bench_chaos.py                  # 1,000 kills (~10 min on a 2-core machine)
    python bench/bench_chaos.py --kills 200      # the CI test's size
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from transformers import AutoModelForCausalLM  # noqa: E402

from jupyter_swarm.models import make_tiny_model  # noqa: E402
from tests.integration.chaos import run_soak  # noqa: E402
from tests.integration.conftest import MODELS  # noqa: E402
from tests.integration.server_zygote import Zygote  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--kills", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-chaos-") as workdir:
        path = make_tiny_model(str(Path(workdir) / "llama"), **MODELS["llama"])
        local = AutoModelForCausalLM.from_pretrained(path).eval()
        cache: dict = {}

        def expected(prompt, new_tokens: int) -> list[int]:
            key = (tuple(prompt[0].tolist()), new_tokens)
            if key not in cache:
                cache[key] = local.generate(prompt, max_new_tokens=new_tokens, do_sample=False)[0].tolist()
            return cache[key]

        with Zygote(Path(workdir)) as zygote:
            result = run_soak(zygote, path, expected, kills=args.kills, seed=args.seed,
                              log=lambda line: print(line, flush=True))
    print(result.summary())
    for line in result.failed_starts:
        print("A SERVER EXITED BEFORE READY:", line)
    for line in result.mismatches[:5]:
        print("MISMATCH", line)
    return 1 if result.mismatches else 0


if __name__ == "__main__":
    sys.exit(main())
