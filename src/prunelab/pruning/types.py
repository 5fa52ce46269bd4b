"""What a pruning run is asked to do (`PruneConfig`) and what it did (`PruneResult`)."""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field, fields
from typing import TYPE_CHECKING, Any

from prunelab.errors import ConfigError, PrunelabError
from prunelab.pruning.registry import METHODS, REFINERS, MethodSpec, get_method_spec, method_option_names
from prunelab.quant import QuantScheme

if TYPE_CHECKING:
    import torch

MIN_DEFAULT_GROUP = 8  # int4's default group size is halved down to this to fit a matrix's input size
_NM = re.compile(r"^(\d+):(\d+)$")


def parse_pattern(pattern: str) -> tuple[int, int] | None:
    """`unstructured` → None; `N:M` → (N, M) where N of every M consecutive inputs are zeroed."""
    if pattern == "unstructured":
        return None
    match = _NM.match(pattern or "")
    if not match:
        raise ConfigError(f"unknown pattern '{pattern}': use 'unstructured' or N:M such as 2:4")
    n, m = int(match.group(1)), int(match.group(2))
    if not 0 < n < m:
        raise ConfigError(f"pattern {pattern}: need 0 < N < M (N zeros in every group of M weights)")
    return n, m


@dataclass
class PruneConfig:
    """One pruning recipe. `sparsity` is the fraction of prunable weights set to zero.

    For an N:M pattern the sparsity is N/M by construction and `sparsity` is ignored
    (recorded as N/M). `calib` is a path or HF dataset name; None means the offline default
    (MRPC training sentences from ../shared/data/glue-mrpc/train.tsv). The fields here are
    common to all methods; a method's own settings are `options`, an instance of its
    `MethodSpec.options` dataclass (None or a mapping is turned into one on validation).
    `PruneConfig.from_settings` takes both kinds as flat keywords.
    """

    method: str = "magnitude"
    sparsity: float = 0.5
    pattern: str = "unstructured"
    calib: str | None = None
    calib_column: str | None = None
    nsamples: int = 64
    seqlen: int = 512
    seed: int = 0
    owl: bool = False  # outlier-weighted layerwise ratios (methods whose spec says owl)
    owl_m: float = 5.0  # OWL: a weight is an outlier when its Wanda score exceeds owl_m × the block mean
    owl_lambda: float = 0.08  # OWL: per-block sparsities spread over [s - λ, s + λ]
    refine: str | None = None  # a mask-refinement step after the method (`REFINERS`: swap), methods with `refine`
    refine_budget: int = 100  # refine: at most this many swap rounds per row
    quant: str | None = None  # quantize the kept weights: int8 (per output channel) or int4 (groups); None: float
    group_size: int | None = None  # input columns per scale (int4 default 128; int8 default: the whole row)
    options: Any = None  # the method's settings dataclass instance

    def __post_init__(self) -> None:
        self.validate()

    @classmethod
    def from_settings(cls, method: str, **settings: Any) -> PruneConfig:
        """`from_settings("sparsegpt", sparsity=0.5, nsamples=8, blocksize=64)`: common fields and the
        method's own options as flat keywords (how the CLI and studies spell them)."""
        own = get_method_spec(method).option_fields()
        common = {f.name for f in fields(cls)} - {"method", "options"}
        unknown = [k for k in settings if k not in own and k not in common]
        if unknown:
            allowed = ("sparsity", "pattern", "seed", *method_option_names(method))
            raise ConfigError(f"method {method} has no option '{unknown[0]}': allowed {', '.join(allowed)}")
        options = {k: v for k, v in settings.items() if k in own}
        return cls(method=method, options=options, **{k: v for k, v in settings.items() if k not in own})

    @property
    def spec(self) -> MethodSpec:
        return get_method_spec(self.method)

    def validate(self) -> None:
        spec = self.spec
        if not isinstance(self.sparsity, (int, float)) or not 0.0 <= float(self.sparsity) < 1.0:
            raise ConfigError(f"sparsity {self.sparsity} is outside [0, 1): pass e.g. 0.5 for 50 %")
        nm = parse_pattern(self.pattern)
        if not spec.supports(self.pattern):
            raise ConfigError(f"{self.method} does not support the pattern {self.pattern}: "
                              f"use {' or '.join(spec.patterns)}")
        if nm is not None:
            self.sparsity = nm[0] / nm[1]
        if self.owl and not spec.owl:
            owl_methods = [name for name, s in METHODS.items() if s.owl]
            raise ConfigError(f"--owl applies to {', '.join(owl_methods)}, not to {self.method}")
        if self.owl and nm is not None:  # N:M fixes every matrix's sparsity at N/M: no per-block ratio to set
            raise ConfigError("--owl sets non-uniform unstructured sparsities: use it with --pattern unstructured")
        self._validate_refine(spec)
        self._validate_quant()
        if self.nsamples < 1 or self.seqlen < 2:
            raise ConfigError("calibration needs --nsamples ≥ 1 and --seqlen ≥ 2")
        self.options = spec.make_options(self.options)

    def _validate_refine(self, spec: MethodSpec) -> None:
        if self.refine is None:
            return
        if self.refine not in REFINERS:
            raise ConfigError(f"unknown --refine '{self.refine}': choose one of {', '.join(REFINERS)}")
        if not spec.refine:
            refinable = [name for name, s in METHODS.items() if s.refine]
            raise ConfigError(f"--refine applies to {', '.join(refinable)}, not to {self.method}")
        if isinstance(self.refine_budget, bool) or not isinstance(self.refine_budget, int) or self.refine_budget < 1:
            raise ConfigError(f"refine_budget {self.refine_budget!r}: need an integer ≥ 1 (swap rounds per row)")

    def _validate_quant(self) -> None:
        if self.quant is None:
            if self.group_size is not None:
                raise ConfigError("--group-size applies to quantized runs: add --quant int4 (or int8)")
            return
        if isinstance(self.group_size, bool) or not isinstance(self.group_size, (int, type(None))):
            raise ConfigError(f"--group-size {self.group_size!r}: need a positive integer")
        QuantScheme.parse(self.quant, self.group_size)  # a one-line ConfigError for int3, group size 0, ...

    @property
    def quant_scheme(self) -> QuantScheme | None:
        """The requested quantization (bits and resolved group size), None for a float run."""
        return QuantScheme.parse(self.quant, self.group_size) if self.quant is not None else None

    def quant_for(self, in_features: int, matrix: str = "") -> QuantScheme | None:
        """The scheme of one matrix. An explicit `--group-size` must divide `in_features` (else a one-line
        `ConfigError` naming the matrix); int4's default 128 is halved until it divides (SmolLM2's
        576-wide inputs get 64), down to 8, so the default works on every common width."""
        scheme = self.quant_scheme
        if scheme is None:
            return None
        g = scheme.group_size
        if self.group_size is None and g is not None:
            while in_features % g and g > MIN_DEFAULT_GROUP:
                g //= 2
            scheme = QuantScheme(scheme.bits, g)
        scheme.groups(in_features, matrix)
        return scheme

    @property
    def joint_quant(self) -> QuantScheme | None:
        """What a reconstructing method should quantize in its own solve (GPTQ): the scheme, unless
        `--refine` re-solves the weights afterwards (the engine then rounds them to nearest instead)."""
        return self.quant_scheme if self.refine is None else None

    @property
    def nm(self) -> tuple[int, int] | None:
        return parse_pattern(self.pattern)

    @property
    def needs_calibration(self) -> bool:
        """The method calibrates, or OWL / refine (which need calibration statistics) are requested."""
        return self.spec.needs_calibration or bool(self.owl) or self.refine is not None

    def to_dict(self) -> dict[str, Any]:
        d = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "options"}
        d["options"] = asdict(self.options)
        return d


class PruningError(PrunelabError):
    """A pruning computation failed in a way the user can act on (e.g. a singular Hessian)."""


@dataclass
class MatrixReport:
    name: str
    module_type: str
    stack: str
    block: int
    numel: int
    requested: float
    achieved: float
    pruned: int = 0  # entries the mask removed (exactly round(requested · numel) or the N:M count)
    zeros: int = 0  # entries that are exactly zero in the weight afterwards (≥ pruned if zeros pre-existed)


_CORE_KEYS = ("config", "requested_sparsity", "achieved_sparsity_prunable", "achieved_sparsity_total",
              "prunable_params", "prunable_zeros", "total_params", "total_zeros", "calibration", "timings_s",
              "peak_rss_bytes", "warnings", "matrices")


class PackedMasks(dict):  # type: ignore[type-arg]
    """Keep-masks stored one bit per weight: what an out-of-core prune can afford to hold for a whole model.

    Behaves as `dict[str, Tensor]` (a bool tensor goes in and comes out); `pruned[name]` counts the
    pruned entries at insertion, so accounting never unpacks.
    """

    def __init__(self) -> None:
        super().__init__()
        self.shapes: dict[str, tuple[int, ...]] = {}
        self.pruned: dict[str, int] = {}

    def __setitem__(self, name: str, mask: torch.Tensor) -> None:
        import numpy as np
        import torch

        self.shapes[name] = tuple(mask.shape)
        self.pruned[name] = int(mask.numel() - int(torch.count_nonzero(mask)))
        super().__setitem__(name, np.packbits(mask.detach().to("cpu").numpy().reshape(-1)))

    def __getitem__(self, name: str) -> torch.Tensor:
        import numpy as np
        import torch

        shape = self.shapes[name]
        flat = np.unpackbits(super().__getitem__(name), count=int(np.prod(shape))).astype(bool)
        return torch.from_numpy(flat).reshape(shape)

    def get(self, name: str, default: Any = None) -> Any:  # type: ignore[override]
        return self[name] if name in self else default

    def update_from(self, masks: dict[str, torch.Tensor]) -> None:
        for name in masks:
            self[name] = masks[name]


@dataclass
class PruneResult:
    """What was pruned. `masks[name]` is a bool tensor in (out, in) orientation, True = kept."""

    config: PruneConfig
    matrices: list[MatrixReport] = field(default_factory=list)
    masks: dict[str, torch.Tensor] = field(default_factory=dict)
    prunable_params: int = 0
    prunable_zeros: int = 0
    total_params: int = 0
    total_zeros: int = 0
    calibration: dict[str, Any] = field(default_factory=dict)  # source, nsamples, seqlen, tokens, sha256
    timings: dict[str, float] = field(default_factory=dict)  # seconds: calibration, pruning, total
    peak_rss_bytes: int | None = None
    warnings: list[str] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)  # the method's own report (`MethodOutput.extra`)

    @property
    def sparsity_prunable(self) -> float:
        return self.prunable_zeros / max(1, self.prunable_params)

    @property
    def sparsity_total(self) -> float:
        return self.total_zeros / max(1, self.total_params)

    def to_dict(self) -> dict[str, Any]:
        """The JSON of prune_report.json; the method's `extra` sections sit beside the core keys."""
        return {
            "config": self.config.to_dict(),
            "requested_sparsity": self.config.sparsity,
            "achieved_sparsity_prunable": self.sparsity_prunable,
            "achieved_sparsity_total": self.sparsity_total,
            "prunable_params": self.prunable_params,
            "prunable_zeros": self.prunable_zeros,
            "total_params": self.total_params,
            "total_zeros": self.total_zeros,
            "calibration": self.calibration,
            "timings_s": self.timings,
            "peak_rss_bytes": self.peak_rss_bytes,
            "warnings": self.warnings,
            "matrices": [asdict(m) for m in self.matrices],
            **{k: v for k, v in self.extra.items() if k not in _CORE_KEYS},
        }
