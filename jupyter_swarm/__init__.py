"""jupyter-swarm: run and fine-tune LLMs over a swarm of GPUs, driven from Jupyter."""

from typing import Any

__version__ = "0.1.0"

__all__ = ["AutoDistributedModelForCausalLM", "AutoDistributedModelForSequenceClassification",
           "DistributedModelForCausalLM", "DistributedModelForSequenceClassification", "__version__"]


def __getattr__(name: str) -> Any:
    # Imported lazily so that `import jupyter_swarm` (e.g. for the magics) does not pull in torch.
    if name in ("AutoDistributedModelForCausalLM", "DistributedModelForCausalLM"):
        from jupyter_swarm.client import model

        return getattr(model, name)
    if name in ("AutoDistributedModelForSequenceClassification", "DistributedModelForSequenceClassification"):
        from jupyter_swarm.client import classification

        return getattr(classification, name)
    raise AttributeError(name)


def load_ipython_extension(ipython: Any) -> None:
    """`%load_ext jupyter_swarm`: registers the `%swarm` magics (imports the notebook layer only now)."""
    from jupyter_swarm.notebook import load_ipython_extension as load

    load(ipython)

