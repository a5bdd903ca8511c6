"""The linear probe of the encoder's states (`eval/probe.py`)."""

import ml_collections
import numpy as np
import pytest

from user_llm_jax import models
from user_llm_jax.data import prepared
from user_llm_jax.data import schema
from user_llm_jax.data import transforms as T
from user_llm_jax.encoder import ENCODER_TINY
from user_llm_jax.eval import probe

DATA = ml_collections.ConfigDict({"window": ENCODER_TINY.max_len,
                                  "max_categories": ENCODER_TINY.max_categories})


def _record(rng, n, favorite):
  cats = rng.integers(schema.FIRST_ID, ENCODER_TINY.num_categories, size=n)
  return {schema.USER_ID: b"u", schema.ITEM_IDS: rng.integers(2, 40, size=n).astype(np.int32),
          schema.RATINGS: np.full((n,), 3, np.int32),
          schema.TIMESTAMPS: np.arange(n, dtype=np.int64) * 1000,
          schema.CATEGORY_IDS: cats.astype(np.int32),
          schema.CATEGORY_LENGTHS: np.ones((n,), np.int32),
          schema.REVIEW_TEXTS: np.asarray([b""] * n, dtype=object),
          schema.FAVORITE_CATEGORY: np.int32(favorite)}


def test_fitted_probe_reads_a_linear_label_and_not_noise():
  """Labels that are the argmax of three features are learned (held-out accuracy near 1);
  random labels are not (held-out accuracy near chance)."""
  rng = np.random.default_rng(0)
  x = rng.normal(size=(1200, 8)).astype(np.float32)
  y = np.argmax(x[:, :3], axis=1)
  fitted = probe.fit_softmax_probe(x[:1000], y[:1000], 3)
  assert np.mean(probe.predict(fitted, x[1000:]) == y[1000:]) > 0.9
  noise = rng.integers(0, 3, size=1200)
  fitted = probe.fit_softmax_probe(x[:1000], noise[:1000], 3)
  assert np.mean(probe.predict(fitted, x[1000:]) == noise[1000:]) < 0.45
  with pytest.raises(ValueError, match=r"labels must lie in \[0, 3\)"):
    probe.fit_softmax_probe(x[:10], np.full(10, 3), 3)
  with pytest.raises(ValueError, match="as many feature rows as labels"):
    probe.fit_softmax_probe(x[:10], y[:9], 3)


def test_pooled_states_are_the_mean_over_the_events_the_encoder_reads():
  rng = np.random.default_rng(1)
  encoder = models.build_encoder(ENCODER_TINY, seed=0)
  records = [_record(rng, n, 2) for n in (3, 9, 20)]  # shorter and longer than the window
  pooled = probe.pooled_states(encoder, records, DATA, batch_size=2)
  assert pooled.shape == (3, ENCODER_TINY.width)
  for r, row in zip(records, pooled):
    example = prepared.crop(DATA).map(r)
    batch = {k: np.asarray(v)[None] for k, v in example.items()}
    states = np.asarray(encoder(batch, deterministic=True))[0]
    mask = example[T.MASK]
    np.testing.assert_allclose(row, states[mask].mean(0), rtol=1e-5, atol=1e-6)


def test_category_probe_scores_the_labelled_test_records_with_their_ids():
  rng = np.random.default_rng(2)
  encoder = models.build_encoder(ENCODER_TINY, seed=0)
  train = [_record(rng, 9, schema.FIRST_ID + i % 3) for i in range(30)]
  test = [_record(rng, 9, 3), _record(rng, 9, schema.PAD_ID), _record(rng, 9, 4)]
  vocab = schema.Vocabulary(dataset="movielens", items=(), ratings=(),
                            categories=tuple(f"c{i}" for i in range(8)))
  config = ml_collections.ConfigDict({"seed": 0, "data": DATA.to_dict()})
  m = probe.category_probe(encoder, train, test, vocab, config, ids=[5, 6, 7])
  assert m["num_examples"] == 2 and m["train_records"] == 30
  assert m["per_example"]["ids"] == [5, 7]            # the unlabelled record is left out
  assert m["accuracy"] == pytest.approx(np.mean(m["per_example"]["values"]["accuracy"]))
  with pytest.raises(ValueError, match="2 ids for 3"):
    probe.category_probe(encoder, train, test, vocab, config, ids=[1, 2])
  unlabelled = [_record(rng, 9, schema.PAD_ID)]
  with pytest.raises(ValueError, match="no training record"):
    probe.category_probe(encoder, unlabelled, test, vocab, config, ids=[5, 6, 7])
