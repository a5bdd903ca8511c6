"""The review task end to end on Amazon-format files: the User-LLM job trains on every
review of its users (`tasks.train_targets='all'`) with the categories' words and an
alignment stage that writes them out, and its report breaks every review row down by where
the test users' answers lie (`floors.review_groups`)."""

import gzip
import json

import pytest

from experiments.configs import user_llm_amazon
from user_llm_jax.eval import floors
from user_llm_jax.jobs import train_user_llm


def write_gift_cards(raw):
  """12 users x 6 reviews of 5 products: half write "Five Stars" every time, the others
  their own words; the last review of users 3 and 7 is new text."""
  raw.mkdir(parents=True)
  lines = []
  for u in range(12):
    for t in range(6):
      summary = "Five Stars" if u % 2 else f"user {u} words"
      if t == 5 and u in (3, 7):
        summary = "something new"
      lines.append(json.dumps({"reviewerID": f"U{u}", "asin": f"I{(u + t) % 5}",
                               "overall": 5.0, "unixReviewTime": 1000 * t + u,
                               "reviewText": "ok", "summary": summary}))
  with gzip.open(raw / "Gift_Cards_5.json.gz", "wt", encoding="utf-8") as f:
    f.write("\n".join(lines) + "\n")


def test_review_run_aligns_on_category_words_and_reports_answer_groups(tmp_path):
  raw = tmp_path / "raw" / "Gift_Cards"
  write_gift_cards(raw)
  config = user_llm_amazon.get_config("smoke")
  config.data.update(manual_dir=str(raw), data_dir=str(tmp_path / "data"), window=6)
  config.tasks.update(max_prompt_tokens=200, train_targets="all")
  config.align.update(steps=2, content="categories", trainable=("projection",
                                                                "cross_attention"))
  config.train.update(num_steps=2, checkpoint_every=2, log_every=1)
  config.eval.update(num_examples=0, shuffled_control=False)
  assert config.bridge.category_text and config.data.text_categories == 2
  summary = train_user_llm.run(config, str(tmp_path / "run"))

  assert summary["align"]["content"] == "categories" and summary["steps"] == 2
  past = summary["metrics"]["past_answer"]["review"]
  groups = past["groups"]
  # Users 1, 5, 9, 11 repeat the prior's "Five Stars"; 0, 2, 4, ... repeat their own
  # words; 3 and 7 write something new.
  assert len(groups[floors.REPEAT_PRIOR]) == 4
  assert len(groups[floors.REPEAT_OWN]) == 6
  assert len(groups[floors.NEW_TEXT]) == 2
  assert sum(len(v) for v in groups.values()) == past["num_examples"] == 12
  breakdown = summary["groups"]["review"]
  assert set(breakdown) >= {"user_llm", "rating_prior", "past_answer"}
  # The user's own earlier answers are exact on every repeat, the prior on its own group.
  assert breakdown["past_answer"][floors.REPEAT_OWN]["mean"] == pytest.approx(1.0)
  assert breakdown["rating_prior"][floors.REPEAT_PRIOR]["mean"] == pytest.approx(1.0)
  assert breakdown["user_llm"][floors.REPEAT_OWN]["n"] == 6
  # eval.review_likelihood (on in the config): every User-LLM review answer's reference
  # scored exactly, per user, beside its ROUGE.
  mine = summary["metrics"]["user_llm"]["review"]
  assert config.eval.review_likelihood
  assert mine["reference_logprob"] < 0 and 0 <= mine["search_errors"] <= 1
  assert len(mine["per_example"]["values"]["reference_logprob"]) == 12
  assert "reference_logprob" not in summary["metrics"]["rating_prior"]["review"]
  by_group = summary["groups_by_metric"]["reference_logprob"]["review"]["user_llm"]
  assert by_group[floors.REPEAT_OWN]["n"] == 6 and by_group[floors.NEW_TEXT]["n"] == 2
  text = (tmp_path / "run" / "summary.txt").read_text()
  assert "ref_logp" in text and "search_err" in text
  assert "review reference_logprob by group of test users:" in text
  assert "review rougeLsum by group of test users:" in text
  assert "writing the last 3 events' categories" in text
