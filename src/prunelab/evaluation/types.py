"""Evaluation options and results; every result is JSON-serialisable."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Literal

from prunelab.errors import ConfigError
from prunelab.io import file_sha256  # noqa: F401  (re-exported: results carry data hashes)

Status = Literal["ok", "not_applicable"]


@dataclass
class EvalOptions:
    """Options shared by all benchmarks; each benchmark reads the ones it needs."""

    seqlen: int | None = None  # ppl windows; None = min(model context, 2048)
    max_tokens: int | None = None  # evaluate a prefix of the token stream
    max_examples: int | None = None  # cap on dev/test examples (embed, glue, asr)
    train_limit: int | None = None  # cap on training examples (probe / finetune)
    mode: Literal["probe", "finetune"] = "probe"
    seed: int = 0
    batch_size: int = 8
    data: str | None = None  # override the dataset file / HF dataset name
    reference: Any = None  # dense LoadedModel for `embed` fidelity
    finetune_epochs: float = 1.0
    finetune_lr: float = 5e-5
    finetune_max_steps: int | None = None  # cap on optimizer steps (finetune mode)
    limit: int | None = None  # examples per task (zeroshot); None = max_examples, else all
    tasks: list[str] | None = None  # zeroshot tasks (`--bench zeroshot:hellaswag,piqa`); None = the paper seven

    def __post_init__(self) -> None:
        if self.limit is not None and (isinstance(self.limit, bool) or not isinstance(self.limit, int)
                                       or self.limit < 1):
            raise ConfigError(f"--limit {self.limit} is not a positive number of examples per task: "
                              "pass e.g. --limit 100")


@dataclass
class EvalResult:
    """One benchmark on one model. `metrics` values are floats, or None when not applicable."""

    model: str
    family: str
    bench: str
    metrics: dict[str, float | None]
    primary: str  # name of the headline metric in `metrics`
    higher_is_better: bool
    status: Status = "ok"
    note: str = ""  # e.g. "not applicable: no MLM head", or how a task is built
    n_tokens: int | None = None
    n_examples: int | None = None
    seqlen: int | None = None
    seed: int = 0
    wall_time_s: float = 0.0
    data_path: str | None = None
    data_sha256: str | None = None
    details: dict[str, Any] = field(default_factory=dict)

    @property
    def value(self) -> float | None:
        return self.metrics.get(self.primary)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["value"] = self.value
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> EvalResult:
        d = {k: v for k, v in d.items() if k in cls.__dataclass_fields__}
        return cls(**d)

