"""qkernels: every product equals a dense matmul of the dequantized matrix (1e-5 relative), on both paths."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch

from prunelab.quant import QuantScheme, quantize_rtn
from prunelab.runtime import qkernels as qk


def _matrix(out: int, inp: int, sparsity: float, pattern: str, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out, inp, generator=g)
    if pattern == "2:4":
        keep = w.abs().reshape(out, -1, 4).argsort(dim=2, descending=True)[..., :2]
        mask = torch.zeros(out, inp // 4, 4, dtype=torch.bool).scatter_(2, keep, True).reshape(out, inp)
        return w * mask
    return torch.where(torch.rand(out, inp, generator=g) < sparsity, torch.zeros_like(w), w)


CASES = [  # out, in, bits (32 = fp32), group size, sparsity, pattern, dense
    (96, 576, 8, None, 0.7, "unstructured", False),
    (37, 128, 8, None, 0.5, "unstructured", False),
    (40, 192, 4, 64, 0.0, "2:4", False),
    (33, 384, 4, 128, 0.6, "unstructured", False),
    (50, 128, 32, None, 0.7, "unstructured", False),
    (24, 128, 32, None, 0.0, "2:4", False),
    (65, 256, 8, None, 0.0, "unstructured", True),
    (40, 256, 4, 128, 0.0, "unstructured", True),
    (17, 128, 32, None, 0.0, "unstructured", True),
    (31, 100, 8, None, 0.6, "unstructured", False),  # in % 64 != 0: the scalar path on both settings
    (29, 72, 4, 36, 0.5, "unstructured", False),
    (13, 96, 4, 32, 0.0, "2:4", False),  # group size not a multiple of 64: scalar path
    (48, 192, 4, 32, 0.0, "2:4", False),  # group size 32 (GGUF blocks): two groups per 64-bit word, SIMD
    (21, 128, 4, 32, 0.6, "unstructured", False),
    (19, 256, 8, 32, 0.0, "unstructured", True),  # the int8 head of a GGUF Q8_0 embedding
    (23, 128, 8, 32, 0.7, "unstructured", False),
    (11, 128, 4, 32, 0.0, "unstructured", True),
    (8, 64, 8, None, 0.99, "unstructured", False),  # rows with no kept weight at all
    (27, 192, 4, 16, 0.0, "2:4", False),  # group size 16: four groups per 64-bit word, SIMD
    (18, 128, 4, 16, 0.6, "unstructured", False),
    (14, 128, 8, 16, 0.7, "unstructured", False),
    (9, 192, 4, 16, 0.0, "unstructured", True),
    (10, 128, 8, 16, 0.0, "unstructured", True),
    (7, 80, 4, 16, 0.5, "unstructured", False),  # in % 64 != 0: scalar path
]


@pytest.mark.parametrize("fast", [True, False], ids=["simd", "scalar"])
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c[0]}x{c[1]}-b{c[2]}-g{c[3]}-{c[5]}-s{c[4]}-d{int(c[6])}")
def test_matches_dense_matmul_of_dequantized(case: tuple, fast: bool) -> None:
    out, inp, bits, gs, sparsity, pattern, dense = case
    w = _matrix(out, inp, sparsity, pattern, seed=out * inp)
    info = None
    if bits != 32:
        q, info = quantize_rtn(w, QuantScheme(bits, gs))
        w = info.dequantize(q)
    pack = qk.QPack()
    pack.add(torch.randn(5, 64), None)  # a matrix before it: offsets into shared buffers are exercised
    m = pack.add(w, info, dense=dense)
    pack.finalize()
    simd = inp % 64 == 0 and (gs is None or gs % 64 == 0 or (gs in (16, 32) and bits != 32))
    assert pack.meta[m, qk.M_FAST] == simd  # the cases exercise the SIMD path they are named for
    x = torch.randn(3, inp, generator=torch.Generator().manual_seed(1))
    ref = (x.double() @ w.double().T).numpy()
    y = pack.matmul(m, x.numpy(), fast=fast)
    assert y.shape == (3, out)
    assert np.linalg.norm(y - ref) / np.linalg.norm(ref) < 1e-5
    y1 = pack.matmul(m, x[0].numpy(), fast=fast)
    assert np.linalg.norm(y1 - ref[0]) / np.linalg.norm(ref[0]) < 1e-5


def test_resident_bytes_follow_the_stored_layout() -> None:
    """Bitmask (1 bit per element) + one byte per kept int8 value + row scales + row offsets: no fp32 copy."""
    w = _matrix(256, 512, 0.7, "unstructured", seed=3)
    q, info = quantize_rtn(w, QuantScheme(8, None))
    pack = qk.QPack()
    pack.add(info.dequantize(q), info)
    pack.finalize()
    nnz = int((q != 0).sum())
    stored = w.numel() // 8 + nnz + 256 * 4
    assert pack.nbytes <= 1.1 * stored + 256 * 8 + 1024
    q4, info4 = quantize_rtn(w, QuantScheme(4, 128))
    pack4 = qk.QPack()
    pack4.add(info4.dequantize(q4), info4)
    pack4.finalize()
    assert pack4.qvals.nbytes <= (int((q4 != 0).sum()) + 1) // 2 + 256 * (512 // 128) + qk.PAD  # + zero points


@pytest.mark.skipif(not qk.HAS_VBMI2, reason="needs AVX-512 VBMI2")
def test_simd_path_uses_vpexpandb() -> None:
    """The row intrinsics compile to register-form expands (int8, fp32) and a byte permute (int4 nibbles)."""
    from numba import njit

    @njit
    def rows(q, m, f, x, s):
        return (qk._row_i8(q, 0, m, 0, x, 0, s, 0, 1, 1, 0) + qk._row_i4(q, 0, m, 0, x, 0, s, 0, 1, 1, 0)
                + qk._row_f32(f, 0, m, 0, x, 0, s, 0, 1, 1, 0))

    q, m = np.zeros(128, np.uint8), np.full(1, 2**64 - 1, np.uint64)
    f, x, s = np.ones(128, np.float32), np.ones(64, np.float32), np.ones(1, np.float32)
    assert rows(q, m, f, x, s) == 64.0
    asm = "".join(rows.inspect_asm().values())
    assert "vpexpandb" in asm and "vexpandps" in asm
    assert "vpermt2b" in asm or "vpermi2b" in asm


@pytest.mark.skipif(not qk.HAS_VBMI2, reason="needs AVX-512 VBMI2")
def test_no_expand_reads_memory() -> None:
    """Inside the real row loops LLVM folded an int8 load into `vpexpandb (mem)`, microcoded on Zen 4/5:
    int8 decode ran ~2x slower than with the register form (SmolLM2 70 % + int8: 11.2 -> 5.9 ms/token)."""
    from numba import njit

    pack = qk.QPack()
    w = _matrix(8, 128, 0.7, "unstructured", seed=0)
    for bits, gs in ((8, None), (8, 32), (4, 64), (4, 32), (4, 16), (8, 16)):
        q, info = quantize_rtn(w, QuantScheme(bits, gs))
        pack.add(info.dequantize(q), info)
    pack.finalize()
    rows = njit(fastmath=True)(qk.mat_rows.py_func)  # a fresh compile (cached code cannot be inspected)
    x, y = np.zeros(128 + qk.PAD, np.float32), np.zeros(8, np.float32)
    for m in range(6):
        rows(*pack.buffers()[:1], m, 0, 8, *pack.buffers()[1:], x, 0, y, 0, True)
    asm = "".join(rows.inspect_asm().values())
    assert "vpexpandb" in asm
    assert not re.findall(r"vpexpandb\s+[^%\s]*\(.*", asm)


def test_generic_expandload_ir_without_vbmi2(monkeypatch: pytest.MonkeyPatch) -> None:
    """The IR for CPUs without VBMI2/AVX-512F (LLVM's generic masked expandload) gives the same row dots."""
    from numba import njit

    monkeypatch.setattr(qk, "HAS_VBMI2", False)
    monkeypatch.setattr(qk, "HAS_AVX512F", False)
    i8, i4, f32 = qk._make_row(8, False), qk._make_row(4, False), qk._make_row(32, False)

    @njit
    def rows(meta, q, m, f, x, s, rowptr, y):
        for r in range(meta[0, 0]):
            vo, moff, soff, zo = qk._offsets(meta, 0, r, rowptr)
            y[0, r] = i8(q, vo, m, moff, x, 0, s, soff, 1, 2, zo)
        for r in range(meta[1, 0]):
            vo, moff, soff, zo = qk._offsets(meta, 1, r, rowptr)
            y[1, r] = i4(q, vo, m, moff, x, 0, s, soff, 2, 1, zo)
        for r in range(meta[2, 0]):
            vo, moff, soff, zo = qk._offsets(meta, 2, r, rowptr)
            y[2, r] = f32(f, vo, m, moff, x, 0, s, soff, 1, 2, zo)

    ws, pack = [], qk.QPack()
    for bits, gs in ((8, None), (4, 64), (32, None)):
        w = _matrix(20, 128, 0.6, "unstructured", seed=bits)
        info = None
        if bits != 32:
            q, info = quantize_rtn(w, QuantScheme(bits, gs))
            w = info.dequantize(q)
        ws.append(w)
        pack.add(w, info)
    pack.finalize()
    x = torch.randn(128)
    y = np.zeros((3, 20), np.float32)
    rows(pack.meta, pack.qvals, pack.masks, pack.fvals, np.concatenate([x.numpy(), np.zeros(64, np.float32)]),
         pack.scales, pack.rowptr, y)
    for k, w in enumerate(ws):
        ref = (w.double() @ x.double()).numpy()
        assert np.linalg.norm(y[k] - ref) / np.linalg.norm(ref) < 1e-5
