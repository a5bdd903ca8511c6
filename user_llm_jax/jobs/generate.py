r"""`--mode=generate`: a trained User-LLM answers a question about one user's own history.

  python -m experiments.main --config=experiments/configs/main.py --workdir=/tmp/main \
      --mode=generate --history_file=my_ratings.csv \
      --question="Which movie should I watch next? Answer with its title."

Everything comes from the User-LLM workdir (`inference.load_trained`); `--history_file`
is read by `inference.history_record` (formats there). The answer is decoded greedily.
"""

from __future__ import annotations

from typing import Any

import ml_collections
from absl import flags

from data_pipelines import records
from user_llm_jax import inference
from user_llm_jax.data import schema
from user_llm_jax.tasks import examples as ex_lib
from user_llm_jax.tasks import prompts
from user_llm_jax.tasks import runner

_HISTORY_FILE = flags.DEFINE_string(
    "history_file", None, "--mode=generate: the user's events (MovieLens ratings CSV or JSONL).")
_QUESTION = flags.DEFINE_string(
    "question", "Which movie will I rate next? Answer with its exact title.",
    "--mode=generate: the question asked about the user.")
_MAX_NEW_TOKENS = flags.DEFINE_integer("max_new_tokens", 32, "--mode=generate: answer length.")


def run(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  del config  # everything comes from the trained run in `workdir`
  if not _HISTORY_FILE.value:
    raise records.BadInputError(
        "--mode=generate needs --history_file (MovieLens ratings CSV or JSONL)")
  model, tokenizer, vocab, trained = inference.load_trained(workdir)
  record = inference.history_record(_HISTORY_FILE.value, vocab)
  unknown = record.pop("unknown_items")
  transform = ex_lib.TaskExample(vocab, tokenizer,
                                 runner.example_config(trained.config, vocab=vocab))
  example = transform.crop.map(record)
  prompt = prompts.chat_prompt(tokenizer, _QUESTION.value)
  text = inference.answer(model, tokenizer, example, prompt, _MAX_NEW_TOKENS.value)
  recent = transform.history_events(record)[-5:]
  events = len(record[schema.ITEM_IDS]) - 1
  note = (f" ({len(unknown)} not in the catalogue, read as unknown: line:id "
          f"{', '.join(unknown[:5])}{' ...' if len(unknown) > 5 else ''})" if unknown else "")
  print(f"history: {events} events{note}; most recent:\n  " + "\n  ".join(recent)
        + f"\nquestion: {_QUESTION.value}\nanswer: {text}", flush=True)
  return {"question": _QUESTION.value, "answer": text, "recent": recent,
          "unknown_items": len(unknown)}
