"""`zoo serve`: an OpenAI-compatible HTTP server over keras-zoo's task objects (shipped as `zoo.serving`)."""

from zoo.serving.adapters import Lora
from zoo.serving.app import ServerConfig, check_port, create_app, load_models, serve

__all__ = ["Lora", "ServerConfig", "check_port", "create_app", "load_models", "serve"]
