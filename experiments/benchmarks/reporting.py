"""Where a benchmark's results go: JSON and a plot, the same way for every benchmark."""

from __future__ import annotations

import json
import pathlib
from collections.abc import Callable
from typing import Any


def write_results(results: dict[str, Any], output: str | None, plot_path: str | None,
                  plot: Callable[[dict[str, Any], str], None]) -> None:
  """Writes `results` as JSON to `output` and `plot(results, path)` beside it.

  Args:
    results: the benchmark's JSON-able results.
    output: the JSON path (parent directories made); None or '' writes no JSON.
    plot_path: the plot's path; None or '' means `output` with a .png suffix (no plot when
      there is no `output` either).
    plot: draws `results` into a file.
  """
  if output:
    out = pathlib.Path(output)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2))
    print(f"wrote {out}")
  plot_path = plot_path or (str(pathlib.Path(output).with_suffix(".png")) if output else None)
  if plot_path:
    plot(results, plot_path)
    print(f"wrote {plot_path}")
