"""Overlaid histograms of per-image bits/dim from ``glow predict`` CSV files (in- vs out-of-distribution).

    python -m glow_lightning.histogram runs/cifar/predictions/cifar10_test.csv \\
        runs/cifar/predictions/svhn_test.csv --output runs/cifar/ood_hist.png

The classic picture of Nalisnick et al. (2019), "Do Deep Generative Models Know What They Don't
Know?": a Glow trained on CIFAR-10 gives SVHN images *lower* bits/dim (higher likelihood).
"""

from __future__ import annotations

import os
import sys

from .callbacks.predictions import read_predictions


def plot_histogram(
    csv_files: list[str],
    output: str = "bpd_histogram.png",
    column: str = "bpd",
    labels: list[str] | None = None,
    bins: int = 50,
    title: str | None = None,
) -> str:
    """Draw one normalised histogram per CSV file, overlaid, and save it as a PNG.

    Args:
        csv_files: CSV files written by ``glow predict`` (one row per image).
        output: PNG file to write.
        column: the column to histogram (``bpd``, or a part such as ``bpd_level1``).
        labels: legend entries, one per file (default: the file names without extension).
        bins: number of histogram bins (shared by all files).
        title: figure title.

    Returns:
        The path of the PNG written.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    if labels is not None and len(labels) != len(csv_files):
        raise ValueError(f"labels must have one entry per CSV file ({len(csv_files)}), got {len(labels)}")
    labels = labels or [os.path.splitext(os.path.basename(p))[0] for p in csv_files]
    values = []
    for path in csv_files:
        table = read_predictions(path)
        if column not in table:
            raise ValueError(f"{path} has no column {column!r}; columns: {', '.join(table)}")
        values.append(table[column].numpy())
    edges = np.histogram_bin_edges(np.concatenate(values), bins=bins)
    fig, ax = plt.subplots(figsize=(6, 4))
    for v, label in zip(values, labels):
        ax.hist(v, bins=edges, density=True, alpha=0.5, label=f"{label} (mean {v.mean():.3f}, n={len(v)})")
    ax.set_xlabel("bits/dim" if column == "bpd" else column)
    ax.set_ylabel("density")
    ax.legend()
    if title:
        ax.set_title(title)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
    fig.savefig(output, dpi=120)
    plt.close(fig)
    print(f"wrote {output}")
    return output


def main(args: list[str] | None = None) -> None:
    """``python -m glow_lightning.histogram A.csv B.csv [--output PNG] [--column bpd] [--labels A B] [--bins 50]``."""
    import argparse

    parser = argparse.ArgumentParser(
        prog="python -m glow_lightning.histogram", description=plot_histogram.__doc__.splitlines()[0]
    )
    parser.add_argument("csv_files", nargs="+", help="CSV files written by glow predict")
    parser.add_argument("--output", default="bpd_histogram.png", help="PNG file to write")
    parser.add_argument("--column", default="bpd", help="column to histogram")
    parser.add_argument("--labels", nargs="+", default=None, help="legend entries, one per file")
    parser.add_argument("--bins", type=int, default=50, help="number of histogram bins")
    parser.add_argument("--title", default=None, help="figure title")
    ns = parser.parse_args(args)
    try:
        plot_histogram(ns.csv_files, ns.output, ns.column, ns.labels, ns.bins, ns.title)
    except (ValueError, OSError) as err:  # one line naming the file, not argparse's usage dump
        print(f"{parser.prog}: error: {err}", file=sys.stderr)
        raise SystemExit(2) from err


if __name__ == "__main__":
    main()
