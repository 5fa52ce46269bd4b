"""Which benchmarks exist, which families they apply to, and what each family runs by default.

Targets are "module:function" strings imported only when the benchmark runs, so importing
the registry is cheap and adding a benchmark is one line here plus its module. A bench
function has the signature `fn(lm: LoadedModel, options: EvalOptions) -> EvalResult`.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from prunelab.errors import ConfigError

if TYPE_CHECKING:
    from prunelab.models.types import LoadedModel

ALL_FAMILIES = {"encoder", "decoder", "encoder-decoder"}


@dataclass(frozen=True)
class BenchSpec:
    """One benchmark: its name, lazy target, the families it applies to, one line of description."""

    name: str
    target: str  # "package.module:function"
    families: set[str] = field(default_factory=lambda: set(ALL_FAMILIES))
    description: str = ""
    arg_parser: str | None = None  # "module:function"(arg, options) -> options, for the `name:arg` form

    def load(self) -> Callable[..., Any]:
        return _import_target(self.target)

    def with_arg(self, bench: str, options: Any) -> Any:
        """`options` for `bench` as written (`zeroshot:hellaswag,piqa` sets its tasks); checks the argument."""
        _, sep, arg = bench.partition(":")
        if not sep:
            return options
        if self.arg_parser is None:
            raise ConfigError(f"bench '{self.name}' takes no ':' argument (got '{bench}')")
        return _import_target(self.arg_parser)(arg, options)


def _import_target(target: str) -> Callable[..., Any]:
    module_name, _, func_name = target.partition(":")
    return getattr(importlib.import_module(module_name), func_name)


def _builtin(name: str, target: str, families: set[str], description: str, **kw: Any) -> BenchSpec:
    return BenchSpec(name, f"prunelab.evaluation.{target}", families, description, **kw)


BENCHMARKS: dict[str, BenchSpec] = {
    s.name: s
    for s in (
        _builtin("ppl", "ppl:evaluate_ppl", {"decoder"},
                 "causal-LM perplexity on WikiText-2 raw test (joined rows, non-overlapping windows, token-level NLL)"),
        _builtin("seq2seq-ppl", "seq2seq_ppl:evaluate_seq2seq_ppl", {"encoder-decoder"},
                 "teacher-forced perplexity over target tokens only, on WikiText-2 chunks rebuilt from a corrupted "
                 "copy"),
        _builtin("pppl", "pppl:evaluate_pppl", {"encoder"},
                 "masked-LM pseudo-perplexity (mask each token in turn) on WikiText-2 rows; needs an MLM head"),
        _builtin("embed", "embed:evaluate_embed", {"encoder"}, "embedding fidelity vs the dense model on SST-2 dev "
                 "sentences: mean cosine, Spearman of pairwise sims"),
        _builtin("sst2", "glue:evaluate_sst2", set(ALL_FAMILIES),
                 "GLUE SST-2 accuracy: frozen-feature logistic-regression probe, or mask-preserving fine-tuning"),
        _builtin("mrpc", "glue:evaluate_mrpc", set(ALL_FAMILIES),
                 "GLUE MRPC accuracy and F1: frozen-feature logistic-regression probe, or mask-preserving fine-tuning"),
        _builtin("asr", "asr:evaluate_asr", {"encoder-decoder"}, "speech: WER, transcript ppl"),
        _builtin("zeroshot", "zeroshot:evaluate_zeroshot", {"decoder"},
                 "zero-shot acc/acc_norm by lm-evaluation-harness on local validation splits (boolq, rte, hellaswag, "
                 "winogrande, arc_easy, arc_challenge, openbookqa; piqa on request: zeroshot:hellaswag,piqa)",
                 arg_parser="prunelab.evaluation.zeroshot:parse_tasks"),
    )
}


def get_bench(name: str) -> BenchSpec:
    """The registered benchmark `name`, or a one-line error listing the known ones."""
    spec = BENCHMARKS.get(name.partition(":")[0])
    if spec is None:
        raise ConfigError(f"unknown bench '{name}': choose one of {', '.join(sorted(BENCHMARKS))}")
    return spec


def benches_for(family: str) -> list[str]:
    return [name for name, spec in BENCHMARKS.items() if family in spec.families]


def default_benchmarks(lm_or_family: LoadedModel | str) -> list[str]:
    """The benchmarks a study runs for a model (or a family name) when none are named.

    decoder → ppl, sst2; encoder → sst2, mrpc, embed; encoder-decoder → asr for speech
    models, seq2seq-ppl otherwise.
    """
    family = lm_or_family if isinstance(lm_or_family, str) else lm_or_family.family
    if family == "decoder":
        return ["ppl", "sst2"]
    if family == "encoder":
        return ["sst2", "mrpc", "embed"]
    if family == "encoder-decoder":
        if not isinstance(lm_or_family, str) and lm_or_family.is_speech:
            return ["asr"]
        return ["seq2seq-ppl"]
    raise ConfigError(f"unknown family '{family}': expected encoder, decoder or encoder-decoder")
