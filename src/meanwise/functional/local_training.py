"""Moved to :mod:`meanwise.engine.local_training` (local training is an engine that runs the
pure rules of this package, not a rule). Re-exported here, without being imported by
``meanwise.functional`` itself, for code that imports ``meanwise.functional.local_training``."""

from meanwise.engine.local_training import *  # noqa: F403
from meanwise.engine.local_training import __all__  # noqa: F401
