"""jupyter-swarm: run and fine-tune LLMs over a swarm of GPUs, driven from Jupyter."""

from importlib.metadata import PackageNotFoundError, version
from typing import Any

try:  # the one version number lives in pyproject.toml (labextension/package.json repeats it; a test checks)
    __version__ = version("jupyter-swarm")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0+unknown"

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


def _jupyter_labextension_paths() -> list[dict[str, str]]:
    """Where JupyterLab and Notebook 7 find the prebuilt front-end extension (the Swarm panel) in this package."""
    return [{"src": "labextension", "dest": "jupyter-swarm-labextension"}]


def load_ipython_extension(ipython: Any) -> None:
    """`%load_ext jupyter_swarm`: registers the `%swarm` magics (imports the notebook layer only now)."""
    from jupyter_swarm.notebook import load_ipython_extension as load

    load(ipython)

