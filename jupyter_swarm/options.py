"""Choices users name on the command line, in `%swarm` magics and in the serve panel, kept free of heavy imports
(the magics load before torch does)."""

#: how a server stores its blocks: jupyter_swarm.models.quantization.QuantType, plus auto (see
#: jupyter_swarm.runtime.server.choose_quant_type)
QUANT_TYPES = ("auto", "none", "int8", "nf4", "fp4")
QUANT_TYPE_HELP = ("how the blocks' linear layers are stored (bitsandbytes): none (the dtype), int8 (LLM.int8()), "
                   "nf4 or fp4 (4-bit); auto: on a GPU the least lossy of none, int8, nf4 that fits, else none")
