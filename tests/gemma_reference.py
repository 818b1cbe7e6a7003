"""Tiny reference Gemma 1/2/3 models built with transformers, saved with a small trained tokenizer."""

import json
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import (
    Gemma2Config,
    Gemma2ForCausalLM,
    Gemma3ForCausalLM,
    Gemma3TextConfig,
    GemmaConfig,
    GemmaForCausalLM,
    PreTrainedTokenizerFast,
)

SPECIALS = ["<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>"]
CORPUS = [
    "def add(a, b):\n    return a + b\n",
    "The quick brown fox jumps over the lazy dog. " * 3,
    "for i in range(10):\n    print(i * i)\n",
    "class Point:\n    def __init__(self, x, y):\n        self.x = x\n        self.y = y\n",
    "Keras runs on JAX, PyTorch and TensorFlow; café, naïve, 東京 and emoji 🙂 too.",
    "import numpy as np\nx = np.arange(12).reshape(3, 4)\n",
]
# Gemma's chat template, as the Hub's Gemma tokenizers carry it.
CHAT_TEMPLATE = (
    "{{ bos_token }}{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}"
    "{% endif %}{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if (message['role'] == 'assistant') %}{% set role = 'model' %}{% else %}{% set role = message['role'] %}"
    "{% endif %}{{ '<start_of_turn>' + role + '\n' + message['content'] | trim + '<end_of_turn>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{'<start_of_turn>model\n'}}{% endif %}"
)
# Weight scale and final-norm boost: measured so that the backends agree with transformers and each
# other within ~7e-5 while along every greedy path the tests take the top two logits differ by >= 1e-3.
SCALE = 0.5
BOOST = 4.0
VOCAB = 160  # model vocabulary (the tokenizer has 150 tokens: Gemma pads its embedding too)

COMMON = dict(vocab_size=VOCAB, hidden_size=48, intermediate_size=80, num_hidden_layers=4, num_attention_heads=4,
              num_key_value_heads=1, head_dim=20, rms_norm_eps=1e-5, max_position_embeddings=96,
              bos_token_id=2, eos_token_id=1, pad_token_id=0)
VARIANTS = {
    "gemma": (GemmaForCausalLM, GemmaConfig, dict(COMMON, rope_theta=5000.0)),
    "gemma2": (Gemma2ForCausalLM, Gemma2Config, dict(COMMON, sliding_window=6, query_pre_attn_scalar=16,
                                                     attn_logit_softcapping=20.0, final_logit_softcapping=15.0,
                                                     rope_theta=3000.0)),
    "gemma3": (Gemma3ForCausalLM, Gemma3TextConfig, dict(COMMON, sliding_window=6, query_pre_attn_scalar=16,
                                                         rope_theta=50000.0, rope_local_base_freq=2000.0,
                                                         sliding_window_pattern=2)),
}


def train_tokenizer(folder: Path) -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=150, special_tokens=SPECIALS, show_progress=False,
                                  initial_alphabet=sorted(pre_tokenizers.ByteLevel.alphabet())[:100])
    tok.train_from_iterator(CORPUS, trainer=trainer)
    tok.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", 2)])
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>",
                                 unk_token="<unk>", additional_special_tokens=["<start_of_turn>", "<end_of_turn>"])
    hf.chat_template = CHAT_TEMPLATE
    hf.save_pretrained(folder)
    return hf


def randomize(model: torch.nn.Module, seed: int) -> None:
    """Every weight random (norms included), blocks strong next to the embedding.

    With tied embeddings, a residual stream dominated by the token's own embedding makes greedy
    decoding repeat that token forever; small embeddings give varied sequences, with logit gaps
    still far larger than the implementations' float differences.
    """
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(torch.randn(p.shape, generator=g) * (0.05 if "embed" in name else SCALE))
        # A larger final norm spreads the logits apart (see SCALE and BOOST above).
        model.model.norm.weight.add_(BOOST)


def save_hf_gemma(folder: Path, variant: str, seed: int = 0, legacy_spelling: bool = False, **overrides) -> Path:
    """A random tiny `variant` ("gemma", "gemma2", "gemma3"), its config changed by `overrides`, and a tokenizer."""
    cls, config_cls, config = VARIANTS[variant]
    config = dict(config, **overrides)
    torch.manual_seed(seed)
    model = cls(config_cls(**config)).eval()
    randomize(model, seed)
    model.save_pretrained(folder)
    train_tokenizer(folder)
    if legacy_spelling:
        rewrite_legacy(folder / "config.json", config)
    return folder


def rewrite_legacy(path: Path, source: dict) -> None:
    """config.json as the Hub's older transformers wrote it: torch_dtype, rope_theta, rope_local_base_freq."""
    raw = json.loads(path.read_text())
    raw["torch_dtype"] = raw.pop("dtype", "float32")
    params = raw.pop("rope_parameters", None)
    if raw["model_type"] == "gemma3_text":
        raw["rope_theta"] = params["full_attention"]["rope_theta"]
        raw["rope_local_base_freq"] = params["sliding_attention"]["rope_theta"]
        raw["sliding_window_pattern"] = source["sliding_window_pattern"]
        raw.pop("layer_types", None)
    else:
        raw["rope_theta"] = params["rope_theta"]
    path.write_text(json.dumps(raw, indent=2))


def reference(folder: Path):
    variant = json.loads((folder / "config.json").read_text())["model_type"]
    cls = {"gemma": GemmaForCausalLM, "gemma2": Gemma2ForCausalLM, "gemma3_text": Gemma3ForCausalLM}[variant]
    return cls.from_pretrained(folder, dtype=torch.float32).eval()


def hf_greedy(model, prompt_ids: list[int], new_tokens: int) -> list[int]:
    """Greedy decoding with the transformers model and its own KV cache, for exactly `new_tokens`
    tokens: end-of-sequence is a token like any other here (generate() would stop at it, and its
    min_new_tokens would instead forbid it, changing the argmax)."""
    tokens, past, step = list(prompt_ids), None, torch.tensor([prompt_ids])
    with torch.no_grad():
        for _ in range(new_tokens):
            out = model(step, past_key_values=past, use_cache=True)
            past = out.past_key_values
            tokens.append(int(out.logits[0, -1].argmax()))
            step = torch.tensor([[tokens[-1]]])
    return tokens[len(prompt_ids):]
