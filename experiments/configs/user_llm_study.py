r"""User-LLM study: named arms, each a set of overrides of the main config, on synthetic data.

  python -m experiments.benchmarks.user_llm_study --output=runs/study/study.json
  python -m experiments.benchmarks.user_llm_study --output=runs/study/study.json \
      --only=user_llm,text_lora,perceiver            # a subset of ARMS
  python -m experiments.benchmarks.user_llm_study --output=/tmp/study/study.json \
      --variant=smoke                                # tiny random LLM, about a minute

Every arm starts from `get_config(variant)` (experiments/configs/main.py with the study's
budget: same synthetic data, encoder pretraining and defaults), applies its overrides
(dotted config keys) and runs as one job (`train_user_llm`, or `text_baseline` for the text
prompt) in its own subdirectory of the output directory. Arms whose resolved configs are
identical run once (`strategy_enc` and `history_50` are the `user_llm` arm).

History length: `data.window` = L events read by the encoder, with
`data.synthetic.events_per_user_mean` = 1.2 L (the main config's 60 events for a window of
50), so most users fill the window; each length has its own data and encoder pretraining.
The text prompt always reads the most recent events that fit `baseline.history_tokens`
(256 SmolLM2 tokens, about 11 events), whatever the history length.

Variants: 'cpu' (default; SmolLM2-135M, `STEPS` steps x batch 8 per arm, about 2 hours on
2 cores: see the benchmark's docstring) and 'smoke' (main.py:smoke: tiny random LLM and
encoder, 4 steps; `SMOKE_ARMS` only; tests).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import ml_collections

from experiments.configs import main as main_config

# Training steps of every LLM arm in the 'cpu' variant (batch 8): the same budget for all.
STEPS = 100
# The arm every other arm is compared with in the verdicts.
REFERENCE = "user_llm"


def soft_prompt_fav_only(bridge_lr_mult: float, **extra: Any) -> dict[str, Any]:
  """Overrides of a soft-prompt arm on the favorite genre alone, the bridge at
  `bridge_lr_mult` x the base rate (the gates keep their 100x)."""
  return {"bridge.mode": "soft_prompt", "tasks.names": ("favorite_category",),
          "bridge.item_head": False,
          "train.lr_mults": (("_gate$", 100.0), ("^bridge/", bridge_lr_mult)), **extra}


@dataclasses.dataclass(frozen=True)
class Arm:
  """One study arm.

  Attributes:
    label: what the arm is, for the table.
    overrides: dotted config keys -> values, applied over the variant's config (`job`
      selects the job; default the main pipeline's User-LLM stage).
  """

  label: str
  overrides: Mapping[str, Any] = dataclasses.field(default_factory=dict)


def history(events: int) -> dict[str, Any]:
  """Overrides of a history-length arm: a window of `events`, 1.2x as many per user."""
  return {"data.window": events, "data.synthetic.events_per_user_mean": 1.2 * events}


ARMS: dict[str, Arm] = {
    "user_llm": Arm("User-LLM: cross-attention, Enc, pretrained encoder, 50 events"),
    # Favorite genre only: the text prompt has no item head, and decoding titles by beam
    # search over 300-token prompts would cost more than the rest of the study.
    "text_lora": Arm("text prompt, LoRA, favorite genre only, same steps",
                     {"job": "text_baseline", "baseline.strategy": "lora",
                      "tasks.names": ("favorite_category",),
                      "baseline.max_answer_tokens": None}),
    "random_encoder": Arm("User-LLM, random (not pretrained) encoder",
                          {"encoder.init": "random"}),
    "soft_prompt": Arm("User-LLM, soft prompt (scaled to the token embeddings)",
                       {"bridge.mode": "soft_prompt"}),
    # The projection's raw outputs as the soft prompt (several times the token embeddings'
    # scale), the diagnosis behind the soft prompt's RMS normalisation.
    "soft_prompt_raw": Arm("User-LLM, soft prompt, unscaled projection outputs",
                           {"bridge.mode": "soft_prompt", "bridge.soft_prompt_norm": False}),
    # With the LLM frozen only the soft prompt can teach the answer format; LoRA lets the LLM
    # learn it too (the paper's soft-prompt runs train the LLM).
    "soft_prompt_lora": Arm("User-LLM, soft prompt, LoRA strategy",
                            {"bridge.mode": "soft_prompt", "strategy": "lora"}),
    # The text arms train on the favorite genre alone; these User-LLM arms do too (the
    # others split their batches with the next item).
    "fav_only": Arm("User-LLM, favorite genre only (the text arm's task)",
                    {"tasks.names": ("favorite_category",), "bridge.item_head": False}),
    "soft_prompt_fav_only": Arm("User-LLM, soft prompt, favorite genre only",
                                {"bridge.mode": "soft_prompt",
                                 "tasks.names": ("favorite_category",),
                                 "bridge.item_head": False}),
    # Prompt tuning moves its embeddings at rates far above a fine-tuning's (its usual
    # recipes use 0.3); the bridge that writes the soft prompt at 10x the base rate.
    "soft_prompt_fav_only_lr10": Arm("User-LLM, soft prompt, favorite genre only, bridge at 10x lr",
                                     soft_prompt_fav_only(10.0)),
    # Further along the same lever: the bridge at 30x, and at 10x with LoRA adapters on the
    # LLM as well (the LLM then learns the answer format alongside the soft prompt).
    "soft_prompt_fav_only_lr30": Arm("User-LLM, soft prompt, favorite genre only, bridge at 30x lr",
                                     soft_prompt_fav_only(30.0)),
    "soft_prompt_lora_fav_only_lr10": Arm(
        "User-LLM, soft prompt, LoRA, favorite genre only, bridge at 10x lr",
        soft_prompt_fav_only(10.0, strategy="lora")),
    "perceiver": Arm("User-LLM, Perceiver (16 latents)",
                     {"bridge.use_perceiver": True, "bridge.num_latents": 16}),
    # The item head plus the encoder's own next-item scores, its LLM part starting at zero.
    "item_head_skip": Arm("User-LLM, item head + the trained encoder's own head (skip)",
                          {"bridge.item_head_skip": True}),
    # The same with the skip read from a frozen copy of the pretrained encoder: the head is
    # the pretrained ranking plus the LLM's correction, whatever Enc does to the encoder.
    "item_head_skip_frozen": Arm(
        "User-LLM, item head + the frozen pretrained encoder's head (main default)",
        {"bridge.item_head_skip": True, "bridge.item_head_skip_frozen": True}),
    "strategy_enc": Arm("User-LLM, strategy Enc (encoder + bridge)", {"strategy": "enc"}),
    "strategy_lora": Arm("User-LLM, strategy LoRA (+ LLM adapters)", {"strategy": "lora"}),
    "strategy_full": Arm("User-LLM, strategy Full (everything)", {"strategy": "full"}),
    "strategy_proj": Arm("User-LLM, strategy Proj (bridge only)", {"strategy": "proj"}),
    "history_50": Arm("User-LLM, 50-event history", history(50)),
    "history_200": Arm("User-LLM, 200-event history", history(200)),
    "history_500": Arm("User-LLM, 500-event history", history(500)),
    # The mean of the encoder's states as one more context embedding: a linear probe of it
    # reads the favorite genre far better than the 500-event arm learns to.
    "pooled_500": Arm("User-LLM, 500-event history, + the mean-pooled state",
                      {**history(500), "bridge.pooled_context": True}),
    # The text arms train on the favorite genre alone (1,600 examples in 200 steps); the
    # User-LLM arms split their batches between next item and favorite genre. This arm
    # trains on the text arm's task alone: the same examples, steps and batch.
    "fav_only_500": Arm("User-LLM, 500-event history, favorite genre only (the text arm's task)",
                        {**history(500), "tasks.names": ("favorite_category",),
                         "bridge.item_head": False}),
    # The encoder states centred and scaled by their training statistics before the bridge.
    "standardized_500": Arm("User-LLM, 500-event history, standardised encoder states",
                            {**history(500), "bridge.standardize_states": True}),
    # The text prompt on the 500-event data: it still reads only the most recent events that
    # fit `baseline.history_tokens`, so its view of the history shrinks to a few percent.
    "text_lora_500": Arm("text prompt, LoRA, favorite genre only, 500-event history",
                         {"job": "text_baseline", "baseline.strategy": "lora",
                          "tasks.names": ("favorite_category",),
                          "baseline.max_answer_tokens": None, **history(500)}),
}
# (arm, arm) pairs on the same data compared in the verdicts besides the reference.
SAME_DATA_PAIRS = (("fav_only", "text_lora"), ("soft_prompt_fav_only", "text_lora"),
                   ("soft_prompt_fav_only_lr10", "soft_prompt_fav_only"),
                   ("soft_prompt_fav_only_lr30", "soft_prompt_fav_only_lr10"),
                   ("soft_prompt_lora_fav_only_lr10", "soft_prompt_fav_only_lr10"),
                   ("soft_prompt_lora_fav_only_lr10", "fav_only"),
                   ("history_500", "text_lora_500"), ("pooled_500", "text_lora_500"),
                   ("pooled_500", "history_500"), ("standardized_500", "text_lora_500"),
                   ("standardized_500", "history_500"), ("fav_only_500", "text_lora_500"),
                   ("fav_only_500", "history_500"))
SMOKE_ARMS = ("user_llm", "random_encoder", "text_lora")
VARIANT_ARMS: dict[str, tuple[str, ...]] = {"cpu": tuple(ARMS), "smoke": SMOKE_ARMS}


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """The config every arm starts from; `arg` selects a variant ('cpu' (default), 'smoke')."""
  variant = arg or "cpu"
  if variant == "cpu":
    config = main_config.get_config("")
    config.name = "user_llm_study"
    config.train.update(num_steps=STEPS, checkpoint_every=50, eval_every=25)
    config.eval.curve_examples = 40    # learning-curve points on 40 test users
    # The arms were measured with the item head alone; the skip (the main job's default
    # since, read from the frozen pretrained encoder) is the arm `item_head_skip_frozen`.
    config.bridge.update(item_head_skip=False, item_head_skip_frozen=False)
  elif variant == "smoke":
    config = main_config.get_config("smoke")
    config.name = "user_llm_study:smoke"
    config.train.eval_every = 2
    config.eval.curve_examples = 3
  else:
    raise ValueError(f"unknown variant {variant!r} of user_llm_study; known: "
                     f"{sorted(VARIANT_ARMS)}")
  config.report_generation = False
  return config
