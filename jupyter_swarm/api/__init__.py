"""An OpenAI-compatible HTTP API over a distributed model (``jupyter-swarm api``, ``%swarm api``).

Layer above the client: it only uses the client's model, tokenizer, chat template and text streaming, never the
wire format. :mod:`.schemas` says what requests may ask, :mod:`.engine` generates for them, :mod:`.stops` cuts
text at stop sequences, :mod:`.app` is the web application and :mod:`.server` runs it.
"""
