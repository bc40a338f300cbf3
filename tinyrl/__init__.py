"""tinyrl: reinforcement learning from verifiable rewards for small language models."""

__version__ = "0.1.0"
