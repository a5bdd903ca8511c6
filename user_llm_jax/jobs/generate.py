r"""`--mode=generate`: a trained User-LLM answers a question about one user's own history.

  python -m experiments.main --config=experiments/configs/main.py --workdir=/tmp/main \
      --mode=generate --history_file=my_ratings.csv \
      --question="Which movie should I watch next? Answer with its title." \
      --top_k=10 --output=answer.json

Everything comes from the User-LLM workdir (`inference.trained_run`); `--history_file` is
read by `histories.read_history` (CSV or JSON lines, items by id or title; a file of many
users gives its first user: `--mode=infer` answers them all). The history is checked
before the model is loaded. Printed, and written as JSON with `--output`: the greedy
answer to `--question` and the top `--top_k` catalogue items with scores (item head, else
the titles' log-probabilities; `inference.Answerer`).
"""

from __future__ import annotations

import json
import os
from typing import Any

import ml_collections
from absl import flags

from data_pipelines import records
from user_llm_jax import histories
from user_llm_jax import inference
from user_llm_jax import inference_flags
from user_llm_jax.tasks import prompts

_QUESTION = flags.DEFINE_string(
    "question", "Which movie will I rate next? Answer with its exact title.",
    "--mode=generate: the question asked about the user.")
_MAX_NEW_TOKENS = flags.DEFINE_integer("max_new_tokens", 32, "--mode=generate: answer length.")


def run(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  del config  # everything comes from the trained run in `workdir`
  path = inference_flags.HISTORY_FILE.value
  if not path:
    raise records.BadInputError(
        "--mode=generate needs --history_file (MovieLens ratings CSV or JSONL)")
  top_k = inference_flags.TOP_K.value
  if top_k < 1:
    raise records.BadInputError(f"--top_k must be >= 1, got {top_k}")
  trained = inference.trained_run(workdir)
  vocab = trained.vocabulary()
  history, users = histories.read_history(path, vocab)  # bad input fails before loading
  tokenizer = trained.tokenizer()
  answerer = inference.Answerer(inference.load_model(trained), tokenizer, vocab,
                                trained.config, top_k=top_k)
  record = history.record
  prompt = prompts.chat_prompt(tokenizer, _QUESTION.value)
  text = answerer.ask([record], prompt, _MAX_NEW_TOKENS.value)[0]
  top = answerer.top_items([record])[0]
  recent = answerer.transform.history_events(record)[-5:]
  out = {"user_id": history.user_id, "history_file": os.path.abspath(path),
         "events": history.num_events, "unknown_ids": list(history.unknown_ids),
         "unmatched_titles": list(history.unmatched_titles),
         "ambiguous_titles": list(history.ambiguous_titles), "recent": recent,
         "question": _QUESTION.value, "answer": text, "top_items": top,
         "ranking": answerer.procedure}
  notes = history.notes()
  others = (f"\n(the file holds {users} users; this is the first, {history.user_id!r}: "
            "--mode=infer answers them all)" if users > 1 else "")
  ranked = "\n".join(f"  {i:>2}. {e['title']}  [id {e['item_id']}]  {e['score']:.4f}"
                     for i, e in enumerate(top, 1))
  print(f"history: {history.num_events} events{f' ({notes})' if notes else ''}; most "
        "recent:\n  " + "\n  ".join(recent) + others
        + f"\nquestion: {_QUESTION.value}\nanswer: {text}\n"
        f"top {len(top)} items ({answerer.procedure}):\n{ranked}", flush=True)
  output = inference_flags.OUTPUT.value
  if output:
    os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
    with open(output, "w", encoding="utf-8") as f:
      json.dump(out, f, indent=2, ensure_ascii=False)
    print(f"written to {output}", flush=True)
  # `unknown_items` counts ids outside the catalogue (as before the title support).
  return dict(out, unknown_items=len(history.unknown_ids))
