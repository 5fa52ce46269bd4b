"""Use a compressed model: text generation and an OpenAI-compatible HTTP server."""
