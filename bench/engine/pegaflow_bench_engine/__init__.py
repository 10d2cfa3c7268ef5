"""pegaflow's reference engine: a Llama-3.1-8B / DeepSeek-MLA shaped torch decoder with a paged KV
cache that drives pegaflow as the vLLM connector's worker does, and ``pegaflow bench engine``."""

__version__ = "0.1.0"
