"""Model families: one small module per family on top of transformers' own layers.

Which parts of a model the client holds (:class:`ClientHead`), how a server's span of blocks runs with a cache
(:class:`BlockSpan`, :class:`SpanCache`), and tiny random models for tests (:func:`make_tiny_model`).
"""

from jupyter_swarm.models import bloom as _bloom  # noqa: F401  (registers the family)
from jupyter_swarm.models import llama as _llama  # noqa: F401  (registers the family)
from jupyter_swarm.models.cache import SessionLengthError, SpanCache
from jupyter_swarm.models.config import load_model_config
from jupyter_swarm.models.family import ModelFamily, get_family, register_family, supported_model_types
from jupyter_swarm.models.head import ClientHead
from jupyter_swarm.models.span import BlockSpan
from jupyter_swarm.models.tiny import make_tiny_model

__all__ = [
    "BlockSpan",
    "ClientHead",
    "ModelFamily",
    "SessionLengthError",
    "SpanCache",
    "get_family",
    "load_model_config",
    "make_tiny_model",
    "register_family",
    "supported_model_types",
]
