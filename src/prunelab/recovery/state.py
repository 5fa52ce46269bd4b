"""A recovery run's saved state: trained tensors (+ Adam's state) and a JSON header, written atomically.

One writer and one reader for every stage: the finished block stage and each distillation checkpoint.
A folder whose fingerprint is not this run's (other settings, other masks, another teacher) is ignored,
so a resumed run can only continue itself.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

STATE_VERSION = 1
TENSORS, OPTIMIZER, HEADER = "trained.safetensors", "optimizer.pt", "state.json"


def write_state(folder: Path, params: dict[str, nn.Parameter], header: dict[str, Any], fingerprint: str,
                optimizer: torch.optim.Optimizer | None = None) -> None:
    """Replace `folder` by a complete new state: written beside it, then renamed (a kill leaves the old one)."""
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file({n: p.detach().contiguous() for n, p in params.items()}, str(tmp / TENSORS))
    if optimizer is not None:
        torch.save(optimizer.state_dict(), tmp / OPTIMIZER)
    body = dict(header, fingerprint=fingerprint, version=STATE_VERSION)
    (tmp / HEADER).write_text(json.dumps(body, default=str))
    old = folder.with_name(folder.name + ".old")
    shutil.rmtree(old, ignore_errors=True)
    if folder.exists():
        folder.rename(old)
    tmp.rename(folder)
    shutil.rmtree(old, ignore_errors=True)


def read_state(folder: Path | None, params: dict[str, nn.Parameter], fingerprint: str,
               optimizer: torch.optim.Optimizer | None = None) -> dict[str, Any] | None:
    """This run's saved header, with `params` (and the optimizer) restored; None when there is none."""
    if folder is None or not (folder / HEADER).is_file():
        return None
    header = json.loads((folder / HEADER).read_text())
    if header.get("fingerprint") != fingerprint or header.get("version") != STATE_VERSION:
        return None
    tensors = load_file(str(folder / TENSORS))
    with torch.no_grad():
        for name, p in params.items():
            p.copy_(tensors[name])
    if optimizer is not None:
        optimizer.load_state_dict(torch.load(folder / OPTIMIZER, weights_only=True))
    return header
