"""Gemma 1, 2 and 3 (text) causal language models in Hugging Face layout."""

from zoo.models import registry
from zoo.models.gemma.config import GemmaConfig
from zoo.models.gemma.model import GemmaBackbone, GemmaCausalLM

for _model_type in ("gemma", "gemma2", "gemma3_text"):
    registry.register_hf(_model_type, registry.Format("gemma", "hf", GemmaConfig.from_hf, "GemmaCausalLM"))

__all__ = ["GemmaBackbone", "GemmaCausalLM", "GemmaConfig"]
