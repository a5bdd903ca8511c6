r"""User-LLM on Amazon Review timelines: review generation (ROUGE-Lsum), and the text baseline.

The answer is the review's summary (its title; `--config.tasks.review_field=text` for the
body), the prompt names the product and the rating. The 5-core files give short timelines,
so the leave-last-out protocol with a 20-event window is the default. The summaries written in
at least 2 training events are event categories (`data.text_categories=2`): a user's writing
habit is most of what the rating does not predict (README "Results"); 0 turns it off, and the
encoder must be pretrained with the same value. Each event's user embedding also carries its
categories' words as the LLM's own token embeddings (`bridge.category_text`), so the LLM
can write a summary the user keeps using without first learning what its id stands for
(ROUGE-Lsum +0.029 over the same run without it, paired over the 458 test users; README).

  # 1. pretrain the encoder on the same category (and the same data keys)
  python -m experiments.main --config=experiments/configs/encoder_movielens.py:paper_small \
      --config.data.dataset=amazon --config.data.manual_dir=../shared/data/amazon/Gift_Cards \
      --config.data.protocol=leave_last_out --config.data.window=20 \
      --config.data.max_categories=3 --config.data.text_categories=2 \
      --workdir=/tmp/amazon_encoder
  # 2. User-LLM (cross-attention, Enc) and 3. the text-prompt baseline
  python -m experiments.main --config=experiments/configs/user_llm_amazon.py \
      --config.encoder.workdir=/tmp/amazon_encoder --workdir=/tmp/amazon_user_llm
  python -m experiments.main --config=experiments/configs/user_llm_amazon.py \
      --config.job=text_baseline --workdir=/tmp/amazon_text
  # 4. User-LLM with the summaries' tokens as memory and the copy head (README, Gift_Cards)
  python -m experiments.main --config=experiments/configs/user_llm_amazon.py \
      --config.encoder.workdir=/tmp/amazon_encoder --config.bridge.text_memory=True \
      --config.bridge.copy_head=True --workdir=/tmp/amazon_copy

Variants: '' (SmolLM2, CPU budget), 'smoke' (tiny random LLM and encoder on the same real
files, for a quick check of the wiring), 'tpu' (paper scale).
"""

import ml_collections

from experiments.configs import user_llm_movielens


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """Returns the config; `arg` selects a variant ('', 'smoke', 'tpu')."""
  config = user_llm_movielens.base_config()
  config.name = "user_llm_amazon"
  config.data.update(dataset="amazon", manual_dir="../shared/data/amazon/Gift_Cards",
                     protocol="leave_last_out", window=20, max_categories=3,
                     text_categories=2)
  config.tasks.update(
      names=("review",), review_field="summary",
      max_prompt_tokens=56,   # fixed ~39 tokens + the product name (<= 12 tokens)
      max_answer_tokens=16)
  config.baseline.history_tokens = 384
  config.bridge.category_text = True
  config.train.num_steps = 200
  config.eval.num_examples = 100
  config.eval.review_likelihood = True

  variant = arg or ""
  if variant == "smoke":
    config.name = "user_llm_amazon:smoke"
    user_llm_movielens.apply_smoke(config)
    config.data.update(manual_dir="../shared/data/amazon/Gift_Cards", window=12)
    config.tasks.update(names=("review",), max_prompt_tokens=200, max_answer_tokens=16)
  elif variant == "tpu":
    config.name = "user_llm_amazon:tpu"
    user_llm_movielens.apply_tpu(config)
    # Movies_and_TV's 3.4 M reviews repeat far more summaries than Gift_Cards' 147-item
    # catalogue: the cap bounds the encoder's category table and the bridge's LLM-wide
    # text table (32,768 x 2,048 floats for Llama-3.2-1B).
    config.data.update(manual_dir="../shared/data/amazon/Movies_and_TV", protocol="paper",
                       window=50, max_text_categories=32_768)
  elif variant:
    raise ValueError(f"unknown variant {variant!r} of user_llm_amazon; known: '', 'smoke', "
                     "'tpu'")
  return config
