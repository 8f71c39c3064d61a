"""jupyter-swarm: run and fine-tune LLMs over a swarm of GPUs, driven from Jupyter."""
