"""Draw an experiment's figures to PNG files without touching pyplot's global state.

Each figure is a fresh `matplotlib.figure.Figure` rendered by the Agg canvas (no GUI backend,
no `plt` figure registry to leak memory across experiments), written atomically.
"""

from __future__ import annotations

import io
import sys
from pathlib import Path
from typing import Any

from meanwise.atomic_io import atomic_write_bytes
from meanwise.experiments.base import Experiment, FigureSpec

__all__ = ["FIGURES_DIR", "render_png", "render_figures"]

FIGURES_DIR = "figures"


def render_png(spec: FigureSpec, dpi: int = 110) -> bytes:
    """The PNG bytes of one figure."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=spec.size, layout="constrained")
    FigureCanvasAgg(figure)
    spec.draw(figure)
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=dpi)
    return buffer.getvalue()


def render_figures(
    experiment: Experiment,
    config: dict[str, Any],
    results: list[dict[str, Any]],
    out_dir: Path,
) -> list[dict[str, Any]]:
    """Write the experiment's figures to `out_dir/figures/<name>-<stem>.png`.

    Returns `{"file": relative path, "caption": ...}` per figure. A figure that fails to draw is
    reported (`"error"`) instead of failing the run: the results are already computed and
    cached, and a report without one plot is more useful than none.
    """
    entries = []
    for spec in experiment.figures(config, results):
        relative = f"{FIGURES_DIR}/{experiment.name}-{spec.stem}.png"
        try:
            atomic_write_bytes(Path(out_dir) / relative, render_png(spec))
        except Exception as error:  # noqa: BLE001 - reported in the page and on stderr
            print(f"meanwise: figure {relative} failed: {error!r}", file=sys.stderr)
            entries.append({"file": None, "caption": spec.caption, "error": repr(error)})
            continue
        entries.append({"file": relative, "caption": spec.caption})
    return entries
