"""Moved to :mod:`dp_model.training.cli` on 2026-12-06 (``dp-train`` runs it); this module
re-exports it, with a ``DeprecationWarning``, until 0.2.0 (see :mod:`dp_model.deprecation`),
and ``python -m dp_model.train_cli`` still runs ``dp-train``."""

import sys

from .deprecation import reexport
from .training import cli as _moved

reexport(globals(), _moved)

if __name__ == "__main__":
    sys.exit(_moved.main())
