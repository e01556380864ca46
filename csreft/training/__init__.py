"""Training: the recipe (build / fit / run), the Trainer subclass, options, run directories,
and what sharded engines need."""

from .options import TrainingOptions
from .recipe import build, fit, run

__all__ = ["TrainingOptions", "build", "fit", "run"]
