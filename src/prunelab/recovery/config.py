"""What a recovery run is asked to do (`RecoveryConfig`).

Recovery trains the weights a pruning method *kept*, with its mask fixed, so that the sparse model
behaves like the dense one again. Two stages, run in this order when both are asked for:

* `block`: each transformer block in execution order is trained so that its output matches the
  dense model's block output (EBFT, arXiv 2402.12419; "A free lunch in LLM compression",
  arXiv 2510.14444): cheap, local, on the calibration windows alone.
* `distill`: the dense model teaches the whole sparse model end to end on `tokens` tokens (KL on the
  logits, plus optionally SquareHead's per-block normalised hidden-state MSE).

Every field has a default a user can ship with; `validate` gives one-line errors naming the fix.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any

from prunelab.errors import ConfigError

MODES = ("block", "distill", "block+distill")
TARGETS = ("dense", "local")
DATA_KINDS = ("calib", "generated")


@dataclass
class RecoveryConfig:
    """One recovery recipe.

    `target` picks what block `i` of the sparse model is trained towards: `dense` is the dense
    model's block output on the dense model's own inputs (so each block also undoes the error the
    pruned blocks before it let through); `local` is the dense block applied to the sparse model's
    inputs (each block only imitates its dense self). `tests/test_recovery.py` compares the two.
    """

    mode: str = "block"
    seed: int = 0
    train_norms: bool = True  # also train norms and biases of the blocks (their masks are all-ones)
    device: str = "cpu"
    precision: str = "fp32"  # fp32, or bf16: forward/backward under bfloat16 autocast (weights and Adam stay fp32)
    # calibration windows of the block stage (a prune's own settings when it recovers right after)
    calib: str | None = None
    calib_column: str | None = None
    nsamples: int = 64
    seqlen: int = 512
    # block-wise reconstruction
    target: str = "dense"
    block_epochs: int = 4
    block_lr: float = 1e-4
    block_batch: int = 4  # calibration windows per optimizer step
    holdout: int = 8  # calibration windows held out to pick the best epoch (early stop)
    patience: int = 1  # epochs without a held-out improvement before a block stops
    # distillation
    tokens: int = 100_000
    data: str = "calib"  # calib: the calibration source; generated: text sampled from the teacher; or a file
    data_column: str | None = None
    distill_lr: float = 1e-4
    distill_batch: int = 4
    distill_seqlen: int = 512
    temperature: float = 1.0
    hidden_mse: float = 0.0  # weight of the per-block normalised hidden-state MSE (SquareHead); 0: logits only
    grad_checkpointing: bool = False
    checkpoint_every_s: float = 300.0

    def __post_init__(self) -> None:
        self.validate()

    @property
    def stages(self) -> list[str]:
        return self.mode.split("+")

    def validate(self) -> None:
        if self.mode not in MODES:
            raise ConfigError(f"unknown --recover '{self.mode}': choose one of {', '.join(MODES)}")
        if self.precision not in ("fp32", "bf16"):
            raise ConfigError(f"unknown recovery precision '{self.precision}': use fp32 or bf16")
        if self.target not in TARGETS:
            raise ConfigError(f"unknown recovery target '{self.target}': choose one of {', '.join(TARGETS)}")
        if "distill" in self.stages and (isinstance(self.tokens, bool) or not isinstance(self.tokens, int)
                                         or self.tokens < 1):
            raise ConfigError(f"--tokens {self.tokens!r}: distillation needs a positive number of tokens, e.g. 100000")
        for name in ("block_epochs", "block_batch", "distill_batch"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"recovery {name} {value!r}: need an integer ≥ 1")
        if self.holdout < 0 or self.patience < 1:
            raise ConfigError("recovery needs holdout ≥ 0 windows and patience ≥ 1 epoch")
        if self.distill_seqlen < 2:
            raise ConfigError("--seqlen for distillation must be at least 2 tokens")
        for name in ("block_lr", "distill_lr", "temperature", "checkpoint_every_s"):
            if not float(getattr(self, name)) > 0:
                raise ConfigError(f"recovery {name} must be positive, got {getattr(self, name)!r}")
        if self.hidden_mse < 0:
            raise ConfigError(f"--hidden-mse {self.hidden_mse}: need a weight ≥ 0")

    def autocast(self) -> Any:
        """The autocast context of training forwards (a no-op in fp32)."""
        import torch

        device = "cuda" if self.device.startswith("cuda") else "cpu"
        return torch.autocast(device, dtype=torch.bfloat16, enabled=self.precision == "bf16")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_spec(cls, spec: str, **settings: Any) -> RecoveryConfig:
        """A study's short form: `block`, `distill:N` or `block+distill:N` (N distillation tokens)."""
        mode, sep, tokens = str(spec).partition(":")
        if sep:
            if not tokens.isdigit():
                raise ConfigError(f"recover '{spec}': write the token budget as a number, e.g. block+distill:100000")
            settings["tokens"] = int(tokens)
        elif "distill" in mode.split("+"):
            raise ConfigError(f"recover '{spec}': give distillation a token budget, e.g. {mode}:100000")
        return cls(mode=mode, **settings)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> RecoveryConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ConfigError(f"recovery has no setting '{unknown[0]}': allowed {', '.join(sorted(known))}")
        return cls(**d)
