"""The text recovery trains on, and the guarantee that no evaluation text is among it.

* `calib` (default): windows drawn from the calibration source (MRPC training sentences offline,
  or whatever `--calib` names), with a seed of their own.
* `generated`: text sampled from the dense teacher itself (seeded), started from a few tokens of
  the calibration text: no benchmark text can leak in, and the student learns the teacher's own
  distribution.
* anything else: a text file / .tsv / .jsonl / HF dataset, read like `--calib`.

A source whose sha256 equals an evaluation split's (WikiText-2 test, the GLUE dev sets) is refused:
training on it would make every number the report prints meaningless.
"""

from __future__ import annotations

import hashlib
import math
from pathlib import Path
from typing import Any

import torch

from prunelab.data.calibration import text_calibration, tokenize_stream
from prunelab.data.glue import TASKS, glue_path
from prunelab.data.text import TextSource, read_text_source
from prunelab.data.wikitext import default_wikitext_path
from prunelab.errors import ConfigError
from prunelab.io import file_sha256
from prunelab.models.types import LoadedModel
from prunelab.recovery.config import RecoveryConfig

PROMPT_TOKENS = 4  # generated text starts from this many calibration tokens, then the teacher samples


def evaluation_splits() -> dict[str, str]:
    """sha256 → name of every evaluation split prunelab reads from the offline data."""
    paths = {"WikiText-2 test": default_wikitext_path()}
    paths |= {f"GLUE {task} dev": glue_path(task, "dev") for task in TASKS}
    return {file_sha256(p): name for name, p in paths.items() if Path(p).is_file()}


def check_not_evaluation(source: TextSource) -> None:
    """Refuse a recovery text that is an evaluation split (by content hash, whatever its file name)."""
    split = evaluation_splits().get(source.sha256)
    if split is not None:
        raise ConfigError(f"recovery text {source.name} is the {split} evaluation split: recover on other text "
                          "(the default calibration text, --data generated, or a training split)")


def check_recovery_texts(config: RecoveryConfig) -> None:
    """Every text this recipe would train on is no evaluation split (before any model is loaded or trained)."""
    check_not_evaluation(read_text_source(config.calib, config.calib_column))
    if "distill" in config.stages and config.data not in ("calib", "generated"):
        check_not_evaluation(read_text_source(config.data, config.data_column))


def _windows_from_source(lm: LoadedModel, source: TextSource, n: int, seqlen: int, seed: int) -> torch.Tensor:
    cs = text_calibration(lm, source, n, seqlen, seed)
    return torch.cat([s["input_ids"] for s in cs.inputs], dim=0)


@torch.no_grad()
def generate_windows(teacher: LoadedModel, prompts: torch.Tensor, seqlen: int, seed: int,
                     batch: int = 16) -> torch.Tensor:
    """Sample `len(prompts)` continuations of `seqlen` tokens from the teacher (temperature 1, top-p 0.95)."""
    torch.manual_seed(seed)
    out = []
    eos = getattr(teacher.tokenizer, "eos_token_id", None)
    for i in range(0, prompts.shape[0], batch):
        p = prompts[i : i + batch]
        new = seqlen - p.shape[1]
        ids = teacher.model.generate(
            input_ids=p, attention_mask=torch.ones_like(p), do_sample=True, top_p=0.95, temperature=1.0,
            max_new_tokens=new, min_new_tokens=new, pad_token_id=eos if eos is not None else 0,
        )
        out.append(ids[:, :seqlen])
    return torch.cat(out, dim=0)


def recovery_windows(teacher: LoadedModel, config: RecoveryConfig, calib: str | None = None,
                     calib_column: str | None = None) -> tuple[torch.Tensor, dict[str, Any]]:
    """(n, seqlen) token windows for distillation and what the report says about them."""
    seqlen = config.distill_seqlen
    limit = teacher.context_length
    if limit is not None:
        seqlen = min(seqlen, limit)
    n = max(1, math.ceil(config.tokens / seqlen))
    if config.data == "generated":
        source = read_text_source(calib, calib_column)
        check_not_evaluation(source)
        stream = tokenize_stream(teacher.tokenizer, source)
        gen = torch.Generator().manual_seed(config.seed + 7)
        starts = torch.randint(0, stream.numel() - PROMPT_TOKENS, (n,), generator=gen)
        prompts = torch.stack([stream[s : s + PROMPT_TOKENS] for s in starts.tolist()])
        windows = generate_windows(teacher, prompts, seqlen, config.seed)
        info = {"data": "generated", "prompt_source": source.name, "prompt_tokens": PROMPT_TOKENS,
                "sampling": "temperature 1, top-p 0.95"}
    else:
        spec = None if config.data == "calib" else config.data
        source = read_text_source(spec if spec is not None else calib,
                                  config.data_column if spec is not None else calib_column)
        check_not_evaluation(source)
        windows = _windows_from_source(teacher, source, n, seqlen, config.seed + 1)
        info = {"data": config.data, "source": source.name, "source_sha256": source.sha256}
    info |= {"windows": int(windows.shape[0]), "seqlen": int(windows.shape[1]),
             "windows_sha256": hashlib.sha256(windows.numpy().tobytes()).hexdigest()}
    return windows, info
