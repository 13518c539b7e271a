"""Sharded training with optax: the rule table that shards inference shards training.

    from jaxpar.training import OptimizerConfig, Trainer, TextDataset, TrainCheckpoints, train
"""

from jaxpar.training.checkpointing import TrainCheckpoints
from jaxpar.training.data import Batch, TextDataset
from jaxpar.training.init import init_params
from jaxpar.training.loop import TrainResult, train
from jaxpar.training.loss import causal_lm_loss
from jaxpar.training.optimizer import OptimizerConfig, make_optimizer
from jaxpar.training.step import Trainer, TrainState, grads_fn, loss_fn, train_step

__all__ = ["Batch", "OptimizerConfig", "TextDataset", "TrainCheckpoints", "TrainResult", "TrainState", "Trainer",
           "causal_lm_loss", "grads_fn", "init_params", "loss_fn", "make_optimizer", "train", "train_step"]
