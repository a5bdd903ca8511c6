"""Run summaries: `summary.json`, a small human-readable `summary.txt`, and `loss.png`.

Files are written atomically (`storage.write_atomic`: a temporary file and a rename, or one
object upload on gs://), so a crashed run never leaves a summary that looks complete.
"""

from __future__ import annotations

import io
import json
import os
from collections.abc import Mapping, Sequence
from typing import Any

from user_llm_jax import storage

SUMMARY_JSON = "summary.json"
SUMMARY_TXT = "summary.txt"
LOSS_PNG = "loss.png"


def remove_stale(workdir: str) -> None:
  """Deletes summaries of an earlier run so only a finished run leaves them."""
  for name in (SUMMARY_JSON, SUMMARY_TXT, LOSS_PNG):
    storage.remove(os.path.join(workdir, name))


def format_table(rows: Sequence[Sequence[Any]], header: Sequence[str]) -> str:
  """A plain-text table with aligned columns (floats to 4 decimals)."""
  def cell(v):
    return f"{v:.4f}" if isinstance(v, float) else str(v)
  cells = [[cell(v) for v in row] for row in rows]
  widths = [max(len(h), *(len(r[i]) for r in cells)) for i, h in enumerate(header)]
  line = lambda r: "  ".join(c.rjust(w) if i else c.ljust(w)
                             for i, (c, w) in enumerate(zip(r, widths)))
  return "\n".join([line(header), line(["-" * w for w in widths])] + [line(r) for r in cells])


def metrics_table(metrics: Mapping[str, Mapping[str, float]],
                  keys: Sequence[str]) -> str:
  """Rows = methods (e.g. 'encoder', 'popularity'), columns = metric `keys`."""
  rows = [[name] + [float(m.get(k, float("nan"))) for k in keys] for name, m in metrics.items()]
  return format_table(rows, ["method", *keys])


def loss_png(workdir: str) -> str:
  return os.path.join(workdir, LOSS_PNG)


def plot_loss(history: Sequence[Mapping[str, float]], path: str,
              evals: Sequence[Mapping[str, float]] = (), eval_key: str | None = None,
              title: str = "", series: Sequence[str] = ()) -> None:
  """Training loss (plus the `series` keys present, e.g. per-task losses, and optionally
  one eval metric) against steps, as a PNG."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top

  fig, ax = plt.subplots(figsize=(6, 4))
  ax.plot([h["step"] for h in history], [h["loss"] for h in history], label="train loss")
  for key in series:
    pts = [(h["step"], h[key]) for h in history if key in h]
    if pts:
      ax.plot(*zip(*pts), "--", label=key)
  ax.set_xlabel("step")
  ax.set_ylabel("loss")
  ax.set_title(title)
  if eval_key and any(eval_key in e for e in evals):
    ax2 = ax.twinx()
    pts = [(e["step"], e[eval_key]) for e in evals if eval_key in e]
    ax2.plot(*zip(*pts), "o--", color="tab:orange", label=eval_key)
    ax2.set_ylabel(eval_key)
    ax2.legend(loc="upper right")
  ax.legend(loc="upper left")
  fig.tight_layout()
  png = io.BytesIO()
  fig.savefig(png, format="png", dpi=100)
  plt.close(fig)
  storage.write_atomic(path, png.getvalue())


def write_summary(workdir: str, summary: Mapping[str, Any], text: str) -> None:
  """Writes `summary.json` (machine-readable) and `summary.txt` (the printed table)."""
  storage.write_atomic(os.path.join(workdir, SUMMARY_TXT), (text + "\n").encode())
  # JSON last: its presence marks a complete run.
  storage.write_atomic(os.path.join(workdir, SUMMARY_JSON),
                json.dumps(summary, indent=2, sort_keys=True, default=str).encode())
