"""Use a compressed model: text generation and an OpenAI-compatible HTTP server.

- `model.py`: `load_model(spec)` — the fused engine where the checkpoint allows it, transformers otherwise;
  chat template, stop tokens, sampling, incremental detokenizing; one batched-step interface for both.
- `generate.py`: `generate(...)` behind `prunelab generate` (streams text, reports engine and tokens/s).
- `scheduler.py`: continuous batching (requests join and leave the running batch per decode step).
- `app.py`: `serve(...)` behind `prunelab serve` (FastAPI + uvicorn, OpenAI routes, /health, /metrics).
"""

from prunelab.serve.app import ServeConfig, create_app, serve
from prunelab.serve.generate import GenerateResult, complete, generate, stream_tokens
from prunelab.serve.model import SamplingParams, ServedModel, load_model

__all__ = ["GenerateResult", "SamplingParams", "ServeConfig", "ServedModel", "complete", "create_app", "generate",
           "load_model", "serve", "stream_tokens"]
