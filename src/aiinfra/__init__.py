"""aiinfra: train, serve, plan and watch language models."""

__version__ = "0.1.0"
