"""Deterministic synthetic MovieLens data in the real `ml-latest-small` file format.

The embedded default dataset: it needs no download, is readable by the MovieLens
reader exactly like the real files (`ratings.csv`: userId,movieId,rating,timestamp
sorted by user then movie; `movies.csv`: movieId,title,genres with `|`-separated
genres and "Title (Year)" titles, quoted when they contain commas), and has
structure a sequence model can learn and a popularity baseline cannot:

* item popularity follows a power law (Zipf exponent `zipf_exponent`);
* every item has 1-3 genres out of 18;
* every user has latent genre preferences that drift from a start to an end
  preference over the timeline;
* a timeline is a series of short "sessions" (mean length `session_mean`), each
  in one genre drawn from the user's current preference; within a session
  items are popular items of that genre, and with probability `successor_prob`
  the next item is the fixed "successor" of the previous one (a sequel), a
  transition only a model reading the history can exploit;
* ratings correlate with how much the user currently likes the item's genres
  (half stars 0.5-5.0);
* timestamps strictly increase per user, so the chronological order is
  recoverable although rows are written sorted by movieId, like the real file.

Generation is vectorised numpy over chunks of users and stream-written, so
MovieLens-20M sizes (20M ratings) run in bounded memory.
"""

from __future__ import annotations

import csv
import dataclasses
import os
import time

import numpy as np
import pyarrow as pa
import pyarrow.csv as pa_csv
import tqdm

GENRES = (
    "Action", "Adventure", "Animation", "Children", "Comedy", "Crime",
    "Documentary", "Drama", "Fantasy", "Film-Noir", "Horror", "Musical",
    "Mystery", "Romance", "Sci-Fi", "Thriller", "War", "Western",
)
_ADJECTIVES = (
    "Silent", "Crimson", "Last", "Hidden", "Golden", "Broken", "Lost", "Wild",
    "Midnight", "Electric", "Frozen", "Secret", "Distant", "Burning", "Little",
    "Iron", "Velvet", "Hollow", "Final", "Restless",
)
_NOUNS = (
    "Harbor", "Garden", "Empire", "River", "Machine", "Summer", "Detective",
    "Kingdom", "Highway", "Mirror", "Orchard", "Frontier", "Symphony", "Island",
    "Station", "Circus", "Lighthouse", "Winter", "Canyon", "Voyage",
)
_START_TIME = 946_684_800  # 2000-01-01, seconds since the epoch.
_SPAN = 15 * 365 * 86_400  # users start within 15 years.
_RATING_TEXT = np.array([f"{x / 2:.1f}" for x in range(11)], dtype=object)  # by 2 * rating


@dataclasses.dataclass(frozen=True)
class SyntheticStats:
  """What `generate` wrote."""

  out_dir: str
  num_users: int
  num_items: int
  num_ratings: int
  num_genres: int
  top1pct_item_share: float  # share of ratings on the 1% most-rated items
  seconds: float

  def to_json(self) -> dict:
    return dataclasses.asdict(self)


def _zipf_weights(n: int, exponent: float) -> np.ndarray:
  w = 1.0 / np.arange(1, n + 1, dtype=np.float64) ** exponent
  return w / w.sum()


def _make_catalogue(rng: np.random.Generator, num_items: int, zipf_exponent: float):
  """Item popularity, genres (multi-hot [I, G]), titles, years, successors."""
  num_genres = len(GENRES)
  # Popularity rank is a random permutation of item ids, so ids carry no signal.
  popularity = _zipf_weights(num_items, zipf_exponent)[rng.permutation(num_items)]
  genre_prior = rng.dirichlet(np.full(num_genres, 2.0))
  num_item_genres = rng.choice([1, 2, 3], size=num_items, p=[0.45, 0.35, 0.20])
  multi_hot = np.zeros((num_items, num_genres), dtype=bool)
  # Gumbel top-k: k distinct genres per item, weighted by the genre prior.
  keys = np.log(genre_prior)[None, :] - np.log(-np.log(rng.random((num_items, num_genres))))
  order = np.argsort(-keys, axis=1)
  for k in range(3):
    sel = num_item_genres > k
    multi_hot[np.flatnonzero(sel), order[sel, k]] = True
  primary = order[:, 0]
  # Successor ("sequel") of each item: another item sharing its primary genre.
  successor = np.empty(num_items, dtype=np.int64)
  for g in range(num_genres):
    members = np.flatnonzero(primary == g)
    if len(members):
      successor[members] = members[rng.permutation(len(members))]
  years = rng.integers(1930, 2016, size=num_items)
  adjectives = rng.integers(0, len(_ADJECTIVES), size=num_items)
  nouns = rng.integers(0, len(_NOUNS), size=num_items)
  comma_style = rng.random(num_items) < 0.1  # "Harbor, The (1994)", as in MovieLens.
  titles = []
  for i in range(num_items):
    words = f"{_ADJECTIVES[adjectives[i]]} {_NOUNS[nouns[i]]} {i + 1}"
    title = f"{words}, The" if comma_style[i] else f"The {words}"
    titles.append(f"{title} ({years[i]})")
  return popularity, multi_hot, titles, successor


def _event_counts(rng: np.random.Generator, num_users: int, num_ratings: int,
                  min_events: int) -> np.ndarray:
  """Heavy-tailed events per user summing exactly to `num_ratings`."""
  extra = num_ratings - min_events * num_users
  if extra < 0:
    raise ValueError(
        f"num_ratings={num_ratings:,} is below num_users * min_events_per_user = "
        f"{num_users * min_events:,}")
  raw = rng.lognormal(mean=0.0, sigma=1.0, size=num_users)
  counts = np.floor(raw / raw.sum() * extra).astype(np.int64)
  # Flooring loses less than one event per user: hand the rest to distinct users.
  short = int(extra - counts.sum())
  counts[rng.choice(num_users, size=short, replace=False)] += 1
  return counts + min_events


def _sample_from_cdf(cdf: np.ndarray, members: np.ndarray, u: np.ndarray) -> np.ndarray:
  idx = np.searchsorted(cdf, u * cdf[-1], side="right")
  return members[np.minimum(idx, len(members) - 1)]


def _generate_chunk(rng, first_user: int, counts: np.ndarray, item_genres: np.ndarray,
                    successor, genre_members, genre_cdfs, session_mean: float,
                    successor_prob: float):
  """Returns (user_ids, movie_ids, ratings, timestamps) of one chunk of users."""
  num_users = len(counts)
  num_genres = len(GENRES)
  n = int(counts.sum())
  user = np.repeat(np.arange(num_users), counts)  # [n] local user index
  starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
  pos = np.arange(n) - np.repeat(starts, counts)  # position in the timeline
  frac = pos / np.maximum(np.repeat(counts, counts) - 1, 1)  # 0 .. 1 along the timeline
  # Concentrated start/end preferences; the current one interpolates (drift).
  pref_a = rng.dirichlet(np.full(num_genres, 0.3), size=num_users)
  pref_b = rng.dirichlet(np.full(num_genres, 0.3), size=num_users)
  # Sessions: a new one starts with probability 1/session_mean (always at pos 0).
  new_session = (rng.random(n) < 1.0 / session_mean) | (pos == 0)
  session = np.cumsum(new_session) - 1
  s_first = np.flatnonzero(new_session)
  s_user, s_frac = user[s_first], frac[s_first]
  s_pref = (1 - s_frac)[:, None] * pref_a[s_user] + s_frac[:, None] * pref_b[s_user]
  s_cdf = np.cumsum(s_pref, axis=1)
  s_genre = (rng.random(len(s_first))[:, None] * s_cdf[:, -1:] > s_cdf).sum(axis=1)
  s_genre = np.minimum(s_genre, num_genres - 1)
  genre = s_genre[session]
  item = np.empty(n, dtype=np.int64)
  u = rng.random(n)
  for g in range(num_genres):
    sel = np.flatnonzero(genre == g)
    if len(sel):
      item[sel] = _sample_from_cdf(genre_cdfs[g], genre_members[g], u[sel])
  # Sequels: inside a session, with probability successor_prob the next item is
  # the previous item's successor. A run of k such steps after a base event b
  # gives item[b + k] = successor^k(item[b]), applied k times vectorised.
  follow = (rng.random(n) < successor_prob) & ~new_session
  index = np.arange(n)
  base = np.maximum.accumulate(np.where(follow, 0, index))
  f_idx = np.flatnonzero(follow)
  steps = (index - base)[f_idx]
  cur = item[base[f_idx]]
  for step in range(1, int(steps.max(initial=0)) + 1):
    active = steps >= step
    cur[active] = successor[cur[active]]
  item[f_idx] = cur
  # Ratings: affinity of the user's current preference for the item's (<= 3)
  # genres, gathered as [n, 3] rather than [n, G] to keep chunks cheap.
  genres = item_genres[item]  # [n, 3], -1 padded
  valid = genres >= 0
  g = np.maximum(genres, 0)
  cur_pref = ((1 - frac)[:, None] * pref_a[user[:, None], g]
              + frac[:, None] * pref_b[user[:, None], g])
  affinity = (cur_pref * valid).sum(axis=1) / valid.sum(axis=1) * num_genres  # ~1 = average
  user_bias = rng.normal(0.0, 0.4, size=num_users)[user]
  score = 3.0 + 0.6 * np.log(affinity + 0.05) + user_bias + rng.normal(0.0, 0.6, n)
  ratings = np.clip(np.round(score * 2) / 2, 0.5, 5.0)
  # Strictly increasing timestamps: a session's events are minutes apart,
  # sessions are days apart.
  gaps = np.where(new_session, rng.exponential(3 * 86_400, n), rng.exponential(600, n))
  gaps = np.floor(gaps).astype(np.int64) + 1
  user_start = _START_TIME + rng.integers(0, _SPAN, size=num_users)
  gaps[starts] = 0
  ts = np.cumsum(gaps)
  ts = ts - np.repeat(ts[starts], counts) + np.repeat(user_start, counts)
  return user + first_user + 1, item + 1, ratings, ts


def generate(out_dir: str | os.PathLike, num_users: int = 600, num_items: int = 2000,
             events_per_user_mean: float | None = 80.0, *, num_ratings: int | None = None,
             seed: int = 0, min_events_per_user: int = 20, zipf_exponent: float = 1.0,
             session_mean: float = 6.0, successor_prob: float = 0.35,
             users_per_chunk: int = 5_000, show_progress: bool = True) -> SyntheticStats:
  """Writes `ratings.csv` and `movies.csv` (ml-latest-small format) into `out_dir`.

  Args:
    out_dir: output directory (created).
    num_users: number of users.
    num_items: catalogue size.
    events_per_user_mean: mean ratings per user (used when `num_ratings` is None).
    num_ratings: exact total number of ratings (overrides the mean).
    seed: all randomness derives from it; same seed -> identical files.
    min_events_per_user: every user has at least this many ratings (20 as in
      MovieLens).
    zipf_exponent: item popularity ~ 1 / rank**exponent.
    session_mean: mean number of consecutive events in one genre.
    successor_prob: probability of following the previous item's sequel.
    users_per_chunk: users generated and written per chunk (bounds memory).
    show_progress: show a tqdm bar.

  Returns:
    `SyntheticStats` of what was written.
  """
  t0 = time.perf_counter()
  if num_users < 1 or num_items < 2:
    raise ValueError(f"need num_users >= 1 and num_items >= 2, got {num_users}, {num_items}")
  if num_ratings is None:
    if events_per_user_mean is None:
      raise ValueError("give events_per_user_mean or num_ratings")
    num_ratings = int(round(num_users * events_per_user_mean))
  os.makedirs(out_dir, exist_ok=True)
  rng = np.random.default_rng(seed)
  popularity, multi_hot, titles, successor = _make_catalogue(rng, num_items, zipf_exponent)
  genre_members, genre_cdfs = [], []
  for g in range(len(GENRES)):
    members = np.flatnonzero(multi_hot[:, g])
    if not len(members):  # a genre no item has: fall back to the whole catalogue.
      members = np.arange(num_items)
    genre_members.append(members)
    genre_cdfs.append(np.cumsum(popularity[members]))
  counts = _event_counts(rng, num_users, num_ratings, min_events_per_user)
  # Each item's genre indices, [I, 3] padded with -1.
  item_genres = np.where(np.arange(3)[None, :] < multi_hot.sum(axis=1, keepdims=True),
                         np.argsort(~multi_hot, axis=1, kind="stable")[:, :3], -1)

  movies_path = os.path.join(out_dir, "movies.csv")
  with open(movies_path, "w", newline="", encoding="utf-8") as f:
    writer = csv.writer(f, lineterminator="\n")  # quotes titles with commas only
    writer.writerow(["movieId", "title", "genres"])
    for i, title in enumerate(titles):
      genres = "|".join(GENRES[g] for g in np.flatnonzero(multi_hot[i]))
      writer.writerow([i + 1, title, genres])

  ratings_path = os.path.join(out_dir, "ratings.csv")
  tmp_path = ratings_path + ".tmp"
  item_counts = np.zeros(num_items + 1, dtype=np.int64)
  write_options = pa_csv.WriteOptions(include_header=False, quoting_style="none")
  with open(tmp_path, "wb") as f:
    f.write(b"userId,movieId,rating,timestamp\n")
    bar = tqdm.tqdm(total=num_ratings, unit="rating", desc="synthetic",
                    disable=not show_progress)
    for first in range(0, num_users, users_per_chunk):
      chunk_counts = counts[first:first + users_per_chunk]
      # A per-chunk generator: the output depends on the seed and users_per_chunk.
      chunk_rng = np.random.default_rng([seed, first])
      users, movies, ratings, ts = _generate_chunk(
          chunk_rng, first, chunk_counts, item_genres, successor,
          genre_members, genre_cdfs, session_mean, successor_prob)
      order = np.lexsort((ts, movies, users))  # as the real file: by user, movie
      # Ratings as "4.0"-style strings from a table (no per-value formatting).
      rating_text = _RATING_TEXT[np.round(ratings[order] * 2).astype(np.int64)]
      table = pa.table({"userId": users[order], "movieId": movies[order],
                        "rating": pa.array(rating_text), "timestamp": ts[order]})
      pa_csv.write_csv(table, f, write_options=write_options)
      item_counts += np.bincount(movies, minlength=num_items + 1)
      bar.update(len(users))
    bar.close()
  os.replace(tmp_path, ratings_path)

  top = np.sort(item_counts)[::-1][:max(1, num_items // 100)]
  return SyntheticStats(
      out_dir=os.fspath(out_dir), num_users=num_users, num_items=num_items,
      num_ratings=int(counts.sum()), num_genres=len(GENRES),
      top1pct_item_share=float(top.sum() / max(item_counts.sum(), 1)),
      seconds=time.perf_counter() - t0)


def main(argv) -> None:
  """CLI: python -m data_pipelines.synthetic --out_dir=DIR [--num_users=...]."""
  from absl import flags

  del argv
  f = flags.FLAGS
  stats = generate(f.out_dir, num_users=f.num_users, num_items=f.num_items,
                   events_per_user_mean=f.events_per_user_mean, num_ratings=f.num_ratings,
                   seed=f.seed)
  print(f"wrote {stats.num_ratings:,} ratings of {stats.num_users:,} users on "
        f"{stats.num_items:,} items to {stats.out_dir} in {stats.seconds:.1f} s")


if __name__ == "__main__":
  from absl import app, flags

  flags.DEFINE_string("out_dir", None, "Output directory.", required=True)
  flags.DEFINE_integer("num_users", 600, "Users.")
  flags.DEFINE_integer("num_items", 2000, "Items.")
  flags.DEFINE_float("events_per_user_mean", 80.0, "Mean ratings per user.")
  flags.DEFINE_integer("num_ratings", None, "Exact number of ratings (overrides the mean).")
  flags.DEFINE_integer("seed", 0, "Seed.")
  app.run(main)
