"""bitsandbytes, imported on first use: quantized blocks (models layer) and 8-bit activations on the wire use it.

Importing it costs about 2 s (it pulls in torch's compiler stack), so nothing imports it before it is needed.
"""

from __future__ import annotations

import logging
from typing import Any

from jupyter_swarm.errors import MissingDependencyError

INSTALL_HINT = 'pip install "bitsandbytes>=0.50" (jupyter-swarm depends on it; reinstalling jupyter-swarm also works)'

# bitsandbytes logs a warning on every int8 forward (inputs are cast to float16, as LLM.int8() intends), and at
# import on CPUs with AVX512-BF16 that an optional hub kernel is missing (it falls back to its own kernel).
_QUIET = {"bitsandbytes.autograd._functions": "MatMul8bitLt: inputs will be cast",
          "bitsandbytes.backends.cpu.ops": "Failed to load CPU gemm_4bit_forward"}


class _DropNotice(logging.Filter):
    def __init__(self, prefix: str):
        super().__init__()
        self.prefix = prefix

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.prefix)


def import_bitsandbytes(needed_for: str = "this feature") -> Any:
    """The ``bitsandbytes`` module (with the notices above silenced).

    Raises:
        MissingDependencyError: bitsandbytes is not installed; the message names ``needed_for`` and how to install it.
    """
    for name, prefix in _QUIET.items():
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropNotice) for f in logger.filters):
            logger.addFilter(_DropNotice(prefix))
    try:
        import bitsandbytes
    except ImportError as e:
        raise MissingDependencyError(
            f"{needed_for} needs bitsandbytes, which is not installed ({e}); install it with: {INSTALL_HINT}") from None
    return bitsandbytes
