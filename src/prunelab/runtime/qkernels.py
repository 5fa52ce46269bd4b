"""Matrix-vector kernels that read sparse int8 / int4 / fp32 weights straight from a bitmask layout.

Why a bitmask and not SELL/CSR (kernels.py): once a kept weight is one byte (int8) or half a
byte (int4), a 2-byte column index would cost more than the value. The layout here is the one
`prunelab.storage` writes: per matrix a little-order bitmask over the row-major elements (bit
`i % 8` of byte `i // 8` says whether element `i` is kept, 1 bit per weight), then the kept values
in row-major order (int8; int4 packed two per byte, element 2k in the low nibble; or fp32) and
float32 scales per output row and group of input columns (int4: plus a uint8 zero point per group,
kept after the matrix's values in the same byte buffer; see `prunelab.quant`). The runtime keeps exactly these bytes
plus an int64 offset per row, so the resident model is the stored model (no fp32 copy).

How it is fast: on a CPU with AVX-512 VBMI2, `vpexpandb` places 64 packed int8 values at the
set bits of a 64-bit mask word in one instruction, so the kernel streams the compressed bytes and
does dense SIMD arithmetic on 64 columns at a time (sign-extend, convert, 4 FMAs with the 64
matching activations) -- no per-nonzero scalar work at all. int4 values are first unpacked from
nibbles (`vpermt2b` picks 64 nibbles starting at any nibble offset), fp32 values use `vexpandps`
per 16 bits. LLVM exposes these as intrinsics that numba reaches through `numba.extending.intrinsic`
(the register form: the memory form of `vpexpandb` measured 3.6x slower on Zen 5). On a CPU
without VBMI2 the same IR uses LLVM's generic `llvm.masked.expandload`, which compiles everywhere
(scalarised), and a plain scalar path (`fast=False`) is kept for matrices whose rows are not whole
64-bit words (in_features % 64 != 0, or a group size that is neither 16, 32 nor a multiple of 64) and for tests.

An int4 nibble becomes its level with `d = ((nibble + z) & 15) - z` (z: the group's zero point),
the same three byte operations per 64 values as a sign extension (which is the `z = 8` case), so
asymmetric int4 costs nothing over symmetric; a pruned lane (expanded as 0) stays 0.

Accumulation is fp32, in the group, then `group_sum * scale` into the row total: the result is a
dense matmul of the dequantized matrix up to fp32 summation order (~1e-7 relative).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from llvmlite import ir
from numba import njit, types
from numba.core import cgutils
from numba.extending import intrinsic

from prunelab.quant import QuantInfo, pack_int4


def _host_features() -> set[str]:
    import llvmlite.binding as llvm

    return {f[1:] for f in llvm.get_host_cpu_features().flatten().split(",") if f.startswith("+")}


_FEATURES = _host_features()
HAS_VBMI2 = {"avx512vbmi2", "avx512vbmi", "avx512bw", "avx512f"} <= _FEATURES
HAS_AVX512F = "avx512f" in _FEATURES
PAD = 64  # bytes of slack after every value buffer: the vector loads read up to 64 bytes past a row
# The layout of QPack's buffers and the kernels' arguments. numba caches a compiled function by its own
# file's content only, so fused_decode.py (whose cached step inlines these kernels) pins this number:
# bump both together, or a stale cached step keeps running the old kernels.
LAYOUT_VERSION = 8  # 2: int4 zero points; 3: group 32 SIMD; 4: register expand; 5: group 16; 6: one split kernel;
# 7: batched rows; 8: transposed sparse rows

# ---------------------------------------------------------------------------------------------------
# LLVM IR for one row: sum over groups of (scale[g] * sum over the group's 64-column words)
# ---------------------------------------------------------------------------------------------------
_I1, _I8, _I16, _I32, _I64 = (ir.IntType(n) for n in (1, 8, 16, 32, 64))
_F32 = ir.FloatType()
_V64F, _V16F, _V64I8 = ir.VectorType(_F32, 64), ir.VectorType(_F32, 16), ir.VectorType(_I8, 64)
_V64I1, _V16I1 = ir.VectorType(_I1, 64), ir.VectorType(_I1, 16)


def _fn(builder: ir.IRBuilder, name: str, ret: ir.Type, args: list[ir.Type]) -> ir.Function:
    return cgutils.get_or_insert_function(builder.module, ir.FunctionType(ret, args), name)


def _shuffle(builder: ir.IRBuilder, a: ir.Value, b: ir.Value, idx: list[int]) -> ir.Value:
    return builder.shuffle_vector(a, b, ir.Constant(ir.VectorType(_I32, len(idx)), idx))


def _ptr(builder: ir.IRBuilder, base: ir.Value, off: ir.Value, vty: ir.Type) -> ir.Value:
    return builder.bitcast(builder.gep(base, [off]), vty.as_pointer())


def _expand_i8(builder: ir.IRBuilder, packed: ir.Value, mask: ir.Value, mem: ir.Value | None) -> ir.Value:
    """64 int8 lanes with `packed`'s first popcount(mask) bytes at the set bits, zeros elsewhere."""
    zero = ir.Constant(_V64I8, None)
    if HAS_VBMI2:
        # An empty asm pins `packed` in a register: left alone, LLVM folds an int8 row's load into the
        # expand, and the memory form of vpexpandb is microcoded on Zen 4/5. With `_row_codegen`'s nested
        # loops this took SmolLM2 70 % + int8's layers from 9.2 to 5.7 ms/token (either change alone: 8.4, 9.5).
        packed = builder.asm(ir.FunctionType(_V64I8, [_V64I8]), "", "=v,0", [packed], False, "in_register")
        fn = _fn(builder, "llvm.x86.avx512.mask.expand.v64i8", _V64I8, [_V64I8, _V64I8, _V64I1])
        return builder.call(fn, [packed, zero, mask])
    if mem is None:  # a register value (unpacked int4): spill it so the generic intrinsic can read it
        mem = cgutils.alloca_once(builder, _V64I8)
        builder.store(packed, mem)
    fn = _fn(builder, "llvm.masked.expandload.v64i8", _V64I8, [_I8.as_pointer(), _V64I1, _V64I8])
    return builder.call(fn, [builder.bitcast(mem, _I8.as_pointer()), mask, zero])


_NIB_EVEN = [(k >> 1) + 64 * (k & 1) for k in range(64)]  # nibble k of a byte run starting at a low nibble
_NIB_ODD = [((k + 1) >> 1) + 64 * ((k + 1) & 1) for k in range(64)]  # ... starting at a high nibble


def _int4_run(builder: ir.IRBuilder, vals: ir.Value, vo: ir.Value, zv: ir.Value) -> tuple[ir.Value, ir.Value]:
    """The 64 int4 levels `((nibble + z) & 15) - z` starting at nibble `vo` (as <64 x i8>; `zv` the
    zero points as <64 x i8>), and no address (the values live in a register)."""
    byte = builder.lshr(vo, ir.Constant(_I64, 1))
    p = _ptr(builder, vals, byte, _V64I8)
    raw = builder.load(p, align=1)
    lo = builder.and_(raw, ir.Constant(_V64I8, [15] * 64))
    hi = builder.lshr(raw, ir.Constant(_V64I8, [4] * 64))
    # The start parity picks the index vector by bit arithmetic, not a select: LLVM turned the select
    # into a branch, mispredicted on every other word (parity is data-dependent).
    odd = builder.sub(ir.Constant(_I8, 0), builder.trunc(builder.and_(vo, ir.Constant(_I64, 1)), _I8))
    odd = builder.insert_element(ir.Constant(_V64I8, ir.Undefined), odd, ir.Constant(_I32, 0))
    odd = _shuffle(builder, odd, odd, [0] * 64)
    flip = ir.Constant(_V64I8, [a ^ b for a, b in zip(_NIB_EVEN, _NIB_ODD, strict=True)])
    idx = builder.xor(ir.Constant(_V64I8, _NIB_EVEN), builder.and_(odd, flip))
    if HAS_VBMI2:  # one vpermt2b
        fn = _fn(builder, "llvm.x86.avx512.vpermi2var.qi.512", _V64I8, [_V64I8, _V64I8, _V64I8])
        nib = builder.call(fn, [lo, idx, hi])
    else:
        is_odd = builder.trunc(vo, _I1)
        nib = builder.select(is_odd, _shuffle(builder, lo, hi, _NIB_ODD), _shuffle(builder, lo, hi, _NIB_EVEN))
    return nib if zv is None else _unwrap(builder, nib, zv), None


def _unwrap(builder: ir.IRBuilder, nib: ir.Value, zv: ir.Value) -> ir.Value:
    """int4 levels `((nibble + z) & 15) - z` of 64 nibbles (0 stays 0: a pruned lane after an expand)."""
    return builder.sub(builder.and_(builder.add(nib, zv), ir.Constant(_V64I8, [15] * 64)), zv)


def _word_values(builder: ir.IRBuilder, bits: int, dense: bool, vals: ir.Value, vo: ir.Value,
                 w: ir.Value, z: ir.Value, z_after: bool = False) -> tuple[ir.Value, ir.Value]:
    """(64 float lanes of this word's weights, number of values consumed). `z_after`: unwrap the int4
    nibbles after the expand (the zero points `z` vary across the word's columns, not its packed lanes)."""
    if bits == 32:
        return _word_values_f32(builder, dense, vals, vo, w)
    if bits == 8:
        p = _ptr(builder, vals, vo, _V64I8)
        q, mem = builder.load(p, align=1), p
    else:
        q, mem = _int4_run(builder, vals, vo, None if z_after and not dense else z)
    if dense:
        return builder.sitofp(q, _V64F), ir.Constant(_I64, 64)
    fn = _fn(builder, "llvm.ctpop.i64", _I64, [_I64])
    q = _expand_i8(builder, q, builder.bitcast(w, _V64I1), mem)
    if bits == 4 and z_after:
        q = _unwrap(builder, q, z)
    return builder.sitofp(q, _V64F), builder.call(fn, [w])


def _word_values_f32(builder: ir.IRBuilder, dense: bool, vals: ir.Value, vo: ir.Value,
                     w: ir.Value) -> tuple[ir.Value, ir.Value]:
    if dense:
        return builder.load(_ptr(builder, vals, vo, _V64F), align=4), ir.Constant(_I64, 64)
    pop16 = _fn(builder, "llvm.ctpop.i16", _I16, [_I16])
    parts, off = [], vo
    for c in range(4):
        m16 = builder.trunc(builder.lshr(w, ir.Constant(_I64, 16 * c)), _I16)
        p = _ptr(builder, vals, off, _V16F)
        if HAS_AVX512F:
            fn = _fn(builder, "llvm.x86.avx512.mask.expand.v16f32", _V16F, [_V16F, _V16F, _V16I1])
            parts.append(builder.call(fn, [builder.load(p, align=4), ir.Constant(_V16F, None),
                                           builder.bitcast(m16, _V16I1)]))
        else:
            fn = _fn(builder, "llvm.masked.expandload.v16f32", _V16F, [_F32.as_pointer(), _V16I1, _V16F])
            parts.append(builder.call(fn, [builder.bitcast(p, _F32.as_pointer()), builder.bitcast(m16, _V16I1),
                                           ir.Constant(_V16F, None)]))
        off = builder.add(off, builder.zext(builder.call(pop16, [m16]), _I64))
    lo = _shuffle(builder, parts[0], parts[1], list(range(32)))
    hi = _shuffle(builder, parts[2], parts[3], list(range(32)))
    return _shuffle(builder, lo, hi, list(range(64))), builder.sub(off, vo)


def _hsum(builder: ir.IRBuilder, v: ir.Value) -> ir.Value:
    n = 64
    while n > 1:
        h = n // 2
        v = builder.fadd(_shuffle(builder, v, v, list(range(h))), _shuffle(builder, v, v, list(range(h, n))))
        n = h
    return builder.extract_element(v, ir.Constant(_I32, 0))


# Intrinsic argument names, in order. A batched row (`nb` > 1) reads `nb` input vectors `xstride` apart and
# writes its `nb` results into `y` `ystride` apart; a single row returns its float.
_ROW_ARGS = ("vals", "voff", "masks", "moff", "x", "xoff", "scales", "soff", "ngroups", "wpg", "zoff")
_BATCH_ARGS = _ROW_ARGS[:6] + ("xstride",) + _ROW_ARGS[6:] + ("y", "yoff", "ystride")
_ARRAYS = ("vals", "masks", "x", "scales", "y", "fbuf", "ibuf")


def _named(context, builder, sig, args, names):  # noqa: ANN001, ANN202
    """The intrinsic's arguments by name; arrays as data pointers."""
    out = {}
    for i, name in enumerate(names):
        out[name] = (context.make_array(sig.args[i])(context, builder, args[i]).data if name in _ARRAYS
                     else args[i])
    return out


def _x_offsets(builder: ir.IRBuilder, a: dict, nb: int) -> list[ir.Value]:
    if nb == 1:
        return [a["xoff"]]
    return [builder.add(a["xoff"], builder.mul(a["xstride"], ir.Constant(_I64, b))) for b in range(nb)]


def _finish(builder: ir.IRBuilder, a: dict, totals: list[ir.Value]) -> ir.Value | None:
    """One row: the summed total. Batched: each total summed and stored at y[yoff + b * ystride]."""
    if len(totals) == 1 and "y" not in a:
        return _hsum(builder, totals[0])
    for b, t in enumerate(totals):
        at = builder.add(a["yoff"], builder.mul(a["ystride"], ir.Constant(_I64, b)))
        builder.store(_hsum(builder, t), builder.gep(a["y"], [at]))
    return None


def _row_loop(builder: ir.IRBuilder, bits: int, dense: bool, a: dict, nb: int) -> list[ir.Value]:
    """Group size a multiple of 64: an outer loop over the row's groups, an inner one over a group's words;
    `nb` input vectors share every decoded word (one pass over the row's bytes serves them all).
    (One flat loop with a group-end branch inside compiled to register copies of the accumulator on every
    word; see `_expand_i8` for what the two changes bought together.)"""
    vals, masks, x, scales = a["vals"], a["masks"], a["x"], a["scales"]
    ngroups, wpg, zoff = a["ngroups"], a["wpg"], a["zoff"]
    xoffs = _x_offsets(builder, a, nb)
    fma = _fn(builder, "llvm.fmuladd.v64f32", _V64F, [_V64F, _V64F, _V64F])
    one, zero_v, c0 = ir.Constant(_I64, 1), ir.Constant(_V64F, None), ir.Constant(_I64, 0)
    entry = builder.block
    ghead, gbody, whead, wbody, gend, done = (builder.append_basic_block(f"qk.{n}") for n in
                                              ("ghead", "gbody", "whead", "wbody", "gend", "done"))
    builder.branch(ghead)
    builder.position_at_end(ghead)  # over groups: g, first word i0, value offset vo, row totals
    g, i0, vo = builder.phi(_I64), builder.phi(_I64), builder.phi(_I64)
    totals = [builder.phi(_V64F) for _ in range(nb)]
    for phi, init in ((g, c0), (i0, c0), (vo, a["voff"]), *((t, zero_v) for t in totals)):
        phi.add_incoming(init, entry)
    builder.cbranch(builder.icmp_signed("<", g, ngroups), gbody, done)
    builder.position_at_end(gbody)
    z = _splat_groups(builder, vals, builder.add(zoff, g), 1, _V64I8) if bits == 4 else None
    builder.branch(whead)
    builder.position_at_end(whead)  # over the group's words: k, value offset wvo, group sums acc
    k, wvo = builder.phi(_I64), builder.phi(_I64)
    accs = [builder.phi(_V64F) for _ in range(nb)]
    for phi, init in ((k, c0), (wvo, vo), *((acc, zero_v) for acc in accs)):
        phi.add_incoming(init, gbody)
    builder.cbranch(builder.icmp_signed("<", k, wpg), wbody, gend)
    builder.position_at_end(wbody)
    i = builder.add(i0, k)
    w = ir.Constant(_I64, -1) if dense else builder.load(builder.gep(masks, [builder.add(a["moff"], i)]))
    q, used = _word_values(builder, bits, dense, vals, wvo, w, z)
    col = builder.mul(i, ir.Constant(_I64, 64))
    new_accs = [builder.call(fma, [q, builder.load(_ptr(builder, x, builder.add(xo, col), _V64F), align=4), acc])
                for xo, acc in zip(xoffs, accs, strict=True)]
    for phi, v in ((k, builder.add(k, one)), (wvo, builder.add(wvo, used)), *zip(accs, new_accs, strict=True)):
        phi.add_incoming(v, builder.block)
    builder.branch(whead)
    builder.position_at_end(gend)
    s = builder.load(builder.gep(scales, [builder.add(a["soff"], g)]))
    splat = builder.insert_element(ir.Constant(_V64F, ir.Undefined), s, ir.Constant(_I32, 0))
    splat = _shuffle(builder, splat, splat, [0] * 64)
    for phi, v in ((g, builder.add(g, one)), (i0, builder.add(i0, wpg)), (vo, wvo)):
        phi.add_incoming(v, gend)
    for t, acc in zip(totals, accs, strict=True):
        t.add_incoming(builder.call(fma, [acc, splat, t]), gend)
    builder.branch(ghead)
    builder.position_at_end(done)
    return totals


def _row_codegen(bits: int, dense: bool, nb: int = 1):  # noqa: ANN202 - numba codegen callback
    def codegen(context, builder, sig, args):  # noqa: ANN001, ANN202
        a = _named(context, builder, sig, args, _ROW_ARGS if nb == 1 else _BATCH_ARGS)
        out = _finish(builder, a, _row_loop(builder, bits, dense, a, nb))
        return context.get_dummy_value() if out is None else out

    return codegen


def _splat_groups(builder: ir.IRBuilder, base: ir.Value, first: ir.Value, n: int, vty: ir.VectorType) -> ir.Value:
    """64 lanes holding `base[first + l // (64 // n)]` in lane l: one value per group of a word that spans
    `n` groups (n = 1: a broadcast)."""
    small = ir.Constant(ir.VectorType(vty.element, n), ir.Undefined)
    for j in range(n):
        v = builder.load(builder.gep(base, [builder.add(first, ir.Constant(_I64, j))]))
        small = builder.insert_element(small, v, ir.Constant(_I32, j))
    return _shuffle(builder, small, small, [lane // (64 // n) for lane in range(64)])


def _split_loop(builder: ir.IRBuilder, bits: int, dense: bool, per_word: int, a: dict, nb: int) -> list[ir.Value]:
    """The row totals (<64 x float>, not yet summed) of a row whose 64-column words hold `per_word` groups;
    every word gets a scale vector (and int4 a zero-point vector) of `per_word` runs and is scaled as read."""
    vals, masks, x, scales = a["vals"], a["masks"], a["x"], a["scales"]
    xoffs = _x_offsets(builder, a, nb)
    fma = _fn(builder, "llvm.fmuladd.v64f32", _V64F, [_V64F, _V64F, _V64F])
    one, zero_v = ir.Constant(_I64, 1), ir.Constant(_V64F, None)
    words = builder.udiv(a["ngroups"], ir.Constant(_I64, per_word))
    entry = builder.block
    head, body, done = (builder.append_basic_block(f"qh{per_word}.{n}") for n in ("head", "body", "done"))
    builder.branch(head)
    builder.position_at_end(head)
    i, vo = builder.phi(_I64), builder.phi(_I64)
    totals = [builder.phi(_V64F) for _ in range(nb)]
    for phi, init in ((i, ir.Constant(_I64, 0)), (vo, a["voff"]), *((t, zero_v) for t in totals)):
        phi.add_incoming(init, entry)
    builder.cbranch(builder.icmp_signed("<", i, words), body, done)
    builder.position_at_end(body)
    w = ir.Constant(_I64, -1) if dense else builder.load(builder.gep(masks, [builder.add(a["moff"], i)]))
    g0 = builder.mul(i, ir.Constant(_I64, per_word))
    z = _splat_groups(builder, vals, builder.add(a["zoff"], g0), per_word, _V64I8) if bits == 4 else None
    q, used = _word_values(builder, bits, dense, vals, vo, w, z, z_after=True)
    sv = _splat_groups(builder, scales, builder.add(a["soff"], g0), per_word, _V64F)
    col = builder.mul(i, ir.Constant(_I64, 64))
    if nb == 1:  # (q * x) * s: the single kernel's rounding
        new = [builder.call(fma, [builder.fmul(q, builder.load(_ptr(builder, x, builder.add(xoffs[0], col), _V64F),
                                                               align=4)), sv, totals[0]])]
    else:  # batched: the word scaled once for all inputs, one FMA per input (half the arithmetic; rounds as q*s*x)
        qs = builder.fmul(q, sv)
        new = [builder.call(fma, [qs, builder.load(_ptr(builder, x, builder.add(xo, col), _V64F), align=4), t])
               for xo, t in zip(xoffs, totals, strict=True)]
    for phi, v in ((i, builder.add(i, one)), (vo, builder.add(vo, used)), *zip(totals, new, strict=True)):
        phi.add_incoming(v, builder.block)
    builder.branch(head)
    builder.position_at_end(done)
    return totals


def _row_codegen_split(bits: int, dense: bool, nb: int = 1):  # noqa: ANN202 - numba codegen callback
    """Group size 32 (the GGUF block) or 16: the `wpg` argument carries the groups per word (2 or 4), and
    the row runs the loop compiled for that count (one well-predicted branch per row)."""
    def codegen(context, builder, sig, args):  # noqa: ANN001, ANN202
        a = _named(context, builder, sig, args, _ROW_ARGS if nb == 1 else _BATCH_ARGS)
        four, two, join = (builder.append_basic_block(f"qs.{n}") for n in ("four", "two", "join"))
        builder.cbranch(builder.icmp_signed("==", a["wpg"], ir.Constant(_I64, 4)), four, two)
        branches = []
        for block, per_word in ((four, 4), (two, 2)):
            builder.position_at_end(block)
            branches.append((_split_loop(builder, bits, dense, per_word, a, nb), builder.block))
            builder.branch(join)
        builder.position_at_end(join)
        totals = []
        for b in range(nb):
            t = builder.phi(_V64F)
            for values, block in branches:
                t.add_incoming(values[b], block)
            totals.append(t)
        out = _finish(builder, a, totals)
        return context.get_dummy_value() if out is None else out

    return codegen


def _make_row(bits: int, dense: bool, split: bool = False):  # noqa: ANN202 - returns a numba intrinsic
    """A row intrinsic; `split`: group size 32 or 16 (`wpg` = groups per word), else a multiple of 64."""
    @intrinsic
    def row(typingctx, vals, voff, masks, moff, x, xoff, scales, soff, ngroups, wpg, zoff):  # noqa: ANN001, ANN202
        sig = types.float32(vals, types.int64, masks, types.int64, x, types.int64, scales, types.int64,
                            types.int64, types.int64, types.int64)
        return sig, _row_codegen_split(bits, dense) if split else _row_codegen(bits, dense)

    return row


BATCH = 4  # input vectors per batched row call: 4 x 4 zmm accumulators, the decoded word kept in registers


def _make_row_batch(bits: int, dense: bool, split: bool = False):  # noqa: ANN202 - returns a numba intrinsic
    """A batched row intrinsic: the same row against `BATCH` inputs, results stored into `y` (no return)."""
    @intrinsic
    def row_b(typingctx, vals, voff, masks, moff, x, xoff, xstride, scales, soff, ngroups, wpg, zoff,  # noqa: ANN001, ANN202
              y, yoff, ystride):
        sig = types.none(vals, types.int64, masks, types.int64, x, types.int64, types.int64, scales, types.int64,
                         types.int64, types.int64, types.int64, y, types.int64, types.int64)
        return sig, (_row_codegen_split if split else _row_codegen)(bits, dense, BATCH)

    return row_b


_row_i8, _row_i4, _row_f32 = _make_row(8, False), _make_row(4, False), _make_row(32, False)
_dense_i8, _dense_i4, _dense_f32 = _make_row(8, True), _make_row(4, True), _make_row(32, True)
_split_i8, _split_i4 = _make_row(8, False, True), _make_row(4, False, True)  # group size 32 or 16
_sdense_i8, _sdense_i4 = _make_row(8, True, True), _make_row(4, True, True)
_brow_i8, _brow_i4, _brow_f32 = _make_row_batch(8, False), _make_row_batch(4, False), _make_row_batch(32, False)
_bdense_i8, _bdense_i4, _bdense_f32 = _make_row_batch(8, True), _make_row_batch(4, True), _make_row_batch(32, True)
_bsplit_i8, _bsplit_i4 = _make_row_batch(8, False, True), _make_row_batch(4, False, True)
_bsdense_i8, _bsdense_i4 = _make_row_batch(8, True, True), _make_row_batch(4, True, True)
SPLIT_GROUPS = (32, 16)  # group sizes below 64 with a SIMD path (int8 / int4)


# ---------------------------------------------------------------------------------------------------
# Sparse rows against many inputs at once: the batch in the SIMD lanes, work per kept weight
# ---------------------------------------------------------------------------------------------------
LANES = 16  # inputs per transposed call: one <16 x float> register holds one column of all of them
UNROLL = 8  # pass 2 of the transposed rows: kept weights per iteration, one accumulator each (2 FMA pipes x 4 latency)
T_CHUNK = 9  # 64-column words per column chunk: 576 columns x 16 lanes x 4 bytes = 36 KB of inputs, L1-resident
_V16F_ = ir.VectorType(_F32, LANES)


def _compress16(builder: ir.IRBuilder, v: ir.Value, m16: ir.Value, dst: ir.Value) -> None:
    """Store the lanes of a 16-lane vector (float or i32) whose mask bit is set, packed, at `dst` (16 lanes
    are written: zeros after the packed ones). Register form where AVX-512 has it (the memory form is slow)."""
    vty = v.type
    if HAS_AVX512F:
        kind = "v16f32" if vty.element == _F32 else "v16i32"
        fn = _fn(builder, f"llvm.x86.avx512.mask.compress.{kind}", vty, [vty, vty, _V16I1])
        builder.store(builder.call(fn, [v, ir.Constant(vty, None), m16]), builder.bitcast(dst, vty.as_pointer()),
                      align=4)
    else:
        builder.store(ir.Constant(vty, None), builder.bitcast(dst, vty.as_pointer()), align=4)
        kind = "v16f32" if vty.element == _F32 else "v16i32"
        fn = _fn(builder, f"llvm.masked.compressstore.{kind}", ir.VoidType(), [vty, vty.element.as_pointer(), _V16I1])
        builder.call(fn, [v, dst, m16])


def _compress_bytes(builder: ir.IRBuilder, v: ir.Value, w: ir.Value) -> ir.Value:
    """<64 x i8>: the bytes of `v` at the set bits of the 64-bit `w`, packed low, zeros above."""
    mask = builder.bitcast(w, _V64I1)
    if HAS_VBMI2:
        fn = _fn(builder, "llvm.x86.avx512.mask.compress.v64i8", _V64I8, [_V64I8, _V64I8, _V64I1])
        return builder.call(fn, [v, ir.Constant(_V64I8, None), mask])
    mem = cgutils.alloca_once(builder, _V64I8)
    builder.store(ir.Constant(_V64I8, None), mem)
    fn = _fn(builder, "llvm.masked.compressstore.v64i8", ir.VoidType(), [_V64I8, _I8.as_pointer(), _V64I1])
    builder.call(fn, [v, builder.bitcast(mem, _I8.as_pointer()), mask])
    return builder.load(mem)


def _row_t_loop(builder: ir.IRBuilder, bits: int, per_word: int, a: dict) -> ir.Value:
    """The lane totals (<16 x float>) of one sparse row against `LANES` transposed inputs; `per_word`: groups
    per 64-column word (2 or 4: group size 32 or 16), or 0 for group sizes that are multiples of 64. Only the
    columns of words [w0, w1) count (a chunk whose inputs stay in L1).

    Two passes. First every word's kept values, decoded and scaled, are packed into a list (`fbuf`) with
    their column indices (`ibuf`) by compress instructions, no per-weight branch; then one loop over the
    list, unrolled by 4 into 4 accumulators, does a broadcast and an FMA per kept weight."""
    vals, masks, xt, scales = a["vals"], a["masks"], a["x"], a["scales"]
    fbuf, ibuf = a["fbuf"], a["ibuf"]
    fma = _fn(builder, "llvm.fmuladd.v16f32", _V16F_, [_V16F_, _V16F_, _V16F_])
    pop16 = _fn(builder, "llvm.ctpop.i16", _I16, [_I16])
    one, c0, zero16 = ir.Constant(_I64, 1), ir.Constant(_I64, 0), ir.Constant(_V16F_, None)
    v16i = ir.VectorType(_I32, LANES)
    pop64 = _fn(builder, "llvm.ctpop.i64", _I64, [_I64])
    if not per_word:  # one division per row chunk, none per word (a 64-bit divide per word cost as much as the word)
        g_start, k_start = builder.udiv(a["w0"], a["wpg"]), builder.urem(a["w0"], a["wpg"])
    entry = builder.block
    shead, sbody, whead, wbody, lhead, lbody, done = (builder.append_basic_block(f"qt{per_word}.{n}") for n in
                                                      ("shead", "sbody", "whead", "wbody", "lhead", "lbody", "done"))
    builder.branch(shead)
    builder.position_at_end(shead)  # the values of the words before this column chunk: skip them
    si, svo = builder.phi(_I64), builder.phi(_I64)
    si.add_incoming(c0, entry)
    svo.add_incoming(a["voff"], entry)
    builder.cbranch(builder.icmp_signed("<", si, a["w0"]), sbody, whead)
    builder.position_at_end(sbody)
    sw = builder.load(builder.gep(masks, [builder.add(a["moff"], si)]))
    si.add_incoming(builder.add(si, one), sbody)
    svo.add_incoming(builder.add(svo, builder.call(pop64, [sw])), sbody)
    builder.branch(shead)
    builder.position_at_end(whead)  # pass 1 over the chunk's words: i, value offset vo, list length cnt,
    i, vo, cnt = builder.phi(_I64), builder.phi(_I64), builder.phi(_I64)  # group gk and word kk in it
    gk, kk = builder.phi(_I64), builder.phi(_I64)
    for phi, init in ((i, a["w0"]), (vo, svo), (cnt, c0)):
        phi.add_incoming(init, shead)
    if per_word:
        gk.add_incoming(c0, shead)
        kk.add_incoming(c0, shead)
    else:
        gk.add_incoming(g_start, shead)
        kk.add_incoming(k_start, shead)
    pad = builder.append_basic_block(f"qt{per_word}.pad")
    builder.cbranch(builder.icmp_signed("<", i, a["w1"]), wbody, pad)
    builder.position_at_end(wbody)
    w = builder.load(builder.gep(masks, [builder.add(a["moff"], i)]))
    g = builder.mul(i, ir.Constant(_I64, per_word)) if per_word else gk
    n = per_word or 1
    sv = _splat_groups(builder, scales, builder.add(a["soff"], g), n, _V64F)
    z = _splat_groups(builder, vals, builder.add(a["zoff"], g), n, _V64I8) if bits == 4 else None
    kk1 = builder.add(kk, one)
    wrap = builder.icmp_signed("==", kk1, a["wpg"])
    gk1 = builder.select(wrap, builder.add(gk, one), gk) if not per_word else gk
    kk1 = builder.select(wrap, c0, kk1) if not per_word else kk
    col0 = builder.trunc(builder.mul(i, ir.Constant(_I64, 64)), _I32)
    if per_word:  # scales vary inside the word: expand, scale, then pack values and columns 16 lanes at a time
        q, used = _word_values(builder, bits, False, vals, vo, w, z, z_after=True)
        q = builder.fmul(q, sv)
        base = builder.insert_element(ir.Constant(v16i, ir.Undefined), col0, ir.Constant(_I32, 0))
        base = _shuffle(builder, base, base, [0] * LANES)
        off = cnt
        for c in range(4):
            m16 = builder.trunc(builder.lshr(w, ir.Constant(_I64, 16 * c)), _I16)
            part = _shuffle(builder, q, q, list(range(16 * c, 16 * c + 16)))
            _compress16(builder, part, builder.bitcast(m16, _V16I1), builder.gep(fbuf, [off]))
            cols = builder.mul(builder.add(base, ir.Constant(v16i, [16 * c + k for k in range(16)])),
                               ir.Constant(v16i, [LANES] * 16))  # stored as the element offset into xt
            _compress16(builder, cols, builder.bitcast(m16, _V16I1), builder.gep(ibuf, [off]))
            off = builder.add(off, builder.zext(builder.call(pop16, [m16]), _I64))
    else:  # one scale per word: the stored values are already the packed list; only the columns need packing
        q, _ = _word_values(builder, bits, True, vals, vo, w, z)  # the next 64 stored values, in order
        v64f = ir.VectorType(_F32, 64)
        builder.store(builder.fmul(q, sv), builder.bitcast(builder.gep(fbuf, [cnt]), v64f.as_pointer()), align=4)
        packed = _compress_bytes(builder, ir.Constant(_V64I8, list(range(64))), w)
        v64i = ir.VectorType(_I32, 64)
        base = builder.insert_element(ir.Constant(v64i, ir.Undefined), col0, ir.Constant(_I32, 0))
        cols = builder.add(builder.zext(packed, v64i), _shuffle(builder, base, base, [0] * 64))
        cols = builder.mul(cols, ir.Constant(v64i, [LANES] * 64))
        builder.store(cols, builder.bitcast(builder.gep(ibuf, [cnt]), v64i.as_pointer()), align=4)
        used = builder.call(pop64, [w])
        off = builder.add(cnt, used)
    i.add_incoming(builder.add(i, one), builder.block)
    vo.add_incoming(builder.add(vo, used), builder.block)
    cnt.add_incoming(off, builder.block)
    gk.add_incoming(gk1, builder.block)
    kk.add_incoming(kk1, builder.block)
    builder.branch(whead)
    builder.position_at_end(pad)  # zero UNROLL entries past the end, so the last group adds nothing
    builder.store(ir.Constant(ir.VectorType(_F32, UNROLL), None),
                  builder.bitcast(builder.gep(fbuf, [cnt]), ir.VectorType(_F32, UNROLL).as_pointer()), align=4)
    builder.store(ir.Constant(ir.VectorType(_I32, UNROLL), None),
                  builder.bitcast(builder.gep(ibuf, [cnt]), ir.VectorType(_I32, UNROLL).as_pointer()), align=4)
    builder.branch(lhead)
    builder.position_at_end(lhead)  # pass 2 over the list, UNROLL at a time: k, accumulators
    k = builder.phi(_I64)
    accs = [builder.phi(_V16F_) for _ in range(UNROLL)]
    k.add_incoming(c0, pad)
    for acc in accs:
        acc.add_incoming(zero16, pad)
    builder.cbranch(builder.icmp_signed("<", k, cnt), lbody, done)
    builder.position_at_end(lbody)
    new = []
    for u, acc in enumerate(accs):
        e = builder.add(k, ir.Constant(_I64, u))
        v = builder.load(builder.gep(fbuf, [e]))
        vb = builder.insert_element(ir.Constant(_V16F_, ir.Undefined), v, ir.Constant(_I32, 0))
        vb = _shuffle(builder, vb, vb, [0] * LANES)
        at = builder.zext(builder.load(builder.gep(ibuf, [e])), _I64)
        xv = builder.load(builder.bitcast(builder.gep(xt, [at]), _V16F_.as_pointer()), align=4)
        new.append(builder.call(fma, [vb, xv, acc]))
    k.add_incoming(builder.add(k, ir.Constant(_I64, UNROLL)), lbody)
    for acc, nv in zip(accs, new, strict=True):
        acc.add_incoming(nv, lbody)
    builder.branch(lhead)
    builder.position_at_end(done)
    while len(accs) > 1:
        accs = [builder.fadd(accs[j], accs[j + 1]) for j in range(0, len(accs), 2)]
    return accs[0]


def _row_t_codegen(bits: int, split: bool):  # noqa: ANN202 - numba codegen callback
    """One sparse row against `LANES` inputs stored transposed (`xt[col * LANES + lane]`): each word's kept
    values are decoded and scaled once, then every kept weight costs one broadcast and one FMA over all
    lanes, so the work follows the kept weights, not the matrix size (the row kernels' dense SIMD work per
    input does not). Four rotating accumulators hide the FMA latency. Lane totals go to `yt[ytoff:]`."""
    def codegen(context, builder, sig, args):  # noqa: ANN001, ANN202
        names = ("vals", "voff", "masks", "moff", "x", "scales", "soff", "ngroups", "wpg", "zoff", "y", "yoff",
                 "fbuf", "ibuf", "w0", "w1")
        a = _named(context, builder, sig, args, names)
        if split:
            four, two, join = (builder.append_basic_block(f"qts.{n}") for n in ("four", "two", "join"))
            builder.cbranch(builder.icmp_signed("==", a["wpg"], ir.Constant(_I64, 4)), four, two)
            branches = []
            for block, per_word in ((four, 4), (two, 2)):
                builder.position_at_end(block)
                branches.append((_row_t_loop(builder, bits, per_word, a), builder.block))
                builder.branch(join)
            builder.position_at_end(join)
            total = builder.phi(_V16F_)
            for value, block in branches:
                total.add_incoming(value, block)
        else:
            total = _row_t_loop(builder, bits, 0, a)
        dst = builder.bitcast(builder.gep(a["y"], [a["yoff"]]), _V16F_.as_pointer())
        first = builder.icmp_signed("==", a["w0"], ir.Constant(_I64, 0))  # later chunks add to the first's sums
        total = builder.select(first, total, builder.fadd(total, builder.load(dst, align=4)))
        builder.store(total, dst, align=4)
        return context.get_dummy_value()

    return codegen


def _row_t_i8row_codegen():  # noqa: ANN202 - numba codegen callback
    """`_row_t_loop` for an int8 row with one scale (per output channel, the usual int8): the stored values
    of the row are already its packed list, in column order, so pass 1 only packs the columns (one byte
    compress and two 64-byte stores per word, as uint16 offsets into `xt`), pass 2 reads each value byte
    where it is stored, and the scale multiplies the row's sums once at the end."""
    def codegen(context, builder, sig, args):  # noqa: ANN001, ANN202
        names = ("vals", "voff", "masks", "moff", "x", "scales", "soff", "y", "yoff", "ibuf", "w0", "w1")
        a = {n: (context.make_array(sig.args[k])(context, builder, args[k]).data
                 if n in ("vals", "masks", "x", "scales", "y", "ibuf") else args[k]) for k, n in enumerate(names)}
        vals, masks, xt, ib = a["vals"], a["masks"], a["x"], a["ibuf"]
        fma = _fn(builder, "llvm.fmuladd.v16f32", _V16F_, [_V16F_, _V16F_, _V16F_])
        pop64 = _fn(builder, "llvm.ctpop.i64", _I64, [_I64])
        one, c0, zero16 = ir.Constant(_I64, 1), ir.Constant(_I64, 0), ir.Constant(_V16F_, None)
        v64s = ir.VectorType(_I16, 64)
        entry = builder.block
        blocks = ("shead", "sbody", "whead", "wbody", "lpre", "lhead", "lbody", "rhead", "rbody", "done")
        shead, sbody, whead, wbody, lpre, lhead, lbody, rhead, rbody, done = (
            builder.append_basic_block(f"q8.{n}") for n in blocks)
        builder.branch(shead)
        builder.position_at_end(shead)  # the values of the words before this chunk
        si, svo = builder.phi(_I64), builder.phi(_I64)
        si.add_incoming(c0, entry)
        svo.add_incoming(a["voff"], entry)
        builder.cbranch(builder.icmp_signed("<", si, a["w0"]), sbody, whead)
        builder.position_at_end(sbody)
        sw = builder.load(builder.gep(masks, [builder.add(a["moff"], si)]))
        si.add_incoming(builder.add(si, one), sbody)
        svo.add_incoming(builder.add(svo, builder.call(pop64, [sw])), sbody)
        builder.branch(shead)
        builder.position_at_end(whead)  # pass 1: pack the chunk's kept columns
        i, cnt = builder.phi(_I64), builder.phi(_I64)
        i.add_incoming(a["w0"], shead)
        cnt.add_incoming(c0, shead)
        builder.cbranch(builder.icmp_signed("<", i, a["w1"]), wbody, lpre)
        builder.position_at_end(wbody)
        w = builder.load(builder.gep(masks, [builder.add(a["moff"], i)]))
        packed = _compress_bytes(builder, ir.Constant(_V64I8, list(range(64))), w)
        base = builder.trunc(builder.mul(i, ir.Constant(_I64, 64)), _I16)
        base = builder.insert_element(ir.Constant(v64s, ir.Undefined), base, ir.Constant(_I32, 0))
        cols = builder.add(builder.zext(packed, v64s), _shuffle(builder, base, base, [0] * 64))
        cols = builder.mul(cols, ir.Constant(v64s, [LANES] * 64))
        builder.store(cols, builder.bitcast(builder.gep(ib, [cnt]), v64s.as_pointer()), align=2)
        i.add_incoming(builder.add(i, one), wbody)
        cnt.add_incoming(builder.add(cnt, builder.call(pop64, [w])), wbody)
        builder.branch(whead)
        builder.position_at_end(lpre)
        nmain = builder.and_(cnt, ir.Constant(_I64, -UNROLL))
        builder.branch(lhead)

        def term(e: ir.Value, acc: ir.Value) -> ir.Value:
            col = builder.mul(builder.zext(builder.load(builder.gep(ib, [e])), _I64), one)
            v = builder.sitofp(builder.load(builder.gep(vals, [builder.add(svo, e)])), _F32)
            vb = builder.insert_element(ir.Constant(_V16F_, ir.Undefined), v, ir.Constant(_I32, 0))
            vb = _shuffle(builder, vb, vb, [0] * LANES)
            xv = builder.load(builder.bitcast(builder.gep(xt, [col]), _V16F_.as_pointer()), align=4)
            return builder.call(fma, [vb, xv, acc])

        builder.position_at_end(lhead)  # pass 2, UNROLL kept weights per iteration
        k = builder.phi(_I64)
        accs = [builder.phi(_V16F_) for _ in range(UNROLL)]
        k.add_incoming(c0, lpre)
        for acc in accs:
            acc.add_incoming(zero16, lpre)
        builder.cbranch(builder.icmp_signed("<", k, nmain), lbody, rhead)
        builder.position_at_end(lbody)
        new = [term(builder.add(k, ir.Constant(_I64, u)), acc) for u, acc in enumerate(accs)]
        k.add_incoming(builder.add(k, ir.Constant(_I64, UNROLL)), lbody)
        for acc, nv in zip(accs, new, strict=True):
            acc.add_incoming(nv, lbody)
        builder.branch(lhead)
        builder.position_at_end(rhead)  # the last cnt % UNROLL
        k2, racc = builder.phi(_I64), builder.phi(_V16F_)
        k2.add_incoming(nmain, lhead)
        racc.add_incoming(zero16, lhead)
        builder.cbranch(builder.icmp_signed("<", k2, cnt), rbody, done)
        builder.position_at_end(rbody)
        k2.add_incoming(builder.add(k2, one), rbody)
        racc.add_incoming(term(k2, racc), rbody)
        builder.branch(rhead)
        builder.position_at_end(done)
        parts = [*accs, racc]
        while len(parts) > 1:
            parts = [builder.fadd(parts[j], parts[j + 1]) if j + 1 < len(parts) else parts[j]
                     for j in range(0, len(parts), 2)]
        sv = builder.load(builder.gep(a["scales"], [a["soff"]]))
        sv = builder.insert_element(ir.Constant(_V16F_, ir.Undefined), sv, ir.Constant(_I32, 0))
        total = builder.fmul(parts[0], _shuffle(builder, sv, sv, [0] * LANES))
        dst = builder.bitcast(builder.gep(a["y"], [a["yoff"]]), _V16F_.as_pointer())
        first = builder.icmp_signed("==", a["w0"], c0)
        total = builder.select(first, total, builder.fadd(total, builder.load(dst, align=4)))
        builder.store(total, dst, align=4)
        return context.get_dummy_value()

    return codegen


@intrinsic
def _trow_i8row(typingctx, vals, voff, masks, moff, xt, scales, soff, yt, ytoff, ib16, w0, w1):  # noqa: ANN001, ANN201
    sig = types.none(vals, types.int64, masks, types.int64, xt, scales, types.int64, yt, types.int64, ib16,
                     types.int64, types.int64)
    return sig, _row_t_i8row_codegen()


def _make_row_t(bits: int, split: bool):  # noqa: ANN202 - returns a numba intrinsic
    @intrinsic
    def row_t(typingctx, vals, voff, masks, moff, xt, scales, soff, ngroups, wpg, zoff, yt, ytoff,  # noqa: ANN001, ANN202
              fbuf, ibuf, w0, w1):
        sig = types.none(vals, types.int64, masks, types.int64, xt, scales, types.int64, types.int64, types.int64,
                         types.int64, yt, types.int64, fbuf, ibuf, types.int64, types.int64)
        return sig, _row_t_codegen(bits, split)

    return row_t


_trow_i8, _trow_i4, _trow_f32 = _make_row_t(8, False), _make_row_t(4, False), _make_row_t(32, False)
_tsplit_i8, _tsplit_i4 = _make_row_t(8, True), _make_row_t(4, True)

# ---------------------------------------------------------------------------------------------------
# One row of any matrix in a QPack; the portable scalar path; matrix-vector products
# ---------------------------------------------------------------------------------------------------
KIND_F32, KIND_I8, KIND_I4 = 0, 1, 2
# columns of QPack.meta
M_OUT, M_IN, M_KIND, M_DENSE, M_GS, M_MOFF, M_VOFF, M_SOFF, M_ROFF, M_FAST, M_ZOFF = range(11)
N_META = 11  # M_ZOFF: byte offset (in qvals) of an int4 matrix's zero points, one per row and group


@njit(cache=True, nogil=True, inline="always")
def _value_at(kind, qvals, fvals, vo, zi):  # pragma: no cover - compiled
    """The unscaled value number `vo` of a value run (fp32, int8 byte, or int4 nibble with the zero point
    at `qvals[zi]`, read only for int4: other kinds have no zero points there)."""
    if kind == KIND_F32:
        return fvals[vo]
    if kind == KIND_I8:
        c = np.int32(qvals[vo])
        return np.float32(c - 256 if c > 127 else c)
    c = np.int32(qvals[vo >> 1])
    nib = (c >> 4) if vo & 1 else (c & 15)
    z = np.int32(qvals[zi])
    return np.float32(((nib + z) & 15) - z)


@njit(cache=True, nogil=True, inline="always")
def _kept(meta, m, r, j, mbytes):  # pragma: no cover - compiled
    b = meta[m, M_MOFF] * 64 + r * meta[m, M_IN] + j
    return meta[m, M_DENSE] != 0 or (mbytes[b >> 3] >> (b & 7)) & 1


@njit(cache=True, nogil=True, fastmath=True)
def _row_scalar(meta, m, r, mbytes, qvals, fvals, vo, scales, soff, zo, x, xoff):  # pragma: no cover - compiled
    inp, kind, gs = meta[m, M_IN], meta[m, M_KIND], meta[m, M_GS]
    total = np.float32(0.0)
    acc = np.float32(0.0)
    for j in range(inp):
        if _kept(meta, m, r, j, mbytes):
            acc += _value_at(kind, qvals, fvals, vo, zo + j // gs) * x[xoff + j]
            vo += 1
        if (j + 1) % gs == 0:
            total += acc * scales[soff + j // gs]
            acc = np.float32(0.0)
    return total


@njit(cache=True, nogil=True, inline="always")
def _offsets(meta, m, r, rowptr):  # pragma: no cover - compiled
    """(first value, first mask word, first scale, first zero point) of row `r` of matrix `m`."""
    inp, gs = meta[m, M_IN], meta[m, M_GS]
    vo = meta[m, M_VOFF] + (r * inp if meta[m, M_DENSE] else rowptr[meta[m, M_ROFF] + r])
    return vo, meta[m, M_MOFF] + r * (inp // 64), meta[m, M_SOFF] + r * (inp // gs), meta[m, M_ZOFF] + r * (inp // gs)


@njit(cache=True, nogil=True, fastmath=True)
def _rows_split(meta, m, r0, r1, masks, qvals, scales, rowptr, x, xoff, y, yoff):  # pragma: no cover - compiled
    """`mat_rows` for group size 32 or 16 (int8 / int4 only: an fp32 matrix has one group per row)."""
    kind, gs, dense = meta[m, M_KIND], meta[m, M_GS], meta[m, M_DENSE] != 0
    ng, per_word = meta[m, M_IN] // gs, 64 // gs
    for r in range(r0, r1):
        vo, moff, soff, zo = _offsets(meta, m, r, rowptr)
        if kind == KIND_I8 and not dense:
            y[yoff + r] = _split_i8(qvals, vo, masks, moff, x, xoff, scales, soff, ng, per_word, zo)
        elif kind == KIND_I4 and not dense:
            y[yoff + r] = _split_i4(qvals, vo, masks, moff, x, xoff, scales, soff, ng, per_word, zo)
        elif kind == KIND_I8:
            y[yoff + r] = _sdense_i8(qvals, vo, masks, moff, x, xoff, scales, soff, ng, per_word, zo)
        else:
            y[yoff + r] = _sdense_i4(qvals, vo, masks, moff, x, xoff, scales, soff, ng, per_word, zo)


@njit(cache=True, nogil=True, fastmath=True)
def mat_rows(meta, m, r0, r1, masks, mbytes, qvals, fvals, scales, rowptr, x, xoff, y, yoff, fast):  # pragma: no cover
    """y[yoff + r] = row r of matrix `m` times `x[xoff : xoff + in]`, for r in [r0, r1).

    The kind dispatch sits outside the row loops: with it inside, the loop body held every
    variant and ran 3x slower (measured)."""
    inp, kind, gs = meta[m, M_IN], meta[m, M_KIND], meta[m, M_GS]
    ng, wpg, dense = inp // gs, gs // 64, meta[m, M_DENSE] != 0
    if not (fast and meta[m, M_FAST]):
        for r in range(r0, r1):
            vo, moff, soff, zo = _offsets(meta, m, r, rowptr)
            y[yoff + r] = _row_scalar(meta, m, r, mbytes, qvals, fvals, vo, scales, soff, zo, x, xoff)
    elif gs < 64:
        _rows_split(meta, m, r0, r1, masks, qvals, scales, rowptr, x, xoff, y, yoff)
    elif kind == KIND_I8 and not dense:
        for r in range(r0, r1):
            vo, moff, soff, zo = _offsets(meta, m, r, rowptr)
            y[yoff + r] = _row_i8(qvals, vo, masks, moff, x, xoff, scales, soff, ng, wpg, zo)
    elif kind == KIND_I4 and not dense:
        for r in range(r0, r1):
            vo, moff, soff, zo = _offsets(meta, m, r, rowptr)
            y[yoff + r] = _row_i4(qvals, vo, masks, moff, x, xoff, scales, soff, ng, wpg, zo)
    elif kind == KIND_F32 and not dense:
        for r in range(r0, r1):
            vo, moff, soff, zo = _offsets(meta, m, r, rowptr)
            y[yoff + r] = _row_f32(fvals, vo, masks, moff, x, xoff, scales, soff, ng, wpg, zo)
    elif kind == KIND_I8:
        for r in range(r0, r1):
            vo, moff, soff, zo = _offsets(meta, m, r, rowptr)
            y[yoff + r] = _dense_i8(qvals, vo, masks, moff, x, xoff, scales, soff, ng, wpg, zo)
    elif kind == KIND_I4:
        for r in range(r0, r1):
            vo, moff, soff, zo = _offsets(meta, m, r, rowptr)
            y[yoff + r] = _dense_i4(qvals, vo, masks, moff, x, xoff, scales, soff, ng, wpg, zo)
    else:
        for r in range(r0, r1):
            vo, moff, soff, zo = _offsets(meta, m, r, rowptr)
            y[yoff + r] = _dense_f32(fvals, vo, masks, moff, x, xoff, scales, soff, ng, wpg, zo)


@njit(cache=True, nogil=True, fastmath=True)
def _rows_split_b(meta, m, r0, r1, masks, qvals, scales, rowptr, x, xs, n, y, yoff, ys):  # pragma: no cover
    """`mat_rows_batch` for group size 32 or 16 (see `_rows_split`)."""
    kind, gs, dense = meta[m, M_KIND], meta[m, M_GS], meta[m, M_DENSE] != 0
    ng, pw, nq = meta[m, M_IN] // gs, 64 // gs, n - n % BATCH
    if kind == KIND_I8 and not dense:
        for r in range(r0, r1):
            vo, moff, soff, zo = _offsets(meta, m, r, rowptr)
            for e in range(0, nq, BATCH):
                _bsplit_i8(qvals, vo, masks, moff, x, e * xs, xs, scales, soff, ng, pw, zo, y, e * ys + yoff + r, ys)
            for e in range(nq, n):
                y[e * ys + yoff + r] = _split_i8(qvals, vo, masks, moff, x, e * xs, scales, soff, ng, pw, zo)
    elif kind == KIND_I4 and not dense:
        for r in range(r0, r1):
            vo, moff, soff, zo = _offsets(meta, m, r, rowptr)
            for e in range(0, nq, BATCH):
                _bsplit_i4(qvals, vo, masks, moff, x, e * xs, xs, scales, soff, ng, pw, zo, y, e * ys + yoff + r, ys)
            for e in range(nq, n):
                y[e * ys + yoff + r] = _split_i4(qvals, vo, masks, moff, x, e * xs, scales, soff, ng, pw, zo)
    elif kind == KIND_I8:
        for r in range(r0, r1):
            vo, moff, soff, zo = _offsets(meta, m, r, rowptr)
            for e in range(0, nq, BATCH):
                _bsdense_i8(qvals, vo, masks, moff, x, e * xs, xs, scales, soff, ng, pw, zo, y, e * ys + yoff + r, ys)
            for e in range(nq, n):
                y[e * ys + yoff + r] = _sdense_i8(qvals, vo, masks, moff, x, e * xs, scales, soff, ng, pw, zo)
    else:
        for r in range(r0, r1):
            vo, moff, soff, zo = _offsets(meta, m, r, rowptr)
            for e in range(0, nq, BATCH):
                _bsdense_i4(qvals, vo, masks, moff, x, e * xs, xs, scales, soff, ng, pw, zo, y, e * ys + yoff + r, ys)
            for e in range(nq, n):
                y[e * ys + yoff + r] = _sdense_i4(qvals, vo, masks, moff, x, e * xs, scales, soff, ng, pw, zo)


@njit(cache=True, nogil=True, fastmath=True)
def mat_rows_batch(meta, m, r0, r1, masks, mbytes, qvals, fvals, scales, rowptr, x, xs, n, y, yoff, ys,
                   fast):  # pragma: no cover - compiled
    """`mat_rows` for `n` inputs at once: y[e * ys + yoff + r] = row r of matrix `m` times x[e * xs:], r in [r0, r1).

    Why: at batch size n the single-row kernel would stream every row's bytes n times. Here each row is
    decoded once per `BATCH` inputs while its bytes sit in L1 (the SIMD paths; the scalar path loops
    `mat_rows` per input). Per input the arithmetic is the single kernel's, in the same order, so a
    batched result equals the unbatched one bit for bit, except for group sizes 16/32, where each word is
    scaled once for all inputs (q * s * x: half the arithmetic; equal up to fp32 rounding). Kind dispatch
    outside the row loops, as in `mat_rows`."""
    inp, kind, gs = meta[m, M_IN], meta[m, M_KIND], meta[m, M_GS]
    ng, wpg, dense, nq = inp // gs, gs // 64, meta[m, M_DENSE] != 0, n - n % BATCH
    if not (fast and meta[m, M_FAST]):
        for e in range(n):
            mat_rows(meta, m, r0, r1, masks, mbytes, qvals, fvals, scales, rowptr, x, e * xs, y, e * ys + yoff, fast)
    elif gs < 64:
        _rows_split_b(meta, m, r0, r1, masks, qvals, scales, rowptr, x, xs, n, y, yoff, ys)
    elif kind == KIND_I8 and not dense:
        for r in range(r0, r1):
            vo, moff, soff, zo = _offsets(meta, m, r, rowptr)
            for e in range(0, nq, BATCH):
                _brow_i8(qvals, vo, masks, moff, x, e * xs, xs, scales, soff, ng, wpg, zo, y, e * ys + yoff + r, ys)
            for e in range(nq, n):
                y[e * ys + yoff + r] = _row_i8(qvals, vo, masks, moff, x, e * xs, scales, soff, ng, wpg, zo)
    elif kind == KIND_I4 and not dense:
        for r in range(r0, r1):
            vo, moff, soff, zo = _offsets(meta, m, r, rowptr)
            for e in range(0, nq, BATCH):
                _brow_i4(qvals, vo, masks, moff, x, e * xs, xs, scales, soff, ng, wpg, zo, y, e * ys + yoff + r, ys)
            for e in range(nq, n):
                y[e * ys + yoff + r] = _row_i4(qvals, vo, masks, moff, x, e * xs, scales, soff, ng, wpg, zo)
    elif kind == KIND_F32 and not dense:
        for r in range(r0, r1):
            vo, moff, soff, zo = _offsets(meta, m, r, rowptr)
            for e in range(0, nq, BATCH):
                _brow_f32(fvals, vo, masks, moff, x, e * xs, xs, scales, soff, ng, wpg, zo, y, e * ys + yoff + r, ys)
            for e in range(nq, n):
                y[e * ys + yoff + r] = _row_f32(fvals, vo, masks, moff, x, e * xs, scales, soff, ng, wpg, zo)
    elif kind == KIND_I8:
        for r in range(r0, r1):
            vo, moff, soff, zo = _offsets(meta, m, r, rowptr)
            for e in range(0, nq, BATCH):
                _bdense_i8(qvals, vo, masks, moff, x, e * xs, xs, scales, soff, ng, wpg, zo, y, e * ys + yoff + r, ys)
            for e in range(nq, n):
                y[e * ys + yoff + r] = _dense_i8(qvals, vo, masks, moff, x, e * xs, scales, soff, ng, wpg, zo)
    elif kind == KIND_I4:
        for r in range(r0, r1):
            vo, moff, soff, zo = _offsets(meta, m, r, rowptr)
            for e in range(0, nq, BATCH):
                _bdense_i4(qvals, vo, masks, moff, x, e * xs, xs, scales, soff, ng, wpg, zo, y, e * ys + yoff + r, ys)
            for e in range(nq, n):
                y[e * ys + yoff + r] = _dense_i4(qvals, vo, masks, moff, x, e * xs, scales, soff, ng, wpg, zo)
    else:
        for r in range(r0, r1):
            vo, moff, soff, zo = _offsets(meta, m, r, rowptr)
            for e in range(0, nq, BATCH):
                _bdense_f32(fvals, vo, masks, moff, x, e * xs, xs, scales, soff, ng, wpg, zo, y, e * ys + yoff + r, ys)
            for e in range(nq, n):
                y[e * ys + yoff + r] = _dense_f32(fvals, vo, masks, moff, x, e * xs, scales, soff, ng, wpg, zo)


@njit(cache=True, nogil=True, inline="always")
def transposed_ok(meta, m, fast):  # pragma: no cover - compiled
    """`mat_rows_t` covers matrix `m`: stored sparse (a mask) on a SIMD layout."""
    return fast and meta[m, M_FAST] != 0 and meta[m, M_DENSE] == 0


@njit(cache=True, nogil=True, fastmath=True)
def mat_rows_t(meta, m, r0, r1, masks, qvals, fvals, scales, rowptr, xt, yt, ytoff):  # pragma: no cover - compiled
    """yt[ytoff + r * LANES + lane] = row r of sparse matrix `m` times input `lane`, for r in [r0, r1), with the
    inputs transposed (`xt[col * LANES + lane]`). Only where `transposed_ok`. Columns run in chunks of
    `T_CHUNK` words, all rows per chunk, so the chunk's inputs (36 KB) stay in L1. Sums in another order
    than `mat_rows` (scaled values times inputs, per kept weight): equal up to fp32 rounding."""
    inp, kind, gs = meta[m, M_IN], meta[m, M_KIND], meta[m, M_GS]
    ng, words = inp // gs, inp // 64
    fb, ib = np.empty(inp + 128, np.float32), np.empty(inp + 128, np.int32)  # one row's kept values and columns
    ib16 = np.empty(inp + 128, np.uint16)
    for w0 in range(0, words, T_CHUNK):
        w1 = min(words, w0 + T_CHUNK)
        if gs < 64:
            pw = 64 // gs
            for r in range(r0, r1):
                vo, moff, soff, zo = _offsets(meta, m, r, rowptr)
                if kind == KIND_I8:
                    _tsplit_i8(qvals, vo, masks, moff, xt, scales, soff, ng, pw, zo, yt, ytoff + r * LANES, fb, ib,
                               w0, w1)
                else:
                    _tsplit_i4(qvals, vo, masks, moff, xt, scales, soff, ng, pw, zo, yt, ytoff + r * LANES, fb, ib,
                               w0, w1)
        elif kind == KIND_I8 and ng == 1 and inp <= 4096:  # one scale per row; uint16 column offsets fit
            for r in range(r0, r1):
                vo, moff, soff, zo = _offsets(meta, m, r, rowptr)
                _trow_i8row(qvals, vo, masks, moff, xt, scales, soff, yt, ytoff + r * LANES, ib16, w0, w1)
        elif kind == KIND_I8:
            for r in range(r0, r1):
                vo, moff, soff, zo = _offsets(meta, m, r, rowptr)
                _trow_i8(qvals, vo, masks, moff, xt, scales, soff, ng, gs // 64, zo, yt, ytoff + r * LANES, fb, ib,
                         w0, w1)
        elif kind == KIND_I4:
            for r in range(r0, r1):
                vo, moff, soff, zo = _offsets(meta, m, r, rowptr)
                _trow_i4(qvals, vo, masks, moff, xt, scales, soff, ng, gs // 64, zo, yt, ytoff + r * LANES, fb, ib,
                         w0, w1)
        else:
            for r in range(r0, r1):
                vo, moff, soff, zo = _offsets(meta, m, r, rowptr)
                _trow_f32(fvals, vo, masks, moff, xt, scales, soff, ng, gs // 64, zo, yt, ytoff + r * LANES, fb, ib,
                          w0, w1)


@njit(cache=True, nogil=True)
def row_values(meta, m, r, mbytes, qvals, fvals, scales, rowptr, out):  # pragma: no cover - compiled
    """Row `r` of matrix `m` dequantized into `out[:in]` (an embedding lookup)."""
    inp, kind, gs = meta[m, M_IN], meta[m, M_KIND], meta[m, M_GS]
    vo, _, soff, zo = _offsets(meta, m, r, rowptr)
    for j in range(inp):
        out[j] = 0.0
        if _kept(meta, m, r, j, mbytes):
            out[j] = _value_at(kind, qvals, fvals, vo, zo + j // gs) * scales[soff + j // gs]
            vo += 1


@njit(cache=True, nogil=True, fastmath=True)
def _gemm_serial(meta, m, masks, mbytes, qvals, fvals, scales, rowptr, x, y, fast):  # pragma: no cover
    inp, out = meta[m, M_IN], meta[m, M_OUT]
    for t in range((x.shape[0] - PAD) // inp):
        mat_rows(meta, m, 0, out, masks, mbytes, qvals, fvals, scales, rowptr, x, t * inp, y, t * out, fast)


FAST = HAS_VBMI2  # the SIMD path is the default where vpexpandb exists in registers


def _rowptr(kept: torch.Tensor) -> np.ndarray:
    counts = kept.sum(dim=1).to(torch.int64).numpy()
    return np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(np.int64)


@dataclass
class _Part:
    mask: np.ndarray  # uint8, little bit order, padded to whole uint64 words
    qvals: np.ndarray  # uint8 (int8 values or packed int4)
    fvals: np.ndarray  # float32 (fp32 values)
    scales: np.ndarray  # float32 (out * groups)
    rowptr: np.ndarray  # int64 (out): first value of each row, in elements
    row: list[int]  # the meta row, offsets filled in by QPack.finalize


def _encode(weight: torch.Tensor, info: QuantInfo | None, dense: bool) -> _Part:
    """The stored layout of one matrix: kept-bitmask, values (int8 / packed int4 / fp32), scales, row offsets."""
    w = weight.detach().to(torch.float32).cpu()
    out, inp = w.shape
    zeros = np.zeros(0, np.uint8)
    if info is None:
        kind, q, scales, gs = KIND_F32, w, torch.ones(out, 1), inp
    else:
        kind = KIND_I8 if info.scheme.bits == 8 else KIND_I4
        q, scales = info.ints(w), info.scales.to(torch.float32)
        gs = inp // scales.shape[1]
        if kind == KIND_I4:  # stored after the values; a missing set (old symmetric int4) is zero point 8
            zeros = info.expanded_zeros(scales.shape[1]).to(torch.uint8).reshape(-1).numpy()
    kept = torch.ones_like(q, dtype=torch.bool) if dense else q != 0
    mask = np.zeros(0, np.uint8) if dense else np.packbits(kept.reshape(-1).numpy(), bitorder="little")
    mask = np.concatenate([mask, np.zeros((-mask.size) % 8, np.uint8)])
    flat = q.reshape(-1) if dense else q[kept]
    qvals, fvals = np.zeros(0, np.uint8), np.zeros(0, np.float32)
    if kind == KIND_F32:
        fvals = flat.numpy().astype(np.float32)
    elif kind == KIND_I8:
        qvals = flat.to(torch.int8).numpy().view(np.uint8)
    else:
        qvals = pack_int4(flat).numpy()
    fast = int(inp % 64 == 0 and (gs % 64 == 0 or (gs in SPLIT_GROUPS and kind != KIND_F32)))
    row = [out, inp, kind, int(dense), gs, 0, 0, 0, 0, fast, qvals.size]  # M_ZOFF: relative until finalize
    qvals = np.concatenate([qvals, zeros])
    return _Part(mask, qvals, fvals, scales.reshape(-1).numpy().astype(np.float32),
                 np.zeros(0, np.int64) if dense else _rowptr(kept), row)


class QPack:
    """Many matrices in one set of flat buffers, so a compiled decode step takes a fixed argument list.

    `add(weight, info)` encodes a matrix (quantized when `info` is given: `weight` must then be the
    dequantized `q * s`, and the integers are recovered exactly; fp32 otherwise) and returns its index;
    `finalize()` concatenates everything. `dense=True` stores all elements without a mask (the head).
    """

    def __init__(self) -> None:
        self._parts: list[_Part] = []
        self.meta = np.zeros((0, N_META), np.int64)
        self.masks = np.zeros(1, np.uint64)
        self.qvals = np.zeros(PAD, np.uint8)
        self.fvals = np.zeros(PAD, np.float32)
        self.scales = np.zeros(1, np.float32)
        self.rowptr = np.zeros(1, np.int64)

    def add(self, weight: torch.Tensor, info: QuantInfo | None = None, *, dense: bool = False) -> int:
        self._parts.append(_encode(weight, info, dense))
        return len(self._parts) - 1

    def add_part(self, part: _Part) -> int:
        self._parts.append(part)
        return len(self._parts) - 1

    def finalize(self) -> QPack:
        """Concatenate the parts (each value run starts on a byte; PAD bytes after the last)."""
        offs = np.zeros(5, np.int64)  # mask words, qval bytes, fvals, scales, rowptr
        meta = []
        for p in self._parts:
            row = list(p.row)
            row[M_MOFF] = offs[0]
            row[M_VOFF] = offs[1] * (2 if row[M_KIND] == KIND_I4 else 1) if row[M_KIND] else offs[2]
            row[M_SOFF], row[M_ROFF] = offs[3], offs[4]
            row[M_ZOFF] += offs[1]
            meta.append(row)
            offs += [p.mask.size // 8, p.qvals.size, p.fvals.size, p.scales.size, p.rowptr.size]
        cat = np.concatenate
        self.meta = np.array(meta, np.int64).reshape(-1, N_META)
        self.masks = cat([p.mask for p in self._parts] + [np.zeros(8, np.uint8)]).view(np.uint64)
        self.qvals = cat([p.qvals for p in self._parts] + [np.zeros(PAD, np.uint8)])
        self.fvals = cat([p.fvals for p in self._parts] + [np.zeros(PAD, np.float32)])
        self.scales = cat([p.scales for p in self._parts] + [np.zeros(1, np.float32)])
        self.rowptr = cat([p.rowptr for p in self._parts] + [np.zeros(1, np.int64)])
        self._parts = []
        return self

    @property
    def mbytes(self) -> np.ndarray:
        return self.masks.view(np.uint8)

    @property
    def nbytes(self) -> int:
        """Resident bytes of all matrices (values, masks, scales, row offsets, meta)."""
        return sum(a.nbytes for a in (self.meta, self.masks, self.qvals, self.fvals, self.scales, self.rowptr))

    def buffers(self) -> tuple[np.ndarray, ...]:
        """(meta, masks, mask bytes, qvals, fvals, scales, rowptr): the argument run of the compiled kernels."""
        return self.meta, self.masks, self.mbytes, self.qvals, self.fvals, self.scales, self.rowptr

    def matmul(self, m: int, x: np.ndarray | torch.Tensor, fast: bool | None = None) -> np.ndarray:
        """`x @ W_m.T` for `x` of shape `(in,)` or `(n, in)` (float32), one row dot at a time."""
        xa = np.ascontiguousarray(np.asarray(x, dtype=np.float32))
        out, inp = int(self.meta[m, M_OUT]), int(self.meta[m, M_IN])
        n = xa.size // inp
        xp = np.concatenate([xa.reshape(-1)[: n * inp], np.zeros(PAD, np.float32)])  # SIMD loads read past x
        y = np.zeros(n * out, np.float32)
        b = self.buffers()
        _gemm_serial(b[0], m, *b[1:], xp, y, FAST if fast is None else fast)
        return y.reshape(xa.shape[:-1] + (out,))
