"""Checkpoint tensor names (Hugging Face `ViTForImageClassification`, timm `VisionTransformer`) -> our weights."""

from zoo.key_map import Row
from zoo.models.vit.config import ViTConfig

# Hugging Face: names as the Hub's google/vit-* repos and transformers' save_pretrained write them.
_HF_BACKBONE = [
    Row("embeddings.cls_token", "embeddings/cls_token"),
    Row("embeddings.position_embeddings", "embeddings/position_embeddings"),
    Row("embeddings.patch_embeddings.projection.weight", "embeddings/patch_embeddings/kernel", "conv_patch"),
    Row("embeddings.patch_embeddings.projection.bias", "embeddings/patch_embeddings/bias"),
    Row("encoder.layer.{i}.layernorm_before.weight", "layers_{i}/layernorm_before_gamma"),
    Row("encoder.layer.{i}.layernorm_before.bias", "layers_{i}/layernorm_before_beta"),
    Row("encoder.layer.{i}.attention.attention.query.weight", "layers_{i}/q_proj/kernel", "rows_to_heads"),
    Row("encoder.layer.{i}.attention.attention.query.bias", "layers_{i}/q_proj/bias", "heads_bias"),
    Row("encoder.layer.{i}.attention.attention.key.weight", "layers_{i}/k_proj/kernel", "rows_to_heads"),
    Row("encoder.layer.{i}.attention.attention.key.bias", "layers_{i}/k_proj/bias", "heads_bias"),
    Row("encoder.layer.{i}.attention.attention.value.weight", "layers_{i}/v_proj/kernel", "rows_to_heads"),
    Row("encoder.layer.{i}.attention.attention.value.bias", "layers_{i}/v_proj/bias", "heads_bias"),
    Row("encoder.layer.{i}.attention.output.dense.weight", "layers_{i}/o_proj/kernel", "cols_to_heads"),
    Row("encoder.layer.{i}.attention.output.dense.bias", "layers_{i}/o_proj/bias"),
    Row("encoder.layer.{i}.layernorm_after.weight", "layers_{i}/layernorm_after_gamma"),
    Row("encoder.layer.{i}.layernorm_after.bias", "layers_{i}/layernorm_after_beta"),
    Row("encoder.layer.{i}.intermediate.dense.weight", "layers_{i}/fc1/kernel"),
    Row("encoder.layer.{i}.intermediate.dense.bias", "layers_{i}/fc1/bias"),
    Row("encoder.layer.{i}.output.dense.weight", "layers_{i}/fc2/kernel"),
    Row("encoder.layer.{i}.output.dense.bias", "layers_{i}/fc2/bias"),
    Row("layernorm.weight", "layernorm/gamma"),
    Row("layernorm.bias", "layernorm/beta"),
]
# transformers 5 renamed ViT's modules; checkpoints (and adapters made under transformers 4) keep the
# old names. PEFT adapters name modules as the installed transformers does: (old, new) for `zoo.lora`.
HF_MODULE_RENAMES = [
    (r"encoder\.layer\.(\d+)\.attention\.attention\.query$", r"layers.\1.attention.q_proj"),
    (r"encoder\.layer\.(\d+)\.attention\.attention\.key$", r"layers.\1.attention.k_proj"),
    (r"encoder\.layer\.(\d+)\.attention\.attention\.value$", r"layers.\1.attention.v_proj"),
    (r"encoder\.layer\.(\d+)\.attention\.output\.dense$", r"layers.\1.attention.o_proj"),
    (r"encoder\.layer\.(\d+)\.intermediate\.dense$", r"layers.\1.mlp.fc1"),
    (r"encoder\.layer\.(\d+)\.output\.dense$", r"layers.\1.mlp.fc2"),
]
# The attention's query and value, as PEFT's default for ViT was before transformers 5 renamed them.
LORA_DEFAULTS = {"hf": ("q_proj", "v_proj"), "timm": ("qkv",)}
LORA_HEADS = {"hf": "classifier", "timm": "head"}

# Present in some HF checkpoints, unused by an image classifier.
_HF_UNUSED = ["pooler.dense.weight", "pooler.dense.bias", "embeddings.mask_token"]
_HF_HEAD = [Row("classifier.weight", "classifier/kernel"), Row("classifier.bias", "classifier/bias")]

_TIMM_BACKBONE = [
    Row("pos_embed", "embeddings/position_embeddings"),
    Row("patch_embed.proj.weight", "embeddings/patch_embeddings/kernel", "conv_patch"),
    Row("blocks.{i}.norm1.weight", "layers_{i}/layernorm_before_gamma"),
    Row("blocks.{i}.norm1.bias", "layers_{i}/layernorm_before_beta"),
    Row("blocks.{i}.attn.qkv.weight", tuple(f"layers_{{i}}/{p}_proj/kernel" for p in "qkv"), "rows_to_heads"),
    Row("blocks.{i}.attn.qkv.bias", tuple(f"layers_{{i}}/{p}_proj/bias" for p in "qkv"), "heads_bias"),
    Row("blocks.{i}.attn.proj.weight", "layers_{i}/o_proj/kernel", "cols_to_heads"),
    Row("blocks.{i}.attn.proj.bias", "layers_{i}/o_proj/bias"),
    Row("blocks.{i}.norm2.weight", "layers_{i}/layernorm_after_gamma"),
    Row("blocks.{i}.norm2.bias", "layers_{i}/layernorm_after_beta"),
    Row("blocks.{i}.mlp.fc2.weight", "layers_{i}/fc2/kernel"),
    Row("blocks.{i}.mlp.fc2.bias", "layers_{i}/fc2/bias"),
]
# timm's optional parts, by the config field that calls for them.
_TIMM_CLASS_TOKEN = [Row("cls_token", "embeddings/cls_token")]
_TIMM_REGISTERS = [Row("reg_token", "embeddings/register_tokens")]
_TIMM_PATCH_BIAS = [Row("patch_embed.proj.bias", "embeddings/patch_embeddings/bias")]
_TIMM_PRE_NORM = [Row("norm_pre.weight", "pre_layernorm/gamma"), Row("norm_pre.bias", "pre_layernorm/beta")]
_TIMM_LAYER_SCALE = [Row("blocks.{i}.ls1.gamma", "layers_{i}/layerscale_1"),
                     Row("blocks.{i}.ls2.gamma", "layers_{i}/layerscale_2")]
_TIMM_MLP = [Row("blocks.{i}.mlp.fc1.weight", "layers_{i}/fc1/kernel"),
             Row("blocks.{i}.mlp.fc1.bias", "layers_{i}/fc1/bias")]
# SwiGLUPacked: fc1's rows are the gate's, then the up projection's.
_TIMM_GATED_MLP = [Row("blocks.{i}.mlp.fc1.weight", ("layers_{i}/gate_proj/kernel", "layers_{i}/up_proj/kernel")),
                   Row("blocks.{i}.mlp.fc1.bias", ("layers_{i}/gate_proj/bias", "layers_{i}/up_proj/bias"))]
_TIMM_ATTENTION_POOL = [
    Row("attn_pool.latent", "attn_pool/latent"),
    Row("attn_pool.q.weight", "attn_pool/q_proj/kernel", "rows_to_heads"),
    Row("attn_pool.q.bias", "attn_pool/q_proj/bias", "heads_bias"),
    Row("attn_pool.kv.weight", ("attn_pool/k_proj/kernel", "attn_pool/v_proj/kernel"), "rows_to_heads"),
    Row("attn_pool.kv.bias", ("attn_pool/k_proj/bias", "attn_pool/v_proj/bias"), "heads_bias"),
    Row("attn_pool.proj.weight", "attn_pool/o_proj/kernel", "cols_to_heads"),
    Row("attn_pool.proj.bias", "attn_pool/o_proj/bias"),
    Row("attn_pool.norm.weight", "attn_pool/norm_gamma"),
    Row("attn_pool.norm.bias", "attn_pool/norm_beta"),
    Row("attn_pool.mlp.fc1.weight", "attn_pool/fc1/kernel"),
    Row("attn_pool.mlp.fc1.bias", "attn_pool/fc1/bias"),
    Row("attn_pool.mlp.fc2.weight", "attn_pool/fc2/kernel"),
    Row("attn_pool.mlp.fc2.bias", "attn_pool/fc2/bias"),
]
_TIMM_FINAL_NORM = {"tokens": "norm", "pooled": "fc_norm", "none": None}
_TIMM_HEAD = [Row("head.weight", "classifier/kernel"), Row("head.bias", "classifier/bias")]


def _with_prefix(rows: list[Row], source: str, target: str) -> list[Row]:
    def tgt(t):
        return t if t is None else (target + t if isinstance(t, str) else tuple(target + x for x in t))

    return [Row(source + r.source, tgt(r.target), r.transform) for r in rows]


def rows(config: ViTConfig, layout: str, target_prefix: str = "", head: bool = False) -> list[Row]:
    """The key map of a backbone (target_prefix "") or a classifier's backbone ("backbone/").

    `head` maps the checkpoint's classifier head; otherwise the head, if any, is ignored
    (a backbone has none, and a classifier given new labels starts a fresh one).
    """
    if layout == "timm":
        backbone = list(_TIMM_BACKBONE)
        for wanted, extra in ((config.class_token, _TIMM_CLASS_TOKEN), (config.register_tokens, _TIMM_REGISTERS),
                              (not config.pre_norm, _TIMM_PATCH_BIAS), (config.pre_norm, _TIMM_PRE_NORM),
                              (config.layer_scale is not None, _TIMM_LAYER_SCALE),
                              (not config.gated_mlp, _TIMM_MLP), (config.gated_mlp, _TIMM_GATED_MLP),
                              (config.pooling == "map", _TIMM_ATTENTION_POOL)):
            backbone += extra if wanted else []
        final_norm = _TIMM_FINAL_NORM[config.final_norm]
        if final_norm:
            backbone += [Row(f"{final_norm}.weight", "layernorm/gamma"), Row(f"{final_norm}.bias", "layernorm/beta")]
        head_rows, source_prefix = _TIMM_HEAD, ""
    else:
        backbone = _HF_BACKBONE + [Row(name, None) for name in _HF_UNUSED]
        head_rows, source_prefix = _HF_HEAD, ("" if config.headless else "vit.")  # ViTModel: no "vit." prefix
    if config.headless:
        return _with_prefix(backbone, source_prefix, target_prefix)
    return _with_prefix(backbone, source_prefix, target_prefix) + (
        head_rows if head else [Row(r.source, None) for r in head_rows]
    )
