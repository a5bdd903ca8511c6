"""Architecture hyperparameters of the user encoder (frozen; presets below)."""

from __future__ import annotations

import dataclasses
import jax.numpy as jnp
from jax.typing import DTypeLike

from user_llm_jax import layer_scan
from user_llm_jax.data import schema
from user_llm_jax.data import transforms

FUSIONS = ("early", "late")
NORM_POSITIONS = ("pre", "post")
ITEM_LOSSES = ("softmax", "sampled_softmax", "gbce")
# How the sampled losses draw negatives: once per training step, or for every position.
NEGATIVES_PER = ("step", "position")


@dataclasses.dataclass(frozen=True)
class EncoderConfig:
  """User encoder: multimodal event embeddings -> causal transformer -> per-event states.

  Attributes:
    num_items: item vocabulary size, including the reserved PAD and OOV ids.
    num_ratings: rating-token vocabulary size, including PAD and OOV.
    num_categories: category vocabulary size, including PAD and OOV.
    num_time_buckets: vocabulary of the `inputs_time` gap buckets (see data/transforms).
    max_len: event positions E (the paper's window, 50).
    max_categories: category slots per event C in the input examples.
    num_layers: transformer blocks (early fusion) / per-feature blocks (late fusion).
    width: model width D.
    num_heads: attention heads N; `width` must be divisible by it.
    mlp_dim: feed-forward hidden width F.
    dropout: dropout rate on embeddings and residual branches during training.
    attention_dropout: dropout rate on the attention weights (the softmax over keys)
      during training, as SASRec and BERT have it (RecBole's `attn_dropout_prob`); 0
      (default): none.
    input_norm: LayerNorm the fused event embeddings plus positions before the first
      block (as SASRec and BERT4Rec do). Without it the small-initialised embeddings
      (std 0.02) enter a residual stream that the blocks' unit-scale outputs swamp, and
      the item identity reaches the head only weakly early in training.
    norm_position: 'pre' (default): Pre-LN blocks, x + f(LN(x)), and a final LayerNorm
      on the encoder's output. 'post': Post-LN blocks, LN(x + f(x)), as SASRec and BERT
      (and RecBole's SASRec) have them; the last block's output is already normalised,
      so no final LayerNorm is applied.
    init_std: 0 (default): LeCun-normal kernels; > 0: every kernel normal(init_std), as
      BERT and SASRec (0.02). Small kernels make every block start near the identity, so
      the (normalised) item embedding reaches the tied head intact and the model starts
      as an item-to-item similarity that the blocks then refine.
    fusion: 'early' (concatenate per-event feature embeddings, project to D, one
      transformer) or 'late' (one transformer per feature, outputs concatenated and
      projected to D), the two variants compared in the paper.
    late_fusion_layers: blocks of each per-feature transformer in late fusion (0: use
      `num_layers`).
    feature_dim: width of each feature's embedding table.
    use_time: embed the time-gap feature as an event feature.
    use_rating: embed the rating as an event feature (False: the rating is not read;
      its prediction loss still follows `rating_loss_weight`).
    use_categories: embed the categories (genres) as an event feature (False: not read).
    tie_item_head: score items by a dot product with the item embedding table (after a
      D -> feature_dim projection) instead of a separate D x num_items matrix.
    item_bias: the tied head adds a learned per-item bias (False: scores are dot products
      only, as gSASRec's; a binary loss can otherwise fit popularity with the biases
      alone). Tied head only.
    repeat_bias: add one learned scalar to the next-item score of every item already in
      the input window (the events the position has read), as repeat-aware recommenders
      model a return to an item (RepeatNet's repeat/explore split, reduced to its prior).
      The model learns from its training targets how often users come back to an item:
      on MovieLens, where nobody rates a movie twice, the scalar goes negative; where
      repeats are common, positive. Only the input window counts (never the history
      beyond it); evaluation ranks every item, the protocol is unchanged. Full softmax,
      unchunked only.
    item_loss: the next-item loss in training (`ITEM_LOSSES`). 'softmax': cross-entropy
      over the whole catalogue. 'sampled_softmax': cross-entropy over the target and
      `item_negatives` sampled items. 'gbce': gSASRec's generalised binary cross-entropy
      (Petrov & Macdonald, RecSys 2023) over the target and the sampled items, calibrated
      by `gbce_t`. The sampled losses score only the sampled items ([positions, K]
      logits instead of [positions, num_items]); their `item_accuracy` is the fraction of
      positions whose target outscores every sampled negative. Evaluation
      (`deterministic=True`) samples nothing and reports the full softmax.
    item_negatives: K, the negatives of the sampled losses: drawn uniformly, with
      replacement, from the real catalogue (see `negatives_per`).
    negatives_per: 'step' (default): one draw of K negatives per training step, shared by
      every position of the batch (one [positions, D] x [D, K] matmul). 'position': a
      draw of K per position, as gSASRec samples them ([positions, K, D] gathered item
      vectors): each step then pushes down positions x K items, not K.
    gbce_t: gBCE's calibration parameter t in [0, 1]: 0 is plain binary cross-entropy,
      1 fully corrects the overconfidence that negative sampling causes.
    item_loss_chunk: positions per chunk of the next-item softmax (0: all at once).
      Chunking keeps only [chunk, num_items] logits live (forward and backward), for
      catalogues of 10^5+ items; the loss is the same. 'softmax' only.
    loss_min_context: 0 (default): every valid position is trained. k > 0: a training
      position is trained (every loss) only when its input context is complete up to
      k events: it reads at least k events of the example (position index >= k - 1),
      or the example starts at the user's first event, so that the position reads the
      user's whole history. Evaluation always reads up to `max_len` events; a random
      window's early positions read only the few events since the window's start,
      contexts that evaluation never sees (SASRec as RecBole trains it scores each
      target with its full history, up to `max_len` events, and only there). Reads
      `transforms.CONTEXT_OFFSET` (random training windows, `data.train_windows=random`).
      Deterministic evaluation losses are unaffected.
    item_loss_weight: weight of the next-item loss.
    rating_loss_weight: weight of the next-rating softmax cross-entropy.
    category_loss_weight: weight of the next-categories sigmoid (multi-label) loss.
    layer_norm_eps: epsilon of every LayerNorm.
    dtype: compute dtype of activations (logits and losses are float32).
    param_dtype: storage dtype of parameters.
    scan_layers: hold each transformer's blocks stacked and run them by one scan
      (same results, one compiled block; see `user_llm_jax.layer_scan`).
    remat_policy: what each block keeps for the backward pass
      (`layer_scan.REMAT_POLICIES`: 'none', 'full', 'dots', 'dots_no_batch').
  """

  num_items: int
  num_ratings: int
  num_categories: int
  num_time_buckets: int = transforms.NUM_TIME_BUCKETS
  max_len: int = 50
  max_categories: int = 10
  num_layers: int = 6
  width: int = 128
  num_heads: int = 4
  mlp_dim: int = 512
  dropout: float = 0.1
  attention_dropout: float = 0.0
  input_norm: bool = False
  norm_position: str = "pre"
  init_std: float = 0.0
  fusion: str = "early"
  late_fusion_layers: int = 0
  feature_dim: int = 64
  use_time: bool = True
  use_rating: bool = True
  use_categories: bool = True
  tie_item_head: bool = True
  item_bias: bool = True
  repeat_bias: bool = False
  item_loss: str = "softmax"
  item_negatives: int = 256
  negatives_per: str = "step"
  gbce_t: float = 0.75
  item_loss_chunk: int = 0
  loss_min_context: int = 0
  item_loss_weight: float = 1.0
  rating_loss_weight: float = 0.5
  category_loss_weight: float = 0.5
  layer_norm_eps: float = 1e-6
  dtype: DTypeLike = jnp.float32
  param_dtype: DTypeLike = jnp.float32
  scan_layers: bool = False
  remat_policy: str = "none"

  def __post_init__(self):
    for name in ("num_items", "num_ratings", "num_categories", "num_time_buckets"):
      value = getattr(self, name)
      # A dataset without categories (e.g. reviews without metadata) has only the reserved
      # ids: fine when categories are neither read nor predicted.
      unused = name == "num_categories" and not self.reads_or_predicts_categories
      min_vocab = schema.FIRST_ID + (0 if unused else 1)
      if not isinstance(value, int) or value < min_vocab:
        raise ValueError(f"EncoderConfig.{name}={value!r}: must be an int >= {min_vocab} "
                         f"(the {schema.FIRST_ID} reserved ids PAD/OOV plus at least one "
                         "real value)" + ("" if unused or name != "num_categories" else
                                          "; a dataset without categories needs "
                                          "use_categories=False, category_loss_weight=0"))
    for name in ("max_len", "max_categories", "num_layers", "width", "num_heads",
                 "mlp_dim", "feature_dim"):
      value = getattr(self, name)
      if not isinstance(value, int) or value < 1:
        raise ValueError(f"EncoderConfig.{name}={value!r}: must be a positive int")
    if self.width % self.num_heads:
      raise ValueError(f"EncoderConfig.width={self.width} is not divisible by "
                       f"num_heads={self.num_heads}")
    if not 0.0 <= self.dropout < 1.0:
      raise ValueError(f"EncoderConfig.dropout={self.dropout}: must be in [0, 1)")
    if not 0.0 <= self.attention_dropout < 1.0:
      raise ValueError(f"EncoderConfig.attention_dropout={self.attention_dropout}: must be "
                       "in [0, 1)")
    if not self.item_bias and not self.tie_item_head:
      raise ValueError("EncoderConfig.item_bias=False needs tie_item_head=True (the "
                       "separate head is a dense layer with its own bias)")
    if self.norm_position not in NORM_POSITIONS:
      raise ValueError(f"EncoderConfig.norm_position={self.norm_position!r}: must be one of "
                       f"{NORM_POSITIONS}")
    if self.fusion not in FUSIONS:
      raise ValueError(f"EncoderConfig.fusion={self.fusion!r}: must be one of {FUSIONS}")
    if not 0.0 <= self.init_std < 1.0:
      raise ValueError(f"EncoderConfig.init_std={self.init_std}: must be in [0, 1) "
                       "(0: LeCun normal)")
    if (isinstance(self.loss_min_context, bool) or not isinstance(self.loss_min_context, int)
        or not 0 <= self.loss_min_context <= self.max_len):
      raise ValueError(f"EncoderConfig.loss_min_context={self.loss_min_context!r}: must be "
                       f"an int in [0, max_len={self.max_len}]")
    if self.item_loss_chunk < 0:
      raise ValueError(f"EncoderConfig.item_loss_chunk={self.item_loss_chunk}: must be >= 0")
    self._check_item_loss()
    if self.late_fusion_layers < 0:
      raise ValueError(f"EncoderConfig.late_fusion_layers={self.late_fusion_layers}: "
                       "must be >= 0")
    layer_scan.check_remat_policy(self.remat_policy, "EncoderConfig.remat_policy")
    weights = (self.item_loss_weight, self.rating_loss_weight, self.category_loss_weight)
    if min(weights) < 0 or sum(weights) <= 0:
      raise ValueError(f"EncoderConfig loss weights (item, rating, category)={weights}: "
                       "must be >= 0 with a positive sum")

  def _check_item_loss(self) -> None:
    if self.item_loss not in ITEM_LOSSES:
      raise ValueError(f"EncoderConfig.item_loss={self.item_loss!r}: must be one of "
                       f"{ITEM_LOSSES}")
    if (isinstance(self.gbce_t, bool) or not isinstance(self.gbce_t, (int, float))
        or not 0.0 <= self.gbce_t <= 1.0):
      raise ValueError(f"EncoderConfig.gbce_t={self.gbce_t!r}: must be a number in [0, 1]")
    if self.negatives_per not in NEGATIVES_PER:
      raise ValueError(f"EncoderConfig.negatives_per={self.negatives_per!r}: must be one of "
                       f"{NEGATIVES_PER}")
    if self.repeat_bias and (self.item_loss != "softmax" or self.item_loss_chunk):
      raise ValueError(f"EncoderConfig.repeat_bias=True: supported with the unchunked full "
                       f"softmax only (item_loss='softmax', item_loss_chunk=0); got "
                       f"item_loss={self.item_loss!r}, item_loss_chunk={self.item_loss_chunk}")
    if self.item_loss == "softmax":
      return
    if (isinstance(self.item_negatives, bool) or not isinstance(self.item_negatives, int)
        or self.item_negatives < 1):
      raise ValueError(f"EncoderConfig.item_negatives={self.item_negatives!r}: must be an "
                       f"int >= 1 with item_loss={self.item_loss!r}")
    if self.item_loss_chunk:
      raise ValueError(f"EncoderConfig.item_loss_chunk={self.item_loss_chunk}: chunks the "
                       f"full softmax only; must be 0 with item_loss={self.item_loss!r} "
                       "(which never builds the [positions, num_items] logits)")
    if self.num_items - schema.FIRST_ID < 2:
      raise ValueError(f"EncoderConfig.num_items={self.num_items}: item_loss="
                       f"{self.item_loss!r} needs at least 2 real items (a target and a "
                       "negative)")

  @property
  def reads_or_predicts_categories(self) -> bool:
    return self.use_categories or self.category_loss_weight > 0

  @property
  def head_dim(self) -> int:
    return self.width // self.num_heads

  @property
  def num_features(self) -> int:
    """Event features embedded: item, then rating, categories and time when used."""
    return 1 + int(self.use_rating) + int(self.use_categories) + int(self.use_time)

  @property
  def feature_layers(self) -> int:
    """Blocks of each per-feature transformer in late fusion."""
    return self.late_fusion_layers or self.num_layers

  def replace(self, **kwargs) -> "EncoderConfig":
    return dataclasses.replace(self, **kwargs)


# MovieLens ml-latest-small sizes: ~9.7k movies, 10 half-star ratings, 20 genres (+2 reserved
# ids each). Real runs replace the vocabulary sizes from the prepared dataset's vocabulary.
ENCODER_PAPER = EncoderConfig(
    num_items=9744, num_ratings=12, num_categories=22, max_len=50, num_layers=6,
    width=128, num_heads=4, mlp_dim=512, feature_dim=64)

ENCODER_TINY = EncoderConfig(
    num_items=40, num_ratings=7, num_categories=8, max_len=8, max_categories=3,
    num_layers=2, width=32, num_heads=2, mlp_dim=64, feature_dim=16, dropout=0.0)
