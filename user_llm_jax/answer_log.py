"""A JSON-lines file of per-user answers that an interrupted run resumes.

One JSON object per line and per user, appended a batch at a time (written, flushed and
synced), so a kill loses at most the batch being written. On restart:

  * complete lines are kept, and their users are not answered again;
  * a last line without its line break (the kill came mid-write) is cut off the file and
    that user is answered again;
  * any other line that is not a JSON object, or a user answered twice, is an error
    naming file and line (the file was not written by this log alone).

The settings that make the answers (run, checkpoint, input, K, ...) are kept beside the
file in `<name>.summary.json`, with the summary of the last run; a restart with other
settings is refused, naming the settings that differ, instead of mixing answers.
"""

from __future__ import annotations

import json
import os
from collections.abc import Hashable, Mapping, Sequence
from typing import Any

from data_pipelines import records


def summary_path(path: str) -> str:
  """The settings / summary file beside the answers file `path`."""
  return os.path.splitext(path)[0] + ".summary.json"


class AnswerLog:
  """Appends answer lines to `path`; `resume()` first.

  Args:
    path: the JSON-lines file.
    settings: what the answers depend on (JSON-serialisable); must match on resume.
    key: the line field that identifies a user (e.g. 'user_id').
  """

  def __init__(self, path: str, settings: Mapping[str, Any], key: str):
    self.path = os.path.abspath(path)
    self.settings = json.loads(json.dumps(dict(settings)))  # as it reads back
    self.key = key
    self.dropped_partial_line = False

  def _check_settings(self) -> None:
    side = summary_path(self.path)
    if not os.path.exists(side):
      raise records.BadInputError(
          f"{self.path} exists but {side} does not: it is not an answers file of this job; "
          "choose another --output (or delete the file to start over)")
    with open(side, encoding="utf-8") as f:
      before = json.load(f).get("settings", {})
    changed = sorted(k for k in set(before) | set(self.settings)
                     if before.get(k) != self.settings.get(k))
    if changed:
      diff = "; ".join(f"{k}: {before.get(k)!r} -> {self.settings.get(k)!r}" for k in changed)
      raise records.BadInputError(
          f"{self.path} holds answers made with other settings ({diff}); choose another "
          "--output (or delete it to start over)")

  def _write_summary(self, summary: Mapping[str, Any] | None) -> None:
    side = summary_path(self.path)
    tmp = side + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
      json.dump({"settings": self.settings, "summary": dict(summary or {})}, f, indent=2)
    os.replace(tmp, side)

  def resume(self) -> dict[Hashable, dict[str, Any]]:
    """Kept answers by user key (empty for a new file); drops a partial last line.

    Raises:
      BadInputError: other settings, a corrupt line or a user answered twice (naming
        file and line).
    """
    if not os.path.exists(self.path):
      os.makedirs(os.path.dirname(self.path), exist_ok=True)
      self._write_summary(None)
      return {}
    self._check_settings()
    with open(self.path, "rb") as f:
      data = f.read()
    complete = data.rfind(b"\n") + 1
    if complete < len(data):
      # The last write was cut: drop its fragment, that user is answered again.
      with open(self.path, "r+b") as f:
        f.truncate(complete)
      self.dropped_partial_line = True
    kept: dict[Hashable, dict[str, Any]] = {}
    for line_no, raw in enumerate(data[:complete].splitlines(), 1):
      try:
        line = json.loads(raw)
      except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise records.BadInputError(f"{self.path}:{line_no}: not a JSON answer line ({e})") \
            from e
      if not isinstance(line, dict) or self.key not in line:
        raise records.BadInputError(f"{self.path}:{line_no}: expected a JSON object with "
                                    f"{self.key!r}")
      key = line[self.key]
      if key in kept:
        raise records.BadInputError(f"{self.path}:{line_no}: {self.key} {key!r} is answered "
                                    "twice")
      kept[key] = line
    return kept

  def append(self, lines: Sequence[Mapping[str, Any]]) -> None:
    """Writes one JSON line per answer and syncs it to disk."""
    text = "".join(json.dumps(dict(line), ensure_ascii=False) + "\n" for line in lines)
    with open(self.path, "a", encoding="utf-8") as f:
      f.write(text)
      f.flush()
      os.fsync(f.fileno())

  def finish(self, summary: Mapping[str, Any]) -> None:
    """Records the run's summary beside the answers."""
    self._write_summary(summary)
