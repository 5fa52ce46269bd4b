"""The pruning methods: one `MethodSpec` per method, the one place every other part reads.

The CLI's `--method` help and validation, `PruneConfig` validation, the engine (calibration,
OWL, pattern support, exact-count checks), the study's accepted options and the report all
read `METHODS`, so adding a method is one module plus one `register_method` call (or one
entry below for a built-in). This module imports neither torch nor the method modules:
targets and options classes are "module:name" strings resolved on first use, so that
`prunelab --help` (which lists the methods) stays fast.

A method is a function `fn(lm, config, calib, progress)`:

- `lm`: the `LoadedModel` to prune in place; `config`: the `PruneConfig` (the method's own
  settings are `config.options`, an instance of its spec's options dataclass);
- `calib`: the calibration batches (`list[dict[str, Tensor]]`, model-ready forward kwargs,
  batch 1 each) when the spec says `needs_calibration`, else None;
- `progress`: None or `progress(message, done, total)`;
- returns keep-masks (bool, (out, in), True = kept) by `PrunableMatrix.name`, **already applied**
  to the model's weights (methods that update weights, like SparseGPT, must do so themselves),
  or a `MethodOutput(masks, extra)` when it has a report of its own (`extra` lands in
  `PruneResult.extra` and in prune_report.json).

Warnings the user should see (e.g. a raised dampening) are issued with
`warnings.warn(msg, PruneWarning)`; `prune()` records them in `PruneResult.warnings`.

Plug-ins: a module that calls `register_method` at import. Study configs list such modules
under `plugins:`; the study imports them before validating and in every worker process.
"""

from __future__ import annotations

import dataclasses
import importlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from prunelab.errors import ConfigError

PATTERN_KINDS = ("unstructured", "N:M")
CALIBRATION_OPTIONS = ("nsamples", "seqlen", "calib", "calib_column")  # PruneConfig fields, calibrated methods
OWL_OPTIONS = ("owl", "owl_m", "owl_lambda")  # PruneConfig fields, methods with `owl=True`
REFINE_OPTIONS = ("refine", "refine_budget")  # PruneConfig fields, methods with `refine=True`
REFINERS = ("swap",)  # mask-refinement steps `--refine` accepts (pruning/refine.py)
RESERVED_NAMES = ("dense",)  # the study's unpruned reference point


class PruneWarning(UserWarning):
    """Something the user should know about a finished pruning run (recorded in the report)."""


@dataclass(frozen=True)
class NoOptions:
    """The options of a method without settings of its own."""


@dataclass
class MethodOutput:
    """What a method returns when it has more to say than its masks (e.g. structured's new shapes)."""

    masks: dict[str, Any]
    extra: dict[str, Any] = field(default_factory=dict)  # JSON-able; merged into prune_report.json


def _resolve(target: str, what: str) -> Any:
    module_name, _, attr = target.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ConfigError(f"{what} '{target}' cannot be imported: {exc}") from exc
    try:
        return getattr(module, attr)
    except AttributeError as exc:
        raise ConfigError(f"{what} '{target}': module {module_name} has no attribute '{attr}'") from exc


@dataclass(frozen=True)
class MethodSpec:
    """One pruning method: everything the rest of prunelab needs to know about it.

    `options` is the method's settings dataclass (its fields are what a user may set, with
    their defaults; `__post_init__` may validate them with a `ConfigError`), or its
    "module:Class" path when importing the class early would be expensive (built-ins).
    `count_scope` says where `exact_counts` holds: "matrix" (every matrix prunes exactly
    round(s · numel)) or "global" (the total over all prunable weights does, as in global
    magnitude); N:M patterns are always checked per matrix. A method with `owl` or `refine` but
    without `needs_calibration` gets a calibration set only when OWL or refine is requested.
    """

    name: str
    target: str  # "package.module:function", imported lazily
    description: str = ""  # one line; CLI help and the report read it
    needs_calibration: bool = False
    patterns: tuple[str, ...] = PATTERN_KINDS  # pattern kinds it supports
    owl: bool = False  # OWL per-block ratios apply
    refine: bool = False  # `--refine` (mask refinement after the method) applies
    reconstructs: bool = False  # the method re-solves kept weights: refine re-solves them on its new support
    exact_counts: bool = True  # the engine checks exact pruned counts
    options: type | str = NoOptions  # the method's own settings dataclass (or "module:Class")
    count_scope: str = "matrix"  # "matrix" or "global": see the class docstring

    def load(self) -> Callable[..., Any]:
        """The method function, imported on first use."""
        return _resolve(self.target, f"method {self.name}: target")

    def supports(self, pattern: str) -> bool:
        """Whether the method handles `pattern`: a kind ("unstructured", "N:M") or a concrete "2:4"."""
        kind = pattern if pattern in PATTERN_KINDS else "N:M"
        return kind in self.patterns

    def options_class(self) -> type:
        """The options dataclass itself (imported when given as a path)."""
        cls = _resolve(self.options, f"method {self.name}: options") if isinstance(self.options, str) else self.options
        if not dataclasses.is_dataclass(cls):
            raise ConfigError(f"method {self.name}: options {cls!r} is not a dataclass")
        return cls  # type: ignore[return-value]

    def option_fields(self) -> tuple[str, ...]:
        return tuple(f.name for f in dataclasses.fields(self.options_class()))

    def make_options(self, value: Any = None) -> Any:
        """An options instance from None (defaults), a mapping, or an instance (kept as is)."""
        cls = self.options_class()
        if isinstance(value, cls):
            return value
        if value is None:
            value = {}
        if not isinstance(value, dict):
            raise ConfigError(f"method {self.name}: options must be a mapping or {cls.__name__}, got {value!r}")
        allowed = self.option_fields()
        for key in value:
            if key not in allowed:
                raise ConfigError(f"method {self.name} has no option '{key}': "
                                  f"{'its options are ' + ', '.join(allowed) if allowed else 'it has none'}")
        return cls(**value)


def _builtin(name: str, module: str, func: str, description: str, **kw: Any) -> MethodSpec:
    return MethodSpec(name, f"prunelab.pruning.{module}:{func}", description, **kw)


METHODS: dict[str, MethodSpec] = {
    s.name: s
    for s in (
        _builtin("magnitude", "magnitude", "prune_global",
                 "global magnitude: one |w| threshold over all prunable matrices", count_scope="global", refine=True),
        _builtin("magnitude-layer", "magnitude", "prune_layerwise",
                 "per-matrix magnitude: every matrix gets exactly the requested sparsity", owl=True, refine=True),
        _builtin("wanda", "wanda", "prune_wanda", "Wanda: |W| x input-feature norm, ranked within each output row",
                 needs_calibration=True, owl=True, refine=True),
        _builtin("sparsegpt", "sparsegpt", "prune_sparsegpt",
                 "SparseGPT: OBS-style one-shot pruning with weight reconstruction", needs_calibration=True,
                 owl=True, refine=True, reconstructs=True, options="prunelab.pruning.sparsegpt:SparseGPTOptions"),
        _builtin("structured", "structured", "prune_structured",
                 "structured: remove whole MLP neurons / attention heads, a smaller dense model",
                 needs_calibration=True, patterns=("unstructured",), exact_counts=False,
                 options="prunelab.pruning.structured:StructuredOptions"),
        _builtin("alps", "alps", "prune_alps",
                 "ALPS: ADMM layer reconstruction from the SparseGPT solution, then PCG on the support",
                 needs_calibration=True, owl=True, refine=True, reconstructs=True,
                 options="prunelab.pruning.alps:AlpsOptions"),
    )
}


def register_method(spec: MethodSpec) -> None:
    """Add a method everywhere at once (CLI, PruneConfig, engine, study, report).

    Registering an equal spec again is a no-op (a plug-in module imported twice); another
    spec under a taken name is an error.
    """
    if not spec.name or spec.name in RESERVED_NAMES or any(c.isspace() for c in spec.name):
        raise ConfigError(f"cannot register method '{spec.name}': choose a non-empty name without spaces, "
                          f"not {', '.join(RESERVED_NAMES)}")
    if ":" not in spec.target:
        raise ConfigError(f"method {spec.name}: target '{spec.target}' must be 'package.module:function'")
    bad = [p for p in spec.patterns if p not in PATTERN_KINDS]
    if bad or not spec.patterns:
        raise ConfigError(f"method {spec.name}: patterns must be a non-empty subset of {', '.join(PATTERN_KINDS)}")
    if spec.count_scope not in ("matrix", "global"):
        raise ConfigError(f"method {spec.name}: count_scope must be 'matrix' or 'global'")
    old = METHODS.get(spec.name)
    if old is not None and old != spec:
        raise ConfigError(f"method '{spec.name}' is already registered (target {old.target})")
    METHODS[spec.name] = spec


def get_method_spec(name: str) -> MethodSpec:
    """The registered method `name`, or a one-line error listing the known ones."""
    spec = METHODS.get(name)
    if spec is None:
        raise ConfigError(f"unknown method '{name}': choose one of {', '.join(METHODS)}")
    return spec


def get_method(name: str) -> Callable[..., Any]:
    """The function registered for `name`, imported on first use."""
    return get_method_spec(name).load()


def method_option_names(name: str) -> tuple[str, ...]:
    """Settings a user may give this method: calibration, OWL and refine options where they apply, then its own.

    Calibration options apply wherever a calibration set may be built: the method's own, or OWL's / refine's.
    """
    spec = get_method_spec(name)
    calibrates = spec.needs_calibration or spec.owl or spec.refine
    common = ((CALIBRATION_OPTIONS if calibrates else ()) + (OWL_OPTIONS if spec.owl else ())
              + (REFINE_OPTIONS if spec.refine else ()))
    return common + spec.option_fields()


def methods_help(**flags: bool) -> str:
    """The registered method names for CLI help, optionally only those whose spec has `flags` (`owl=True`)."""
    return ", ".join(n for n, s in METHODS.items() if all(getattr(s, k) == v for k, v in flags.items()))


def parse_options(pairs: Iterable[str]) -> dict[str, Any]:
    """`["blocksize=64", "target=heads"]` → {"blocksize": 64, "target": "heads"}; values read as YAML
    scalars (numbers, true/false, null, strings), the way a study config spells them."""
    import yaml

    out: dict[str, Any] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"method option '{pair}' must be KEY=VALUE, e.g. blocksize=64")
        out[key.strip()] = yaml.safe_load(value) if value.strip() else None
    return out


def load_plugins(modules: Iterable[str]) -> None:
    """Import plug-in modules (each registers its methods at import); a failure is a one-line error."""
    for module in modules:
        try:
            importlib.import_module(module)
        except ImportError as exc:
            raise ConfigError(f"plugin module '{module}' cannot be imported ({exc}): install it or add it to "
                              "PYTHONPATH") from exc
