"""Study configuration: YAML or dict → a validated grid, checked before any work starts.

Every entry is checked up front — plug-ins, models, methods and their options, patterns,
sparsities, benchmarks, top-level keys — and the first bad one is named in a one-line `ConfigError`
(`models[1] 'zoo:nope' ...`). Only then does `plan()` touch the models (to learn each one's
family and pick its default benchmarks) and expand the grid into `Cell`s.

Presets set the data sizes (`quick` for a few minutes, `default` for the ≤ 20-minute demo on
2 cores); any value in the YAML overrides the preset's. The preset's numbers are part of every
cell's hash, so `quick` and `default` results never mix.
"""

from __future__ import annotations

import copy
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from prunelab.errors import ConfigError, PrunelabError
from prunelab.pruning.registry import CALIBRATION_OPTIONS, METHODS, load_plugins, method_option_names
from prunelab.study.cells import DENSE, Cell, norm_sparsity

DEFAULT_MODELS = ["zoo:minilm", "zoo:smollm2", "zoo:whisper-tiny-en"]
DEFAULT_METHODS = ["magnitude", "wanda", "sparsegpt"]
DEFAULT_SPARSITIES = [0.1, 0.5, 0.9, 0.95, 0.99]

# A method entry may carry `method_option_names(name)` (pruning registry); these are the calibration ones.
CALIBRATION_KEYS = CALIBRATION_OPTIONS
EVAL_KEYS = ("seqlen", "max_tokens", "max_examples", "train_limit", "mode", "batch_size", "data",
             "finetune_epochs", "finetune_lr")
# Options only some benchmarks read; the same names (`--limit`, `zeroshot:tasks`) as on the eval CLI.
BENCH_EVAL_KEYS = {"zeroshot": ("limit", "tasks")}
SPEED_KEYS = ("sparsities", "methods", "prefill_tokens", "decode_tokens", "repeats", "measure_rss", "measure_size")
SIZE_KEYS = ("sparsities", "methods")
TOP_KEYS = ("models", "methods", "patterns", "sparsities", "benchmarks", "analyze", "size", "speed", "calibration",
            "eval", "seed", "resources", "preset", "allow_hub", "keep_checkpoints", "threads", "model_overrides",
            "plugins", "recover")
# Speech encoders see 1500 frames per clip: 2 clips already give 3000 calibration positions per layer.
SPEECH_CALIBRATION = {"zoo:whisper-tiny-en": {"calibration": {"nsamples": 2}}}

# Data sizes. `default` is sized for `make demo` (all three zoo models, 3 methods × 5 sparsities)
# to finish in ≤ 20 minutes on 2 cores; PRESET_NOTES says what was cut and why (printed in the report).
PRESETS: dict[str, dict[str, Any]] = {
    "default": {
        "calibration": {"nsamples": 8, "seqlen": 128},
        "eval": {
            "ppl": {"max_tokens": 1024, "seqlen": 512},
            "seq2seq-ppl": {"max_examples": 32},
            "pppl": {"max_tokens": 1024},
            "sst2": {"train_limit": 128, "max_examples": 64},
            "mrpc": {"train_limit": 128, "max_examples": 64},
            "embed": {"max_examples": 128},
            "asr": {"max_examples": 6},
            "zeroshot": {"limit": 20},
        },
        "size": True,
        "speed": {"sparsities": [0.5, 0.9, 0.99], "methods": ["magnitude"], "prefill_tokens": 64,
                  "decode_tokens": 8, "repeats": 2},
        "model_overrides": SPEECH_CALIBRATION,
    },
    "quick": {
        "sparsities": [0.5, 0.9],
        "calibration": {"nsamples": 4, "seqlen": 64},
        "eval": {
            "ppl": {"max_tokens": 512, "seqlen": 256},
            "seq2seq-ppl": {"max_examples": 8},
            "pppl": {"max_tokens": 256},
            "sst2": {"train_limit": 32, "max_examples": 32},
            "mrpc": {"train_limit": 32, "max_examples": 32},
            "embed": {"max_examples": 32},
            "asr": {"max_examples": 3},
            "zeroshot": {"limit": 5},
        },
        "size": True,
        "speed": {"sparsities": [0.9], "methods": ["magnitude"], "prefill_tokens": 64, "decode_tokens": 8,
                  "repeats": 2},
        "model_overrides": SPEECH_CALIBRATION,
    },
}

# Why the presets use the data sizes they do (printed in the report).
PRESET_NOTES = {
    "default": (
        "Sized so that `make demo` (3 zoo models x 3 methods x 5 sparsities = 45 pruned points, 198 cells, "
        "2 single-thread worker processes) fits 20 minutes on 2 CPU cores. Measured CPU cost per cell: SmolLM2 "
        "~6 s for 1024 perplexity tokens, ~0.16 s per probe sentence, 6 s magnitude / ~35 s Wanda pruning, "
        "~80 s per speed cell (dense + sparse runtime), Whisper ~20 s; MiniLM 2-6 s per benchmark; "
        "about 1900 CPU-s in all. "
        "Cut versus the papers' protocol and versus the first plan (16x256 calibration, 8x512 ppl tokens, "
        "1000-example probes, 12 clips): calibration 8 x 128 tokens of MRPC text (papers: 128 x 2048 of C4; "
        "Whisper: 2 synthesized clips, i.e. 3000 encoder positions); WikiText-2 perplexity on the first 1024 "
        "tokens in two 512-token windows (papers: the whole test set in 2048-token windows); SST-2 and MRPC "
        "linear probes trained on 128 examples and scored on the first 64 dev examples (training on 64 was "
        "tried: the SmolLM2 probe then stays at chance even dense); embedding fidelity on 128 SST-2 sentences; "
        "speech benchmark on 6 clips; decode speed only for magnitude pruning at 0.5/0.9/0.99 (speed depends "
        "on the sparsity pattern, not on how the mask was chosen), 64 prefill and 8 decoded tokens x 2 "
        "repeats; zero-shot accuracy (not run by default; add `zeroshot` to a decoder's benchmarks) on the first "
        "20 documents per task (~0.4 s a document for SmolLM2, so ~1 min a cell; the papers use whole splits). "
        "Numbers are therefore noisier than published ones and comparable only within this report; "
        "raise them in a study YAML for real work."
    ),
    "quick": (
        "A smoke test of the whole pipeline in a few minutes: sparsities 0.5 and 0.9 only, calibration "
        "4 x 64 tokens, perplexity on 512 tokens, probes trained and scored on 32 examples, 3 speech clips, "
        "speed at 0.9 only, zero-shot (when asked for) on 5 documents per task. "
        "Use it to check a setup, not to draw conclusions."
    ),
}


@dataclass
class MethodEntry:
    name: str
    options: dict[str, Any] = field(default_factory=dict)


@dataclass
class StudyConfig:
    """A validated study. Build with `load_config`; `plan()` expands it into cells."""

    models: list[str]
    methods: list[MethodEntry]
    patterns: list[str]
    sparsities: list[float]
    benchmarks: Any  # "default" | list[str] | dict[model, "default" | list[str]]
    analyze: bool
    size: dict[str, Any] | None
    speed: dict[str, Any] | None
    calibration: dict[str, Any]
    eval: dict[str, dict[str, Any]]
    seed: int
    resources: dict[str, float]
    preset: str
    allow_hub: bool = False
    keep_checkpoints: bool = False
    threads: int | None = None
    model_overrides: dict[str, dict[str, Any]] = field(default_factory=dict)  # model -> calibration/eval
    plugins: list[str] = field(default_factory=list)  # modules that register methods (imported by every worker)

    def calibration_for(self, model: str) -> dict[str, Any]:
        return {**self.calibration, **self.model_overrides.get(model, {}).get("calibration", {})}

    def eval_for(self, model: str, bench: str) -> dict[str, Any]:
        return {**self.eval.get(bench, {}), **self.model_overrides.get(model, {}).get("eval", {}).get(bench, {})}

    def to_dict(self) -> dict[str, Any]:
        """The exact configuration, as recorded in the store and printed in the report."""
        return {
            "preset": self.preset,
            "models": list(self.models),
            "methods": [{"name": m.name, **m.options} if m.options else m.name for m in self.methods],
            "patterns": list(self.patterns),
            "sparsities": list(self.sparsities),
            "benchmarks": copy.deepcopy(self.benchmarks),
            "analyze": self.analyze,
            "size": copy.deepcopy(self.size) if self.size is not None else False,
            "speed": copy.deepcopy(self.speed) if self.speed is not None else False,
            "calibration": dict(self.calibration),
            "eval": copy.deepcopy(self.eval),
            "seed": self.seed,
            "resources": dict(self.resources),
            "allow_hub": self.allow_hub,
            "keep_checkpoints": self.keep_checkpoints,
            "threads": self.threads,
            "model_overrides": copy.deepcopy(self.model_overrides),
            **({"plugins": list(self.plugins)} if self.plugins else {}),
        }


# ---------------------------------------------------------------------------------------------
# Registries: the pruning methods and the benchmarks are whatever their registries hold
# ---------------------------------------------------------------------------------------------


def known_methods() -> list[str]:
    return list(METHODS)


def known_benchmarks() -> dict[str, set[str]]:
    """Benchmark name → families it applies to."""
    from prunelab.evaluation.registry import BENCHMARKS

    return {name: set(spec.families) for name, spec in BENCHMARKS.items()}


# ---------------------------------------------------------------------------------------------
# Loading and validation
# ---------------------------------------------------------------------------------------------


def _deep_merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def read_yaml(path: str | os.PathLike[str]) -> dict[str, Any]:
    import yaml

    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"study config not found: {p}")
    try:
        data = yaml.safe_load(p.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        first = str(exc).splitlines()[0]
        raise ConfigError(f"study config {p} is not valid YAML ({first}): fix the syntax") from exc
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"study config {p} must be a mapping (models:, methods:, sparsities:, ...)")
    return data


def load_config(
    source: str | os.PathLike[str] | dict[str, Any] | None = None, *, preset: str | None = None
) -> StudyConfig:
    """Validate a YAML file / dict (None = the offline default study) against a preset.

    Raises `ConfigError` naming the first bad entry; nothing is loaded or computed here.
    """
    raw: dict[str, Any] = read_yaml(source) if isinstance(source, (str, os.PathLike)) else dict(source or {})
    unknown = [k for k in raw if k not in TOP_KEYS]
    if unknown:
        raise ConfigError(f"study config: unknown key '{unknown[0]}': allowed keys are {', '.join(TOP_KEYS)}")
    preset_name = preset or raw.get("preset") or "default"
    if preset_name not in PRESETS:
        raise ConfigError(f"unknown preset '{preset_name}': choose one of {', '.join(PRESETS)}")
    base = {
        "models": list(DEFAULT_MODELS), "methods": list(DEFAULT_METHODS), "patterns": ["unstructured"],
        "sparsities": list(DEFAULT_SPARSITIES), "benchmarks": "default", "analyze": True, "seed": 0,
        "resources": {"num_cpus": 1, "num_gpus": 0}, "allow_hub": False, "keep_checkpoints": False,
        "threads": None, "model_overrides": {},
    }
    merged = _deep_merge(_deep_merge(base, PRESETS[preset_name]), {k: v for k, v in raw.items() if k != "preset"})

    allow_hub = _bool(merged["allow_hub"], "allow_hub")
    plugins = _check_plugins(merged.get("plugins") or [])
    models = _check_models(merged["models"], allow_hub)
    methods = _expand_recover(_check_methods(merged["methods"]), merged.get("recover"))
    patterns = _check_patterns(merged["patterns"])
    sparsities = _check_sparsities(merged["sparsities"], "sparsities")
    benchmarks = _check_benchmarks(merged["benchmarks"], models)
    calibration = _check_keys(merged.get("calibration") or {}, CALIBRATION_KEYS, "calibration")
    eval_opts = _check_eval(merged.get("eval") or {})
    seed = merged["seed"]
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise ConfigError(f"study config: seed {seed!r} must be an integer")
    size = _check_sub(merged.get("size"), SIZE_KEYS, "size", methods, raw.get("size"))
    speed = _check_sub(merged.get("speed"), SPEED_KEYS, "speed", methods, raw.get("speed"))
    resources = _check_resources(merged.get("resources") or {})
    overrides = _check_overrides(merged.get("model_overrides") or {}, raw.get("model_overrides") or {}, models)
    threads = merged.get("threads")
    if threads is not None and (not isinstance(threads, int) or threads < 1):
        raise ConfigError(f"study config: threads {threads!r} must be a positive integer or null")
    return StudyConfig(
        models=models, methods=methods, patterns=patterns, sparsities=sparsities, benchmarks=benchmarks,
        analyze=_bool(merged["analyze"], "analyze"), size=size, speed=speed, calibration=calibration,
        eval=eval_opts, seed=seed, resources=resources, preset=preset_name, allow_hub=allow_hub,
        keep_checkpoints=_bool(merged["keep_checkpoints"], "keep_checkpoints"), threads=threads,
        model_overrides=overrides, plugins=plugins,
    )


def _bool(value: Any, name: str) -> bool:
    if not isinstance(value, bool):
        raise ConfigError(f"study config: {name} must be true or false, got {value!r}")
    return value


def _as_list(value: Any, name: str) -> list[Any]:
    if isinstance(value, (str, int, float, dict)):
        value = [value]
    if not isinstance(value, list) or not value:
        raise ConfigError(f"study config: {name} must be a non-empty list")
    return value


def _check_models(value: Any, allow_hub: bool) -> list[str]:
    from prunelab.models.spec import parse_spec

    out: list[str] = []
    for i, entry in enumerate(_as_list(value, "models")):
        if not isinstance(entry, str):
            raise ConfigError(f"study config: models[{i}] {entry!r} must be a model spec string")
        try:
            spec = parse_spec(entry)
        except PrunelabError as exc:
            raise ConfigError(f"study config: models[{i}] '{entry}' is not a known model: {exc}") from exc
        if spec.kind == "hub" and not allow_hub and not _in_hf_cache(spec.target):
            raise ConfigError(
                f"study config: models[{i}] '{entry}' is not a known model: not a zoo: alias, local directory or "
                "cached hub model (use zoo:minilm / zoo:smollm2 / zoo:whisper-tiny-en, or set allow_hub: true)"
            )
        if entry in out:
            raise ConfigError(f"study config: models[{i}] '{entry}' is listed twice")
        out.append(entry)
    return out


def _in_hf_cache(repo_id: str) -> bool:
    try:
        from huggingface_hub import try_to_load_from_cache

        hit = try_to_load_from_cache(repo_id, "config.json")
        return isinstance(hit, str)
    except Exception:
        return False


def _check_plugins(value: Any) -> list[str]:
    """Modules that register pruning methods: imported now (so `methods:` may name their methods) and
    by every worker before it runs a cell (they must be importable there: installed or on PYTHONPATH)."""
    if value in (None, [], ()):
        return []
    modules = _as_list(value, "plugins")
    for i, module in enumerate(modules):
        if not isinstance(module, str) or not module:
            raise ConfigError(f"study config: plugins[{i}] {module!r} must be a module name")
        try:
            load_plugins([module])
        except PrunelabError as exc:
            raise ConfigError(f"study config: plugins[{i}]: {exc}") from exc
    return list(dict.fromkeys(modules))


def _check_methods(value: Any) -> list[MethodEntry]:
    known = known_methods()
    out: list[MethodEntry] = []
    for i, entry in enumerate(_as_list(value, "methods")):
        if isinstance(entry, str):
            name, opts = entry, {}
        elif isinstance(entry, dict) and isinstance(entry.get("name"), str):
            name, opts = entry["name"], {k: v for k, v in entry.items() if k != "name"}
        else:
            raise ConfigError(f"study config: methods[{i}] {entry!r} must be a name or a mapping with 'name:'")
        if name == DENSE:
            raise ConfigError(f"study config: methods[{i}] 'dense' is implicit (every study evaluates the dense "
                              "model as the reference): remove it")
        if name not in known:
            raise ConfigError(f"study config: methods[{i}] '{name}' is not a known method: choose one of "
                              f"{', '.join(known)}")
        recover = opts.pop("recover", None)
        if recover is not None:
            _check_recover(recover, f"methods[{i}] '{name}'")
        allowed = method_option_names(name)
        for key in opts:
            if key not in allowed:
                raise ConfigError(f"study config: methods[{i}] '{name}' has unknown option '{key}': allowed "
                                  f"{', '.join(allowed) if allowed else 'none'}")
        try:  # let PruneConfig check option values (types, ranges)
            from prunelab.pruning.types import PruneConfig

            PruneConfig.from_settings(name, sparsity=0.5, **opts)
        except (TypeError, PrunelabError) as exc:
            raise ConfigError(f"study config: methods[{i}] '{name}': {exc}") from exc
        out.append(MethodEntry(name, dict(opts) | ({"recover": recover} if recover is not None else {})))
    return out


def _check_recover(spec: Any, where: str) -> str:
    """`block`, `distill:N`, `block+distill:N` (recovery after the method; see prunelab.recovery)."""
    from prunelab.recovery.config import RecoveryConfig

    try:
        RecoveryConfig.from_spec(spec)
    except PrunelabError as exc:
        raise ConfigError(f"study config: {where}: {exc}") from exc
    return str(spec)


def _expand_recover(methods: list[MethodEntry], value: Any) -> list[MethodEntry]:
    """The `recover:` axis: every method once per recovery (`none` keeps the method as it is)."""
    if value is None:
        return methods
    specs = [str(v) for v in _as_list(value, "recover")]
    for spec in specs:
        if spec != "none":
            _check_recover(spec, "recover")
    return [MethodEntry(m.name, dict(m.options) | ({"recover": spec} if spec != "none" else {}))
            for m in methods for spec in specs]


def _check_patterns(value: Any) -> list[str]:
    from prunelab.pruning.types import parse_pattern

    out = []
    for i, entry in enumerate(_as_list(value, "patterns")):
        try:
            parse_pattern(str(entry))
        except PrunelabError as exc:
            raise ConfigError(f"study config: patterns[{i}] '{entry}' is not a known pattern: {exc}") from exc
        out.append(str(entry))
    return out


def _check_sparsities(value: Any, name: str) -> list[float]:
    out: list[float] = []
    for i, entry in enumerate(_as_list(value, name)):
        if isinstance(entry, bool) or not isinstance(entry, (int, float)):
            raise ConfigError(f"study config: {name}[{i}] {entry!r} is not a number: use e.g. 0.5 for 50 %")
        if not 0.0 <= float(entry) < 1.0:
            raise ConfigError(f"study config: {name}[{i}] {entry} is outside [0, 1): use e.g. 0.5 for 50 %")
        s = norm_sparsity(entry)
        if s not in out:
            out.append(s)
    return out


def _check_bench_list(value: Any, where: str, known: dict[str, set[str]]) -> Any:
    if value == "default":
        return "default"
    items = _as_list(value, where)
    for i, b in enumerate(items):
        if b not in known:
            raise ConfigError(f"study config: {where}[{i}] '{b}' is not a known benchmark: choose from "
                              f"{', '.join(sorted(known))} or 'default'")
    return list(dict.fromkeys(items))


def _check_benchmarks(value: Any, models: list[str]) -> Any:
    known = known_benchmarks()
    if isinstance(value, dict):
        out = {}
        for model, benches in value.items():
            if model not in models:
                raise ConfigError(f"study config: benchmarks has an entry for '{model}', which is not in models")
            out[model] = _check_bench_list(benches, f"benchmarks[{model}]", known)
        return out
    return _check_bench_list(value, "benchmarks", known)


def _check_keys(value: Any, allowed: tuple[str, ...], where: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise ConfigError(f"study config: {where} must be a mapping")
    for key in value:
        if key not in allowed:
            raise ConfigError(f"study config: {where} has unknown key '{key}': allowed {', '.join(allowed)}")
    return dict(value)


def _check_eval(value: Any) -> dict[str, dict[str, Any]]:
    known = known_benchmarks()
    value = _check_keys(value, tuple(known), "eval")
    return {bench: _check_bench_options(bench, opts or {}) for bench, opts in value.items()}


def _check_bench_options(bench: str, opts: Any) -> dict[str, Any]:
    """One bench's `eval:` entry; `limit` and `tasks` are checked here so a typo fails before any cell runs."""
    where = f"eval.{bench}"
    d = _check_keys(opts, EVAL_KEYS + BENCH_EVAL_KEYS.get(bench, ()), where)
    limit = d.get("limit")
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise ConfigError(f"study config: {where}.limit {limit!r} is not a positive number of examples per task")
    if "tasks" in d:
        from prunelab.evaluation.registry import get_bench
        from prunelab.evaluation.types import EvalOptions

        tasks = [str(t) for t in _as_list(d["tasks"], f"{where}.tasks")]
        try:  # the bench's own `name:arg` parser names the unknown task and the known ones
            d["tasks"] = get_bench(bench).with_arg(f"{bench}:{','.join(tasks)}", EvalOptions()).tasks
        except ConfigError as exc:
            raise ConfigError(f"study config: {where}.tasks: {exc}") from None
    return d


def _check_sub(value: Any, allowed: tuple[str, ...], where: str, methods: list[MethodEntry],
               user: Any = None) -> dict[str, Any] | None:
    """`size:` / `speed:` — false, true (every pruned point) or a mapping narrowing it.

    A method filter the user wrote must name the study's methods; one inherited from the preset
    (speed on magnitude only) is intersected with them, falling back to the study's first method.
    """
    if value is None or value is False:
        return None
    if value is True:
        return {}
    d = _check_keys(value, allowed, where)
    if d.get("sparsities", "all") != "all":
        d["sparsities"] = _check_sparsities(d["sparsities"], f"{where}.sparsities")
    if d.get("methods", "all") != "all":
        names = [m.name for m in methods]
        user_methods = isinstance(user, dict) and "methods" in user
        wanted = _as_list(d["methods"], f"{where}.methods")
        if user_methods:
            for i, m in enumerate(wanted):
                if m not in names:
                    raise ConfigError(f"study config: {where}.methods[{i}] '{m}' is not one of the study's methods")
        else:
            d["methods"] = [m for m in wanted if m in names] or names[:1]
    for key in ("prefill_tokens", "decode_tokens", "repeats"):
        if key in d and (not isinstance(d[key], int) or d[key] < 1):
            raise ConfigError(f"study config: {where}.{key} must be a positive integer")
    for key in ("measure_rss", "measure_size"):
        if key in d:
            _bool(d[key], f"{where}.{key}")
    return d


def _check_overrides(merged: Any, user: Any, models: list[str]) -> dict[str, dict[str, Any]]:
    """Per-model calibration/eval settings. A preset's entries for models not in the study are dropped;
    the user's must name a model of the study."""
    if not isinstance(merged, dict) or not isinstance(user, dict):
        raise ConfigError("study config: model_overrides must map a model to {calibration: ..., eval: ...}")
    out: dict[str, dict[str, Any]] = {}
    for model, entry in merged.items():
        if model not in models:
            if model in user:
                raise ConfigError(f"study config: model_overrides has an entry for '{model}', which is not in models")
            continue
        entry = _check_keys(entry or {}, ("calibration", "eval"), f"model_overrides[{model}]")
        d: dict[str, Any] = {}
        if "calibration" in entry:
            d["calibration"] = _check_keys(entry["calibration"] or {}, CALIBRATION_KEYS,
                                           f"model_overrides[{model}].calibration")
        if "eval" in entry:
            d["eval"] = _check_eval(entry["eval"] or {})
        out[model] = d
    return out


def _check_resources(value: Any) -> dict[str, float]:
    d = _check_keys(value, ("num_cpus", "num_gpus"), "resources")
    for key, v in d.items():
        if isinstance(v, bool) or not isinstance(v, (int, float)) or v < 0:
            raise ConfigError(f"study config: resources.{key} {v!r} must be a number ≥ 0")
    d.setdefault("num_cpus", 1)
    d.setdefault("num_gpus", 0)
    return d


# ---------------------------------------------------------------------------------------------
# Expansion into cells
# ---------------------------------------------------------------------------------------------


def model_family(spec: str) -> tuple[str, bool]:
    """(family, is_speech) from the model's config.json (converting zoo models into the cache)."""
    from prunelab.models import detect_family, read_config, resolve_source
    from prunelab.models.types import is_speech_config

    config = read_config(resolve_source(spec))
    return detect_family(config), is_speech_config(config)


def default_benchmarks_for(family: str, is_speech: bool) -> list[str]:
    """The family's defaults from the benchmark registry (speech enc-dec → asr)."""
    from prunelab.evaluation.registry import default_benchmarks

    if family == "encoder-decoder" and is_speech:
        return ["asr"]
    return list(default_benchmarks(family))


def _prune_params(config: StudyConfig, method: MethodEntry, model: str) -> dict[str, Any]:
    """Seed, plus the calibration settings for points that calibrate (the method itself, or its OWL / refine
    option), so plain magnitude cells do not depend on them."""
    from prunelab.pruning.types import PruneConfig

    params: dict[str, Any] = {"seed": config.seed}
    calib = {**config.calibration_for(model), **{k: v for k, v in method.options.items() if k in CALIBRATION_KEYS}}
    options = {k: v for k, v in method.options.items() if k != "recover"}
    # recovery trains on the calibration windows, so a recovered point depends on them too
    if "recover" in method.options or PruneConfig.from_settings(method.name, sparsity=0.5, **options).needs_calibration:
        defaults = PruneConfig(method=method.name, sparsity=0.5)
        for key in CALIBRATION_KEYS:
            params[key] = calib.get(key, getattr(defaults, key))
    return params


def _selected(sub: dict[str, Any] | None, method: str, sparsity: float) -> bool:
    if sub is None:
        return False
    methods = sub.get("methods", "all")
    sparsities = sub.get("sparsities", "all")
    return (methods == "all" or method in methods) and (sparsities == "all" or norm_sparsity(sparsity) in sparsities)


def plan(config: StudyConfig, *, families: dict[str, tuple[str, bool]] | None = None) -> list[Cell]:
    """Expand the grid into cells, in the order a sequential run executes them.

    Per model: analyze, the dense benchmarks, then for every (method, pattern, sparsity) point
    its prune cell followed by the cells that reuse its checkpoint (benchmarks, size, speed).
    N:M patterns fix the sparsity at N/M, so they add one point per method.
    """
    from prunelab.pruning.types import parse_pattern

    families = dict(families or {})
    resources = dict(config.resources)
    cells: list[Cell] = []
    speed_opts = {k: v for k, v in (config.speed or {}).items() if k not in ("sparsities", "methods")}
    for model in config.models:
        if model not in families:
            families[model] = model_family(model)
        family, is_speech = families[model]
        if isinstance(config.benchmarks, dict):
            chosen = config.benchmarks.get(model, "default")
        else:
            chosen = config.benchmarks
        if chosen == "default":
            benches = default_benchmarks_for(family, is_speech)
        else:
            fam = known_benchmarks()
            benches = [b for b in chosen if family in fam.get(b, {family})]
        if config.analyze:
            cells.append(Cell("analyze", model, resources=resources))
        for bench in benches:
            opts = {**config.eval_for(model, bench), "seed": config.seed}
            cells.append(Cell("bench", model, bench=bench, options=opts, resources=resources))
        for method in config.methods:
            mopts = {k: v for k, v in method.options.items() if k not in CALIBRATION_KEYS}
            prune = _prune_params(config, method, model)
            for pattern in config.patterns:
                nm = parse_pattern(pattern)
                points = [nm[0] / nm[1]] if nm else config.sparsities
                for sparsity in points:
                    base = {"model": model, "method": method.name, "pattern": pattern,
                            "sparsity": norm_sparsity(sparsity), "method_options": mopts, "prune": prune,
                            "resources": resources, "plugins": tuple(config.plugins)}
                    cells.append(Cell("prune", **base))
                    for bench in benches:
                        opts = {**config.eval_for(model, bench), "seed": config.seed}
                        cells.append(Cell("bench", bench=bench, options=opts, **base))
                    if _selected(config.size, method.name, sparsity):
                        cells.append(Cell("size", **base))
                    if _selected(config.speed, method.name, sparsity):
                        cells.append(Cell("speed", options=speed_opts, **base))
    return cells
