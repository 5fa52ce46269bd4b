"""Structured pruning: whole neurons / KV groups removed, matrices sliced, config updated, reloadable."""

from __future__ import annotations

import copy

import pytest
import torch

from prunelab.errors import ConfigError
from prunelab.pruning.structured import (
    expected_params_removed,
    mlp_groups,
    structured_prune,
)
from prunelab.storage import load

ARCHS = ["llama", "gpt2", "bert", "bart", "t5"]


def _calib(lm, n: int = 3, seqlen: int = 16) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    out = []
    for _ in range(n):
        ids = torch.randint(5, 260, (1, seqlen), generator=g)
        sample = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
        if lm.family == "encoder-decoder":
            sample["decoder_input_ids"] = ids[:, :8]
        out.append(sample)
    return out


def _logits(model, sample):
    with torch.no_grad():
        return model(**sample).logits


def _zero_removed_neurons(lm_ref, plan_keep):
    """Independent reference: keep the original shapes but zero the removed neurons' down columns."""
    with torch.no_grad():
        for g in mlp_groups(lm_ref):
            keep = plan_keep[(g.stack, g.block)]
            drop = torch.ones(g.width, dtype=torch.bool)
            drop[keep] = False
            g.output.weight(lm_ref.model)[:, drop] = 0.0


def _auto_class(lm):
    import transformers as tf

    return {"decoder": tf.AutoModelForCausalLM, "encoder-decoder": tf.AutoModelForSeq2SeqLM,
            "encoder": tf.AutoModelForMaskedLM}[lm.family]


@pytest.mark.parametrize("arch", ARCHS)
def test_mlp_pruning_shrinks_matches_masked_reference_and_reloads(tiny_dirs, tmp_path, arch, monkeypatch):
    from prunelab.pruning import structured as st

    lm = load(str(tiny_dirs[arch]))
    ref = copy.deepcopy(lm)
    calib = _calib(lm)
    expected = expected_params_removed(lm, 0.25)
    width = mlp_groups(lm)[0].width
    assert expected > 0
    seen = {}
    orig_choose = st.choose

    def spy(plan, fraction):
        out = orig_choose(plan, fraction)
        seen.update(out.mlp_keep)
        return out

    monkeypatch.setattr(st, "choose", spy)
    report = structured_prune(lm, 0.25, calib)
    # Exactly the expected number of parameters is gone, every block keeps 75 % of its neurons.
    assert report["params_removed"] == expected
    assert sum(p.numel() for p in lm.model.parameters()) == report["params_before"] - expected
    assert all(g.width == width - round(0.25 * width) for g in mlp_groups(lm))
    # Same outputs as the original model with the removed neurons zeroed.
    _zero_removed_neurons(ref, seen)
    sample = calib[0]
    torch.testing.assert_close(_logits(lm.model, sample), _logits(ref.model, sample), rtol=1e-4, atol=1e-5)
    # Saves with save_pretrained and loads with plain transformers, same outputs.
    lm.model.save_pretrained(tmp_path / "small", safe_serialization=True)
    back = _auto_class(lm).from_pretrained(str(tmp_path / "small")).eval()
    assert sum(p.numel() for p in back.parameters()) == report["params_after"]
    torch.testing.assert_close(_logits(back, sample), _logits(lm.model, sample), rtol=1e-5, atol=1e-6)


def test_removing_zero_neurons_is_identity(tiny_dirs):
    lm = load(str(tiny_dirs["llama"]))
    sample = _calib(lm, 1)[0]
    before = _logits(lm.model, sample)
    report = structured_prune(lm, 0.0, _calib(lm))
    assert report["params_removed"] == 0
    assert torch.equal(_logits(lm.model, sample), before)


def test_gqa_heads_removed_as_whole_kv_groups(tiny_dirs, tmp_path):
    lm = load(str(tiny_dirs["llama"]))  # 4 query heads, 2 KV heads, head_dim 16
    ref = copy.deepcopy(lm)
    calib = _calib(lm)
    expected = expected_params_removed(lm, 0.5, "heads")
    report = structured_prune(lm, 0.5, calib, target="heads")
    assert report["heads"] == {"num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 16}
    assert report["params_removed"] == expected == 2 * (2 * 16 * 64 + 16 * 64 + 16 * 64 + 64 * 2 * 16)
    # Reference: zero the removed heads' o_proj columns in the original model.
    with torch.no_grad():
        for block in range(2):
            q_new = lm.model.model.layers[block].self_attn.q_proj.weight
            q_old = ref.model.model.layers[block].self_attn.q_proj.weight
            kept_heads = [h for h in range(4) if any(torch.equal(q_old[h * 16:(h + 1) * 16], q_new[i * 16:(i + 1) * 16])
                                                     for i in range(2))]
            assert len(kept_heads) == 2 and kept_heads[1] == kept_heads[0] + 1 and kept_heads[0] % 2 == 0
            o = ref.model.model.layers[block].self_attn.o_proj.weight
            for h in range(4):
                if h not in kept_heads:
                    o[:, h * 16:(h + 1) * 16] = 0.0
    sample = calib[0]
    torch.testing.assert_close(_logits(lm.model, sample), _logits(ref.model, sample), rtol=1e-4, atol=1e-5)
    lm.model.save_pretrained(tmp_path / "h", safe_serialization=True)
    import transformers as tf

    back = tf.AutoModelForCausalLM.from_pretrained(str(tmp_path / "h")).eval()
    torch.testing.assert_close(_logits(back, sample), _logits(lm.model, sample), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("arch", ["gpt2", "bert"])
def test_heads_on_derived_head_size_is_a_clear_error(tiny_dirs, arch):
    lm = load(str(tiny_dirs[arch]))
    with pytest.raises(ConfigError, match="structured-target mlp"):
        structured_prune(lm, 0.25, _calib(lm), target="heads")


def test_registry_method_through_prune_engine(tiny_dirs, monkeypatch):
    """`prune(lm, PruneConfig(method="structured"))` goes through the engine and the method registry."""
    import prunelab.data.calibration as cal
    import prunelab.pruning as pruning

    lm = load(str(tiny_dirs["llama"]))
    calib = _calib(lm)

    class _Set:
        inputs = calib
        info = {"source": "test"}
        warnings: list[str] = []

    monkeypatch.setattr(cal, "calibration_set", lambda lm, config: _Set())
    expected = expected_params_removed(lm, 0.25)
    before = sum(p.numel() for p in lm.model.parameters())
    result = pruning.prune(lm, pruning.PruneConfig(method="structured", sparsity=0.25, nsamples=3, seqlen=16))
    assert result.total_params == before - expected
    assert lm.model.config.intermediate_size == 96
    assert result.extra["structured"]["params_removed"] == expected  # the report travels in the result
    assert not hasattr(lm, "structured_report")
