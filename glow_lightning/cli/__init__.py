"""The ``glow`` command line: :mod:`.main` (GlowCLI, ``main``, the console script), :mod:`.subcommands`
(GlowTrainer: ``sample``, ``reconstruct``, ``interpolate``) and :mod:`.tracking` (config to W&B).

``python -m glow_lightning.cli`` runs the same as ``glow``.
"""

from .main import GlowCLI, entry, main

__all__ = ["GlowCLI", "entry", "main"]
