"""Flax models exposed as pure ``(init, apply)`` pairs; losses and the tasks that pair them with metrics."""

from fedjaxpriv.models.core import (MODEL_NAMES, READS_TOKENS, TOKEN_CLASSIFIERS, TOKEN_MODELS, WIDTH_MODELS, Model,
                                    ModelLike, as_model, count_params, get_model)
from fedjaxpriv.models.losses import cross_entropy, accuracy, soft_cross_entropy
from fedjaxpriv.models.tasks import CLASSIFICATION, MULTI_LABEL, NEXT_TOKEN, TASKS, Task, as_task

__all__ = ["Model", "ModelLike", "as_model", "count_params", "get_model", "MODEL_NAMES", "TOKEN_MODELS", "WIDTH_MODELS",
           "TOKEN_CLASSIFIERS", "READS_TOKENS", "cross_entropy", "accuracy",
           "soft_cross_entropy", "CLASSIFICATION", "MULTI_LABEL", "NEXT_TOKEN", "TASKS", "Task", "as_task"]
