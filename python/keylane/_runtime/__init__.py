"""One run of an App; ``run.py`` says how its tasks fit together."""

from keylane._runtime.run import Run

__all__ = ["Run"]
