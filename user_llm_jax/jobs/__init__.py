"""Job registry: a config's `job` name (and the launcher's `--mode`) -> a job function.

A job is `run(config: ConfigDict, workdir: str) -> dict | None`. Registering one is one
line in `JOBS`: `"<name>": "<module>:<function>"`. The launcher looks up, in order,
`"<config.job>:<mode>"`, then `"<config.job>"` when `--mode=train`, else `"<mode>"`.
Job modules are imported before flag parsing, so a job may define its own absl flags
(e.g. `--text_file` for perplexity).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any

import ml_collections

JobFn = Callable[[ml_collections.ConfigDict, str], Any]

JOBS: dict[str, str] = {
    "pretrain_encoder": "user_llm_jax.jobs.pretrain_encoder:run",
    "train_user_llm": "user_llm_jax.jobs.train_user_llm:run",
    "text_baseline": "user_llm_jax.jobs.text_baseline:run",
    "main_pipeline": "user_llm_jax.jobs.main_pipeline:run",
    "generate": "user_llm_jax.jobs.generate:run",
    "infer": "user_llm_jax.jobs.infer:run",
    "dual_encoder": "user_llm_jax.jobs.dual_encoder:run",
    "generate_text": "user_llm_jax.jobs.generate_text:run",
    "perplexity": "user_llm_jax.jobs.perplexity:run",
}


def register(name: str, target: str) -> None:
  """Registers `target` ('module:function') under `name` (overrides allowed)."""
  if ":" not in target:
    raise ValueError(f"job target {target!r} must be 'module:function'")
  JOBS[name] = target


def import_job_modules() -> None:
  """Imports every registered job module (so that their absl flags exist)."""
  for target in JOBS.values():
    importlib.import_module(target.split(":")[0])


def resolve(job: str, mode: str = "train") -> JobFn:
  """The job function for a config's `job` and the launcher's `--mode`.

  Raises:
    KeyError: nothing is registered for this job/mode (lists what is).
  """
  keys = [f"{job}:{mode}", job if mode == "train" else mode]
  for key in keys:
    if key in JOBS:
      module, fn = JOBS[key].split(":")
      return getattr(importlib.import_module(module), fn)
  raise KeyError(f"no job registered for job={job!r} mode={mode!r} (looked up {keys}); "
                 f"registered: {sorted(JOBS)}")
