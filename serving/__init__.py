"""`zoo serve`: an OpenAI-compatible HTTP server over keras-zoo's task objects (shipped as `zoo.serving`)."""

from zoo.serving.app import ServerConfig, check_port, create_app, load_models, serve

__all__ = ["ServerConfig", "check_port", "create_app", "load_models", "serve"]
