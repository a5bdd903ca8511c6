"""The text-prompt baseline's reading of users, shared by its training job and inference.

The baseline is the same LLM with the user's history rendered as text in every prompt
("Toy Story (1995), rated 4.0, Adventure|Animation; ...", the most recent events within
`baseline.history_tokens` tokens) instead of user embeddings.

  check_config(config)     its config keys, validated (the strategy's name)
  example_config(...)      its task examples: history text, answer length, tasks
  trained_run(workdir)     a text-baseline run read back from its workdir
  load_model(run)          its decoder: the LLM its `llm` section names (zero-shot: nothing
                           was trained) or the weights of its checkpoint (LoRA / full)
  reader(...)              how `inference.Answerer` answers with it, as its evaluation does
"""

from __future__ import annotations

import json

import ml_collections
from flax import nnx

from user_llm_jax import config as config_lib
from user_llm_jax import inference
from user_llm_jax import models
from user_llm_jax import runs
from user_llm_jax.bridge import strategies
from user_llm_jax.data import schema
from user_llm_jax.llm.model import Decoder
from user_llm_jax.llm.tokenizer import Tokenizer
from user_llm_jax.tasks import evaluate as eval_lib
from user_llm_jax.tasks import examples as ex_lib
from user_llm_jax.tasks import prompts
from user_llm_jax.tasks import runner
from user_llm_jax.train import checkpointing

JOB = "text_baseline"
ZERO_SHOT = "zero_shot"
MAKE_HINT = ("python -m experiments.main --config=experiments/configs/main.py --workdir=DIR "
             "(its text_baseline/ stage), or a user_llm_*.py config with "
             "--config.job=text_baseline")


def check_config(config: ml_collections.ConfigDict) -> str:
  """The lower-cased `baseline.strategy`, after checking the `baseline` keys.

  Raises:
    ConfigError: naming the bad key.
  """
  strategy = models.check_strategy_name(config.baseline.strategy, strategies.TEXT_STRATEGIES,
                                        key="baseline.strategy")
  if config.baseline.history_tokens < 1:
    raise config_lib.ConfigError("config key 'baseline.history_tokens' must be >= 1")
  return strategy


def example_config(config: ml_collections.ConfigDict,
                   vocab: schema.Vocabulary) -> ex_lib.ExampleConfig:
  """The baseline's task examples: `tasks` with the history as text, its answer length."""
  return runner.example_config(
      config, history_tokens=config.baseline.history_tokens, vocab=vocab,
      max_answer_tokens=config.baseline.max_answer_tokens,
      tasks=config.baseline.tasks or None)


def trained_run(workdir: str) -> runs.Run:
  """The text-prompt baseline run in `workdir` (nothing built yet).

  A zero-shot run has no checkpoint (its weights are the configured LLM's); a LoRA or full
  run must have one.

  Raises:
    NotARunError: the workdir holds no such run, or an untrained LoRA / full one.
  """
  run = runs.load_run(workdir, job=JOB, what="text-prompt baseline run", make=MAKE_HINT,
                      checkpoint=False)
  strategy = run.architecture.get("strategy")
  if strategy != ZERO_SHOT and checkpointing.latest_step(run.checkpoints) is None:
    raise runs.NotARunError(
        f"{run.workdir!r} holds no trained text-prompt baseline yet (strategy {strategy!r}, "
        f"no checkpoint in {runs.CHECKPOINTS}/); rerun its training command to make one")
  return run


def _as_json(value):
  return json.loads(json.dumps(value, default=str))


def load_model(run: runs.Run) -> Decoder:
  """The run's decoder with the weights it answers with.

  Raises:
    NotARunError: a zero-shot run whose `llm` section now loads another architecture than
      the one it recorded (the weights it was evaluated with are gone).
  """
  arch = run.architecture
  if arch.get("strategy") == ZERO_SHOT:
    # Nothing was trained: the config names the weights (a random LLM by its seed).
    llm, _ = models.load_llm(run.config.llm, run.config.seed)
    loaded = _as_json(models.architecture(llm=llm.cfg)["llm"])
    # The recorded architecture read back as a config: fields added to LlmConfig since the
    # run was written take their defaults (the architecture the run had), not "missing".
    recorded = _as_json(models.architecture(
        llm=models.llm_config_from_architecture(arch))["llm"])
    if loaded != recorded:
      differ = sorted(k for k in set(loaded) | set(recorded)
                      if loaded.get(k) != recorded.get(k))
      raise runs.NotARunError(
          f"{run.workdir}/{runs.RUN_JSON}: its config key 'llm.source'="
          f"{run.config.llm.source!r} now loads another LLM than the one the run recorded "
          f"(differs in {', '.join(differ)})")
    return llm
  with nnx.use_eager_sharding(False):
    llm = Decoder(models.llm_config_from_architecture(arch), rngs=nnx.Rngs(0))
  models.apply_lora(llm, models.lora_config_from_architecture(arch), 0)
  checkpointing.restore_params(llm, run.checkpoints)
  return llm


def reader(decoder: Decoder, config: ml_collections.ConfigDict,
           vocab: schema.Vocabulary) -> inference.Reader:
  """How the baseline answers: as its evaluation (`runner.evaluate_tasks`) does.

  Every prompt holds the history text; answers are at most `baseline.max_answer_tokens`
  (+ the end token) long. The next item is ranked over the catalogue titles (exact scoring
  up to `eval.exact_threshold` titles, constrained beam search above), never decoded
  greedily, and only when the baseline is scored on it (`baseline.tasks`): with
  history-long prompts it is the costliest answer.
  """
  cfg = example_config(config, vocab)
  return inference.Reader(
      name=inference.TEXT_PROMPT, example_config=cfg,
      condition=eval_lib.text_conditioner(decoder), item_head=False,
      ranks_items=prompts.NEXT_ITEM in cfg.tasks,
      decoded_tasks=tuple(t for t in cfg.tasks if t != prompts.NEXT_ITEM))


def answerer(run: runs.Run, decoder: Decoder, tokenizer: Tokenizer,
             vocab: schema.Vocabulary, *, top_k: int = 10,
             pad_to: int | None = None) -> inference.Answerer:
  """An `inference.Answerer` of the baseline run `run` (its `decoder` from `load_model`)."""
  return inference.Answerer(decoder, tokenizer, vocab, run.config, top_k=top_k,
                            ranking="titles", pad_to=pad_to,
                            reader=reader(decoder, run.config, vocab))
