"""A random-weight checkpoint of any size, written block by block (never whole in memory).

Out-of-core work has to be exercised on models larger than the machine's memory, and nobody
can download one here: `random_checkpoint` builds the model's skeleton on the meta device from
a config and writes each block's tensors, freshly drawn, as one shard. Weights are N(0, 0.02)
like Hugging Face's initialisers, norms are ones and biases zeros, so activations stay finite.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from prunelab.models.family import detect_family
from prunelab.models.loader import auto_class_for
from prunelab.models.offload import meta_model, units_of
from prunelab.storage.checkpoint import save_config, write_preprocessors
from prunelab.storage.stream import ShardStream


def _draw(name: str, shape: tuple[int, ...], gen: torch.Generator) -> torch.Tensor:
    if name.endswith("bias"):
        return torch.zeros(shape)
    if len(shape) == 1:  # norm scales
        return torch.ones(shape)
    return torch.empty(shape).normal_(0.0, 0.02, generator=gen)


def random_checkpoint(config: Any, directory: str | Path, *, seed: int = 0, tokenizer: Any = None) -> Path:
    """Write `config`'s model with random weights to `directory` (config, shards, index, tokenizer)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    model = meta_model(directory, config, auto_class_for(config, detect_family(config)))
    state = model.state_dict(keep_vars=True)
    first: dict[int, str] = {}
    for name, t in state.items():  # a tied tensor is stored once, under its first name, as save_pretrained does
        first.setdefault(id(t), name)
    shapes = {n: tuple(state[n].shape) for n in first.values()}
    units = units_of(shapes)
    gen = torch.Generator().manual_seed(seed)
    stream = ShardStream(directory)
    for unit in [u for u in units if u] + [""]:
        if unit:
            stream.write({n: _draw(n, shapes[n], gen) for n in units[unit]})
        else:
            for n in units[unit]:  # embeddings and head: one shard each
                stream.write({n: _draw(n, shapes[n], gen)})
    stream.finish()
    save_config(model, directory)
    write_preprocessors(directory, tokenizer, None)
    return directory
