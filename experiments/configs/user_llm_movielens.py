r"""User-LLM on MovieLens-format timelines: next item + favorite genre (and text baseline).

Trains User-LLM (`job=train_user_llm`) for any bridge mode / Perceiver / strategy /
encoder init; the same file drives the text-prompt baseline with `--config.job=text_baseline`.
The pretrained encoder comes from an encoder pretraining workdir on the same data
(experiments/configs/encoder_movielens.py, same data keys).

  # 1. pretrain the encoder (paper protocol, window 50; 2 x 64, 1,600 steps x 32) on
  #    ml-latest-small
  python -m experiments.main --config=experiments/configs/encoder_movielens.py:paper_small \
      --config.data.manual_dir=../shared/data/ml-latest-small --workdir=/tmp/ml_encoder
  # 2. User-LLM, cross-attention, Enc strategy, SmolLM2-135M-Instruct
  python -m experiments.main --config=experiments/configs/user_llm_movielens.py \
      --config.data.manual_dir=../shared/data/ml-latest-small \
      --config.encoder.workdir=/tmp/ml_encoder --workdir=/tmp/ml_user_llm
  # 3. the text-prompt baseline on the same examples
  python -m experiments.main --config=experiments/configs/user_llm_movielens.py \
      --config.job=text_baseline --config.data.manual_dir=../shared/data/ml-latest-small \
      --workdir=/tmp/ml_text

Variants: '' (CPU-sized: SmolLM2-135M, 300 steps x 8, the main job's bridge and task
settings), 'fav_only' (the same budget on favorite genre alone), 'smoke' (tiny random LLM and
random tiny encoder on ~150 synthetic users; seconds on a CPU), 'tpu' (paper scale:
Llama-3.2-1B in bfloat16 (`llm.preset` selects llama_3_2_3b or smollm2_1_7b), batch 64,
20k steps, mesh over all chips; `python -m experiments.compile_check
--config=experiments/configs/user_llm_movielens.py:tpu --topology=v5e-8` checks that it fits).
Ablations are overrides: --config.bridge.mode=soft_prompt, --config.bridge.use_perceiver=True,
--config.strategy=full|lora|enc|proj, --config.encoder.init=random (fresh weights in the
architecture of the pretraining run `encoder.workdir` names; with no workdir, in the one
`encoder.model` gives), --config.bridge.item_head_skip_frozen=False (the item head's skip read
from the encoder being trained, not from its frozen pretrained copy); an alignment stage
before the tasks: --config.align.steps=100 (--config.align.trainable, .events, ...).
"""

import ml_collections
from ml_collections import config_dict

from experiments.configs import common


def base_config() -> ml_collections.ConfigDict:
  """Every key of the User-LLM / text-baseline jobs (shared by the dataset configs)."""
  config = ml_collections.ConfigDict()
  config.job = "train_user_llm"
  config.name = "user_llm_movielens"
  config.seed = 0
  config.strategy = "enc"          # full | lora | enc | proj
  config.data = common.movielens_data_section(protocol="paper", window=50)

  config.encoder = ml_collections.ConfigDict()
  config.encoder.init = "pretrained"   # pretrained | random (ablation)
  # The encoder pretraining workdir: its weights and architecture (init=pretrained), or
  # its architecture alone with fresh weights (init=random: the like-for-like ablation).
  config.encoder.workdir = ""
  # The encoder architecture: used when init=random with no workdir (and by a pipeline's
  # pretraining stage); otherwise the pretraining run's saved architecture is used.
  config.encoder.model = common.encoder_model_section("paper")

  config.llm = ml_collections.ConfigDict()
  config.llm.source = "smollm2"    # smollm2 | random | path to .gguf / HF dir / Orbax dir
  config.llm.preset = "tiny"       # architecture when source=random
  config.llm.dtype = "float32"
  # Storage dtype of the LLM's weights: bfloat16 halves their HBM for a frozen LLM
  # (enc / proj strategies); trained weights want float32.
  config.llm.param_dtype = "float32"
  config.llm.cache_dir = ""        # Orbax cache of the imported LLM (skips GGUF dequant)
  config.llm.scan_layers = False    # stack the layers, run by one scan (same results)
  config.llm.remat_policy = "none"  # none | full | dots | dots_no_batch (per layer)

  config.bridge = ml_collections.ConfigDict()
  config.bridge.mode = "cross_attention"   # cross_attention | soft_prompt
  config.bridge.use_perceiver = False
  config.bridge.num_latents = 16
  config.bridge.perceiver_layers = 2
  config.bridge.perceiver_heads = 4
  config.bridge.projection_layers = 2
  config.bridge.projection_hidden = config_dict.placeholder(int)
  config.bridge.xattn_every = 5
  config.bridge.xattn_first = 0   # first decoder layer with a block (higher: cheaper steps)
  config.bridge.xattn_heads = config_dict.placeholder(int)
  config.bridge.xattn_mlp_dim = config_dict.placeholder(int)
  config.bridge.xattn_gate_init = 0.0
  config.bridge.item_head = False          # full-catalogue item scores from the LLM state
  config.bridge.item_head_dim = config_dict.placeholder(int)  # None: encoder feature_dim
  config.bridge.item_head_skip = False     # + the encoder's own head, the LLM's part from 0
  config.bridge.item_head_skip_frozen = False  # the skip reads the encoder as it started
  config.bridge.item_loss_weight = 1.0
  config.bridge.soft_prompt_norm = True    # soft prompt at the scale of the token embeddings
  config.bridge.pooled_context = False     # + one embedding: the states' mean over the events
  config.bridge.standardize_states = False # states centred / scaled by training statistics
  config.bridge.category_text = False      # + each event's category names, as LLM embeddings
  config.bridge.category_text_tokens = 8   # tokens kept of each name
  config.bridge.text_memory = False        # + those tokens as cross-attention slots
  config.bridge.copy_head = False          # + a pointer head copying those tokens
  config.bridge.copy_gate_init = -2.0      # its gate's start (sigmoid: share copied)
  config.bridge.dtype = "float32"
  config.bridge.param_dtype = "float32"

  config.lora = ml_collections.ConfigDict()
  config.lora.rank = 8
  config.lora.alpha = 16.0
  config.lora.targets = ("q", "v")

  config.tasks = ml_collections.ConfigDict()
  config.tasks.names = ("next_item", "favorite_category")
  config.tasks.max_prompt_tokens = 48   # User-LLM prompts are ~36 SmolLM2 tokens
  config.tasks.max_answer_tokens = 24
  config.tasks.review_field = "summary"
  config.tasks.next_item_titles = True  # False: next item by the item head alone
  # 'all': every event of a training record is a next-item / review target once per pass
  # (the favorite category keeps one example per record); 'last': each record's last.
  config.tasks.train_targets = "last"

  # The text-prompt baseline (job=text_baseline): same LLM, history as text.
  config.baseline = ml_collections.ConfigDict()
  config.baseline.strategy = "lora"    # zero_shot | lora | full
  config.baseline.history_tokens = 512
  # Answer length of the text prompt (None: tasks.max_answer_tokens); it writes whole titles.
  config.baseline.max_answer_tokens = config_dict.placeholder(int)
  config.baseline.tasks = ()           # the tasks it is trained / scored on (): tasks.names

  # Alignment stage before the tasks (LLaVA's stage 1): the LLM frozen, the named bridge
  # modules learn to write out the user's last `events` titles (free supervision from every
  # window). Off (steps=0) until it is measured to help.
  config.align = ml_collections.ConfigDict()
  config.align.steps = 0
  config.align.events = 3
  config.align.content = "titles"   # or "categories": their words (with bridge.category_text)
  config.align.trainable = ("projection", "perceiver", "cross_attention")  # or + "encoder"
  config.align.learning_rate = 1e-3
  config.align.warmup = 10
  config.align.max_answer_tokens = 48   # "Recent: t1; t2; t3": <= 47 SmolLM2 tokens on main

  config.train = common.train_section(
      batch_size=8, num_steps=300, learning_rate=1e-4, warmup=30, weight_decay=0.0,
      log_every=10, eval_every=0, checkpoint_every=100, keep_checkpoints=1,
      # The zero-initialised tanh gates move ~lr per Adam step; without a larger rate they
      # stay near 0 for a short run and the cross-attention blocks behind them barely learn.
      lr_mults=(("_gate$", 100.0),))
  config.eval = common.eval_section(
      batch_size=8,
      num_examples=200,       # seeded sample of test records (<= 0: all)
      exact_threshold=1000,   # catalogues up to this size are scored exactly
      shuffled_control=True,  # also evaluate with each user's context swapped
      curve_examples=0,       # > 0 with train.eval_every > 0: learning-curve points
      # review task: also score the reference and the greedy answer exactly (search
      # errors, the reference's log-probability with the real and the shuffled context)
      review_likelihood=False)
  config.mesh = common.mesh_section()
  config.aot = common.aot_section()
  return config


def apply_cpu(config: ml_collections.ConfigDict) -> None:
  """The CPU budget with the main job's measured settings (README "Results"): blocks before
  SmolLM2's layers 15, 20 and 25 (no gradient through the frozen layers below), lr 5e-4
  with the gates at 100x, next item by the item head over the whole catalogue plus the
  encoder's own head read from a frozen copy of the pretrained encoder (under Enc the
  trained encoder's own ranking drifts: README "Results"; decoding titles by beam search
  costs seconds per user here: `--config.tasks.next_item_titles=True` adds it), favorite
  genre as a short label."""
  config.bridge.update(xattn_every=5, xattn_first=15, item_head=True, item_head_skip=True,
                       item_head_skip_frozen=True)
  config.tasks.update(max_answer_tokens=6,     # MovieLens genre names are at most 5 tokens
                      next_item_titles=False)
  config.train.update(learning_rate=5e-4, warmup=10)
  # The text prompt on the task that needs the whole history (titles would need decoding).
  config.baseline.tasks = ("favorite_category",)


def apply_fav_only(config: ml_collections.ConfigDict) -> None:
  """The CPU budget spent on favorite genre alone (no next-item examples, no item head):
  the task that needs the whole history gets every training example instead of half."""
  apply_cpu(config)
  config.tasks.names = ("favorite_category",)
  config.bridge.update(item_head=False, item_head_skip=False, item_head_skip_frozen=False)


def apply_smoke(config: ml_collections.ConfigDict) -> None:
  """Tiny random LLM + tiny random encoder on a few synthetic users (tests, CPU smoke)."""
  config.data.update(protocol="leave_last_out", window=12, max_categories=3)
  config.data.synthetic.update(num_users=120, num_items=60, events_per_user_mean=24.0)
  config.encoder.init = "random"
  config.encoder.model.preset = "tiny"
  config.llm.update(source="random", preset="tiny")
  config.bridge.update(xattn_every=2, xattn_first=0, num_latents=4, perceiver_heads=2)
  config.tasks.update(max_prompt_tokens=160,   # byte-level tokens: one per character
                      max_answer_tokens=24)
  config.baseline.update(history_tokens=64, strategy="full", max_answer_tokens=None)
  config.train.update(batch_size=8, num_steps=6, learning_rate=1e-3, warmup=1, log_every=2,
                      checkpoint_every=3, keep_checkpoints=3)
  config.eval.update(num_examples=6, batch_size=3, ks=(1, 5, 10), exact_threshold=100)


def apply_tpu(config: ml_collections.ConfigDict) -> None:
  """Paper scale on a TPU slice: a 1B+ LLM in bfloat16, bigger batch, longer run.

  The LLM is a Hugging Face checkpoint directory on the TPU VMs (`llm.source`) of the
  architecture `llm.preset` names, which is also what the compile check assumes when the
  checkpoint is not on the compiling host: 'llama_3_2_1b' (default), 'llama_3_2_3b' or
  'smollm2_1_7b', e.g.
    --config.llm.preset=llama_3_2_3b --config.llm.source=checkpoints/Llama-3.2-3B-Instruct

  bfloat16: the frozen LLM's weights are stored and used in bfloat16; the encoder, the
  bridge and the cross-attention blocks compute in bfloat16 from float32 weights (they
  train: float32 master weights and Adam moments). float32 stays where precision matters:
  RMSNorm / LayerNorm statistics, RoPE angles, attention logits and softmax, the LLM's and
  item head's logits, every loss, the optimizer.
  """
  config.llm.update(source="checkpoints/Llama-3.2-1B-Instruct", preset="llama_3_2_1b",
                    dtype="bfloat16", param_dtype="bfloat16")
  config.encoder.model.dtype = "bfloat16"
  config.bridge.dtype = "bfloat16"
  config.bridge.xattn_first = 0   # blocks before layers 0, 5, 10, 15 of Llama-3.2-1B
  config.aot.update(num_items=26_746, num_ratings=12, num_categories=22)  # ML-20M
  config.train.update(batch_size=64, num_steps=20_000, learning_rate=1e-4, warmup=500,
                      checkpoint_every=1000, keep_checkpoints=3)
  config.eval.update(num_examples=0, batch_size=64)
  config.mesh.shape = (-1, 1, 1)


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """Returns the config; `arg` selects a variant ('', 'fav_only', 'smoke', 'tpu')."""
  config = base_config()
  variant = arg or ""
  if not variant:
    apply_cpu(config)
  elif variant == "fav_only":
    config.name = "user_llm_movielens:fav_only"
    apply_fav_only(config)
  elif variant == "smoke":
    config.name = "user_llm_movielens:smoke"
    apply_smoke(config)
  elif variant == "tpu":
    config.name = "user_llm_movielens:tpu"
    apply_tpu(config)
  elif variant:
    raise ValueError(f"unknown variant {variant!r} of user_llm_movielens; known: '', "
                     "'fav_only', 'smoke', 'tpu'")
  return config
