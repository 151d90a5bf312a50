"""Training: the loop, its schedule and its entry point."""

from aiinfra.train.trainer import Trainer, TrainResult, train

__all__ = ["Trainer", "TrainResult", "train"]
