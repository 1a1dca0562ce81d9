"""``python -m glow_lightning.cli``: the ``glow`` console script."""

from .main import entry

entry()
