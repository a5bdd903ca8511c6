"""Users' own history files -> schema records the trained User-LLM reads.

Formats (one event per row; the file's extension decides):

  CSV (header on line 1)   userId,movieId,rating,timestamp   (the MovieLens ratings format)
                           or a `title` column instead of (or beside) `movieId`
  JSON lines (.jsonl/.json) one object per line with `movieId` (or `item_id`) or `title`,
                           and optional `userId`, `rating`, `timestamp`

Items are named by the catalogue's raw id or by title (the id when a row has both). A
title is matched exactly first, then case-, accent- and punctuation-insensitively
("toy story 1995" finds "Toy Story (1995)"). Nothing is dropped silently:

  * a malformed row (wrong number of CSV fields, not a JSON object, no item id or title, a
    rating that is not a finite number, a timestamp that is not an integer >= 0) stops
    the read with an error naming file and line, as `data_pipelines.prepare` does;
  * an id not in the catalogue is kept as an unknown item (the encoder reads it as OOV)
    and reported with its line;
  * a title that matches no catalogue item, or several (ambiguous), is skipped and
    reported with its line;
  * a user none of whose rows names a catalogue item is refused.

Rows without a timestamp are ordered as in the file. Each user's record ends with a
placeholder target after the last event (what the model predicts).
"""

from __future__ import annotations

import collections
import csv
import dataclasses
import json
import math
import os
import re
import unicodedata
from typing import Any

import numpy as np

from data_pipelines import records
from user_llm_jax.data import schema

ID_KEYS = ("movieId", "item_id")
TITLE_KEY = "title"
USER_KEY = "userId"
YOU = "you"  # the user id of a file without user ids
_SHOWN = 5   # how many examples a report lists


def shown(entries: list[str] | tuple[str, ...]) -> str:
  """The first few entries of a report list, with the total when cut."""
  more = f" ... ({len(entries)} in all)" if len(entries) > _SHOWN else ""
  return ", ".join(entries[:_SHOWN]) + more


def loose_title(title: str) -> str:
  """`title` without case, accents, punctuation or repeated spaces ('Toy Story (1995)' ->
  'toy story 1995')."""
  text = unicodedata.normalize("NFKD", title)
  text = "".join(c for c in text if not unicodedata.combining(c)).casefold()
  return " ".join(re.sub(r"[\W_]+", " ", text).split())


class TitleIndex:
  """Catalogue titles -> item ids, exact and loose (`loose_title`)."""

  def __init__(self, vocab: schema.Vocabulary):
    self.exact: dict[str, list[int]] = collections.defaultdict(list)
    self.loose: dict[str, list[int]] = collections.defaultdict(list)
    for item in range(schema.FIRST_ID, vocab.num_items):
      title = vocab.items[item].title.strip()
      self.exact[title].append(item)
      self.loose[loose_title(title)].append(item)

  def match(self, title: str) -> list[int]:
    """The items of `title`: one (a match), several (ambiguous) or none (unmatched)."""
    title = title.strip()
    if title in self.exact:
      return list(self.exact[title])
    return list(self.loose.get(loose_title(title), []))


@dataclasses.dataclass(frozen=True)
class History:
  """One user's events read from a history file.

  Attributes:
    user_id: the file's user id (`YOU` when the file has none).
    record: the schema record (events sorted by time, then a placeholder target).
    rows: the user's rows in the file (skipped ones included).
    unknown_ids: 'line:id' of ids not in the catalogue (kept as unknown items).
    unmatched_titles: 'line:title' of titles matching no catalogue item (skipped).
    ambiguous_titles: 'line:title (items ...)' of titles matching several (skipped).
  """

  user_id: str
  record: dict[str, Any]
  rows: int
  unknown_ids: tuple[str, ...] = ()
  unmatched_titles: tuple[str, ...] = ()
  ambiguous_titles: tuple[str, ...] = ()

  @property
  def num_events(self) -> int:
    return len(self.record[schema.ITEM_IDS]) - 1

  def notes(self) -> str:
    """What was not read as a catalogue item, with lines ('' when everything was)."""
    parts = []
    if self.unknown_ids:
      parts.append(f"{len(self.unknown_ids)} id(s) not in the catalogue, read as unknown "
                   f"items (line:id {shown(self.unknown_ids)})")
    if self.unmatched_titles:
      parts.append(f"{len(self.unmatched_titles)} title(s) matching no catalogue item, "
                   f"skipped (line:title {shown(self.unmatched_titles)})")
    if self.ambiguous_titles:
      parts.append(f"{len(self.ambiguous_titles)} ambiguous title(s), skipped "
                   f"(line:title {shown(self.ambiguous_titles)})")
    return "; ".join(parts)


@dataclasses.dataclass(frozen=True)
class HistoryFile:
  """Every user of a history file.

  Attributes:
    path: the file.
    histories: the users with at least one catalogue item, in file order.
    refused: user id -> why it was refused (no row names a catalogue item).
    rows: data rows read.
    users: every user id, in file order (refused ones included).
  """

  path: str
  histories: list[History]
  refused: dict[str, str]
  rows: int
  users: list[str]

  def totals(self) -> dict[str, int]:
    return {"users": len(self.histories), "refused_users": len(self.refused),
            "rows": self.rows,
            "unknown_ids": sum(len(h.unknown_ids) for h in self.histories),
            "unmatched_titles": sum(len(h.unmatched_titles) for h in self.histories),
            "ambiguous_titles": sum(len(h.ambiguous_titles) for h in self.histories)}

  def report(self) -> str:
    """What was read: users answered and refused, skipped rows with their lines."""
    t = self.totals()
    lines = [f"{self.path}: {t['rows']} rows, {t['users']} user(s) to answer, "
             f"{t['refused_users']} refused; {t['unknown_ids']} id(s) not in the catalogue "
             f"(read as unknown items), {t['unmatched_titles']} unmatched and "
             f"{t['ambiguous_titles']} ambiguous title(s) skipped"]
    for user, why in list(self.refused.items())[:_SHOWN]:
      lines.append(f"  refused user {user!r}: {why}")
    noted = [h for h in self.histories if h.notes()]
    lines += [f"  user {h.user_id!r}: {h.notes()}" for h in noted[:_SHOWN]]
    hidden = max(len(self.refused) - _SHOWN, 0) + max(len(noted) - _SHOWN, 0)
    if hidden:
      lines.append(f"  ... and {hidden} more user(s)")
    return "\n".join(lines)


def _csv_rows(path: str, f) -> list[tuple[int, dict[str, Any]]]:
  reader = csv.reader(f)
  header = next(reader, None)
  if header is None:
    return []
  header = [h.strip() for h in header]
  if not set(header) & set(ID_KEYS + (TITLE_KEY,)):
    raise records.BadInputError(
        f"{path}:1: header {header} has no 'movieId' (or 'item_id') and no 'title' column; "
        "expected userId,movieId,rating,timestamp (or a 'title' column naming the items)")
  rows = []
  for fields in reader:
    if not any(x.strip() for x in fields):
      continue  # a blank line
    if len(fields) != len(header):
      raise records.BadInputError(
          f"{path}:{reader.line_num}: expected {len(header)} fields ({','.join(header)}), "
          f"found {len(fields)}")
    rows.append((reader.line_num, dict(zip(header, fields))))
  return rows


def _json_rows(path: str, f) -> list[tuple[int, dict[str, Any]]]:
  rows = []
  for line_no, line in enumerate(f, 1):
    if not line.strip():
      continue
    try:
      row = json.loads(line)
    except json.JSONDecodeError as e:
      raise records.BadInputError(f"{path}:{line_no}: not a JSON object ({e}); expected one "
                                  "object per line") from e
    if not isinstance(row, dict):
      raise records.BadInputError(f"{path}:{line_no}: expected a JSON object, got "
                                  f"{type(row).__name__}")
    rows.append((line_no, row))
  return rows


def read_rows(path: str) -> list[tuple[int, dict[str, Any]]]:
  """(line number, row) of every data row of a CSV or JSON-lines history file.

  Raises:
    FileNotFoundError: no such file.
    BadInputError: a CSV header without an item column, a row with the wrong number of
      fields, a line that is not a JSON object (naming file and line).
  """
  if not os.path.isfile(path):
    raise FileNotFoundError(f"--history_file {path!r} does not exist")
  with open(path, encoding="utf-8-sig", newline="") as f:
    if path.endswith((".jsonl", ".json")):
      return _json_rows(path, f)
    return _csv_rows(path, f)


def _text(value: Any) -> str:
  """A cell as text; JSON numbers name ids as the CSV would (1.0 -> '1')."""
  if value is None:
    return ""
  if isinstance(value, float) and value.is_integer():
    value = int(value)
  return str(value).strip()


@dataclasses.dataclass
class _Events:
  """One user's events as they are read."""

  rows: int = 0
  items: list[int] = dataclasses.field(default_factory=list)
  ratings: list[int] = dataclasses.field(default_factory=list)
  times: list[int] = dataclasses.field(default_factory=list)
  unknown: list[str] = dataclasses.field(default_factory=list)
  unmatched: list[str] = dataclasses.field(default_factory=list)
  ambiguous: list[str] = dataclasses.field(default_factory=list)

  def refusal(self) -> str | None:
    """Why the user cannot be answered, or None."""
    if any(i != schema.OOV_ID for i in self.items):
      return None
    found = [f"unknown ids at line:id {shown(self.unknown)}" if self.unknown else "",
             f"unmatched titles at line:title {shown(self.unmatched)}" if self.unmatched
             else "",
             f"ambiguous titles at line:title {shown(self.ambiguous)}" if self.ambiguous
             else ""]
    return (f"none of its {self.rows} events names a catalogue item ("
            + "; ".join(x for x in found if x) + "); ids must be the dataset's raw item "
            "ids, titles the catalogue's")


class _Parser:
  """Rows -> events of a catalogue (`vocab`)."""

  def __init__(self, path: str, vocab: schema.Vocabulary):
    self.path = path
    self.vocab = vocab
    self.by_raw = {it.raw_id: i for i, it in enumerate(vocab.items) if i >= schema.FIRST_ID}
    self.rating_ids = {r: i for i, r in enumerate(vocab.ratings) if i >= schema.FIRST_ID}
    self._titles: TitleIndex | None = None

  def titles(self) -> TitleIndex:
    if self._titles is None:  # built only for files that name items by title
      self._titles = TitleIndex(self.vocab)
    return self._titles

  def add(self, events: _Events, line_no: int, row: dict[str, Any]) -> None:
    where = f"{self.path}:{line_no}"
    events.rows += 1
    raw = next((_text(row[k]) for k in ID_KEYS if _text(row.get(k))), "")
    title = _text(row.get(TITLE_KEY))
    if not raw and not title:
      raise records.BadInputError(
          f"{where}: no 'movieId' (or 'item_id') and no 'title' in {sorted(row)}")
    try:
      rating = float(_text(row.get("rating")) or 0.0)
      time_text = _text(row.get("timestamp"))
      ts = int(float(time_text)) if time_text else line_no
    except (TypeError, ValueError) as e:
      raise records.BadInputError(f"{where}: bad rating/timestamp ({e})") from e
    if not math.isfinite(rating):
      raise records.BadInputError(f"{where}: bad rating/timestamp (rating {rating} is not "
                                  "a finite number)")
    if ts < 0:
      raise records.BadInputError(f"{where}: bad rating/timestamp (timestamp must be >= 0, "
                                  f"got {ts})")
    if raw:
      item = self.by_raw.get(raw, schema.OOV_ID)
      if item == schema.OOV_ID:
        events.unknown.append(f"{line_no}:{raw}")
    else:
      found = self.titles().match(title)
      if not found:
        events.unmatched.append(f"{line_no}:{title!r}")
        return
      if len(found) > 1:
        ids = ", ".join(self.vocab.items[i].raw_id for i in found[:_SHOWN])
        events.ambiguous.append(f"{line_no}:{title!r} ({len(found)} items: ids {ids})")
        return
      item = found[0]
    events.items.append(item)
    events.ratings.append(self.rating_ids.get(rating, schema.OOV_ID))
    events.times.append(ts)

  def record(self, user: str, events: _Events) -> dict[str, Any]:
    """The schema record of `events` (sorted by time, stable) + a placeholder target."""
    cats, lengths = [], []
    for item in events.items:
      c = list(self.vocab.items[item].category_ids) if item >= schema.FIRST_ID else []
      cats.extend(c)
      lengths.append(len(c))
    order = np.argsort(np.asarray(events.times), kind="stable")
    split = schema.split_categories(cats, lengths)
    items = [events.items[i] for i in order] + [schema.PAD_ID]
    ratings = [events.ratings[i] for i in order] + [schema.PAD_ID]
    times = [events.times[i] for i in order] + [events.times[order[-1]]]
    split = [split[i] for i in order] + [[]]
    return {schema.USER_ID: user.encode("utf-8"),
            schema.ITEM_IDS: np.asarray(items, np.int32),
            schema.RATINGS: np.asarray(ratings, np.int32),
            schema.TIMESTAMPS: np.asarray(times, np.int64),
            schema.CATEGORY_IDS: np.asarray([c for cs in split for c in cs], np.int32),
            schema.CATEGORY_LENGTHS: np.asarray([len(cs) for cs in split], np.int32),
            schema.FAVORITE_CATEGORY: np.int32(schema.PAD_ID)}


def read_histories(path: str, vocab: schema.Vocabulary, *,
                   need_user_ids: bool = False) -> HistoryFile:
  """Every user of a history file (see the module docstring for formats and checks).

  Args:
    path: the CSV or JSON-lines file.
    vocab: the trained run's catalogue.
    need_user_ids: every row must name its user (`userId`): a file of many users.

  Raises:
    FileNotFoundError: no such file.
    BadInputError: an empty file, a missing column or user id, a malformed row (naming
      file and line), or no user with a catalogue item.
  """
  rows = read_rows(path)
  if not rows:
    raise records.BadInputError(f"{path}: no events (an empty history file)")
  parser = _Parser(path, vocab)
  users: dict[str, _Events] = {}
  for line_no, row in rows:
    user = _text(row.get(USER_KEY))
    if not user:
      if need_user_ids:
        raise records.BadInputError(
            f"{path}:{line_no}: no '{USER_KEY}'; a file of many users names each row's "
            f"user (a '{USER_KEY}' column or key)")
      user = YOU
    parser.add(users.setdefault(user, _Events()), line_no, row)
  histories, refused = [], {}
  for user, events in users.items():
    why = events.refusal()
    if why is not None:
      refused[user] = why
      continue
    histories.append(History(user, parser.record(user, events), events.rows,
                             tuple(events.unknown), tuple(events.unmatched),
                             tuple(events.ambiguous)))
  if not histories:
    user, why = next(iter(refused.items()))
    who = f"user {user!r}: " if len(refused) > 1 else ""
    raise records.BadInputError(f"{path}: {who}{why}")
  return HistoryFile(path, histories, refused, len(rows), list(users))


def read_history(path: str, vocab: schema.Vocabulary) -> tuple[History, int]:
  """The file's first user (as `read_histories` reads it) and how many users it holds.

  Raises:
    BadInputError: as `read_histories`, or the first user has no catalogue item.
  """
  found = read_histories(path, vocab)
  first = found.users[0]
  if first in found.refused:
    raise records.BadInputError(f"{path}: {found.refused[first]}")
  return found.histories[0], len(found.users)
