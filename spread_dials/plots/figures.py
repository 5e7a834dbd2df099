"""What every PNG plot shares: matplotlib with the Agg backend (no display), and saving a figure."""

from __future__ import annotations

from pathlib import Path

from spread_dials.util.atomic import atomic_path

__all__ = ["pyplot", "save_figure"]


def pyplot():
    """``matplotlib.pyplot`` on the Agg backend (imported on first use: plots are optional)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path: str | Path, **savefig_kwargs) -> Path:
    """Write ``fig`` to ``path`` (PNG) atomically (never half a file; its folder made if missing),
    close it, and return the path."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(path) as tmp:
            fig.savefig(tmp, **savefig_kwargs)
    finally:
        pyplot().close(fig)
    return path
