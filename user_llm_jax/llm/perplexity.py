"""Strided perplexity of a decoder over a token sequence or a text file.

Windows of `window` tokens move by `stride`; each window scores only the tokens not scored
by an earlier window, so every token after the first is predicted exactly once, with up to
`window - stride` tokens of left context (the Hugging Face "strided perplexity" recipe).
Windows are right-padded to one fixed shape so the scoring function compiles once.
"""

from __future__ import annotations

import dataclasses
import math
import os
import pathlib
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
import tqdm
from flax import nnx

from user_llm_jax.llm.model import Decoder


@dataclasses.dataclass(frozen=True)
class PerplexityResult:
  """Summed negative log-likelihood (nats) over `num_tokens` predicted tokens."""
  nll: float
  num_tokens: int

  @property
  def mean_nll(self) -> float:
    return self.nll / max(self.num_tokens, 1)

  @property
  def perplexity(self) -> float:
    return math.exp(self.mean_nll)


@nnx.jit
def _window_nll(model: Decoder, tokens: jax.Array, weights: jax.Array) -> jax.Array:
  """Sum over [B,T] of weights * -log p(tokens[t+1] | tokens[:t+1])."""
  b, t = tokens.shape
  positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
  logits, _ = model(tokens, positions=positions)             # [B,T,V] float32
  logp = jax.nn.log_softmax(logits[:, :-1], axis=-1)         # predicts tokens[:, 1:]
  target = jnp.take_along_axis(logp, tokens[:, 1:, None], axis=-1)[..., 0]  # [B,T-1]
  return -jnp.sum(target * weights[:, 1:])


def token_perplexity(model: Decoder, token_ids: Sequence[int], *, window: int = 512,
                     stride: int | None = None, pad_id: int = 0,
                     progress: bool = True) -> PerplexityResult:
  """Perplexity of `model` on one token sequence.

  Args:
    model: the decoder.
    token_ids: the text's token ids (at least 2).
    window: tokens per forward pass (<= the model's context length).
    stride: how far the window moves (default window // 2); tokens in the overlap serve
      only as context for the next window.
    pad_id: id used to right-pad the last window (its positions carry zero weight).
    progress: show a progress bar over windows.

  Returns:
    The summed NLL and the number of predicted tokens (len(token_ids) - 1).
  """
  ids = np.asarray(token_ids, np.int32)
  n = len(ids)
  if n < 2:
    raise ValueError(f"perplexity needs at least 2 tokens, got {n}")
  stride = stride or max(window // 2, 1)
  if not 0 < stride <= window:
    raise ValueError(f"stride must be in (0, window={window}], got {stride}")
  window = min(window, n)  # a short text is one window (the stride no longer matters)
  stride = min(stride, window)
  starts = list(range(0, max(n - window, 0) + stride, stride))
  nll, counted, scored_until = 0.0, 0, 1  # token 0 is never predicted
  for begin in tqdm.tqdm(starts, desc="perplexity", disable=not progress, leave=False):
    end = min(begin + window, n)
    if end <= scored_until:
      break
    chunk = np.full((1, window), pad_id, np.int32)
    chunk[0, :end - begin] = ids[begin:end]
    weights = np.zeros((1, window), np.float32)
    # Only tokens not yet predicted, and never the window's first (it has no context).
    lo = max(scored_until, begin + 1)
    weights[0, lo - begin:end - begin] = 1.0
    nll += float(_window_nll(model, jnp.asarray(chunk), jnp.asarray(weights)))
    counted += end - lo
    scored_until = end
  return PerplexityResult(nll=nll, num_tokens=counted)


def file_perplexity(model: Decoder, tokenizer, path: str | os.PathLike, *,
                    window: int = 512, stride: int | None = None,
                    progress: bool = True) -> PerplexityResult:
  """Perplexity of `model` on the UTF-8 text of `path`, tokenized with `tokenizer`."""
  path = pathlib.Path(path)
  if not path.exists():
    raise FileNotFoundError(f"text file {path} does not exist")
  try:
    text = path.read_text(encoding="utf-8")
  except UnicodeDecodeError as e:
    raise ValueError(f"{path}: not UTF-8 text (byte {e.start}): {e.reason}") from e
  ids = tokenizer.encode(text)
  if len(ids) < 2:
    raise ValueError(f"{path}: needs at least 2 tokens of text, found {len(ids)}")
  return token_perplexity(model, ids, window=window, stride=stride,
                          pad_id=tokenizer.pad_id, progress=progress)
