"""Moved to :mod:`dp_model.serving.runner` on 2026-12-06; this module re-exports it, with a
``DeprecationWarning``, until 0.2.0 (see :mod:`dp_model.deprecation`)."""

from .deprecation import reexport
from .serving import runner as _moved

reexport(globals(), _moved)
