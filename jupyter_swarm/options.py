"""Choices users name on the command line, in `%swarm` magics and in the serve panel, kept free of heavy imports
(the magics load before torch does)."""

from jupyter_swarm.errors import ConfigurationError

#: how a server stores its blocks: jupyter_swarm.models.quantization.QuantType, plus auto (see
#: jupyter_swarm.runtime.server.choose_quant_type)
QUANT_TYPES = ("auto", "none", "int8", "nf4", "fp4")
QUANT_TYPE_HELP = ("how the blocks' linear layers are stored (bitsandbytes): none (the dtype), int8 (LLM.int8()), "
                   "nf4 or fp4 (4-bit); auto: on a GPU the least lossy of none, int8, nf4 that fits, else none")

DEFAULT_LOOKUP_TOKENS = 8  # candidates per step from prompt lookup
SPECULATIVE_HELP = ("off (one token per trip through the servers), lookup[:K] (guess up to K tokens, default "
                    f"{DEFAULT_LOOKUP_TOKENS}, by copying what followed the last words in the text so far: good when "
                    "the answer quotes its input) or draft:PATH (a small local model with the same tokenizer guesses)")


def parse_speculative(mode: str | None) -> tuple[str, int | str | None]:
    """``off``, ``lookup``, ``lookup:K`` or ``draft:PATH`` -> (kind, K or PATH). Raises ConfigurationError."""
    text = (mode or "off").strip()
    kind, _, value = text.partition(":")
    if kind == "off" and not value:
        return "off", None
    if kind == "lookup":
        if not value:
            return "lookup", DEFAULT_LOOKUP_TOKENS
        if value.isdigit() and 1 <= int(value) <= 63:
            return "lookup", int(value)
    if kind == "draft" and value:
        return "draft", value
    raise ConfigurationError(f"unknown speculative mode {text!r}; use {SPECULATIVE_HELP}")
