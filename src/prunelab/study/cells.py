"""One point of a study grid (`Cell`) and the stable hash that keys it in the results store.

A cell's hash covers everything that can change its result — kind, model, method and its
options, pattern, sparsity, benchmark, calibration and evaluation settings, seed — and
nothing that cannot (output directory, executor, number of jobs). Re-running a study skips
exactly the cells whose hash already has a finished row, so the hash must be stable across
processes and Python versions: it is the sha256 of canonical JSON (sorted keys, no spaces,
sparsities rounded to 6 decimals).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from typing import Any, Literal

CellKind = Literal["analyze", "prune", "bench", "size", "speed"]
KINDS: tuple[str, ...] = ("analyze", "prune", "bench", "size", "speed")
DENSE = "dense"  # method name of the unpruned reference point
SCHEMA = 1  # bump when the meaning of a cell's configuration changes


def canonical_json(obj: Any) -> str:
    """JSON with sorted keys and no whitespace: equal configurations give equal strings."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True, default=str)


def sha256_of(obj: Any) -> str:
    return hashlib.sha256(canonical_json(obj).encode("utf-8")).hexdigest()


def norm_sparsity(value: float) -> float:
    return round(float(value), 6)


@dataclass(frozen=True)
class Cell:
    """One unit of study work.

    kinds:
      - `analyze`: weight statistics and plots of the dense model (no method/sparsity);
      - `prune`: prune the dense model once per (model, method, options, pattern, sparsity)
        and write the checkpoint every later cell of that point reuses;
      - `bench`: one benchmark on the pruned checkpoint (or on the dense model, method `dense`);
      - `size`: write the sparse on-disk format of the pruned checkpoint and measure it;
      - `speed`: dense-vs-sparse prefill/decode timing of the pruned checkpoint.

    `prune` holds the pruning options that matter for this method (calibration size only for
    methods that calibrate); `options` holds the benchmark / size / speed options. `plugins`
    (the study's plug-in modules, which register methods) travel to the worker with the cell
    but are not part of its identity, like `resources`.
    """

    kind: str
    model: str
    method: str = DENSE
    pattern: str = "unstructured"
    sparsity: float = 0.0
    bench: str = ""
    method_options: dict[str, Any] = field(default_factory=dict)
    prune: dict[str, Any] = field(default_factory=dict)
    options: dict[str, Any] = field(default_factory=dict)
    resources: dict[str, float] = field(default_factory=dict, compare=False)
    plugins: tuple[str, ...] = field(default=(), compare=False)

    # -- identity -------------------------------------------------------------------------
    def point_dict(self) -> dict[str, Any]:
        """The pruning point this cell belongs to (what its checkpoint depends on)."""
        return {
            "schema": SCHEMA,
            "model": self.model,
            "method": self.method,
            "method_options": dict(self.method_options),
            "pattern": self.pattern,
            "sparsity": norm_sparsity(self.sparsity),
            "prune": dict(self.prune),
        }

    def to_dict(self) -> dict[str, Any]:
        """Full configuration; the hash is computed over exactly this."""
        d = self.point_dict()
        d.update({"kind": self.kind, "bench": self.bench, "options": dict(self.options)})
        return d

    @property
    def hash(self) -> str:
        return sha256_of(self.to_dict())

    def __hash__(self) -> int:  # dict fields: hash by configuration instead
        return hash(self.hash)

    @property
    def point_hash(self) -> str:
        return sha256_of(self.point_dict())

    @property
    def is_dense(self) -> bool:
        return self.method == DENSE

    @property
    def method_label(self) -> str:
        """`wanda`, `wanda[owl=True]`, `wanda+swap` (refine), `alps +block` (recovery), `magnitude 2:4`: how plots
        and tables name the method."""
        opts = dict(self.method_options)
        refine = opts.pop("refine", None)
        recover = opts.pop("recover", None)
        label = self.method + (f"+{refine}" if refine else "") + (f" +{recover}" if recover else "")
        if opts:
            label += "[" + ",".join(f"{k}={v}" for k, v in sorted(opts.items())) + "]"
        if self.pattern != "unstructured":
            label += f" {self.pattern}"
        return label

    @property
    def label(self) -> str:
        """Short human-readable name for progress lines and log files."""
        model = self.model.split("/")[-1]
        if self.kind == "analyze":
            return f"analyze {model}"
        point = f"{model} dense" if self.is_dense else f"{model} {self.method_label} @{self.sparsity:g}"
        if self.kind == "bench":
            return f"{self.bench} {point}"
        return f"{self.kind} {point}"

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Cell:
        return cls(
            kind=d["kind"], model=d["model"], method=d.get("method", DENSE), pattern=d.get("pattern", "unstructured"),
            sparsity=float(d.get("sparsity", 0.0)), bench=d.get("bench", ""),
            method_options=dict(d.get("method_options") or {}), prune=dict(d.get("prune") or {}),
            options=dict(d.get("options") or {}), resources=dict(d.get("resources") or {}),
            plugins=tuple(d.get("plugins") or ()),
        )

    def payload(self) -> dict[str, Any]:
        """What travels to a worker (picklable, JSON-able)."""
        d = self.to_dict()
        d["resources"] = dict(self.resources)
        if self.plugins:
            d["plugins"] = list(self.plugins)
        return d
