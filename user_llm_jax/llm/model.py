"""Llama-family decoder in Flax NNX with an explicit KV cache and insertion points.

The decoder is shared by the sampler (KV cache in, cache out), the User-LLM bridges
(cross-attention blocks in `Decoder.cross_attention`, soft prompts via `inputs_embeds`)
and the checkpoint importers. Parameter names (`params.param_path`, used by the
importers/exporters):

  embedder/embedding              [V,D]   ('vocab', 'embed')
  layers/{i}/attn_norm/scale      [D]
  layers/{i}/attn/{q,k,v}/kernel  [D,N|K,H]
  layers/{i}/attn/o/kernel        [N,H,D]
  layers/{i}/mlp_norm/scale       [D]
  layers/{i}/mlp/{gate,up}/kernel [D,F]
  layers/{i}/mlp/down/kernel      [F,D]
  final_norm/scale                [D]
  lm_head/kernel                  [D,V]   (only when the head is untied)

and, by `LlmConfig` switches (Qwen, Gemma): layers/{i}/attn/{q,k,v}/bias [N|K,H],
layers/{i}/attn/{q,k}_norm/scale [H], layers/{i}/{attn,mlp}/post_norm/scale [D].

With `scan_layers=True` the layers are held stacked (`layers/attn/q/kernel` [L,D,N,H], see
`user_llm_jax.layer_scan`) and run as one scan per stretch of layers between
cross-attention blocks, so a deep decoder is traced and compiled once per stretch instead
of once per layer. `decoder_params` and `decoder_from_params` speak the per-layer names
above in both forms, so checkpoint import and export do not depend on the choice.
"""

from __future__ import annotations

import functools

import flax
import numpy as np
import jax
import jax.numpy as jnp
from flax import nnx

from user_llm_jax import layer_scan
from user_llm_jax import nn
from user_llm_jax import params as params_lib
from user_llm_jax import sharding
from user_llm_jax.llm.config import LlmConfig
from user_llm_jax.llm.layers import Attention, Einsum, Mlp, RMSNorm
from user_llm_jax.sharding import partitioned

_ACT = sharding.ACT_BTD  # the residual stream [B,T,D]
# Cached cross-attention keys/values [B,E,N,H]: E user embeddings laid out like positions.
_CONTEXT_KV = sharding.ACT_BENH


@flax.struct.dataclass
class KVCache:
  """Keys/values of every layer, stacked on a leading layer axis.

  Attributes:
    k: [L,B,S,K,H] keys (RoPE already applied).
    v: [L,B,S,K,H] values.
    end_index: int32 scalar, number of filled slots (the same for all rows; left-padded
      prompts mark their padding slots through the attention mask).
  """
  k: jax.Array
  v: jax.Array
  end_index: jax.Array

  @property
  def max_length(self) -> int:
    return self.k.shape[2]


@flax.struct.dataclass
class CrossContext:
  """User context of the cross-attention blocks, projected once per prompt.

  Every block's keys/values depend on the context alone, so decoding computes them once
  at prefill (`Decoder.precompute_context`) and every generated token (and every beam)
  reuses them instead of re-applying the context LayerNorm and K/V projections.

  Attributes:
    k: {block key: [B,E,N,H] keys} for the blocks that expose `context_kv`.
    v: {block key: [B,E,N,H] values}, same keys as `k`.
    mask: [B,E] bool, True for real (non-padding) user embeddings.
    raw: [B,E,C] the raw context, kept only for blocks without `context_kv` (which are
      called with it as before); None otherwise.
    copy: for a decoder with a `copy_head`, its memory: {'keys': [B,S,D] the slots'
      keys, 'ids': int[B,S] their tokens, 'mask': [B,S] bool}; None otherwise.
  """
  k: dict[str, jax.Array]
  v: dict[str, jax.Array]
  mask: jax.Array
  raw: jax.Array | None = None
  copy: dict[str, jax.Array] | None = None

  def take(self, rows: jax.Array) -> "CrossContext":
    """Rows [N] of every tensor (all have the batch on axis 0): beams, tiling."""
    return jax.tree.map(lambda x: x[rows], self)


class Embedder(nnx.Module):
  """Token embedding table [V,D]; also the output head when embeddings are tied."""

  def __init__(self, cfg: LlmConfig, *, rngs: nnx.Rngs):
    self.dtype = cfg.compute_dtype
    init = partitioned(nnx.initializers.normal(stddev=1.0), ("vocab", "embed"))
    self.embedding = nnx.Param(init(rngs.params(), (cfg.vocab_size, cfg.width),
                                    cfg.storage_dtype))

  def encode(self, tokens: jax.Array) -> jax.Array:
    return jnp.take(self.embedding[...], tokens, axis=0).astype(self.dtype)  # [B,T,D]

  def decode(self, x: jax.Array) -> jax.Array:
    return jnp.einsum("BTD,VD->BTV", x, self.embedding[...].astype(self.dtype))


class DecoderLayer(nnx.Module):
  """Pre-norm residual block: x + attn(norm(x)); x + mlp(norm(x))."""

  def __init__(self, cfg: LlmConfig, *, rngs: nnx.Rngs):
    kw = dict(eps=cfg.norm_eps, offset=cfg.norm_scale_offset, dtype=cfg.compute_dtype,
              param_dtype=cfg.storage_dtype, rngs=rngs)
    self.attn_norm = RMSNorm(cfg.width, **kw)
    self.attn = Attention(cfg, rngs=rngs)
    self.mlp_norm = RMSNorm(cfg.width, **kw)
    self.mlp = Mlp(cfg, rngs=rngs)

  def __call__(self, x, positions, mask, kv=None, end_index=None, layer: int = 0):
    h, kv = self.attn(self.attn_norm(x), positions, mask, kv, end_index, layer)
    x = sharding.with_logical_constraint(x + h, _ACT)
    x = sharding.with_logical_constraint(x + self.mlp(self.mlp_norm(x)), _ACT)
    return x, kv


def causal_mask(batch: int, length: int, cache_length: int | None = None,
                end_index: jax.Array | int = 0) -> jax.Array:
  """[B,T,S] causal mask: query t (stored at slot end_index + t) sees slots <= its own."""
  s = length if cache_length is None else cache_length
  q_slot = jnp.arange(length)[:, None] + end_index  # [T,1]
  mask = jnp.arange(s)[None, :] <= q_slot            # [T,S]
  return jnp.broadcast_to(mask, (batch, length, s))


class Decoder(nnx.Module):
  """Llama-family decoder (token embedding, L x [RMSNorm, GQA+RoPE, RMSNorm, SwiGLU], head).

  Attributes:
    cfg: the architecture.
    layers: `nnx.List` of `DecoderLayer`s, or one `DecoderLayer` with stacked variables
      (`scanned`).
    remat_policy: what each layer keeps for the backward pass (`layer_scan.REMAT_POLICIES`).
    cross_attention: `nnx.Dict` of blocks `block(x [B,T,D], context [B,E,D],
      context_mask [B,E]) -> x [B,T,D]`; the block under key str(i) runs before decoder
      layer i (key str(num_layers) runs after the last layer, before the final norm).
      Called only when `context` is given. Empty by default. A block may also expose
      `context_kv(context) -> (k, v)` and accept `context_kv=(k, v)` in place of the
      context (`GatedCrossAttention` does); `precompute_context` then caches its k/v.
    copy_head: None, or a pointer head (`bridge.copy_head.CopyHead`) that mixes copies of
      memory tokens into the output distribution (`logits`); it reads its memory from a
      `CrossContext` built with `copy_slots`.
  """

  def __init__(self, cfg: LlmConfig, *, rngs: nnx.Rngs, scan_layers: bool = False,
               remat_policy: str = "none"):
    """Builds the decoder.

    Args:
      cfg: the architecture.
      rngs: random streams (`params`).
      scan_layers: hold the layers stacked and run them with one scan (the same
        initial values and results as unrolled layers).
      remat_policy: a `layer_scan.REMAT_POLICIES` name, applied to every layer.
    """
    self.cfg = cfg
    self.embedder = Embedder(cfg, rngs=rngs)
    layers = [DecoderLayer(cfg, rngs=rngs) for _ in range(cfg.num_layers)]
    self.layers = layer_scan.stack_modules(layers) if scan_layers else nnx.List(layers)
    self.remat_policy = layer_scan.check_remat_policy(remat_policy)
    self.final_norm = RMSNorm(cfg.width, eps=cfg.norm_eps, offset=cfg.norm_scale_offset,
                              dtype=cfg.compute_dtype, param_dtype=cfg.storage_dtype, rngs=rngs)
    if not cfg.tie_embeddings:
      self.lm_head = Einsum("BTD,DV->BTV", (cfg.width, cfg.vocab_size), ("embed", "vocab"),
                            dtype=cfg.compute_dtype, param_dtype=cfg.storage_dtype, rngs=rngs)
    self.cross_attention = nnx.Dict()
    self.copy_head = nnx.data(None)

  @property
  def scanned(self) -> bool:
    """True when the layers are stacked and run by a scan."""
    return not isinstance(self.layers, nnx.List)

  def _run_layers(self, x: jax.Array, kv: tuple[jax.Array, jax.Array] | None,
                  positions: jax.Array, mask: jax.Array, end_index: jax.Array | None,
                  start: int, stop: int):
    """Layers [start, stop): unrolled, or one scan over that stretch of the stack."""
    if start == stop:
      return x, kv
    if self.scanned:
      def body(layer, carry, i):
        return layer(carry[0], positions, mask, carry[1], end_index, i)
      return layer_scan.scan(self.layers, body, (x, kv), remat_policy=self.remat_policy,
                             start=start, stop=stop)
    for i in range(start, stop):
      step = layer_scan.remat(
          lambda layer, h, c, i=i: layer(h, positions, mask, c, end_index, i),
          self.remat_policy)
      x, kv = step(self.layers[i], x, kv)
    return x, kv

  def init_cache(self, batch_size: int, max_length: int, dtype=None) -> KVCache:
    """An empty cache of `max_length` slots ([L,B,S,K,H], compute dtype by default)."""
    cfg = self.cfg
    shape = (cfg.num_layers, batch_size, max_length, cfg.num_kv_heads, cfg.head_dim)
    dtype = cfg.compute_dtype if dtype is None else dtype
    return KVCache(k=jnp.zeros(shape, dtype), v=jnp.zeros(shape, dtype),
                   end_index=jnp.zeros((), jnp.int32))

  def precompute_context(self, context: jax.Array,
                         context_mask: jax.Array | None = None, *,
                         copy_slots: tuple[jax.Array, jax.Array, jax.Array] | None = None,
                         ) -> CrossContext:
    """Projects the user context once for every cross-attention block.

    Args:
      context: [B,E,C] user embeddings.
      context_mask: [B,E] bool (None: all valid).
      copy_slots: (slots [B,S,D], token ids int[B,S], mask [B,S]) the memory the
        `copy_head` copies from; needed when the decoder has one.

    Returns:
      A `CrossContext` that `__call__` accepts as `context` with the same results as the
      raw arrays, without recomputing the keys/values.
    """
    if context_mask is None:
      context_mask = jnp.ones(context.shape[:2], jnp.bool_)
    if context_mask.shape != context.shape[:2]:
      raise ValueError(f"context_mask shape {context_mask.shape} != context (B, E) "
                       f"{context.shape[:2]}")
    ks, vs, raw = {}, {}, None
    for key, block in self.cross_attention.items():
      if hasattr(block, "context_kv"):
        k, v = block.context_kv(context)  # [B,E,N,H] each
        ks[key] = sharding.with_logical_constraint(k, _CONTEXT_KV)
        vs[key] = sharding.with_logical_constraint(v, _CONTEXT_KV)
      else:
        raw = context
    mask = sharding.with_logical_constraint(context_mask.astype(jnp.bool_), sharding.ACT_BE)
    copy = None
    if self.copy_head is not None:
      if copy_slots is None:
        raise ValueError("this decoder has a copy head: precompute_context needs copy_slots "
                         "(memory slots, their token ids and mask)")
      slots, ids, slot_mask = copy_slots
      copy = dict(keys=self.copy_head.slot_keys(slots), ids=jnp.asarray(ids, jnp.int32),
                  mask=jnp.asarray(slot_mask, bool))
    return CrossContext(k=ks, v=vs, mask=mask, raw=raw, copy=copy)

  def _cross(self, key: str, x: jax.Array, context: jax.Array | CrossContext,
             context_mask: jax.Array) -> jax.Array:
    """Runs block `key` on raw context arrays or on a `CrossContext`."""
    block = self.cross_attention[key]
    if not isinstance(context, CrossContext):
      return block(x, context, context_mask)
    if key in context.k:
      return block(x, None, context.mask, context_kv=(context.k[key], context.v[key]))
    if context.raw is None:
      raise ValueError(f"CrossContext holds no keys/values for cross-attention block {key!r} "
                       "(built for a different decoder?)")
    return block(x, context.raw, context.mask)

  def embed(self, tokens: jax.Array) -> jax.Array:
    """Token embeddings [B,T] -> [B,T,D] (times sqrt(D) for Gemma; Llama does not scale)."""
    x = self.embedder.encode(tokens)
    if self.cfg.scale_embeddings:  # the factor rounded to the compute dtype, as in HF
      x = x * jnp.asarray(self.cfg.width ** 0.5, x.dtype)
    return x

  def head(self, x: jax.Array) -> jax.Array:
    """Final-normed hidden states [B,T,D] -> float32 logits [B,T,V]."""
    logits = self.embedder.decode(x) if self.cfg.tie_embeddings else self.lm_head(x)
    logits = nn.soft_cap(logits.astype(jnp.float32), self.cfg.final_logit_softcap)
    return sharding.with_logical_constraint(logits, sharding.ACT_BTV)

  def output(self, hidden: jax.Array, tokens: jax.Array | None,
             context: jax.Array | CrossContext | None) -> jax.Array:
    """Final-normed hidden states [B,T,D] -> float32 logits [B,T,V]: the head's, mixed
    with the copy head's copies when the decoder has one and a context is given (then
    log-probabilities, which every sampler and scorer reads as logits).

    Args:
      hidden: [B,T,D] final-normed states.
      tokens: [B,T] the tokens read at those positions (the copy head's queries).
      context: the cross-attention context of the call (None: no user, no copies).
    """
    logits = self.head(hidden)
    if self.copy_head is None or context is None:
      return logits
    if not isinstance(context, CrossContext) or context.copy is None:
      raise ValueError("this decoder has a copy head: pass its context as a CrossContext "
                       "built by precompute_context(..., copy_slots=...)")
    if tokens is None:
      raise ValueError("the copy head reads the input tokens; soft prompts have none")
    token_embeds = self.embed(jnp.take(self.copy_head.lowercase[...], tokens, axis=0))
    return self.copy_head(logits, hidden, token_embeds, context.copy["keys"],
                          context.copy["ids"], context.copy["mask"])

  def __call__(self, tokens: jax.Array | None, *, positions: jax.Array,
               attention_mask: jax.Array | None = None,
               cache: KVCache | None = None,
               inputs_embeds: jax.Array | None = None,
               context: jax.Array | CrossContext | None = None,
               context_mask: jax.Array | None = None,
               return_hidden: bool = False,
               ) -> tuple[jax.Array, KVCache | None]:
    """Runs the decoder.

    Args:
      tokens: [B,T] int token ids (ignored when `inputs_embeds` is given; may be None).
      positions: [B,T] int32 RoPE positions.
      attention_mask: [B,T,S] bool, True where query t may attend to key slot s
        (S = T without a cache, the cache length with one). None -> causal.
      cache: KV cache; the new keys/values are written at [end_index, end_index + T).
      inputs_embeds: [B,T,D] embeddings used instead of `embed(tokens)` (soft prompts).
      context: [B,E,D] user embeddings read by the cross-attention blocks, or their
        `precompute_context` (decoding: projected once, reused at every step).
      context_mask: [B,E] bool, True for real (non-padding) user embeddings (ignored for
        a `CrossContext`, which carries its own mask).
      return_hidden: return the final-normed hidden states [B,T,D] in place of the
        logits (for chunked losses or scoring without materialising [B,T,V]).

    Returns:
      (logits [B,T,V] float32 -- or hidden [B,T,D] --, updated cache or None).
    """
    if inputs_embeds is not None:
      x = inputs_embeds.astype(self.cfg.compute_dtype)
    elif tokens is not None:
      x = self.embed(tokens)
    else:
      raise ValueError("Decoder needs `tokens` or `inputs_embeds`")
    b, t, _ = x.shape
    if positions.shape != (b, t):
      raise ValueError(f"positions shape {positions.shape} != (batch, length) {(b, t)}")
    x = sharding.with_logical_constraint(x, _ACT)
    end_index = cache.end_index if cache is not None else None
    if attention_mask is None:
      attention_mask = causal_mask(b, t, None if cache is None else cache.max_length,
                                   0 if cache is None else cache.end_index)
    expected_s = t if cache is None else cache.max_length
    if attention_mask.shape != (b, t, expected_s):
      raise ValueError(f"attention_mask shape {attention_mask.shape} != (B, T, S) "
                       f"{(b, t, expected_s)}")
    if isinstance(context, CrossContext):
      if context.mask.shape[0] != b:
        raise ValueError(f"CrossContext batch {context.mask.shape[0]} != text batch {b}")
      context_mask = context.mask
    elif context is not None and context_mask is None:
      context_mask = jnp.ones(context.shape[:2], jnp.bool_)

    kv = (cache.k, cache.v) if cache is not None else None
    num_layers = self.cfg.num_layers
    # Cross-attention blocks split the layers into stretches run back to back (each one
    # scan when the layers are stacked); block key str(L) runs after the last layer.
    blocks = sorted(int(k) for k in self.cross_attention) if context is not None else []
    start = 0
    for block in blocks:
      x, kv = self._run_layers(x, kv, positions, attention_mask, end_index, start, block)
      x = self._cross(str(block), x, context, context_mask)
      if block < num_layers:
        x = sharding.with_logical_constraint(x, _ACT)
      start = block
    x, kv = self._run_layers(x, kv, positions, attention_mask, end_index, start, num_layers)
    x = self.final_norm(x)

    new_cache = None
    if cache is not None:
      new_cache = KVCache(k=kv[0], v=kv[1], end_index=cache.end_index + t)
    if return_hidden:
      return x, new_cache
    return self.output(x, tokens if inputs_embeds is None else None, context), new_cache




def create_sharded(cfg: LlmConfig, mesh: jax.sharding.Mesh, seed: int = 0,
                   rules: sharding.Rules | None = None, **layout) -> Decoder:
  """Initialises a `Decoder` directly on `mesh` (params never materialise unsharded).

  `rules`: logical-axis rules; None reads the active ones (`sharding.axis_rules`).
  `layout`: `scan_layers` / `remat_policy` of the `Decoder`.
  """
  abstract = nnx.eval_shape(lambda: Decoder(cfg, rngs=nnx.Rngs(seed), **layout))
  graphdef, _ = nnx.split(abstract)
  shardings = sharding.model_shardings(abstract, mesh, rules)

  @functools.partial(jax.jit, out_shardings=shardings)
  def init():
    return nnx.state(Decoder(cfg, rngs=nnx.Rngs(seed), **layout))

  with jax.set_mesh(mesh):
    state = init()
  return nnx.merge(graphdef, state)


def set_layer_scan(model: Decoder, scan_layers: bool,
                   remat_policy: str | None = None) -> Decoder:
  """Converts `model`'s layers in place to stacked (scanned) or unrolled form.

  The results do not change. On a mesh, re-place the model afterwards
  (`sharding.shard_model`): the stacked arrays are new.

  Args:
    model: a `Decoder` (with or without LoRA adapters on every layer).
    scan_layers: the form wanted.
    remat_policy: a new `layer_scan.REMAT_POLICIES` name (None: keep the current one).

  Returns:
    `model`, for chaining.
  """
  if scan_layers and not model.scanned:
    model.layers = layer_scan.stack_modules(list(model.layers))
  elif not scan_layers and model.scanned:
    model.layers = nnx.List(layer_scan.unstack_module(model.layers))
  if remat_policy is not None:
    model.remat_policy = layer_scan.check_remat_policy(remat_policy)
  return model


def decoder_params(model: nnx.Module, wrt=nnx.Param) -> dict[str, jax.Array]:
  """Flat {parameter name ('layers/0/attn/q/kernel'): array} view of `model`.

  Per-layer names in both forms: unrolled layers' arrays are not copied, stacked ones are
  sliced per layer.
  """
  state = nnx.state(model, wrt)
  flat = {params_lib.param_path(p): v
          for p, v in jax.tree_util.tree_flatten_with_path(state)[0]}
  if getattr(model, "scanned", False):
    flat = layer_scan.unstack_params(flat, "layers")
  return flat


def decoder_from_params(cfg: LlmConfig, params: dict[str, np.ndarray | jax.Array], *,
                        source: str = "checkpoint", mesh: jax.sharding.Mesh | None = None,
                        rules: sharding.Rules | None = None, scan_layers: bool = False,
                        remat_policy: str = "none") -> Decoder:
  """Builds a `Decoder` whose parameters are `params` (named as by `decoder_params`).

  The per-layer tensors are stacked (on the host) when `scan_layers` asks for a scanned
  decoder, so every importer hands over the same per-layer names either way.

  No random initialisation happens (the structure comes from `nnx.eval_shape`), so
  importing a large checkpoint costs only the conversion itself. With `mesh`, each host
  array goes straight to its sharded placement (never whole onto one device), by `rules`
  (None: the active ones, `sharding.axis_rules`).

  Raises:
    ValueError: naming `source` and the tensor, if a parameter is missing, unexpected or
      of the wrong shape.
  """
  abstract = nnx.eval_shape(lambda: Decoder(cfg, rngs=nnx.Rngs(0), scan_layers=scan_layers,
                                            remat_policy=remat_policy))
  if scan_layers:
    params = layer_scan.stack_params(params, "layers", cfg.num_layers, source=source)
  graphdef, state = nnx.split(abstract)
  leaves, treedef = jax.tree_util.tree_flatten_with_path(state)
  placements = [None] * len(leaves)
  if mesh is not None:
    placements = jax.tree.leaves(sharding.model_shardings(abstract, mesh, rules))
  expected = {params_lib.param_path(p) for p, _ in leaves}
  unexpected = sorted(set(params) - expected)
  if unexpected:
    raise ValueError(f"{source}: unexpected parameters {unexpected[:5]} for this config")
  values = []
  for (path, leaf), placement in zip(leaves, placements, strict=True):
    key = params_lib.param_path(path)
    if key not in params:
      raise ValueError(f"{source}: parameter {key!r} (shape {tuple(leaf.shape)}) is missing")
    value = params[key]
    if tuple(value.shape) != tuple(leaf.shape):
      raise ValueError(f"{source}: parameter {key!r} has shape {tuple(value.shape)}, "
                       f"expected {tuple(leaf.shape)}")
    value = np.asarray(value, dtype=leaf.dtype) if not isinstance(value, jax.Array) else value
    values.append(jax.device_put(value, placement) if placement is not None
                  else jnp.asarray(value, dtype=leaf.dtype))
  return nnx.merge(graphdef, jax.tree_util.tree_unflatten(treedef, values))
