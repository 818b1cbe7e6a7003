"""Checkpoint tensor names (transformers' Gemma/Gemma2/Gemma3ForCausalLM) -> our weights."""

from zoo.key_map import Row
from zoo.models.gemma.config import GemmaConfig

_LAYER = [
    Row("layers.{i}.input_layernorm.weight", "layers_{i}/input_layernorm/weight"),
    Row("layers.{i}.self_attn.q_proj.weight", "layers_{i}/self_attn/q_proj/kernel", "rows_to_heads"),
    Row("layers.{i}.self_attn.k_proj.weight", "layers_{i}/self_attn/k_proj/kernel", "rows_to_heads"),
    Row("layers.{i}.self_attn.v_proj.weight", "layers_{i}/self_attn/v_proj/kernel", "rows_to_heads"),
    Row("layers.{i}.self_attn.o_proj.weight", "layers_{i}/self_attn/o_proj/kernel", "cols_to_heads"),
    Row("layers.{i}.post_attention_layernorm.weight", "layers_{i}/post_attention_layernorm/weight"),
    Row("layers.{i}.mlp.gate_proj.weight", "layers_{i}/mlp/gate_proj/kernel"),
    Row("layers.{i}.mlp.up_proj.weight", "layers_{i}/mlp/up_proj/kernel"),
    Row("layers.{i}.mlp.down_proj.weight", "layers_{i}/mlp/down_proj/kernel"),
]
_BIASES = [
    Row("layers.{i}.self_attn.q_proj.bias", "layers_{i}/self_attn/q_proj/bias", "heads_bias"),
    Row("layers.{i}.self_attn.k_proj.bias", "layers_{i}/self_attn/k_proj/bias", "heads_bias"),
    Row("layers.{i}.self_attn.v_proj.bias", "layers_{i}/self_attn/v_proj/bias", "heads_bias"),
    Row("layers.{i}.self_attn.o_proj.bias", "layers_{i}/self_attn/o_proj/bias"),
]
_SANDWICH = [
    Row("layers.{i}.pre_feedforward_layernorm.weight", "layers_{i}/pre_feedforward_layernorm/weight"),
    Row("layers.{i}.post_feedforward_layernorm.weight", "layers_{i}/post_feedforward_layernorm/weight"),
]
_QK_NORM = [
    Row("layers.{i}.self_attn.q_norm.weight", "layers_{i}/self_attn/q_norm/weight"),
    Row("layers.{i}.self_attn.k_norm.weight", "layers_{i}/self_attn/k_norm/weight"),
]
LORA_DEFAULTS = ("q_proj", "v_proj")  # PEFT's default targets for gemma, gemma2 and gemma3_text
_ENDS = [Row("embed_tokens.weight", "embed_tokens/embeddings"), Row("norm.weight", "norm/weight")]


def rows(config: GemmaConfig, target_prefix: str, head: bool) -> list[Row]:
    """The key map of a backbone (target_prefix "", head False) or a causal LM ("backbone/", True)."""
    body = _LAYER + _ENDS
    if config.attention_bias:
        body += _BIASES
    if config.sandwich_norms:
        body += _SANDWICH
    if config.qk_norm:
        body += _QK_NORM
    out = [Row("model." + r.source, target_prefix + r.target, r.transform) for r in body]
    if head and not config.tie_word_embeddings:
        out.append(Row("lm_head.weight", "lm_head/kernel"))
    else:  # tied to the embedding, or a backbone: a stored copy is not used
        out.append(Row("lm_head.weight", None))
    return out
