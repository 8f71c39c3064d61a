"""jupyter-swarm: run and fine-tune LLMs over a swarm of GPUs, driven from Jupyter."""

from typing import Any

__version__ = "0.1.0"

__all__ = ["AutoDistributedModelForCausalLM", "DistributedModelForCausalLM", "__version__"]


def __getattr__(name: str) -> Any:
    # Imported lazily so that `import jupyter_swarm` (e.g. for the magics) does not pull in torch.
    if name in ("AutoDistributedModelForCausalLM", "DistributedModelForCausalLM"):
        from jupyter_swarm.client import model

        return getattr(model, name)
    raise AttributeError(name)
