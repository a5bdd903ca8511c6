"""Scanned (stacked) layers compute what unrolled layers compute, and load / export alike.

Each test builds the same model twice from one seed, with unrolled layers (`nnx.List`) and
with stacked layers run by `nnx.scan`, and compares logits, losses, gradients, KV-cache
decoding, LoRA adapters, the User-LLM's cross-attention stretches and the encoder
(dropout on). Checkpoint import and export go through per-layer names in both forms.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from user_llm_jax import layer_scan
from user_llm_jax import sharding
from user_llm_jax.bridge import user_llm as ullm
from user_llm_jax.encoder import ENCODER_TINY, UserEncoder
from user_llm_jax.encoder.transformer import CausalTransformer
from user_llm_jax.llm import checkpoint, safetensors_io
from user_llm_jax.llm import sampler as sampler_lib
from user_llm_jax.llm.config import LLM_TINY
from user_llm_jax.llm.lora import LoraConfig, LoraParam, apply_lora, merge_lora
from user_llm_jax.llm.model import (Decoder, create_sharded, decoder_from_params,
                                    decoder_params, set_layer_scan)

B, T = 2, 10
TOKENS = jax.random.randint(jax.random.key(1), (B, T), 0, LLM_TINY.vocab_size)
POS = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
TOL = dict(rtol=1e-5, atol=1e-5)


def _loss(model):
  logits, _ = model(TOKENS[:, :-1], positions=POS[:, :-1])
  return optax.softmax_cross_entropy_with_integer_labels(logits, TOKENS[:, 1:]).mean()


@nnx.jit
def _logits(model):
  return model(TOKENS, positions=POS)[0]


@nnx.jit
def _loss_and_grads(model):
  return nnx.value_and_grad(_loss)(model)


def _flat(tree) -> dict[str, np.ndarray]:
  """{per-layer name: array} of a state or gradient tree (layer stacks unstacked)."""
  pure = layer_scan.unstack_tree(nnx.to_pure_dict(tree))
  return {"/".join(str(getattr(k, "key", k)) for k in path): np.asarray(v)
          for path, v in jax.tree_util.tree_flatten_with_path(pure)[0]}


def _assert_trees_close(a: dict, b: dict, **tol):
  assert sorted(a) == sorted(b)
  for key in a:
    np.testing.assert_allclose(a[key], b[key], err_msg=key, **(tol or TOL))


@pytest.fixture(scope="module")
def pair():
  return (Decoder(LLM_TINY, rngs=nnx.Rngs(0)),
          Decoder(LLM_TINY, rngs=nnx.Rngs(0), scan_layers=True))


def test_stacked_layers_hold_the_unrolled_initial_values(pair):
  unrolled, scanned = pair
  assert not unrolled.scanned and scanned.scanned
  kernel = scanned.layers.attn.q.kernel
  assert kernel.shape == (LLM_TINY.num_layers, LLM_TINY.width, LLM_TINY.num_heads,
                          LLM_TINY.head_dim)
  # The layer axis has no logical name: it is not sharded, the rest shard as before.
  assert kernel.get_metadata()["out_sharding"] == (None, "embed", "heads", "head_dim")
  a, b = decoder_params(unrolled), decoder_params(scanned)
  assert "layers/3/mlp/down/kernel" in b
  _assert_trees_close({k: np.asarray(v) for k, v in a.items()},
                      {k: np.asarray(v) for k, v in b.items()}, rtol=0, atol=0)


@pytest.mark.parametrize("remat", ["none", "full", "dots_no_batch"])
def test_train_forward_loss_and_gradients_match(pair, remat):
  unrolled, _ = pair
  scanned = Decoder(LLM_TINY, rngs=nnx.Rngs(0), scan_layers=True, remat_policy=remat)
  np.testing.assert_allclose(_logits(scanned), _logits(unrolled), **TOL)
  loss_u, grads_u = _loss_and_grads(unrolled)
  loss_s, grads_s = _loss_and_grads(scanned)
  np.testing.assert_allclose(loss_s, loss_u, **TOL)
  assert float(loss_u) > 1.0  # a real loss, not a degenerate zero
  _assert_trees_close(_flat(grads_u), _flat(grads_s))


def test_remat_on_unrolled_layers_keeps_the_gradients(pair):
  unrolled, _ = pair
  remat = Decoder(LLM_TINY, rngs=nnx.Rngs(0), remat_policy="full")
  _assert_trees_close(_flat(_loss_and_grads(unrolled)[1]), _flat(_loss_and_grads(remat)[1]))


def test_kv_cache_decoding_matches(pair):
  outputs = []
  for model in pair:
    sampler = sampler_lib.Sampler(model, pad_id=0, length_bucket=4)
    outputs.append(sampler([[5, 17, 99], [1, 2, 3, 4, 5, 6]], max_new_tokens=6,
                           return_logprobs=True))
  np.testing.assert_array_equal(outputs[0].tokens, outputs[1].tokens)
  np.testing.assert_allclose(outputs[0].log_probs, outputs[1].log_probs, **TOL)

  def prefill_and_step(model):
    tokens, mask = sampler_lib.left_pad([[5, 17, 99], [1, 2, 3, 4, 5, 6]], 0, 4)
    logits, state = sampler_lib.prefill(model, jnp.asarray(tokens), jnp.asarray(mask),
                                        cache_length=12)
    step_logits, state = sampler_lib.decode_step(model, jnp.argmax(logits, -1), state)
    return step_logits, state.cache

  (lu, cu), (ls, cs) = (nnx.jit(prefill_and_step)(m) for m in pair)
  np.testing.assert_allclose(ls, lu, **TOL)
  np.testing.assert_allclose(cs.k, cu.k, **TOL)
  np.testing.assert_allclose(cs.v, cu.v, **TOL)
  assert int(cs.end_index) == int(cu.end_index) == 9


def test_lora_adapters_logits_gradients_and_merge_match():
  lora = LoraConfig(rank=2, alpha=4.0, targets=("q", "v", "down"))
  models = [apply_lora(Decoder(LLM_TINY, rngs=nnx.Rngs(0), scan_layers=scan), lora,
                       rngs=nnx.Rngs(3)) for scan in (False, True)]
  assert models[1].scanned
  assert models[1].layers.attn.q.lora_a.shape == (LLM_TINY.num_layers, LLM_TINY.width, 2)
  for model in models:  # non-zero B so that the adapters act
    state = nnx.state(model, LoraParam)
    nnx.update(model, jax.tree.map(lambda v: v + 0.01, state))
  _assert_trees_close(_flat(nnx.state(models[0], LoraParam)),
                      _flat(nnx.state(models[1], LoraParam)), rtol=0, atol=0)
  np.testing.assert_allclose(_logits(models[1]), _logits(models[0]), **TOL)

  @nnx.jit
  def lora_grads(model):
    return nnx.grad(_loss, argnums=nnx.DiffState(0, LoraParam))(model)

  grads = [_flat(lora_grads(m)) for m in models]
  assert any("lora_a" in k for k in grads[0])
  _assert_trees_close(*grads)
  merged = [merge_lora(m) for m in models]
  assert merged[1].scanned
  np.testing.assert_allclose(_logits(merged[1]), _logits(merged[0]), **TOL)


def test_lora_on_some_layers_of_a_stack_is_refused():
  model = Decoder(LLM_TINY, rngs=nnx.Rngs(0), scan_layers=True)
  with pytest.raises(ValueError, match=r"LoraConfig.layers=\(1, 3\).*scan"):
    apply_lora(model, LoraConfig(rank=2, layers=(1, 3)), rngs=nnx.Rngs(1))
  with pytest.raises(ValueError, match="layer 1 differs in structure"):
    unrolled = apply_lora(Decoder(LLM_TINY, rngs=nnx.Rngs(0)),
                          LoraConfig(rank=2, layers=(1, 3)), rngs=nnx.Rngs(1))
    set_layer_scan(unrolled, True)


def test_converting_in_place_keeps_results(pair):
  unrolled, _ = pair
  model = Decoder(LLM_TINY, rngs=nnx.Rngs(0))
  expected = _logits(unrolled)
  set_layer_scan(model, True, remat_policy="full")
  assert model.scanned and model.remat_policy == "full"
  np.testing.assert_allclose(_logits(model), expected, **TOL)
  set_layer_scan(model, False)
  assert not model.scanned and len(model.layers) == LLM_TINY.num_layers
  np.testing.assert_allclose(_logits(model), expected, **TOL)


# -- checkpoint import / export -------------------------------------------------------------


def test_import_and_export_speak_per_layer_names(pair, tmp_path):
  unrolled, scanned = pair
  params = {k: np.asarray(v) for k, v in decoder_params(unrolled).items()}
  imported = decoder_from_params(LLM_TINY, params, scan_layers=True, source="x.safetensors")
  assert imported.scanned
  np.testing.assert_allclose(_logits(imported), _logits(unrolled), **TOL)
  hf_u, hf_s = safetensors_io.params_to_hf(unrolled), safetensors_io.params_to_hf(scanned)
  _assert_trees_close(hf_u, hf_s, rtol=0, atol=0)
  # A safetensors directory written from the scanned model loads as an unrolled one.
  safetensors_io.save_hf_dir(scanned, tmp_path / "hf")
  loaded = safetensors_io.load_hf_dir(tmp_path / "hf")
  assert not loaded.scanned
  np.testing.assert_allclose(_logits(loaded), _logits(unrolled), **TOL)
  # The Orbax LLM cache keeps the per-layer layout whichever form saved it.
  checkpoint.save_decoder(scanned, tmp_path / "orbax")
  restored = checkpoint.restore_decoder(tmp_path / "orbax")
  assert not restored.scanned
  np.testing.assert_allclose(_logits(restored), _logits(unrolled), **TOL)


def test_import_names_the_missing_or_misshaped_layer_tensor(pair):
  params = {k: np.asarray(v) for k, v in decoder_params(pair[0]).items()}
  missing = {k: v for k, v in params.items() if k != "layers/2/attn/k/kernel"}
  with pytest.raises(ValueError, match=r"ckpt: parameter layers/2/'?attn/k/kernel"):
    decoder_from_params(LLM_TINY, missing, scan_layers=True, source="ckpt")
  bad = dict(params, **{"layers/1/mlp/up/kernel": np.zeros((3, 3), np.float32)})
  with pytest.raises(ValueError, match=r"ckpt: parameter layers/<i>/mlp/up/kernel"):
    decoder_from_params(LLM_TINY, bad, scan_layers=True, source="ckpt")
  extra = dict(params, **{"layers/9/mlp/up/kernel": params["layers/0/mlp/up/kernel"]})
  with pytest.raises(ValueError, match=r"layers/9/mlp/up/kernel.*layer 9 out of range"):
    decoder_from_params(LLM_TINY, extra, scan_layers=True, source="ckpt")


def test_pure_dict_round_trip_for_orbax_trees(pair):
  _, scanned = pair
  pure = nnx.to_pure_dict(nnx.state(scanned, nnx.Param))
  flat = layer_scan.unstack_tree(pure, frozenset({"layers"}))
  assert sorted(flat["layers"]) == list(range(LLM_TINY.num_layers))
  unrolled_pure = nnx.to_pure_dict(nnx.state(pair[0], nnx.Param))
  assert jax.tree.structure(flat) == jax.tree.structure(unrolled_pure)
  back = layer_scan.stack_tree(flat, pure)
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(a, b), back, pure)


def test_scanned_decoder_shards_like_the_unrolled_one():
  mesh = sharding.make_mesh((2, 1, 4))
  with sharding.axis_rules(()):
    model = create_sharded(LLM_TINY, mesh, seed=0, scan_layers=True)
    spec = model.layers.attn.q.kernel[...].sharding.spec
    assert tuple(spec) == (None, "fsdp", "tensor", None)
    with jax.set_mesh(mesh):
      sharded = _logits(model)
  np.testing.assert_allclose(sharded, _logits(Decoder(LLM_TINY, rngs=nnx.Rngs(0))), **TOL)


# -- the User-LLM: cross-attention blocks between scanned stretches ----------------------------


def _user_batch(seed=0):
  rng = np.random.default_rng(seed)
  e = ENCODER_TINY.max_len
  mask = np.arange(e)[None] < np.array([[e], [3]])

  def ids(high, shape):
    m = mask.reshape(mask.shape + (1,) * (len(shape) - 2))
    return np.where(m, rng.integers(2, high, shape), 0).astype(np.int32)

  return {"inputs_item": ids(ENCODER_TINY.num_items, (B, e)),
          "inputs_rating": ids(ENCODER_TINY.num_ratings, (B, e)),
          "inputs_category": ids(ENCODER_TINY.num_categories, (B, e, 3)),
          "inputs_time": ids(ENCODER_TINY.num_time_buckets, (B, e)),
          "mask": mask}


def _user_llm(scan: bool, every: int, first: int):
  cfg = ullm.UserLlmConfig(mode="cross_attention", xattn_every=every, xattn_first=first)
  model = ullm.UserLLM(cfg, encoder=UserEncoder(ENCODER_TINY, rngs=nnx.Rngs(1)),
                       llm=Decoder(LLM_TINY, rngs=nnx.Rngs(0), scan_layers=scan),
                       rngs=nnx.Rngs(2))
  for blk in model.llm.cross_attention.values():  # open gates: the user changes the logits
    blk.attn_gate[...] = jnp.asarray(0.5)
    blk.mlp_gate[...] = jnp.asarray(0.5)
  return model


@pytest.mark.parametrize("every,first", [(2, 1), (3, 0)])
def test_user_llm_logits_gradients_and_decoding_match(every, first):
  models = [_user_llm(scan, every, first) for scan in (False, True)]
  user = _user_batch()
  batch = dict(user, tokens=np.asarray(TOKENS), loss_mask=np.ones((B, T), bool))

  @nnx.jit
  def logits_and_grads(model):
    def loss(m):
      return m.loss(batch)[0]
    return model(user, TOKENS), nnx.value_and_grad(loss)(model)

  (lu, (loss_u, gu)), (ls, (loss_s, gs)) = (logits_and_grads(m) for m in models)
  np.testing.assert_allclose(ls, lu, **TOL)
  np.testing.assert_allclose(loss_s, loss_u, **TOL)
  _assert_trees_close(_flat(gu), _flat(gs))
  gate_grad = [k for k in _flat(gu) if k.endswith("attn_gate")]
  assert gate_grad and all(np.abs(_flat(gu)[k]) > 0 for k in gate_grad)

  def generate(model):
    inputs = model.sampler_inputs(user, jnp.asarray([[5, 17, 99], [1, 2, 3]]))
    logits, state = sampler_lib.prefill(model.llm, inputs["tokens"], inputs["prompt_mask"],
                                        cache_length=8, context=inputs["context"],
                                        context_mask=inputs["context_mask"])
    step, _ = sampler_lib.decode_step(model.llm, jnp.argmax(logits, -1), state)
    return logits, step

  (pu, su), (ps, ss) = (nnx.jit(generate)(m) for m in models)
  np.testing.assert_allclose(ps, pu, **TOL)
  np.testing.assert_allclose(ss, su, **TOL)


# -- the user encoder -----------------------------------------------------------------------------


def test_encoder_stack_matches_with_dropout_on():
  cfg = ENCODER_TINY.replace(dropout=0.3, num_layers=3)
  models = [CausalTransformer(cfg.replace(scan_layers=scan, remat_policy=remat), 3,
                              rngs=nnx.Rngs(params=0, dropout=1))
            for scan, remat in ((False, "none"), (True, "none"), (True, "full"))]
  assert tuple(models[1].blocks.attn.q_dnh.shape[:1]) == (3,)
  x = jax.random.normal(jax.random.key(0), (2, cfg.max_len, cfg.width))
  mask = jnp.arange(cfg.max_len)[None] < jnp.array([[cfg.max_len], [5]])

  @nnx.jit
  def loss_and_grads(model):
    return nnx.value_and_grad(lambda m: jnp.mean(m(x, mask, deterministic=False) ** 2))(model)

  for _ in range(2):  # the second call draws new dropout masks, in step in every form
    results = [loss_and_grads(m) for m in models]
    losses = [float(r[0]) for r in results]
    np.testing.assert_allclose(losses[1:], [losses[0]] * 2, **TOL)
    grads = [_flat(nnx.state(r[1], nnx.Param)) for r in results]
    _assert_trees_close(grads[0], grads[1])
    _assert_trees_close(grads[0], grads[2])


def test_user_encoder_pretrain_loss_matches():
  rng = np.random.default_rng(0)
  batch = _user_batch()
  e = ENCODER_TINY.max_len
  batch.update(
      targets_item=rng.integers(2, ENCODER_TINY.num_items, (B, e)).astype(np.int32),
      targets_rating=rng.integers(2, ENCODER_TINY.num_ratings, (B, e)).astype(np.int32),
      targets_category=rng.integers(2, ENCODER_TINY.num_categories, (B, e, 3)).astype(
          np.int32))
  models = [UserEncoder(ENCODER_TINY.replace(scan_layers=scan), rngs=nnx.Rngs(0))
            for scan in (False, True)]

  @nnx.jit
  def loss_and_grads(model):
    return nnx.value_and_grad(lambda m: m.pretrain_loss(batch, deterministic=True)[0])(model)

  (lu, gu), (ls, gs) = (loss_and_grads(m) for m in models)
  np.testing.assert_allclose(ls, lu, **TOL)
  _assert_trees_close(_flat(nnx.state(gu, nnx.Param)), _flat(nnx.state(gs, nnx.Param)))


def test_remat_policy_is_checked():
  with pytest.raises(ValueError, match=r"EncoderConfig.remat_policy='most'.*expected one of"):
    ENCODER_TINY.replace(remat_policy="most")
  with pytest.raises(ValueError, match=r"remat_policy='most'"):
    Decoder(LLM_TINY, rngs=nnx.Rngs(0), remat_policy="most")


def test_train_checkpoints_resume_across_forms(tmp_path):
  from user_llm_jax.train import checkpointing  # pylint: disable=g-import-not-at-top
  scanned = Decoder(LLM_TINY, rngs=nnx.Rngs(0), scan_layers=True)
  opt = nnx.Optimizer(scanned, optax.adam(1e-2), wrt=nnx.Param)
  opt.update(scanned, _loss_and_grads(scanned)[1])
  saver = checkpointing.Checkpointer(str(tmp_path / "ckpt"), every=1)
  saver.save(1, nnx.state((scanned, opt)))
  saver.close()
  # A run resumed with unrolled layers gets the same parameters and Adam moments.
  unrolled = Decoder(LLM_TINY, rngs=nnx.Rngs(7))
  opt_u = nnx.Optimizer(unrolled, optax.adam(1e-2), wrt=nnx.Param)
  state = nnx.state((unrolled, opt_u))
  checkpointing.Checkpointer(str(tmp_path / "ckpt"), every=1).restore(state)
  nnx.update((unrolled, opt_u), state)
  np.testing.assert_allclose(_logits(unrolled), _logits(scanned), **TOL)
  _assert_trees_close(_flat(nnx.state(opt_u, nnx.OptState)),
                      _flat(nnx.state(opt, nnx.OptState)), rtol=0, atol=0)
  # And a scanned module loads the per-layer checkpoint's parameters alone.
  again = Decoder(LLM_TINY, rngs=nnx.Rngs(9), scan_layers=True)
  assert checkpointing.restore_params(again, str(tmp_path / "ckpt")) == 1
  assert again.scanned
  np.testing.assert_allclose(_logits(again), _logits(scanned), **TOL)
