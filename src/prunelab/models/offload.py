"""Models larger than memory: the skeleton on the meta device, each block's weights read just in time.

`load_offloaded` builds the model from its config with every parameter on the meta device (no
memory; buffers such as rotary frequencies are still computed), then `Offload` reads weights
from the safetensors shards only while they are needed:

* a transformer block's weights are read when the block is called and released after it,
  unless a caller pins the block (the pruning engine pins the block it is solving, then writes
  it out and releases it: `pin` / `release`);
* embeddings, norms and the head (everything outside the numbered blocks) are read inside
  `with offload.outside():` — the embedding pass before the first block, the head after the last.

Tensors are read with plain positioned reads into a fresh buffer, not through a memory map:
pages of a mapped shard would count towards the process's resident memory until the map is
closed, doubling the footprint of the largest tensor. Values are converted to the model's
dtype exactly as `from_pretrained` does, so an out-of-core run computes on the same numbers.

Which stored tensor fills which parameter is decided by transformers' own loading rules
(`stored_names`: its key renamings and base-model prefix handling; tied weights read once from
the stored half of the tie), not by a parallel table: an architecture whose checkpoint names
differ from its module names streams like any other. What the checkpoint does not store
(sinusoidal position tables, for instance) is initialised once by the model's own
`initialize_weights`, as `from_pretrained` does, and kept in memory (`Offload.initialised`).
"""

from __future__ import annotations

import contextlib
import re
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from prunelab.errors import ConfigError, ModelLoadError
from prunelab.models.blocks import BlockError, block_prefix
from prunelab.models.header import TORCH_DTYPES, TensorInfo, read_header

_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def parse_bytes(text: str) -> int:
    """`4GB`, `512MiB`, `1.5 GB`, `1000000` → bytes; anything else is a one-line error."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([KMGT]?I?B?)\s*", text.upper())
    if not match or match.group(2) not in _UNITS:
        raise ConfigError(f"cannot read the memory size {text!r}: write it like 4GB, 512MB or 2GiB")
    return int(float(match.group(1)) * _UNITS[match.group(2)])


def format_bytes(n: float) -> str:
    if n >= 1e9:
        return f"{n / 1e9:.2f} GB"
    return f"{n / 1e6:.1f} MB" if n >= 1e6 else f"{n / 1e3:.1f} kB"


def read_stored(t: TensorInfo) -> torch.Tensor:
    """One tensor, read into a fresh buffer with a positioned read (no memory map)."""
    buf = torch.empty(t.nbytes, dtype=torch.uint8)
    with open(t.file, "rb", buffering=0) as fh:
        fh.seek(t.start)
        view = memoryview(buf.numpy())
        got = 0
        while got < t.nbytes:
            n = fh.readinto(view[got:])
            if not n:
                raise ModelLoadError(f"{t.file} is truncated: re-download or re-save the checkpoint")
            got += n
    return buf.view(TORCH_DTYPES[t.dtype]).reshape(t.shape)


def checkpoint_index(files: list[Path]) -> dict[str, TensorInfo]:
    """Every tensor of a checkpoint by name, from the shards' headers (the one parser, `models.header`)."""
    index: dict[str, TensorInfo] = {}
    for f in files:
        index.update({t.name: t for t in read_header(f)})
    return index


@dataclass
class _Slot:
    """A parameter or persistent buffer: its checkpoint key and every (module, attribute) that holds it."""

    key: str
    holders: list[tuple[nn.Module, str, bool]] = field(default_factory=list)  # (module, attr, is_parameter)
    meta: torch.Tensor | None = None


def bound_heap(threshold: int = 1 << 20) -> None:
    """Every allocation of `threshold` bytes or more gets its own memory map (glibc `M_MMAP_THRESHOLD`).

    glibc otherwise raises that threshold as large blocks are freed and serves the next blocks of
    a similar size from its heap, which it rarely returns to the system: after a few hundred
    block reads the heap holds tens of megabytes no tensor uses. Out of core, memory is the point,
    so freed tensors must go back at once. No-op where glibc's `mallopt` is not available.
    """
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.mallopt(-3, int(threshold))  # M_MMAP_THRESHOLD; a fixed value also stops the dynamic raise
    except (OSError, AttributeError):
        pass


class Offload:
    """Just-in-time weights for a model built on the meta device (see the module docstring)."""

    def __init__(self, model: nn.Module, index: dict[str, TensorInfo], *, dtype: torch.dtype | None,
                 device: torch.device, budget_bytes: int | None = None) -> None:
        self.model, self.index, self.dtype, self.device = model, index, dtype, device
        self.budget_bytes = budget_bytes
        self.slots = self._slots(model)
        self.units = units_of(self.slots)  # block prefix -> slot names ("" = outside every block)
        self.resident: set[str] = set()
        self.pinned: set[str] = set()
        self.pinned_at: dict[str, float] = {}  # when each block was last pinned (its read, solve and write time)
        self.bytes_read = 0
        # Called with (unit, its tensors) when a pruned block is finished: the pruning engine writes it out.
        self.sink: Callable[[str, dict[str, torch.Tensor]], None] | None = None
        self._hooks = [self._hook_block(prefix) for prefix in self.units if prefix]
        bound_heap()

    # -- which tensor is where ------------------------------------------------------------------
    def _slots(self, model: nn.Module) -> dict[str, _Slot]:
        """Every parameter and persistent buffer, with the stored tensor `from_pretrained` would put there.

        Keys are resolved by transformers' own loading rules (`stored_names`), tied tensors share one
        slot (read from the stored one of the group, as `tie_weights` does), and whatever the
        checkpoint does not store is initialised now, in memory, by `_initialise_missing`.
        """
        stored = stored_names(model, self.index)
        self.renamed = {name: key for name, key in stored.items() if key != name}
        _untie_differing(model, stored, self.index)
        tied_targets = set(getattr(model, "all_tied_weights_keys", {}) or {})
        slots: dict[str, _Slot] = {}
        names: dict[str, list[str]] = {}
        by_id: dict[int, str] = {}
        for mod_name, module in model.named_modules(remove_duplicate=False):
            for attr, t in list(module._parameters.items()) + [
                (b, module._buffers[b]) for b in module._buffers if b not in module._non_persistent_buffers_set
            ]:
                if t is None:
                    continue
                name = f"{mod_name}.{attr}" if mod_name else attr
                first = by_id.setdefault(id(t), name)
                slots.setdefault(first, _Slot(""))
                slots[first].holders.append((module, attr, attr in module._parameters))
                names.setdefault(first, []).append(name)
        missing: dict[str, _Slot] = {}
        for first, slot in slots.items():
            # a tied group is read from its source (a target only when the source is not stored)
            aliases = sorted(names[first], key=lambda n: n in tied_targets)
            slot.key = next((stored[n] for n in aliases if n in stored), "")
            if not slot.key:
                missing[first] = slot
            else:
                _check_shape(first, slot, self.index[slot.key])
        self.initialised = _initialise_missing(model, missing, self.device)
        return {n: s for n, s in slots.items() if s.key}

    # -- reading and releasing ------------------------------------------------------------------
    def read(self, name: str) -> torch.Tensor:
        """The stored tensor behind a model name, in the model's dtype (a new tensor)."""
        stored = self.index[self.slots[name].key]
        self.bytes_read += stored.nbytes
        t = read_stored(stored)
        if self.dtype is not None and t.is_floating_point() and t.dtype != self.dtype:
            t = t.to(self.dtype)
        return t.to(self.device)

    def _set(self, name: str, value: torch.Tensor | None) -> None:
        slot = self.slots[name]
        if slot.meta is None:
            module, attr, _ = slot.holders[0]
            slot.meta = getattr(module, attr)
        new: Any = slot.meta if value is None else value
        if value is not None and slot.holders[0][2]:
            new = nn.Parameter(value, requires_grad=False)
        for module, attr, is_param in slot.holders:
            (module._parameters if is_param else module._buffers)[attr] = new

    def load(self, unit: str) -> None:
        """Read every tensor of a block (or of the outside, unit "") unless it is already resident."""
        if unit in self.resident:
            return
        for name in self.units.get(unit, []):
            self._set(name, self.read(name))
        self.resident.add(unit)

    def release(self, unit: str) -> None:
        """Back to the meta device: the block's memory is freed (its module keeps its shapes)."""
        for name in self.units.get(unit, []):
            self._set(name, None)
        self.resident.discard(unit)
        self.pinned.discard(unit)

    def pin(self, unit: str) -> None:
        """Load a block and keep it until `release` (a block being solved is called more than once)."""
        self.pinned_at[unit] = time.perf_counter()
        self.load(unit)
        self.pinned.add(unit)

    def repoint(self, shard: Path) -> None:
        """Tensors just written to `shard` are read from there from now on: a pruned block that runs
        again (an encoder feeding its decoder) must run pruned."""
        for stored in read_header(shard):
            if stored.name in self.slots:
                self.index[self.slots[stored.name].key] = stored

    def finish(self, unit: str, *, write: bool) -> None:
        """A block is done: hand its (pruned) tensors to the sink when asked, then free them."""
        if write and self.sink is not None:
            self.sink(unit, self.tensors(unit))
        self.release(unit)

    def initialised_report(self) -> list[dict[str, Any]]:
        """What the checkpoint does not store and was initialised in memory (for `prune_report.json`)."""
        out = []
        for name, slot in self.initialised.items():
            module, attr, is_param = slot.holders[0]
            t = getattr(module, attr)
            out.append({"name": name, "kind": "parameter" if is_param else "buffer", "shape": list(t.shape),
                        "dtype": str(t.dtype).removeprefix("torch."), "numel": t.numel(),
                        "initialised_by": f"{type(self.model).__name__}._init_weights (as from_pretrained)"})
        return out

    def tensors(self, unit: str) -> dict[str, torch.Tensor]:
        """A resident unit's current tensors by model name (what a writer stores)."""
        out = {}
        for name in self.units.get(unit, []):
            module, attr, _ = self.slots[name].holders[0]
            out[name] = getattr(module, attr).detach()
        return out

    @contextlib.contextmanager
    def outside(self) -> Iterator[None]:
        """Embeddings, norms and head resident inside the block; released after."""
        was = "" in self.resident
        self.load("")
        try:
            yield
        finally:
            if not was:
                self.release("")

    def _hook_block(self, prefix: str) -> Any:
        module = self.model.get_submodule(prefix)

        def pre(mod: nn.Module, args: Any) -> None:
            if "forward" not in mod.__dict__:  # a block replaced by a stand-in needs no weights
                self.load(prefix)

        def post(mod: nn.Module, args: Any, out: Any) -> None:
            if prefix not in self.pinned:
                self.release(prefix)

        return module.register_forward_pre_hook(pre), module.register_forward_hook(post)

    # -- sizes ----------------------------------------------------------------------------------
    def unit_bytes(self, unit: str) -> int:
        """fp32-equivalent bytes of one unit's tensors once read (what the budget is compared with)."""
        item = (self.dtype or torch.float32).itemsize
        return sum(self.index[self.slots[n].key].numel * item for n in self.units.get(unit, []))

    @property
    def total_bytes(self) -> int:
        return sum(self.unit_bytes(u) for u in self.units)

    def blocks(self) -> list[str]:
        return [u for u in self.units if u]

    def check_budget(self) -> None:
        """A budget smaller than one block cannot work: say which block and by how much."""
        if self.budget_bytes is None:
            return
        blocks = self.blocks()
        unit = max(blocks, key=self.unit_bytes) if blocks else ""
        if self.unit_bytes(unit) <= self.budget_bytes:
            unit = ""  # every block fits: the embeddings and head must too
        need = self.unit_bytes(unit)
        if need > self.budget_bytes:
            what = f"block {unit}" if unit else "the weights outside the blocks (embeddings, norms, head)"
            raise ConfigError(f"--max-memory {format_bytes(self.budget_bytes)} is smaller than {what}, which needs "
                              f"{format_bytes(need)}: raise --max-memory to at least {format_bytes(2 * need)}")


def stored_names(model: nn.Module, index: dict[str, TensorInfo]) -> dict[str, str]:
    """Model state-dict name → checkpoint key, by the rules `from_pretrained` itself applies.

    transformers renames checkpoint keys while loading (legacy names such as `LayerNorm.gamma`,
    per-architecture rules such as GPT-NeoX's `embed_out` → `lm_head`, the base-model prefix added
    or stripped): its own `get_model_conversion_mapping` and `rename_source_key` are run on every
    stored key, in its order, so a key lands where `from_pretrained` would put it and nowhere else.
    A key that transformers builds with a conversion (several stored tensors merged, one split) is
    not a tensor that can be read on its own: that is refused here, before any work, naming it.
    """
    from transformers.conversion_mapping import get_model_conversion_mapping
    from transformers.core_model_loading import WeightConverter, WeightRenaming, dot_natural_key, rename_source_key

    mapping = get_model_conversion_mapping(model)
    renamings = [m for m in mapping if isinstance(m, WeightRenaming)]
    converters = [m for m in mapping if isinstance(m, WeightConverter)]
    prefix = getattr(model, "base_model_prefix", "") or None
    meta_state = model.state_dict()
    out: dict[str, str] = {}
    for key in sorted(index, key=dot_natural_key):  # transformers' order: with duplicates the first one wins
        renamed, pattern = rename_source_key(key, renamings, converters, prefix, meta_state)
        if renamed not in meta_state and key in meta_state:
            renamed, pattern = rename_source_key(key, [], [], prefix, meta_state)
        if renamed not in meta_state:
            continue  # an unexpected key: from_pretrained ignores it too
        if pattern is not None:
            raise ModelLoadError(f"cannot stream {renamed}: transformers builds it from the stored {key} with a "
                                 "weight conversion (tensors merged or split while loading), which --offload disk "
                                 "does not do; load it in memory instead (--offload none)")
        out.setdefault(renamed, key)
    return out


def _untie_differing(model: nn.Module, stored: dict[str, str], index: dict[str, TensorInfo]) -> None:
    """A tied pair whose two tensors are both stored and differ is left untied, as `from_pretrained` does.

    Only checkpoints that store both halves of a tie are read here (safetensors from
    `save_pretrained` never do), one pair at a time.
    """
    tied = getattr(model, "all_tied_weights_keys", None) or {}
    for target, source in list(tied.items()):
        if target not in stored or source not in stored or stored[target] == stored[source]:
            continue
        if torch.equal(read_stored(index[stored[target]]), read_stored(index[stored[source]])):
            continue
        parent_name, _, attr = target.rpartition(".")
        parent = model.get_submodule(parent_name)
        shared = getattr(parent, attr)
        setattr(parent, attr, nn.Parameter(torch.empty_like(shared, device="meta"), requires_grad=False))
        tied.pop(target)


def _check_shape(name: str, slot: _Slot, stored: TensorInfo) -> None:
    module, attr, _ = slot.holders[0]
    want = tuple(getattr(module, attr).shape)
    if tuple(stored.shape) != want:
        raise ModelLoadError(f"cannot stream {name}: the checkpoint stores {stored.name} with shape "
                             f"{list(stored.shape)} where the model built from config.json has {list(want)}")


def _initialise_missing(model: nn.Module, missing: dict[str, _Slot], device: torch.device) -> dict[str, _Slot]:
    """Tensors the checkpoint does not store, initialised the way `from_pretrained` initialises them.

    `from_pretrained` gives each missing parameter or persistent buffer an empty tensor, marks every
    loaded one `_is_hf_initialized` and runs the model's `initialize_weights`, whose `_init_weights`
    fills exactly the unmarked ones (sinusoidal position tables, for instance, are computed there).
    The same calls are made here on the skeleton — its streamed tensors are still on the meta device,
    so the walk costs no memory — and the results stay in memory for the whole run: they are small.
    """
    if not missing:
        return {}
    fresh: set[int] = set()
    for slot in missing.values():
        module, attr, is_param = slot.holders[0]
        meta = getattr(module, attr)
        value: Any = torch.empty_like(meta, device="cpu")
        if is_param:
            value = nn.Parameter(value, requires_grad=False)
        for mod, a, p in slot.holders:
            (mod._parameters if p else mod._buffers)[a] = value
        fresh.add(id(value))
    init_weights = getattr(model, "initialize_weights", None)
    if init_weights is None:
        raise ModelLoadError(f"cannot stream {next(iter(missing))}: the checkpoint does not store it and "
                             f"{type(model).__name__} has no initialize_weights; load it in memory (--offload none)")
    for t in [*model.parameters(), *model.buffers()]:
        if id(t) not in fresh:
            t._is_hf_initialized = True  # type: ignore[attr-defined]  # transformers' own "loaded" mark
    for module in model.modules():
        module._is_hf_initialized = False  # as in from_pretrained, where no module was initialised yet
    init_weights()
    for slot in missing.values():
        module, attr, is_param = slot.holders[0]
        value = getattr(module, attr).detach().to(device)
        if is_param:
            value = nn.Parameter(value, requires_grad=False)
        for mod, a, p in slot.holders:
            (mod._parameters if p else mod._buffers)[a] = value
    return missing


def units_of(names: Iterable[str]) -> dict[str, list[str]]:
    """Tensor names grouped by transformer block, in order; "" holds everything outside the blocks."""
    units: dict[str, list[str]] = {}
    for name in names:
        units.setdefault(_unit_of(name), []).append(name)
    return units


def _unit_of(name: str) -> str:
    try:
        return block_prefix(name)
    except BlockError:  # not inside a numbered block: embeddings, norms, head
        return ""


def meta_model(source: Path, config: Any, auto_class: Any) -> nn.Module:
    """The model's modules with parameters on the meta device (buffers real) and weights tied."""
    from accelerate import init_empty_weights

    with init_empty_weights(include_buffers=False):
        model = auto_class.from_config(config)
    model.tie_weights()
    return model.eval()


def resolve_device(device: str) -> torch.device:
    """`cpu`, `cuda`, `cuda:N` or `auto` (a GPU when there is one); asking for a missing GPU is an error."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ConfigError(f"--device {device}: no CUDA GPU is visible to PyTorch here; use --device cpu or auto")
        return torch.device(device)
    if device != "cpu":
        raise ConfigError(f"unknown --device {device!r}: use cpu, cuda or auto")
    return torch.device("cpu")


def available_memory_bytes() -> int:
    """MemAvailable from /proc/meminfo (Linux); where that cannot be read, a conservative 8 GB."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 8 * 10**9


def load_offloaded(spec: Any, *, device: str = "cpu", max_memory: int | None = None,
                   dtype: torch.dtype | None = torch.float32) -> Any:
    """A `LoadedModel` whose weights stay on disk until used (`lm.offload`); see the module docstring."""
    from prunelab.models.family import detect_family
    from prunelab.models.loader import auto_class_for, loaded_model, read_config, resolve_source, weight_files
    from prunelab.models.spec import parse_spec

    spec = parse_spec(spec)
    source = resolve_source(spec)
    config = read_config(source)
    family = detect_family(config)
    index = checkpoint_index(weight_files(source))
    model = meta_model(source, config, auto_class_for(config, family, source))
    offload = Offload(model, index, dtype=dtype, device=resolve_device(device), budget_bytes=max_memory)
    offload.check_budget()
    lm = loaded_model(model, spec, source, config)
    for m in lm.prunable:  # pruned in memory, it could not be written out with its block: say so now
        if m.param_name in offload.initialised:
            raise ModelLoadError(f"cannot stream {m.param_name}: the checkpoint does not store this prunable "
                                 "matrix (from_pretrained would initialise it); load it in memory (--offload none)")
    lm.offload = offload
    return lm


def should_offload(source_bytes: int, max_memory: int | None) -> bool:
    """`--offload auto`: stream from disk when the weights exceed the budget (default: 80 % of free memory)."""
    budget = max_memory if max_memory is not None else int(0.8 * available_memory_bytes())
    return source_bytes > budget


def fp32_bytes(source: Path) -> int:
    """Bytes of a checkpoint's floating-point weights once in float32 (headers only are read)."""
    from prunelab.models.loader import weight_files

    index = checkpoint_index(weight_files(source))
    return sum(4 * t.numel if t.is_float else t.nbytes for t in index.values())
