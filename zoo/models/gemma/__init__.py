"""Gemma 1, 2 and 3 (text) causal language models in Hugging Face layout."""

from zoo import registry
from zoo.models.gemma.config import MODEL_TYPES, GemmaConfig
from zoo.models.gemma.model import GemmaBackbone, GemmaCausalLM

for _model_type in MODEL_TYPES:
    registry.register_hf(_model_type, registry.Format("gemma", "hf", GemmaConfig.from_hf, GemmaCausalLM))

__all__ = ["GemmaBackbone", "GemmaCausalLM", "GemmaConfig"]
