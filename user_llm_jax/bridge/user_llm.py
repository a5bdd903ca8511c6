"""User-LLM: a user encoder, a bridge and a decoder LLM in one `nnx.Module`.

    user events --encoder--> [B,E,D_enc] --bridge--> [B,P,D] --> LLM
                                          (Perceiver: P=Q latents, else P=E events)

The LLM reads the user embeddings either through gated cross-attention blocks inserted
into the decoder (`mode='cross_attention'`) or as a soft prompt prepended to the prompt's
token embeddings (`mode='soft_prompt'`). Submodule names are what the training-strategy
filters (`bridge.strategies`) select on: `encoder`, `bridge`, `llm` (cross-attention blocks
sit at `llm/cross_attention` and count as bridge).

Task batch contract (`UserLLM.loss`): the encoder's input features
(`data.transforms.CropAndPad`: inputs_item, inputs_rating, inputs_category, inputs_time,
mask, ...) plus

  tokens      int32[B, T]  prompt followed by the answer, right-padded
  loss_mask   bool[B, T]   True on answer tokens (the tokens the loss predicts)
  text_mask   bool[B, T]   optional, True on real tokens (default: all real)
  task_id     int32[B]     optional, the task of each example (per-task loss metrics)

and, with the item head (`UserLlmConfig.item_head`), `prompt_length` int32[B] and the
encoder crop's `targets_item` / `last_index` (the record's target item), which the head
learns to rank first among the whole catalogue from the LLM state at the prompt's last
token (next-item examples only).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from user_llm_jax import sharding
from user_llm_jax.bridge import category_text as category_text_lib
from user_llm_jax.bridge import copy_head as copy_head_lib
from user_llm_jax.bridge import item_head as item_head_lib
from user_llm_jax.bridge import soft_prompt
from user_llm_jax.bridge.cross_attention import GatedCrossAttention, insert_cross_attention
from user_llm_jax.bridge.perceiver import PerceiverResampler
from user_llm_jax.bridge.projection import Projection
from user_llm_jax.data import transforms
from user_llm_jax.encoder.config import EncoderConfig
from user_llm_jax.encoder.losses import masked_mean
from user_llm_jax.encoder.model import UserEncoder
from user_llm_jax.llm.config import LlmConfig
from user_llm_jax.llm.losses import next_token_nll
from user_llm_jax.llm.model import CrossContext, Decoder
from user_llm_jax.tasks import examples as ex_lib
from user_llm_jax.tasks import prompts

MODES = ("cross_attention", "soft_prompt")

# The task-batch keys are defined once, with the task examples that produce them.
TOKENS, LOSS_MASK, TEXT_MASK = ex_lib.TOKENS, ex_lib.LOSS_MASK, ex_lib.TEXT_MASK
TASK_ID, PROMPT_LENGTH = ex_lib.TASK_ID, ex_lib.PROMPT_LENGTH

Batch = Mapping[str, Any]


@dataclasses.dataclass(frozen=True)
class UserLlmConfig:
  """How the user encoder is bridged into the LLM.

  Attributes:
    mode: 'cross_attention' (gated blocks inside the decoder) or 'soft_prompt'
      (embeddings prepended to the prompt).
    use_perceiver: compress the E event embeddings to `num_latents` with a Perceiver
      resampler (run at the encoder width, before the projection).
    num_latents: Q, Perceiver output length (paper: 50 events -> 16 latents).
    perceiver_layers: Perceiver attention + FFN layers.
    perceiver_heads: Perceiver attention heads (must divide the encoder width).
    projection_layers: dense layers of the encoder -> LLM width MLP.
    projection_hidden: hidden width of that MLP (None: the LLM width).
    xattn_every: a cross-attention block before every k-th decoder layer (first, first + k,
      ...).
    xattn_first: the first decoder layer with a block (0: from the bottom; higher is
      cheaper to train, as no gradient flows through the frozen layers below it).
    xattn_heads: heads of each block (None: the LLM's query heads).
    xattn_mlp_dim: FFN width of each block (None: the LLM's MLP width).
    xattn_gate_init: initial tanh-gate pre-activation; 0 leaves the LLM unchanged.
    item_head: add an `ItemHead` that ranks the whole catalogue from the LLM's state at
      the prompt's last token, trained on the next-item examples.
    item_head_dim: width of the head's item table (None: the encoder's `feature_dim`, so
      the table starts from the pretrained encoder's item embeddings).
    item_head_skip: add the encoder's own next-item scores at the user's last event (its
      SASRec-style head) to the item head's, with the head's query projection starting at
      zero: the head starts as the encoder's ranking and the LLM learns a correction.
    item_head_skip_frozen: the skip reads a frozen copy of the encoder as the model was
      built (the pretrained weights; `UserLLM.skip_encoder`, trained by no strategy)
      instead of the encoder the strategy trains. Under Enc and Full the encoder moves for
      the LLM's tasks and its own ranking drifts with it (the `user_llm_encoder_head` row
      of a run shows how far); with the frozen copy the head is the pretrained ranking plus
      the LLM's correction. Needs `item_head_skip`.
    item_loss_weight: weight of the head's softmax loss next to the token loss.
    soft_prompt_norm: soft-prompt mode: RMS-normalise each user embedding and scale it to
      the RMS of the LLM's token embeddings (times a learned per-dimension gain starting
      at 1). The frozen LLM then reads inputs of the scale it was trained on; the
      projection's raw outputs are several times larger than SmolLM2's token embeddings
      (the `context_rms` / `token_embed_rms` training metrics show both).
    pooled_context: append one more user embedding, the encoder's states averaged over
      the valid events (projected like the others), plus a learned marker vector, after
      the event (or Perceiver) embeddings. A statistic of the whole history (e.g. how often
      each genre occurs) is then one attention hop away, where the event embeddings alone
      need the attention spread evenly over every event to read it (a linear probe of the
      mean-pooled states reads the favorite genre far better than the bridge learns to in
      a few hundred steps: `eval/probe.py`). The marker lets attention pick the pooled
      embedding out: without it its key is close to the mean of the events' keys. On the
      500-event synthetic data it changed nothing measurable: attention spread over the
      events already reads their mean (README, User-LLM study).
    category_text: add to each event's user embedding the text of its categories in the
      LLM's token-embedding space (`bridge/category_text.py`: the mean of the name's token
      embeddings, fixed, times a learned per-dimension gain starting at 1), so the LLM can
      say a category's words (a genre, a summary the user keeps writing) without first
      learning what its id stands for. Needs `use_perceiver=False` (the Perceiver's latents
      are not events) and the category names when the model is built.
    category_text_tokens: tokens kept of each category name.
    text_memory: with `category_text`, the cross-attention also reads each event's first
      category name (the review summary with `data.text_categories`) token by token: one
      memory slot per token after the event embeddings, each its token's embedding plus
      the previous token's (shifted apart) plus the event's embedding
      (`category_text.memory_slots`), so a block can copy a phrase word by word where the
      mean vector gives only its words. Costs E x `category_text_tokens` more context
      slots and a fixed [num_categories, L, D] table. Needs `mode='cross_attention'`.
    copy_head: with `text_memory`, a pointer head at the LLM's output
      (`bridge/copy_head.py`) mixes copies of the memory's tokens into the next-token
      distribution, starting copy-ready: the token just read finds the slots it precedes
      in a user's summaries and offers their tokens, so a phrase the user keeps writing
      can be continued word by word without the LLM's upper layers learning to copy.
    copy_gate_init: the copy gate's starting pre-activation (sigmoid: the copied share
      where a memory slot matches).
    standardize_states: shift and scale every encoder state before the bridge,
      (state - shift) * gain per dimension, with `shift` and `gain` trained parameters that
      the job initialises from the encoder's states on training records (their mean and
      1 / standard deviation: `UserLLM.init_state_standardization`), as a linear probe
      standardises its inputs (`eval/probe.py`). On the 500-event synthetic data it changed
      nothing measurable (README, User-LLM study).
    dtype: compute dtype of the bridge.
    param_dtype: storage dtype of the bridge parameters.
  """

  mode: str = "cross_attention"
  use_perceiver: bool = False
  num_latents: int = 16
  perceiver_layers: int = 2
  perceiver_heads: int = 4
  projection_layers: int = 2
  projection_hidden: int | None = None
  xattn_every: int = 5
  xattn_first: int = 0
  xattn_heads: int | None = None
  xattn_mlp_dim: int | None = None
  xattn_gate_init: float = 0.0
  item_head: bool = False
  item_head_dim: int | None = None
  item_head_skip: bool = False
  item_head_skip_frozen: bool = False
  item_loss_weight: float = 1.0
  soft_prompt_norm: bool = True
  pooled_context: bool = False
  standardize_states: bool = False
  category_text: bool = False
  category_text_tokens: int = 8
  text_memory: bool = False
  copy_head: bool = False
  copy_gate_init: float = -2.0
  dtype: str = "float32"
  param_dtype: str = "float32"

  def __post_init__(self):
    if self.mode not in MODES:
      raise ValueError(f"UserLlmConfig.mode={self.mode!r}: must be one of {MODES}")
    if self.item_head_skip and not self.item_head:
      raise ValueError("UserLlmConfig.item_head_skip=True needs item_head=True (the skip "
                       "adds the encoder's scores to the item head's)")
    if self.item_head_skip_frozen and not self.item_head_skip:
      raise ValueError("UserLlmConfig.item_head_skip_frozen=True needs item_head_skip=True "
                       "(it names where the skip's scores come from)")
    if self.category_text and self.use_perceiver:
      raise ValueError("UserLlmConfig.category_text=True needs use_perceiver=False: the text "
                       "is added per event, and the Perceiver's latents are not events")
    if self.text_memory and not (self.category_text and self.mode == "cross_attention"):
      raise ValueError("UserLlmConfig.text_memory=True needs category_text=True and "
                       f"mode='cross_attention' (got category_text={self.category_text}, "
                       f"mode={self.mode!r}): it is the category names' tokens, read by "
                       "the cross-attention blocks")
    if self.copy_head and not self.text_memory:
      raise ValueError("UserLlmConfig.copy_head=True needs text_memory=True: it copies the "
                       "tokens of the memory slots")
    for name in ("num_latents", "perceiver_layers", "perceiver_heads", "projection_layers",
                 "xattn_every", "category_text_tokens"):
      value = getattr(self, name)
      if not isinstance(value, int) or value < 1:
        raise ValueError(f"UserLlmConfig.{name}={value!r}: must be a positive int")
    if not isinstance(self.xattn_first, int) or self.xattn_first < 0:
      raise ValueError(f"UserLlmConfig.xattn_first={self.xattn_first!r}: must be an int >= 0")
    for name in ("projection_hidden", "xattn_heads", "xattn_mlp_dim", "item_head_dim"):
      value = getattr(self, name)
      if value is not None and (not isinstance(value, int) or value < 1):
        raise ValueError(f"UserLlmConfig.{name}={value!r}: must be None or a positive int")
    for name in ("dtype", "param_dtype"):
      try:
        jnp.dtype(getattr(self, name))
      except TypeError as e:
        raise ValueError(f"UserLlmConfig.{name}={getattr(self, name)!r} is not a dtype") from e

  def replace(self, **changes: Any) -> "UserLlmConfig":
    return dataclasses.replace(self, **changes)

  @classmethod
  def from_dict(cls, d: Mapping[str, Any]) -> "UserLlmConfig":
    """Builds from a (ConfigDict-like) mapping; unknown keys are an error naming them."""
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - known)
    if unknown:
      raise ValueError(f"unknown UserLlmConfig keys {unknown}; known: {sorted(known)}")
    return cls(**dict(d))


def check_compatible(cfg: UserLlmConfig, encoder_width: int) -> None:
  """Raises a ValueError naming the key when `cfg` does not fit the encoder."""
  if cfg.use_perceiver and encoder_width % cfg.perceiver_heads:
    raise ValueError(f"UserLlmConfig.perceiver_heads={cfg.perceiver_heads} must divide the "
                     f"encoder width {encoder_width}")


def _set_table(table: nnx.Variable | None, values: Any, setter: str, option: str,
               what: str, axes: str, dtype: Any = jnp.float32) -> None:
  """Fills a fixed bridge table, or raises a ValueError naming the option or the shape."""
  if table is None:
    raise ValueError(f"{setter} needs UserLlmConfig.{option}=True")
  held = tuple(table[...].shape)
  if tuple(np.shape(values)) != held:
    raise ValueError(f"{what} of shape {tuple(np.shape(values))}; this bridge "
                     f"holds {held} ({axes})")
  table[...] = jnp.asarray(values, dtype)


class Bridge(nnx.Module):
  """Encoder states [B,E,D_enc] -> user embeddings at the LLM width [B,P,D] with mask.

  Attributes:
    perceiver: the optional `PerceiverResampler`.
    projection: the encoder -> LLM width MLP.
    prompt_gain: [D] learned gain of the soft prompt's RMS normalisation, or None (cross-
      attention mode, or `soft_prompt_norm=False`).
    category_text: [num_categories, D] fixed text vectors of the category names
      (`category_text.CategoryText`), or None without `cfg.category_text`.
    text_gain: [D] learned gain of the events' category text, or None.
    text_memory: [num_categories, L, D] fixed token embeddings of the category names
      (`category_text.TextMemory`), or None without `cfg.text_memory`.
    memory_start: [D] learned "previous token" of each name's first memory slot, or None.
    memory_event_gain: scalar learned weight of the event embedding in its memory slots,
      or None.
  """

  def __init__(self, cfg: UserLlmConfig, encoder_width: int, llm_width: int, *,
               rngs: nnx.Rngs, num_categories: int = 0):
    dtype, param_dtype = jnp.dtype(cfg.dtype), jnp.dtype(cfg.param_dtype)
    check_compatible(cfg, encoder_width)
    self.perceiver = PerceiverResampler(
        encoder_width, num_latents=cfg.num_latents, num_layers=cfg.perceiver_layers,
        num_heads=cfg.perceiver_heads, dtype=dtype, param_dtype=param_dtype,
        rngs=rngs) if cfg.use_perceiver else None
    self.projection = Projection(encoder_width, llm_width, hidden_dim=cfg.projection_hidden,
                                 num_layers=cfg.projection_layers, dtype=dtype,
                                 param_dtype=param_dtype, rngs=rngs)
    self.prompt_gain = (nnx.Param(jnp.ones((llm_width,), param_dtype))
                        if cfg.mode == "soft_prompt" and cfg.soft_prompt_norm else None)
    self.pooled_context = cfg.pooled_context
    # Constant initialisers: no draw from the shared stream (the other parameters start
    # as without the option); the job sets them from the data.
    axes, unused_key = ("embed",), jax.random.key(0)
    self.state_shift = (nnx.Param(sharding.partitioned(nnx.initializers.zeros_init(), axes)(
        unused_key, (encoder_width,), param_dtype)) if cfg.standardize_states else None)
    self.state_gain = (nnx.Param(sharding.partitioned(nnx.initializers.ones_init(), axes)(
        unused_key, (encoder_width,), param_dtype)) if cfg.standardize_states else None)
    # Drawn from its own key, not the shared stream, so every other parameter starts as it
    # does without the option (the ablation changes nothing else).
    marker = sharding.partitioned(nnx.initializers.normal(0.02), ("embed",))
    self.pooled_marker = (nnx.Param(marker(jax.random.fold_in(rngs.params.key[...], 1),
                                           (llm_width,), param_dtype))
                          if cfg.pooled_context else None)
    # Constant too: the table is set from the LLM's embeddings (`set_category_text`) or
    # restored from a checkpoint.
    self.category_text = (category_text_lib.CategoryText(sharding.partitioned(
        nnx.initializers.zeros_init(), (None, "embed"))(
            unused_key, (num_categories, llm_width), jnp.float32))
                          if cfg.category_text else None)
    self.text_gain = (nnx.Param(sharding.partitioned(nnx.initializers.ones_init(), axes)(
        unused_key, (llm_width,), param_dtype)) if cfg.category_text else None)
    memory = cfg.text_memory
    self.text_memory = (category_text_lib.TextMemory(sharding.partitioned(
        nnx.initializers.zeros_init(), (None, None, "embed"))(
            unused_key, (num_categories, cfg.category_text_tokens, llm_width), jnp.float32))
                        if memory else None)
    self.memory_start = (nnx.Param(sharding.partitioned(nnx.initializers.zeros_init(), axes)(
        unused_key, (llm_width,), param_dtype)) if memory else None)
    self.memory_event_gain = (nnx.Param(sharding.partitioned(
        nnx.initializers.ones_init(), ())(unused_key, (), param_dtype)) if memory else None)
    self.memory_tokens = (category_text_lib.MemoryTokens(jnp.full(
        (num_categories, cfg.category_text_tokens), category_text_lib.PAD_TOKEN, jnp.int32))
                          if cfg.copy_head else None)

  def set_category_text(self, vectors: jax.Array) -> None:
    """Sets the category text table ([num_categories, D], `category_text.text_vectors`)."""
    _set_table(self.category_text, vectors, "set_category_text", "category_text",
               "category text vectors", "categories x LLM width")

  def set_text_memory(self, vectors: jax.Array) -> None:
    """Sets the token memory table ([num_categories, L, D], `category_text.token_vectors`)."""
    _set_table(self.text_memory, vectors, "set_text_memory", "text_memory",
               "text memory vectors", "categories x name tokens x LLM width")

  def set_memory_tokens(self, tokens: np.ndarray | jax.Array) -> None:
    """Sets the memory slots' token ids ([num_categories, L], `category_text.token_table`)."""
    _set_table(self.memory_tokens, tokens, "set_memory_tokens", "copy_head",
               "memory token ids", "categories x name tokens", jnp.int32)

  def __call__(self, states: jax.Array, mask: jax.Array, *,
               target_rms: jax.Array | None = None,
               categories: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
    """states [B,E,D_enc], mask [B,E] -> (embeddings [B,P,D], mask [B,P]).

    P is E (or the Perceiver's Q), plus one with `pooled_context`, plus E x L memory slots
    with `text_memory`.
    `target_rms`: the RMS each embedding is normalised to (with `prompt_gain`).
    `categories`: int[B,E,C] the events' category ids (needed with `category_text`).
    """
    if self.state_shift is not None:
      states = ((states - self.state_shift[...].astype(states.dtype))
                * self.state_gain[...].astype(states.dtype))
    pooled = None
    if self.pooled_context:
      weights = mask.astype(states.dtype)[..., None]                              # [B,E,1]
      pooled = (jnp.sum(states * weights, axis=1, keepdims=True)
                / jnp.maximum(jnp.sum(weights, axis=1, keepdims=True), 1.0))    # [B,1,D_enc]
    if self.perceiver is not None:
      states = self.perceiver(states, mask)  # [B,Q,D_enc]
      mask = jnp.ones(states.shape[:2], bool)
    if pooled is not None:
      states = jnp.concatenate([states, pooled.astype(states.dtype)], axis=1)
      mask = jnp.concatenate([mask, jnp.ones(mask.shape[:1] + (1,), bool)], axis=1)
    out = self.projection(states)
    if self.category_text is not None:
      if categories is None:
        raise ValueError("bridge.category_text needs the events' categories "
                         f"({transforms.INPUTS_CATEGORY!r} of the user batch)")
      text = category_text_lib.event_text(self.category_text[...], categories)  # [B,E,D]
      text = text * self.text_gain[...].astype(jnp.float32)
      e = text.shape[1]
      out = jnp.concatenate([out[:, :e] + text.astype(out.dtype), out[:, e:]], axis=1)
    if self.pooled_marker is not None:
      marker = self.pooled_marker[...].astype(out.dtype)
      out = jnp.concatenate([out[:, :-1], out[:, -1:] + marker], axis=1)
    if self.text_memory is not None:
      e = categories.shape[1]
      slots, slot_mask = category_text_lib.memory_slots(
          self.text_memory[...], categories, out[:, :e], mask[:, :e],
          self.memory_start[...], self.memory_event_gain[...])
      out = jnp.concatenate([out, slots.astype(out.dtype)], axis=1)
      mask = jnp.concatenate([mask, slot_mask], axis=1)
    if self.prompt_gain is not None:
      if target_rms is None:
        raise ValueError("the soft prompt's RMS normalisation needs target_rms")
      x = out.astype(jnp.float32)
      x = x * jax.lax.rsqrt(jnp.mean(jnp.square(x), axis=-1, keepdims=True) + 1e-6)
      out = (x * self.prompt_gain[...].astype(jnp.float32) * target_rms).astype(out.dtype)
    return out, mask


def _deep_copy(module: nnx.Module) -> nnx.Module:
  """A copy of `module` with buffers of its own. `nnx.clone` copies the graph but shares
  the arrays, and a train step that donates the model's buffers must not meet one twice."""
  copy = nnx.clone(module)
  nnx.update(copy, jax.tree.map(lambda x: jnp.array(x, copy=True), nnx.state(copy)))
  return copy


class UserLLM(nnx.Module):
  """Encoder + bridge + decoder, contextualizing the LLM with user embeddings.

  Attributes:
    cfg: the bridge configuration.
    encoder: the `UserEncoder` (pretrained or random).
    bridge: `Bridge` (optional Perceiver, then projection).
    llm: the `Decoder`; in cross-attention mode it holds the gated blocks.
    item_head: the full-catalogue `ItemHead`, or None.
    skip_encoder: with `cfg.item_head_skip_frozen`, a copy of `encoder` as it was passed
      in, whose next-item scores the skip adds (no strategy trains it), else None.
  """

  def __init__(self, cfg: UserLlmConfig, *, encoder: UserEncoder, llm: Decoder,
               rngs: nnx.Rngs, category_tokens: Any = None,
               lowercase_tokens: Any = None, copy_start_token: int | None = None):
    """Wires already-built (e.g. pretrained) modules together and adds the bridge.

    Args:
      cfg: bridge configuration.
      encoder: user encoder; its pretrained weights are kept as they are.
      llm: decoder without cross-attention blocks (they are inserted here in
        cross-attention mode).
      rngs: random streams for the new bridge parameters.
      category_tokens: with `cfg.category_text`, int[num_categories, L] token ids of the
        category names (`category_text.token_table`); the bridge's text table is computed
        from them and `llm`'s embeddings. None leaves the table at 0 (a model whose
        weights, the table included, are restored from a checkpoint afterwards).
      lowercase_tokens: with `cfg.copy_head`, int[vocab] each token's lowercase form
        (`copy_head.lowercase_table`); None keeps every token as it is (or a checkpoint
        restores the table).
      copy_start_token: with `cfg.copy_head`, the prompt's last token (the one before
        every answer): the memory's start vector starts as its embedding, so the copy head
        offers the first words of the user's summaries at the answer's start.
    """
    self.cfg = cfg
    self.encoder = encoder
    self.llm = llm
    self.bridge = Bridge(cfg, encoder.cfg.width, llm.cfg.width, rngs=rngs,
                         num_categories=encoder.cfg.num_categories)
    if cfg.category_text and category_tokens is not None:
      self.bridge.set_category_text(category_text_lib.text_vectors(
          llm.embedder.embedding[...], category_tokens))
      if cfg.text_memory:
        self.bridge.set_text_memory(category_text_lib.token_vectors(
            llm.embedder.embedding[...], category_tokens))
      if cfg.copy_head:
        self.bridge.set_memory_tokens(category_tokens)
    if cfg.copy_head:
      llm.copy_head = copy_head_lib.CopyHead(
          llm.cfg.width, llm.cfg.vocab_size, gate_init=cfg.copy_gate_init,
          param_dtype=jnp.dtype(cfg.param_dtype))
      if lowercase_tokens is not None:
        llm.copy_head.set_lowercase(lowercase_tokens)
      if copy_start_token is not None:
        start = category_text_lib.token_vectors(llm.embedder.embedding[...],
                                                np.asarray([[copy_start_token]]))[0, 0]
        self.bridge.memory_start[...] = start.astype(self.bridge.memory_start[...].dtype)
    if cfg.mode == "cross_attention":
      insert_cross_attention(
          llm, cfg.xattn_every, rngs=rngs, context_width=llm.cfg.width,
          num_heads=cfg.xattn_heads, head_dim=llm.cfg.head_dim, mlp_dim=cfg.xattn_mlp_dim,
          gate_init=cfg.xattn_gate_init, dtype=jnp.dtype(cfg.dtype),
          param_dtype=jnp.dtype(cfg.param_dtype), first=cfg.xattn_first)
    head = None
    if cfg.item_head:
      dim = cfg.item_head_dim or encoder.cfg.feature_dim
      head = item_head_lib.ItemHead(
          llm.cfg.width, encoder.cfg.num_items, dim, rngs=rngs, zero_query=cfg.item_head_skip,
          dtype=jnp.dtype(cfg.dtype), param_dtype=jnp.dtype(cfg.param_dtype))
      table = encoder.features.item.embedding[...]
      if tuple(table.shape) == tuple(head.items.shape):
        # Start from the pretrained encoder's notion of item similarity.
        head.init_items_from(table)
    self.item_head = nnx.data(head)
    # Copied before any training step: the copy keeps the weights the model starts from.
    self.skip_encoder = nnx.data(_deep_copy(encoder) if cfg.item_head_skip_frozen else None)

  def init_state_standardization(self, mean: jax.Array, std: jax.Array) -> None:
    """Sets the bridge's state shift to `mean` and gain to 1 / `std` ([D_enc] each; the
    encoder states' statistics over training events). Requires `standardize_states`."""
    if self.bridge.state_shift is None:
      raise ValueError("init_state_standardization needs UserLlmConfig.standardize_states")
    width = self.bridge.state_shift.shape
    mean, std = jnp.asarray(mean, jnp.float32), jnp.asarray(std, jnp.float32)
    if mean.shape != width or std.shape != width:
      raise ValueError(f"state statistics of shapes {mean.shape} / {std.shape}; the encoder "
                       f"width needs {width}")
    dtype = self.bridge.state_shift[...].dtype
    self.bridge.state_shift[...] = mean.astype(dtype)
    self.bridge.state_gain[...] = (1.0 / jnp.maximum(std, 1e-6)).astype(dtype)

  def user_context(self, user_batch: Batch, *,
                   deterministic: bool = True) -> tuple[jax.Array, jax.Array]:
    """Encodes the user: -> (embeddings [B,P,D] at the LLM width, mask [B,P] bool)."""
    states = self.encoder(user_batch, deterministic=deterministic)  # [B,E,D_enc]
    return self._bridge(user_batch, states)

  def _bridge(self, user_batch: Batch, states: jax.Array) -> tuple[jax.Array, jax.Array]:
    mask = jnp.asarray(user_batch[transforms.MASK], bool)  # [B,E]
    return self.bridge(states, mask, target_rms=self.bridge_target_rms(),
                       categories=user_batch.get(transforms.INPUTS_CATEGORY))

  def bridge_target_rms(self) -> jax.Array | None:
    """What `Bridge` normalises the soft prompt to (`target_rms`), or None without the norm.

    Callers that run the encoder and the bridge apart from the LLM pass it along.
    """
    return self.token_embed_rms() if self.bridge.prompt_gain is not None else None

  def token_embed_rms(self) -> jax.Array:
    """RMS of the LLM's input token embeddings (float32 scalar; no gradient flows to them)."""
    table = self.llm.embedder.embedding[...].astype(jnp.float32)
    rms = jnp.sqrt(jnp.mean(jnp.square(table)))
    if self.llm.cfg.scale_embeddings:  # Gemma multiplies its embeddings by sqrt(width)
      rms = rms * self.llm.cfg.width ** 0.5
    return jax.lax.stop_gradient(rms)

  def hidden_states(self, user_batch: Batch, tokens: jax.Array, *,
                    positions: jax.Array | None = None,
                    attention_mask: jax.Array | None = None,
                    text_mask: jax.Array | None = None,
                    deterministic: bool = True) -> jax.Array:
    """Final-normed LLM states of the text positions given the user: [B, T, D].

    Args: as `__call__`.
    """
    return self._forward(user_batch, tokens, positions=positions,
                         attention_mask=attention_mask, text_mask=text_mask,
                         deterministic=deterministic)[0]

  def decoder_context(self, user_batch: Batch, context: jax.Array,
                      context_mask: jax.Array) -> jax.Array | CrossContext:
    """What the decoder reads as `context`: the user context [B,P,D] itself, or, with the
    copy head, its `CrossContext` with the memory the head copies from (its slots are the
    context's last E x L embeddings, `Bridge.__call__`)."""
    if self.llm.copy_head is None:
      return context
    ids = category_text_lib.memory_token_ids(
        self.bridge.memory_tokens[...], user_batch[transforms.INPUTS_CATEGORY])  # [B,S]
    s = ids.shape[1]
    return self.llm.precompute_context(
        context, context_mask, copy_slots=(context[:, -s:], ids, context_mask[:, -s:]))

  def _forward(self, user_batch: Batch, tokens: jax.Array, *,
               positions: jax.Array | None = None,
               attention_mask: jax.Array | None = None,
               text_mask: jax.Array | None = None,
               deterministic: bool = True,
               ) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array, Any]:
    """(final-normed LLM states of the text [B, T, D], encoder states [B, E, D_enc], user
    context [B, P, D], its mask [B, P], and what the decoder read as context (for
    `Decoder.output`; None in soft-prompt mode))."""
    b, t = tokens.shape
    text_mask = jnp.ones((b, t), bool) if text_mask is None else text_mask.astype(bool)
    encoded = self.encoder(user_batch, deterministic=deterministic)       # [B,E,D_enc]
    context, context_mask = self._bridge(user_batch, encoded)
    if self.cfg.mode == "cross_attention":
      if positions is None:
        positions = soft_prompt.text_positions(text_mask)
      if attention_mask is None:
        attention_mask = soft_prompt.text_attention_mask(text_mask)
      read = self.decoder_context(user_batch, context, context_mask)
      hidden, _ = self.llm(tokens, positions=positions, attention_mask=attention_mask,
                           context=read, context_mask=context_mask, return_hidden=True)
      return hidden, encoded, context, context_mask, read
    embeds, mask, merged_positions = soft_prompt.merge_soft_prompt(
        context, context_mask, self.llm.embed(tokens), text_mask, attention_mask, positions)
    hidden, _ = self.llm(None, positions=merged_positions, attention_mask=mask,
                         inputs_embeds=embeds, return_hidden=True)  # [B,P+T,D]
    return hidden[:, context.shape[1]:], encoded, context, context_mask, None

  def __call__(self, user_batch: Batch, tokens: jax.Array, *,
               positions: jax.Array | None = None,
               attention_mask: jax.Array | None = None,
               text_mask: jax.Array | None = None,
               deterministic: bool = True) -> jax.Array:
    """Logits of the text tokens given the user.

    Args:
      user_batch: the encoder's input features for B users.
      tokens: [B, T] int prompt (+ answer) tokens.
      positions: [B, T] RoPE positions of the text (default: from `text_mask`). In
        soft-prompt mode they are shifted past the soft prompt.
      attention_mask: [B, T, T] bool text-to-text mask (default: causal over real tokens).
      text_mask: [B, T] bool, True on real tokens (default: all).
      deterministic: disable dropout in the encoder.

    Returns:
      float32 logits [B, T, V] for the text positions only (in both modes).
    """
    # Only text positions need the [.., V] head (the soft prompt's are dropped).
    hidden, _, _, _, read = self._forward(
        user_batch, tokens, positions=positions, attention_mask=attention_mask,
        text_mask=text_mask, deterministic=deterministic)
    return self.llm.output(hidden, tokens, read)

  def next_item_logits(self, batch: Batch) -> jax.Array:
    """Item-head scores of every catalogue item for task examples: float32 [B, V].

    The LLM reads each example's prompt (what follows it is causally invisible) and the
    head scores the catalogue from the state at the prompt's last token; PAD and OOV are
    -inf. Same contract as `UserEncoder.next_item_logits`, so `eval.retrieval` ranks both.
    """
    if self.item_head is None:
      raise ValueError("this User-LLM has no item head (bridge.item_head=False)")
    tokens = jnp.asarray(batch[TOKENS], jnp.int32)
    text_mask = batch.get(TEXT_MASK)
    hidden, encoded, _, _, _ = self._forward(batch, tokens, text_mask=None if text_mask is None
                                          else jnp.asarray(text_mask, bool))
    return self._item_scores(batch, hidden, encoded)

  def _item_scores(self, batch: Batch, hidden: jax.Array, encoded: jax.Array) -> jax.Array:
    """Item-head scores [B, V] from the LLM states [B, T, D] (and, with the encoder skip,
    the encoder's own next-item scores at the user's last event, from `encoded`)."""
    scores = self.item_head(item_head_lib.last_prompt_states(hidden, batch[PROMPT_LENGTH]))
    if self.cfg.item_head_skip:
      encoder = self.encoder
      if self.skip_encoder is not None:   # the frozen copy reads the user itself, no dropout
        encoder, encoded = self.skip_encoder, self.skip_encoder(batch, deterministic=True)
      last = jnp.asarray(batch[transforms.LAST_INDEX], jnp.int32)
      user = jnp.take_along_axis(encoded, last[:, None, None], axis=1)[:, 0]  # [B,D_enc]
      skip = encoder.last_item_logits(user, batch)
      if self.skip_encoder is not None:
        # Fixed weights: nothing of the frozen copy's path needs a gradient.
        skip = jax.lax.stop_gradient(skip)
      # PAD/OOV stay -inf: -inf plus the encoder's finite scores.
      scores = scores + skip
    return scores

  def gate_values(self) -> dict[str, jax.Array]:
    """tanh of every cross-attention gate, by block ('xattn<i>/attn', 'xattn<i>/mlp')."""
    out = {}
    for key, block in self.llm.cross_attention.items():
      if isinstance(block, GatedCrossAttention):
        out[f"gate/xattn{key}_attn"] = jnp.tanh(block.attn_gate[...])
        out[f"gate/xattn{key}_mlp"] = jnp.tanh(block.mlp_gate[...])
    if self.llm.copy_head is not None:  # the copied share where a slot matches, state at 0
      out["gate/copy"] = self.llm.copy_head.gate()
    return out

  def sampler_inputs(self, user_batch: Batch, tokens: jax.Array,
                     text_mask: jax.Array | None = None) -> dict[str, jax.Array | None]:
    """Keyword arguments for `llm.sampler.prefill` / `Sampler` to generate for these users.

    Args:
      user_batch: the encoder's input features for B users.
      tokens: [B, T] left-padded prompt tokens.
      text_mask: [B, T] bool, True on real prompt tokens (default: all).

    Returns:
      A dict with `tokens`, `prompt_mask`, `inputs_embeds`, `context`, `context_mask`:
      cross-attention mode passes the tokens and the user context; soft-prompt mode
      passes the merged [soft; text] embeddings (tokens None) and their combined mask, from
      which the sampler derives the same positions as `merge_soft_prompt`.
    """
    b, t = tokens.shape
    text_mask = jnp.ones((b, t), bool) if text_mask is None else text_mask.astype(bool)
    context, context_mask = self.user_context(user_batch)
    if self.cfg.mode == "cross_attention":
      read = self.decoder_context(user_batch, context, context_mask)
      return dict(tokens=tokens, prompt_mask=text_mask, inputs_embeds=None,
                  context=read, context_mask=None if read is not context else context_mask)
    embeds = jnp.concatenate(
        [context.astype(self.llm.cfg.compute_dtype), self.llm.embed(tokens)], axis=1)
    return dict(tokens=None, prompt_mask=jnp.concatenate([context_mask, text_mask], axis=1),
                inputs_embeds=embeds, context=None, context_mask=None)

  def loss(self, batch: Batch, *,
           deterministic: bool = True) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Mean next-token cross-entropy over the answer tokens of a task batch.

    With the item head, plus `item_loss_weight` x the head's softmax cross-entropy over the
    catalogue on the next-item examples. Examples with `example_mask` False (eval padding)
    contribute nothing. A batch without any answer token gives loss 0 with zero gradients.

    Returns:
      (loss, metrics): `answer_tokens` (count), `token_accuracy` (greedy argmax hits among
      answer tokens), `task_nll/<task>` and `task_tokens/<task>` (summed token loss and
      token count per task, when `task_id` is given),
      `item_loss` (item head), and the cross-attention gates' tanh values (`gate/...`).
    """
    for key in (TOKENS, LOSS_MASK):
      if key not in batch:
        raise KeyError(f"User-LLM batch lacks {key!r}; got keys {sorted(batch)}")
    tokens = jnp.asarray(batch[TOKENS], jnp.int32)
    loss_mask = jnp.asarray(batch[LOSS_MASK], bool)
    if loss_mask.shape != tokens.shape:
      raise ValueError(f"batch[{LOSS_MASK!r}] has shape {loss_mask.shape}, expected the "
                       f"shape of batch[{TOKENS!r}] {tokens.shape}")
    text_mask = batch.get(TEXT_MASK)
    if text_mask is not None:
      text_mask = jnp.asarray(text_mask, bool)
      loss_mask = loss_mask & text_mask
    example_mask = jnp.ones(tokens.shape[:1], bool)
    if transforms.EXAMPLE_MASK in batch:
      example_mask = jnp.asarray(batch[transforms.EXAMPLE_MASK], bool)
      loss_mask = loss_mask & example_mask[:, None]
    hidden, encoded, context, context_mask, read = self._forward(
        batch, tokens, text_mask=text_mask, deterministic=deterministic)  # [B,T,D]
    logits = self.llm.output(hidden, tokens, read)                        # [B,T,V]
    nll = next_token_nll(logits, tokens)                                  # [B,T-1]
    weights = loss_mask[:, 1:].astype(jnp.float32)
    count = weights.sum()
    # where(): an all-masked batch gives exactly 0 whatever the masked losses are.
    token_nll = jnp.where(weights > 0, nll, 0.0)
    loss = token_nll.sum() / jnp.maximum(count, 1.0)
    hits = (jnp.argmax(logits[:, :-1], axis=-1) == tokens[:, 1:]) & loss_mask[:, 1:]
    metrics = {"answer_tokens": count, "token_accuracy": hits.sum() / jnp.maximum(count, 1.0)}
    if TASK_ID in batch:
      task_id = jnp.asarray(batch[TASK_ID], jnp.int32)
      per_example = token_nll.sum(axis=1)                                 # [B]
      per_count = weights.sum(axis=1)
      for i, name in enumerate(prompts.TASKS):
        # Sums, not means: averaged over a log interval they give the per-task loss as a
        # ratio of totals, also when a step draws no example of a task.
        rows = task_id == i
        metrics[f"task_nll/{name}"] = jnp.where(rows, per_example, 0.0).sum()
        metrics[f"task_tokens/{name}"] = jnp.where(rows, per_count, 0.0).sum()
    if self.item_head is not None:
      targets = jnp.take_along_axis(jnp.asarray(batch[transforms.TARGETS_ITEM], jnp.int32),
                                    jnp.asarray(batch[transforms.LAST_INDEX],
                                                jnp.int32)[:, None], axis=1)[:, 0]
      rows = example_mask
      if TASK_ID in batch:
        rows = rows & (jnp.asarray(batch[TASK_ID]) == prompts.TASKS.index(prompts.NEXT_ITEM))
      item_nll, item_count = item_head_lib.item_loss(
          self._item_scores(batch, hidden, encoded), targets, rows)
      loss = loss + self.cfg.item_loss_weight * item_nll
      metrics.update(item_loss=item_nll, item_examples=item_count)
    metrics.update(self.gate_values())
    # The scale the LLM reads the user at, beside the scale of its own token inputs.
    mean_square = masked_mean(jnp.mean(jnp.square(context.astype(jnp.float32)), axis=-1),
                              context_mask)
    metrics.update(context_rms=jnp.sqrt(mean_square), token_embed_rms=self.token_embed_rms())
    return loss, metrics


def build_user_llm(cfg: UserLlmConfig, encoder_cfg: EncoderConfig, llm_cfg: LlmConfig, *,
                   rngs: nnx.Rngs) -> UserLLM:
  """A randomly initialised User-LLM (use `nnx.eval_shape` on it for an abstract one).

  Pretrained weights are loaded afterwards with `nnx.update(model.encoder, ...)` /
  `nnx.update(model.llm, ...)`, or by passing pretrained modules to `UserLLM` directly.
  """
  check_compatible(cfg, encoder_cfg.width)  # before the (slow) initialisation
  return UserLLM(cfg, encoder=UserEncoder(encoder_cfg, rngs=rngs),
                 llm=Decoder(llm_cfg, rngs=rngs), rngs=rngs)
