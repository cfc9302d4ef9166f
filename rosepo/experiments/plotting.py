"""The one plotting helper of the experiments: matplotlib without a display, figures saved atomically."""

from __future__ import annotations

from pathlib import Path

from rosepo.storage import atomic_path


def pyplot():
    """``matplotlib.pyplot`` on the Agg backend (no display needed; imported on first use)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path: Path, *, dpi: int) -> None:
    """Lay out ``fig``, write it to ``path`` atomically and close it."""
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=dpi)
    pyplot().close(fig)
