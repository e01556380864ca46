"""Training: the recipe (build / fit / run), the Trainer subclass, options, run directories,
and what sharded engines need. `csreft.training.run(options)` is the whole recipe; the
Trainer is imported only when the recipe is used (the command line stays quick to start)."""

_RECIPE = ("build", "fit", "run")


def __getattr__(name: str):
    if name in _RECIPE:
        from . import recipe

        return getattr(recipe, name)
    if name == "TrainingOptions":
        from .options import TrainingOptions

        return TrainingOptions
    raise AttributeError(f"module 'csreft.training' has no attribute {name!r}")


__all__ = ["TrainingOptions", *_RECIPE]
