"""One line to the user from inside a run, above the progress bars.

A plain ``print`` during a fit lands at the end of the bar's line (``Training: ... it/s]glow: lr schedule: ...``),
and the bar's next redraw writes over it; ``tqdm.write`` clears the bars (Lightning's are tqdm bars), writes the
line and redraws them below it. Without a bar it is a plain print.
"""

from __future__ import annotations

import sys

from lightning.pytorch.utilities import rank_zero_only
from tqdm import tqdm


def say(line: str, *, all_ranks: bool = False) -> None:
    """Print ``line`` above any progress bar, on global rank 0 only unless ``all_ranks``."""
    if all_ranks or rank_zero_only.rank == 0:
        tqdm.write(line)
        sys.stdout.flush()
