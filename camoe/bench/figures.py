"""The benchmarks' figures: matplotlib without a display, each saved the same way."""

from __future__ import annotations

from pathlib import Path
from types import ModuleType
from typing import Any


def pyplot() -> ModuleType:
    """``matplotlib.pyplot`` on the Agg backend (imported late: the CLI starts without it)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save(fig: Any, path: Path, **options: Any) -> Path:
    """Writes ``fig`` to ``path`` at 120 dpi, closes it and returns ``path``."""
    fig.savefig(path, dpi=120, **options)
    pyplot().close(fig)
    return path
