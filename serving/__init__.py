"""The HTTP server (shipped as zoo.serving)."""
