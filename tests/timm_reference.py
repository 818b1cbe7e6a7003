"""timm's ViT variants, with reference outputs from transformers' models of the same maths.

timm itself needs torchvision, which has no build for the CPU PyTorch installed here, so each
variant is a tiny transformers model (DINOv2, with registers or a SwiGLU MLP, CLIP's and SigLIP's
vision towers, SigLIP's with its attention-pool head) whose weights are written under timm's tensor
names with a timm config.json, as the Hub's timm/* repos hold them. Each builder returns the folder
and the reference output on the given images: the hidden states of a backbone (num_classes 0), or a
classifier's logits.
"""

import json
from pathlib import Path

import numpy as np
import torch
from safetensors.numpy import save_file

WIDTH, DEPTH, HEADS, PATCH, SIZE, LABELS = 24, 2, 2, 7, 21, 5


def _randomize(model: torch.nn.Module, seed: int) -> None:
    """Every parameter random; norm weights and layer scales near 1 (else they would hide mapping bugs)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            near_one = ("norm" in name and name.endswith("weight")) or "lambda1" in name
            p.copy_(torch.randn(p.shape, generator=g) * 0.2 + (1.0 if near_one else 0.0))


def _np(t: torch.Tensor) -> np.ndarray:
    return t.detach().numpy().copy()


def _blocks(state: dict, layer: str, names: dict) -> dict:
    """timm's blocks.{i}.* from a transformers encoder's per-layer tensors (`names`: timm part -> HF part)."""
    out = {}
    for i in range(DEPTH):
        src, dst = layer.format(i=i), f"blocks.{i}."
        for kind in ("weight", "bias"):
            parts = [state.get(src + names[p] + "." + kind) for p in ("q", "k", "v")]
            if parts[0] is not None:
                out[dst + f"attn.qkv.{kind}"] = np.concatenate([_np(p) for p in parts])
            for timm_name in ("attn.proj", "norm1", "norm2", "mlp.fc1", "mlp.fc2"):
                # A tuple of parts is packed along the rows (SwiGLUPacked's fc1: the gate's, then up's).
                parts = names[timm_name] if isinstance(names[timm_name], tuple) else (names[timm_name],)
                out[dst + f"{timm_name}.{kind}"] = np.concatenate([_np(state[src + p + "." + kind]) for p in parts])
        if "ls1" in names:
            out[dst + "ls1.gamma"] = _np(state[src + names["ls1"]])
            out[dst + "ls2.gamma"] = _np(state[src + names["ls2"]])
    return out


def _write(folder: Path, tensors: dict, architecture: str, model_args: dict, num_classes: int, pool: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    config = {
        "architecture": architecture, "num_classes": num_classes, "num_features": WIDTH, "global_pool": pool,
        "model_args": {"embed_dim": WIDTH, "depth": DEPTH, "num_heads": HEADS, "patch_size": PATCH,
                       "img_size": [SIZE, SIZE], "num_classes": num_classes, **model_args},
        "pretrained_cfg": {"tag": "test", "input_size": [3, SIZE, SIZE], "fixed_input_size": True,
                           "interpolation": "bicubic", "crop_pct": 1.0, "crop_mode": "center",
                           "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225], "num_classes": num_classes,
                           "first_conv": "patch_embed.proj", "classifier": "head"},
    }
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    return folder


def _head(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed + 100)
    return torch.randn(LABELS, WIDTH, generator=g) * 0.3, torch.randn(LABELS, generator=g) * 0.3


_DINO_NAMES = {"q": "attention.q_proj", "k": "attention.k_proj", "v": "attention.v_proj", "attn.proj": "attention.o_proj",
               "norm1": "norm1", "norm2": "norm2", "mlp.fc1": "mlp.fc1", "mlp.fc2": "mlp.fc2",
               "ls1": "layer_scale1.lambda1", "ls2": "layer_scale2.lambda1"}
_CLIP_NAMES = {"q": "self_attn.q_proj", "k": "self_attn.k_proj", "v": "self_attn.v_proj", "attn.proj": "self_attn.out_proj",
               "norm1": "layer_norm1", "norm2": "layer_norm2", "mlp.fc1": "mlp.fc1", "mlp.fc2": "mlp.fc2"}


def _last_hidden_state(model: torch.nn.Module):
    """The reference of a backbone: transformers' last_hidden_state on channels-last images."""
    def reference(pixels: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return model(torch.from_numpy(pixels.transpose(0, 3, 1, 2))).last_hidden_state.numpy()

    return reference


def _dinov2(seed: int, names: dict = _DINO_NAMES, **config) -> tuple[torch.nn.Module, dict]:
    """A random transformers DINOv2 of the test's sizes, and its tensors under timm's names."""
    from transformers import Dinov2Config, Dinov2Model

    model = Dinov2Model(Dinov2Config(hidden_size=WIDTH, num_hidden_layers=DEPTH, num_attention_heads=HEADS,
                                     image_size=SIZE, patch_size=PATCH, **config)).eval()
    _randomize(model, seed)
    s = model.state_dict()
    tensors = {"cls_token": _np(s["embeddings.cls_token"]), "pos_embed": _np(s["embeddings.position_embeddings"]),
               "patch_embed.proj.weight": _np(s["embeddings.patch_embeddings.projection.weight"]),
               "patch_embed.proj.bias": _np(s["embeddings.patch_embeddings.projection.bias"]),
               "norm.weight": _np(s["layernorm.weight"]), "norm.bias": _np(s["layernorm.bias"]),
               **_blocks(s, "encoder.layer.{i}.", names)}
    return model, tensors


def dinov2(folder: Path, seed: int = 0):
    """DINOv2 (layer scale, no qkv bias here): a backbone; reference = transformers' last_hidden_state."""
    model, tensors = _dinov2(seed, mlp_ratio=3, qkv_bias=False)
    _write(folder, tensors, "vit_small_patch14_dinov2", {"mlp_ratio": 3, "qkv_bias": False}, 0, "token")
    return folder, _last_hidden_state(model)


def dinov2_registers(folder: Path, seed: int = 0):
    """DINOv2 with 2 registers, position embeddings for the patches only (timm's no_embed_class): a backbone."""
    from transformers import Dinov2WithRegistersConfig, Dinov2WithRegistersModel

    model = Dinov2WithRegistersModel(Dinov2WithRegistersConfig(
        hidden_size=WIDTH, num_hidden_layers=DEPTH, num_attention_heads=HEADS, mlp_ratio=4, image_size=SIZE,
        patch_size=PATCH, num_register_tokens=2)).eval()
    _randomize(model, seed)
    s = model.state_dict()
    pos = _np(s["embeddings.position_embeddings"])
    tensors = {"cls_token": _np(s["embeddings.cls_token"]) + pos[:, :1],  # timm folds the class position in
               "reg_token": _np(s["embeddings.register_tokens"]), "pos_embed": pos[:, 1:].copy(),
               "patch_embed.proj.weight": _np(s["embeddings.patch_embeddings.projection.weight"]),
               "patch_embed.proj.bias": _np(s["embeddings.patch_embeddings.projection.bias"]),
               "norm.weight": _np(s["layernorm.weight"]), "norm.bias": _np(s["layernorm.bias"]),
               **_blocks(s, "encoder.layer.{i}.", _DINO_NAMES)}
    _write(folder, tensors, "vit_small_patch14_reg4_dinov2", {"reg_tokens": 2}, 0, "token")
    return folder, _last_hidden_state(model)


def registers_avg_pool(folder: Path, seed: int = 0):
    """No class token, 2 registers, average pooling normalised after the mean (fc_norm), layer scale.

    timm's vit_*_reg*_gap_* models; transformers has no such model, so the reference runs a
    DINOv2-with-registers encoder on tokens assembled as timm does.
    """
    from transformers import Dinov2WithRegistersConfig, Dinov2WithRegistersModel

    model = Dinov2WithRegistersModel(Dinov2WithRegistersConfig(
        hidden_size=WIDTH, num_hidden_layers=DEPTH, num_attention_heads=HEADS, mlp_ratio=4, image_size=SIZE,
        patch_size=PATCH, num_register_tokens=2)).eval()
    _randomize(model, seed)
    s = model.state_dict()
    pos = _np(s["embeddings.position_embeddings"])[:, 1:].copy()  # (1, patches, d)
    head_w, head_b = _head(seed)
    tensors = {"reg_token": _np(s["embeddings.register_tokens"]), "pos_embed": pos,
               "patch_embed.proj.weight": _np(s["embeddings.patch_embeddings.projection.weight"]),
               "patch_embed.proj.bias": _np(s["embeddings.patch_embeddings.projection.bias"]),
               "fc_norm.weight": _np(s["layernorm.weight"]), "fc_norm.bias": _np(s["layernorm.bias"]),
               "head.weight": _np(head_w), "head.bias": _np(head_b), **_blocks(s, "encoder.layer.{i}.", _DINO_NAMES)}
    _write(folder, tensors, "vit_betwixt_patch16_reg4_gap_256", {"reg_tokens": 2}, LABELS, "avg")

    def reference(pixels: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            patches = model.embeddings.patch_embeddings(torch.from_numpy(pixels.transpose(0, 3, 1, 2)))
            regs = model.embeddings.register_tokens.expand(patches.shape[0], -1, -1)
            hidden = model.encoder(torch.cat([regs, patches + torch.from_numpy(pos)], dim=1)).last_hidden_state
            pooled = torch.nn.functional.layer_norm(hidden[:, 2:].mean(dim=1), (WIDTH,), model.layernorm.weight,
                                                    model.layernorm.bias, model.config.layer_norm_eps)
            return (pooled @ head_w.T + head_b).numpy()

    return folder, reference


def clip(folder: Path, seed: int = 0):
    """CLIP's image tower (pre-norm, no patch bias, QuickGELU, eps 1e-5) with a head: logits."""
    from transformers import CLIPVisionConfig, CLIPVisionModel

    model = CLIPVisionModel(CLIPVisionConfig(hidden_size=WIDTH, num_hidden_layers=DEPTH, num_attention_heads=HEADS,
                                             intermediate_size=48, image_size=SIZE, patch_size=PATCH)).eval()
    _randomize(model, seed)
    s = model.state_dict()
    head_w, head_b = _head(seed)
    tensors = {"cls_token": _np(s["embeddings.class_embedding"])[None, None],
               "pos_embed": _np(s["embeddings.position_embedding.weight"])[None],
               "patch_embed.proj.weight": _np(s["embeddings.patch_embedding.weight"]),
               "norm_pre.weight": _np(s["pre_layrnorm.weight"]), "norm_pre.bias": _np(s["pre_layrnorm.bias"]),
               "norm.weight": _np(s["post_layernorm.weight"]), "norm.bias": _np(s["post_layernorm.bias"]),
               "head.weight": _np(head_w), "head.bias": _np(head_b),
               **_blocks(s, "encoder.layers.{i}.", _CLIP_NAMES)}
    _write(folder, tensors, "vit_base_patch16_clip_quickgelu_224", {"mlp_ratio": 2}, LABELS, "token")

    def reference(pixels: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            pooled = model(torch.from_numpy(pixels.transpose(0, 3, 1, 2))).pooler_output  # post_layernorm(CLS)
            return (pooled @ head_w.T + head_b).numpy()

    return folder, reference


def _siglip(seed: int, **config) -> tuple[torch.nn.Module, dict, torch.Tensor, torch.Tensor]:
    """A random transformers SigLIP image tower of the test's sizes, its tensors under timm's names with
    a classifier head, and that head's weight and bias."""
    from transformers import SiglipVisionConfig, SiglipVisionModel

    model = SiglipVisionModel(SiglipVisionConfig(hidden_size=WIDTH, num_hidden_layers=DEPTH, num_attention_heads=HEADS,
                                                 image_size=SIZE, patch_size=PATCH, **config)).eval()
    _randomize(model, seed)
    s = model.state_dict()
    head_w, head_b = _head(seed)
    tensors = {"pos_embed": _np(s["embeddings.position_embedding.weight"])[None],
               "patch_embed.proj.weight": _np(s["embeddings.patch_embedding.weight"]),
               "patch_embed.proj.bias": _np(s["embeddings.patch_embedding.bias"]),
               "norm.weight": _np(s["post_layernorm.weight"]), "norm.bias": _np(s["post_layernorm.bias"]),
               "head.weight": _np(head_w), "head.bias": _np(head_b),
               **_blocks(s, "encoder.layers.{i}.", _CLIP_NAMES)}
    return model, tensors, head_w, head_b


def siglip_avg_pool(folder: Path, seed: int = 0):
    """SigLIP's image tower without its attention-pool head (no class token, tanh GELU), mean pooled: logits."""
    model, tensors, head_w, head_b = _siglip(seed, intermediate_size=96, vision_use_head=False)
    # timm builds this name with erf GELU; SigLIP itself uses the tanh one, which model_args can name.
    _write(folder, tensors, "vit_base_patch16_siglip_gap_224", {"act_layer": "gelu_tanh"}, LABELS, "avg")

    def reference(pixels: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            hidden = model(torch.from_numpy(pixels.transpose(0, 3, 1, 2))).last_hidden_state  # post_layernorm'd
            return (hidden.mean(dim=1) @ head_w.T + head_b).numpy()

    return folder, reference


def dinov2_swiglu(folder: Path, seed: int = 0):
    """DINOv2 with a SwiGLU MLP (timm's SwiGLUPacked, as vit_giant_patch14_dinov2): a backbone."""
    names = {**_DINO_NAMES, "mlp.fc1": ("mlp.gate_proj", "mlp.up_proj"), "mlp.fc2": "mlp.down_proj"}
    model, tensors = _dinov2(seed, names, mlp_ratio=4, use_swiglu_ffn=True)
    hidden = model.encoder.layer[0].mlp.gate_proj.out_features  # transformers' 2/3 rule: 64
    # timm sizes fc1 (gate and up together) as int(embed_dim * mlp_ratio): 128 here.
    _write(folder, tensors, "vit_giant_patch14_dinov2", {"mlp_ratio": 2 * hidden / WIDTH}, 0, "token")
    return folder, _last_hidden_state(model)


def siglip_attention_pool(folder: Path, seed: int = 0):
    """SigLIP's image tower with its attention-pool head (timm's global_pool='map') and a classifier: logits."""
    model, tensors, head_w, head_b = _siglip(seed, intermediate_size=72, vision_use_head=True)
    s = model.state_dict()
    in_w, in_b = _np(s["head.attention.in_proj_weight"]), _np(s["head.attention.in_proj_bias"])  # (3d, d): q, k, v
    tensors.update({
        "attn_pool.latent": _np(s["head.probe"]),
        "attn_pool.q.weight": in_w[:WIDTH].copy(), "attn_pool.q.bias": in_b[:WIDTH].copy(),
        "attn_pool.kv.weight": in_w[WIDTH:].copy(), "attn_pool.kv.bias": in_b[WIDTH:].copy(),
        "attn_pool.proj.weight": _np(s["head.attention.out_proj.weight"]),
        "attn_pool.proj.bias": _np(s["head.attention.out_proj.bias"]),
        "attn_pool.norm.weight": _np(s["head.layernorm.weight"]), "attn_pool.norm.bias": _np(s["head.layernorm.bias"]),
        **{f"attn_pool.mlp.{fc}.{kind}": _np(s[f"head.mlp.{fc}.{kind}"])
           for fc in ("fc1", "fc2") for kind in ("weight", "bias")},
    })
    _write(folder, tensors, "vit_base_patch16_siglip_224", {"act_layer": "gelu_tanh", "mlp_ratio": 3}, LABELS, "map")

    def reference(pixels: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            pooled = model(torch.from_numpy(pixels.transpose(0, 3, 1, 2))).pooler_output  # head(post_layernorm(x))
            return (pooled @ head_w.T + head_b).numpy()

    return folder, reference


VARIANTS = {"dinov2": dinov2, "dinov2_registers": dinov2_registers, "registers_avg_pool": registers_avg_pool,
            "clip": clip, "siglip_avg_pool": siglip_avg_pool, "dinov2_swiglu": dinov2_swiglu,
            "siglip_attention_pool": siglip_attention_pool}
