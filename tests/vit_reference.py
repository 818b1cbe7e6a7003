"""Tiny reference ViTs built with transformers, and the same weights written in timm's layout."""

import json
from pathlib import Path

import numpy as np
import torch
from safetensors.numpy import load_file, save_file
from transformers import ViTConfig as HFViTConfig
from transformers import ViTForImageClassification, ViTModel


def randomize(model: torch.nn.Module, seed: int) -> None:
    """Every parameter random (HF's init leaves biases 0 and norms 1, which would hide mapping bugs)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g) * 0.1
            p.copy_(1.0 + noise if "layernorm" in name and name.endswith("weight") else noise)


def save_hf_vit(folder: Path, seed: int = 0, dtype: torch.dtype = torch.float32, dtype_key: str = "dtype",
                bare: bool = False, **config) -> Path:
    """Saves a random ViTForImageClassification (or ViTModel if bare) and returns the folder."""
    cls = ViTModel if bare else ViTForImageClassification
    torch.manual_seed(seed)
    model = cls(HFViTConfig(**config)).eval()
    randomize(model, seed)
    model.to(dtype).save_pretrained(folder)
    if dtype_key != "dtype":  # rewrite as the Hub's older transformers wrote it
        path = folder / "config.json"
        raw = json.loads(path.read_text())
        raw[dtype_key] = raw.pop("dtype")
        path.write_text(json.dumps(raw, indent=2))
    return folder


def hf_logits(folder: Path, pixels_nhwc: np.ndarray, interpolate: bool = False) -> np.ndarray:
    model = ViTForImageClassification.from_pretrained(folder, dtype=torch.float32).eval()
    with torch.no_grad():
        out = model(torch.from_numpy(pixels_nhwc.transpose(0, 3, 1, 2)), interpolate_pos_encoding=interpolate)
    return out.logits.numpy()


def hf_hidden(folder: Path, pixels_nhwc: np.ndarray) -> np.ndarray:
    model = ViTModel.from_pretrained(folder, dtype=torch.float32, add_pooling_layer=False).eval()
    with torch.no_grad():
        return model(torch.from_numpy(pixels_nhwc.transpose(0, 3, 1, 2))).last_hidden_state.numpy()


def hf_to_timm(hf_folder: Path, timm_folder: Path, global_pool: str = "token") -> Path:
    """Writes the HF checkpoint's weights under timm's names, with a timm config.json."""
    cfg = json.loads((hf_folder / "config.json").read_text())
    hf = load_file(hf_folder / "model.safetensors")
    d, f = cfg["hidden_size"], cfg["intermediate_size"]
    out = {
        "cls_token": hf["vit.embeddings.cls_token"],
        "pos_embed": hf["vit.embeddings.position_embeddings"],
        "patch_embed.proj.weight": hf["vit.embeddings.patch_embeddings.projection.weight"],
        "patch_embed.proj.bias": hf["vit.embeddings.patch_embeddings.projection.bias"],
        "head.weight": hf["classifier.weight"],
        "head.bias": hf["classifier.bias"],
    }
    norm = "fc_norm" if global_pool == "avg" else "norm"
    out[f"{norm}.weight"], out[f"{norm}.bias"] = hf["vit.layernorm.weight"], hf["vit.layernorm.bias"]
    for i in range(cfg["num_hidden_layers"]):
        src, dst = f"vit.encoder.layer.{i}.", f"blocks.{i}."
        att = src + "attention.attention."
        for kind in ("weight", "bias"):
            out[dst + f"attn.qkv.{kind}"] = np.concatenate([hf[att + f"{p}.{kind}"] for p in ("query", "key", "value")])
            out[dst + f"attn.proj.{kind}"] = hf[src + f"attention.output.dense.{kind}"]
            out[dst + f"norm1.{kind}"] = hf[src + f"layernorm_before.{kind}"]
            out[dst + f"norm2.{kind}"] = hf[src + f"layernorm_after.{kind}"]
            out[dst + f"mlp.fc1.{kind}"] = hf[src + f"intermediate.dense.{kind}"]
            out[dst + f"mlp.fc2.{kind}"] = hf[src + f"output.dense.{kind}"]
    timm_folder.mkdir(parents=True, exist_ok=True)
    save_file(out, timm_folder / "model.safetensors", metadata={"format": "pt"})
    size, patch, labels = cfg["image_size"], cfg["patch_size"], len(cfg["id2label"])
    config = {
        "architecture": f"vit_tiny_patch{patch}_{size}",
        "num_classes": labels,
        "num_features": d,
        "global_pool": global_pool,
        "model_args": {"embed_dim": d, "depth": cfg["num_hidden_layers"], "num_heads": cfg["num_attention_heads"],
                       "mlp_ratio": f / d, "img_size": size, "patch_size": patch, "global_pool": global_pool},
        "pretrained_cfg": {"tag": "test", "input_size": [3, size, size], "fixed_input_size": True,
                           "interpolation": "bicubic", "crop_pct": 0.9, "crop_mode": "center",
                           "mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5], "num_classes": labels,
                           "first_conv": "patch_embed.proj", "classifier": "head"},
    }
    (timm_folder / "config.json").write_text(json.dumps(config, indent=2))
    return timm_folder


def timm_avg_pool_logits(hf_folder: Path, pixels_nhwc: np.ndarray) -> np.ndarray:
    """What timm computes with global_pool='avg' (fc_norm after the mean), from the HF modules."""
    model = ViTForImageClassification.from_pretrained(hf_folder, dtype=torch.float32).eval()
    with torch.no_grad():
        out = model.vit(torch.from_numpy(pixels_nhwc.transpose(0, 3, 1, 2)), output_hidden_states=True)
        pre_norm = out.hidden_states[-1]
        pooled = torch.nn.functional.layer_norm(
            pre_norm[:, 1:].mean(dim=1), (pre_norm.shape[-1],), model.vit.layernorm.weight,
            model.vit.layernorm.bias, model.config.layer_norm_eps,
        )
        return model.classifier(pooled).numpy()
