"""A compiled decode step for Llama-architecture decoders over sparse int8 / int4 / fp32 weights.

Why: at batch 1 a token is ~210 matrix-vector products plus norms, RoPE and attention. Through
HF eager modules every one of them costs Python and dispatcher overhead (measured: at 99 %
sparsity the linears were 13 ms of a 51 ms token), and the fp32 head alone streams 113 MB per
token. Here one Python call runs the whole token inside numba: every linear reads the stored
bitmask + integer layout (`qkernels.QPack`), the head is read as int8 rows when the checkpoint
stored it so, and the KV cache is preallocated. The engine holds only the packed weights, the
norm vectors and the RoPE table, never the float matrices (`resident_bytes`).

Numerics follow transformers' Llama: RMSNorm in fp32 (`x * rsqrt(mean(x^2) + eps) * w`), RoPE
from the model's own `rotary_emb` (so rope_theta and any scaling type are the model's), GQA with
`scaling` from the attention module, SiLU MLP. Logits match HF on the dequantized weights up to
fp32 summation order.

    engine = DecodeEngine.from_model(lm)        # lm: LoadedModel (lm.quant used where present)
    ids = engine.generate(prompt_ids, 64)       # greedy; or engine.logits(ids) for scoring

Many sequences at once (`BatchDecoder`, for a server's continuous batching): one call feeds any set of
(sequence slot, position, token) entries — decode tokens of running sequences and prompt chunks of new
ones alike — through every block, each row of every packed matrix read once for all entries
(`qkernels.mat_rows_batch`), and returns the logits of the entries that ask for them.

    batch = BatchDecoder(engine, slots=16)
    logits = batch.step(tokens, slots, positions, want)   # (sum(want), vocab)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from numba import njit, prange

from prunelab.errors import ConfigError
from prunelab.models.types import LoadedModel
from prunelab.quant import QuantScheme, quantize_rtn
from prunelab.runtime.qkernels import (
    FAST,
    LANES,
    LAYOUT_VERSION,
    PAD,
    QPack,
    mat_rows,
    mat_rows_batch,
    mat_rows_t,
    row_values,
    transposed_ok,
)

# numba caches `_step` by this file's content alone, not by the qkernels it inlines: pinning the kernels'
# layout version here makes a kernel change change this file too (and so recompile the step).
PINNED_LAYOUT = 8
if LAYOUT_VERSION != PINNED_LAYOUT:
    raise RuntimeError(f"qkernels layout {LAYOUT_VERSION} != {PINNED_LAYOUT} pinned in fused_decode.py: "
                       "bump PINNED_LAYOUT (numba would otherwise reuse a cached step built for the old kernels)")

_LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
            "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
SUPPORTED = ("llama", "mistral", "smollm3")
# cfg vector layout passed to the compiled step
C_H, C_NH, C_NKV, C_HD, C_I, C_MAXPOS, C_NCH = range(7)


@njit(cache=True, nogil=True, fastmath=False)
def _rmsnorm(x, w, eps, out):  # pragma: no cover - compiled
    s = np.float32(0.0)
    for i in range(x.shape[0]):
        s += x[i] * x[i]
    r = np.float32(1.0) / np.sqrt(s / np.float32(x.shape[0]) + eps)
    for i in range(x.shape[0]):
        out[i] = w[i] * (x[i] * r)
    out[x.shape[0]:] = 0.0


@njit(cache=True, nogil=True)
def _rope(v, off, nheads, hd, cos, sin, pos):  # pragma: no cover - compiled
    half = hd // 2
    for h in range(nheads):
        b = off + h * hd
        for i in range(half):
            a, c = v[b + i], v[b + i + half]
            v[b + i] = a * cos[pos, i] - c * sin[pos, i]
            v[b + i + half] = c * cos[pos, i + half] + a * sin[pos, i + half]


@njit(parallel=True, cache=True, nogil=True, fastmath=True)
def _gemv_par(mats, yoffs, meta, masks, mbytes, qvals, fvals, scales, rowptr, x, y, nch, fast):  # pragma: no cover
    """Several matrices on the same input, rows cut into `nch` chunks each, all chunks in one prange."""
    for c in prange(mats.shape[0] * nch):
        k, part = c // nch, c % nch
        m = mats[k]
        out = meta[m, 0]
        r0, r1 = out * part // nch, out * (part + 1) // nch
        mat_rows(meta, m, r0, r1, masks, mbytes, qvals, fvals, scales, rowptr, x, 0, y, yoffs[k], fast)


@njit(cache=True, nogil=True, fastmath=True)
def _attention(qkv, kc, vc, layer, pos, nh, nkv, hd, scaling, out):  # pragma: no cover - compiled
    """Serial on purpose: a few microseconds of work at decode lengths, while every parallel region
    is a fork/join that costs far more on a busy machine (measured 11 ms per region under load)."""
    group = nh // nkv
    for h in range(nh):
        kvh = h // group
        qo = h * hd
        scores = np.empty(pos + 1, np.float32)
        best = np.float32(-np.inf)
        for t in range(pos + 1):
            s = np.float32(0.0)
            for i in range(hd):
                s += qkv[qo + i] * kc[layer, kvh, t, i]
            s *= scaling
            scores[t] = s
            best = max(best, s)
        tot = np.float32(0.0)
        for t in range(pos + 1):
            scores[t] = np.exp(scores[t] - best)
            tot += scores[t]
        for i in range(hd):
            out[qo + i] = 0.0
        for t in range(pos + 1):
            p = scores[t] / tot
            for i in range(hd):
                out[qo + i] += p * vc[layer, kvh, t, i]


@njit(cache=True, nogil=True, fastmath=True)
def _step(tok, pos, cfg, eps, scaling, lmats, offs, norms, fnorm, emb_m, head_m, cos, sin, kc, vc,
          meta, masks, mbytes, qvals, fvals, scales, rowptr,
          x, xn, qkv, att, gu, act, tmp, logits, fast):  # pragma: no cover - compiled
    """One token through every block and the head; `logits` receives the result. Serial glue,
    parallel GEMVs and attention (`_gemv_par`, `_attention`)."""
    h, nh, nkv, hd, inter, nch = cfg[C_H], cfg[C_NH], cfg[C_NKV], cfg[C_HD], cfg[C_I], cfg[C_NCH]
    buf = (meta, masks, mbytes, qvals, fvals, scales, rowptr)
    row_values(meta, emb_m, tok, mbytes, qvals, fvals, scales, rowptr, x)
    qd, kd = nh * hd, nkv * hd
    for layer in range(lmats.shape[0]):
        _rmsnorm(x[:h], norms[layer, 0], eps, xn)
        _gemv_par(lmats[layer, 0:3], offs[0], *buf, xn, qkv, nch, fast)
        _rope(qkv, 0, nh, hd, cos, sin, pos)
        _rope(qkv, qd, nkv, hd, cos, sin, pos)
        for g in range(nkv):
            for i in range(hd):
                kc[layer, g, pos, i] = qkv[qd + g * hd + i]
                vc[layer, g, pos, i] = qkv[qd + kd + g * hd + i]
        _attention(qkv, kc, vc, layer, pos, nh, nkv, hd, scaling, att)
        _gemv_par(lmats[layer, 3:4], offs[2], *buf, att, tmp, nch, fast)
        for i in range(h):
            x[i] += tmp[i]
        _rmsnorm(x[:h], norms[layer, 1], eps, xn)
        _gemv_par(lmats[layer, 4:6], offs[1], *buf, xn, gu, nch, fast)
        for i in range(inter):
            g_ = gu[i]
            act[i] = g_ / (np.float32(1.0) + np.exp(-g_)) * gu[inter + i]
        _gemv_par(lmats[layer, 6:7], offs[2], *buf, act, tmp, nch, fast)
        for i in range(h):
            x[i] += tmp[i]
    _rmsnorm(x[:h], fnorm, eps, xn)
    _gemv_par(np.array([head_m]), offs[2], *buf, xn, logits, nch, fast)


T_MIN = 10  # inputs from which a sparse matrix runs transposed (work per kept weight, not per input and weight)


@njit(parallel=True, cache=True, nogil=True, fastmath=True)
def _gemv_batch(mats, yoffs, meta, masks, mbytes, qvals, fvals, scales, rowptr, x, xs, n, y, ys, nch,
                fast):  # pragma: no cover - compiled
    """`_gemv_par` for `n` inputs `xs` apart (outputs `ys` apart): each chunk of rows serves every input.

    From `T_MIN` inputs on, sparse matrices run `mat_rows_t` on the inputs transposed in blocks of `LANES`
    (one FMA per kept weight serves 16 inputs; a block costs the same however few lanes it fills, so a last
    block of fewer than `T_MIN` inputs is left to `mat_rows_batch`); dense ones (the head) and smaller
    batches run `mat_rows_batch` (one row decode per 4 inputs, dense SIMD work per input)."""
    inp = meta[mats[0], 1]
    use_t = n >= T_MIN
    nblk = 0  # blocks of LANES inputs; a last partial block of fewer than T_MIN goes the mat_rows_batch way
    if use_t:
        nblk = n // LANES + (1 if n % LANES >= T_MIN else 0)
    tail = min(n, nblk * LANES)  # first input not in a block
    xt_raw = np.zeros(nblk * inp * LANES + PAD + 16, np.float32)
    a0 = (-xt_raw.ctypes.data % 64) // 4  # 64-byte aligned: each 16-lane column load is one cache line
    xt = xt_raw[a0:]
    rowoff = np.zeros(mats.shape[0] + 1, np.int64)
    for k in range(mats.shape[0]):
        rowoff[k + 1] = rowoff[k] + meta[mats[k], 0]
    yt = np.empty(nblk * rowoff[-1] * LANES + PAD, np.float32)
    for e in range(nblk * LANES if use_t else 0):
        blk, lane = e // LANES, e % LANES
        if e < n:
            for j in range(inp):
                xt[(blk * inp + j) * LANES + lane] = x[e * xs + j]
    for c in prange(mats.shape[0] * nch):
        k, part = c // nch, c % nch
        m = mats[k]
        out = meta[m, 0]
        r0, r1 = out * part // nch, out * (part + 1) // nch
        if use_t and transposed_ok(meta, m, fast):
            for blk in range(nblk):
                base = (blk * rowoff[-1] + rowoff[k]) * LANES
                mat_rows_t(meta, m, r0, r1, masks, qvals, fvals, scales, rowptr, xt[blk * inp * LANES:], yt, base)
                for r in range(r0, r1):
                    for lane in range(min(LANES, n - blk * LANES)):
                        y[(blk * LANES + lane) * ys + yoffs[k] + r] = yt[base + r * LANES + lane]
            if tail < n:
                mat_rows_batch(meta, m, r0, r1, masks, mbytes, qvals, fvals, scales, rowptr, x[tail * xs:], xs,
                               n - tail, y[tail * ys:], yoffs[k], ys, fast)
        else:
            mat_rows_batch(meta, m, r0, r1, masks, mbytes, qvals, fvals, scales, rowptr, x, xs, n, y, yoffs[k], ys,
                           fast)


@njit(parallel=True, cache=True, nogil=True, fastmath=True)
def _attention_batch(qkv, qs, kc, vc, layer, slots, poss, n, nh, nkv, hd, scaling, out, os):  # pragma: no cover
    """`_attention` per entry (in parallel), entry e reading its slot's cache (`kc[slot]`: the single
    engine's layout) up to its own position."""
    for e in prange(n):
        _attention(qkv[e * qs:(e + 1) * qs], kc[slots[e]], vc[slots[e]], layer, poss[e], nh, nkv, hd, scaling,
                   out[e * os:(e + 1) * os])


@njit(cache=True, nogil=True, fastmath=True)
def _step_batch(toks, slots, poss, heads, cfg, eps, scaling, lmats, offs, norms, fnorm, emb_m, head_m, cos, sin,
                kc, vc, meta, masks, mbytes, qvals, fvals, scales, rowptr,
                x, xn, qkv, att, gu, act, tmp, logits, fast):  # pragma: no cover - compiled
    """`_step` for `n = len(toks)` entries (token `toks[e]` of slot `slots[e]` at position `poss[e]`); the
    logits of entries `heads` go to `logits` rows 0.. in that order. Every entry of a layer writes its K/V
    before any entry attends, so a prompt chunk of one slot may sit in the same call (causal by position)."""
    h, nh, nkv, hd, inter, nch = cfg[C_H], cfg[C_NH], cfg[C_NKV], cfg[C_HD], cfg[C_I], cfg[C_NCH]
    n = toks.shape[0]
    w, qw, gw, vocab = x.shape[1], qkv.shape[1], gu.shape[1], logits.shape[1]
    xnf, qkvf, attf, guf, actf, tmpf, logf = (xn.reshape(-1), qkv.reshape(-1), att.reshape(-1), gu.reshape(-1),
                                              act.reshape(-1), tmp.reshape(-1), logits.reshape(-1))
    buf = (meta, masks, mbytes, qvals, fvals, scales, rowptr)
    for e in range(n):
        row_values(meta, emb_m, toks[e], mbytes, qvals, fvals, scales, rowptr, x[e])
    qd, kd = nh * hd, nkv * hd
    for layer in range(lmats.shape[0]):
        for e in range(n):
            _rmsnorm(x[e, :h], norms[layer, 0], eps, xn[e])
        _gemv_batch(lmats[layer, 0:3], offs[0], *buf, xnf, w, n, qkvf, qw, nch, fast)
        for e in range(n):
            q = qkv[e]
            _rope(q, 0, nh, hd, cos, sin, poss[e])
            _rope(q, qd, nkv, hd, cos, sin, poss[e])
            for g in range(nkv):
                for i in range(hd):
                    kc[slots[e], layer, g, poss[e], i] = q[qd + g * hd + i]
                    vc[slots[e], layer, g, poss[e], i] = q[qd + kd + g * hd + i]
        _attention_batch(qkvf, qw, kc, vc, layer, slots, poss, n, nh, nkv, hd, scaling, attf, w)
        _gemv_batch(lmats[layer, 3:4], offs[2], *buf, attf, w, n, tmpf, w, nch, fast)
        for e in range(n):
            for i in range(h):
                x[e, i] += tmp[e, i]
            _rmsnorm(x[e, :h], norms[layer, 1], eps, xn[e])
        _gemv_batch(lmats[layer, 4:6], offs[1], *buf, xnf, w, n, guf, gw, nch, fast)
        for e in range(n):
            for i in range(inter):
                g_ = gu[e, i]
                act[e, i] = g_ / (np.float32(1.0) + np.exp(-g_)) * gu[e, inter + i]
        _gemv_batch(lmats[layer, 6:7], offs[2], *buf, actf, w, n, tmpf, w, nch, fast)
        for e in range(n):
            for i in range(h):
                x[e, i] += tmp[e, i]
    for j in range(heads.shape[0]):
        _rmsnorm(x[heads[j], :h], fnorm, eps, xn[j])
    _gemv_batch(np.array([head_m]), offs[2], *buf, xnf, w, heads.shape[0], logf, vocab, nch, fast)


def _rope_table(inv_freq: torch.Tensor, attention_scaling: float, n: int) -> tuple[np.ndarray, np.ndarray]:
    """cos/sin `(n, head_dim)` computed with the same fp32 ops as transformers' rotary embedding."""
    pos = torch.arange(n, dtype=torch.float32)[None, None, :]
    freqs = (inv_freq.float()[None, :, None] @ pos).transpose(1, 2)
    emb = torch.cat((freqs, freqs), dim=-1)[0]
    cos, sin = emb.cos() * attention_scaling, emb.sin() * attention_scaling
    return np.ascontiguousarray(cos.numpy(), np.float32), np.ascontiguousarray(sin.numpy(), np.float32)


def _check_llama(lm: LoadedModel) -> None:
    cfg = lm.config
    if getattr(cfg, "model_type", None) not in SUPPORTED or not hasattr(lm.model, "model"):
        raise ConfigError(f"the fused decoder runs Llama-architecture decoders ({', '.join(SUPPORTED)}); "
                          f"{lm.name} is {getattr(cfg, 'model_type', '?')}: use sparsify_for_inference instead")
    if getattr(cfg, "hidden_act", "silu") != "silu" or getattr(cfg, "attention_bias", False) \
            or getattr(cfg, "mlp_bias", False):
        raise ConfigError(f"the fused decoder needs a SiLU MLP without biases; {lm.name} has other settings")


def _head_entry(lm: LoadedModel, pack: QPack, head: str) -> tuple[int, int]:
    """(embedding matrix, head matrix) indices: the stored int8 head when quantized, else as `head` says."""
    model = lm.model
    emb, out = model.get_input_embeddings(), model.get_output_embeddings()
    tied = out.weight.data_ptr() == emb.weight.data_ptr()
    head_name = next((n for n, m in model.named_modules() if m is out), "lm_head")
    info = lm.quant.get(head_name)
    if info is None and head == "int8":
        _, info = quantize_rtn(out.weight.detach(), QuantScheme(8, None), head_name)
        w = info.dequantize(info.ints(out.weight.detach()))
    else:
        w = out.weight.detach()
    head_m = pack.add(w, info, dense=True)
    if tied:  # one matrix serves both (with head="int8" on a float model the lookup reads the int8 rows too)
        return head_m, head_m
    emb_name = next((n for n, m in model.named_modules() if m is emb), "")
    return pack.add(emb.weight.detach(), lm.quant.get(emb_name), dense=True), head_m


@dataclass
class DecodeEngine:
    """Packed weights, norms, RoPE table, KV cache and scratch of one model; greedy decode on CPU."""

    pack: QPack
    cfg: np.ndarray
    eps: float
    scaling: float
    lmats: np.ndarray
    norms: np.ndarray
    fnorm: np.ndarray
    emb_m: int
    head_m: int
    inv_freq: torch.Tensor
    attention_scaling: float
    vocab: int
    fast: bool = FAST
    pos: int = 0
    tokenizer: Any = None
    context: int | None = None  # the model's longest sequence (max_position_embeddings)

    @classmethod
    def from_model(cls, lm: LoadedModel, *, head: str = "auto", fast: bool | None = None) -> DecodeEngine:
        """Pack `lm` (sparse or dense, quantized where `lm.quant` says, fp32 elsewhere).

        `head="auto"` reads the head as stored (int8 rows when quantized, else fp32: exact);
        `head="int8"` quantizes a float head per row (one scale per vocabulary entry) for speed.
        """
        _check_llama(lm)
        if head not in ("auto", "int8"):
            raise ConfigError(f"unknown head mode {head!r}: choose auto or int8")
        c, layers = lm.config, lm.model.model.layers
        pack, lmats, norms = QPack(), [], []
        for i, layer in enumerate(layers):
            names = [f"model.layers.{i}.{s}" for s in _LINEARS]
            lmats.append([pack.add(lm.model.get_submodule(n).weight.detach(), lm.quant.get(n)) for n in names])
            norms.append([layer.input_layernorm.weight.detach().float().numpy(),
                          layer.post_attention_layernorm.weight.detach().float().numpy()])
        emb_m, head_m = _head_entry(lm, pack, head)
        attn = layers[0].self_attn
        hd = int(getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads)
        cfg = np.array([c.hidden_size, c.num_attention_heads, c.num_key_value_heads, hd, c.intermediate_size,
                        0, 1], np.int64)
        rot = lm.model.model.rotary_emb
        eng = cls(pack.finalize(), cfg, float(layers[0].input_layernorm.variance_epsilon), float(attn.scaling),
                  np.array(lmats, np.int64), np.ascontiguousarray(np.array(norms, np.float32)),
                  lm.model.model.norm.weight.detach().float().numpy().copy(), emb_m, head_m,
                  rot.inv_freq.detach().clone(), float(getattr(rot, "attention_scaling", 1.0)),
                  int(c.vocab_size), FAST if fast is None else fast, tokenizer=lm.tokenizer,
                  context=lm.context_length)
        eng._allocate(256)
        return eng

    def _allocate(self, max_positions: int) -> None:
        """KV cache and RoPE table for `max_positions` (kept on growth), scratch vectors padded for SIMD reads."""
        h, nh, nkv, hd, inter = (int(v) for v in self.cfg[:5])
        n_layers = self.lmats.shape[0]
        old = (self.kc, self.vc) if hasattr(self, "kc") else None
        self.kc = np.zeros((n_layers, nkv, max_positions, hd), np.float32)
        self.vc = np.zeros_like(self.kc)
        if old is not None:
            keep = old[0].shape[2]
            self.kc[:, :, :keep], self.vc[:, :, :keep] = old
        self.cos, self.sin = _rope_table(self.inv_freq, self.attention_scaling, max_positions)
        self.cfg[C_MAXPOS] = max_positions
        wide = max(h, inter, nh * hd) + PAD
        self.x, self.xn, self.att, self.act, self.tmp = (np.zeros(wide, np.float32) for _ in range(5))
        self.qkv = np.zeros((nh + 2 * nkv) * hd + PAD, np.float32)
        self.gu = np.zeros(2 * inter + PAD, np.float32)
        self.logits_buf = np.zeros(self.vocab + PAD, np.float32)
        qd, kd = nh * hd, nkv * hd
        self.offs = np.array([[0, qd, qd + kd], [0, inter, 0], [0, 0, 0]], np.int64)

    @property
    def resident_bytes(self) -> int:
        """Bytes of weights the engine holds (packed matrices, norms, RoPE table), without the KV cache."""
        return self.pack.nbytes + self.norms.nbytes + self.fnorm.nbytes + self.cos.nbytes + self.sin.nbytes

    def reset(self) -> None:
        """Forget the sequence (the KV cache is overwritten from position 0)."""
        self.pos = 0

    def step(self, token: int) -> np.ndarray:
        """Feed one token at the next position; the logits `(vocab,)` (a view, overwritten next step)."""
        import numba

        if self.pos >= self.cfg[C_MAXPOS]:
            self._allocate(2 * int(self.cfg[C_MAXPOS]))
        self.cfg[C_NCH] = numba.get_num_threads()
        _step(int(token), self.pos, self.cfg, np.float32(self.eps), np.float32(self.scaling), self.lmats, self.offs,
              self.norms, self.fnorm, self.emb_m, self.head_m, self.cos, self.sin, self.kc, self.vc,
              *self.pack.buffers(), self.x, self.xn, self.qkv, self.att, self.gu, self.act, self.tmp,
              self.logits_buf, self.fast)
        self.pos += 1
        return self.logits_buf[: self.vocab]

    def logits(self, ids: list[int] | torch.Tensor) -> np.ndarray:
        """Logits `(len(ids), vocab)` of a fresh sequence (token-by-token prefill)."""
        self.reset()
        ids = [int(t) for t in (ids.reshape(-1).tolist() if isinstance(ids, torch.Tensor) else ids)]
        out = np.empty((len(ids), self.vocab), np.float32)
        for i, t in enumerate(ids):
            out[i] = self.step(t)
        return out

    def generate(self, ids: list[int] | torch.Tensor, max_new_tokens: int,
                 eos_token_id: int | None = None) -> list[int]:
        """Greedy continuation of `ids` (a fresh sequence): the new tokens, stopping after `eos_token_id`."""
        ids = [int(t) for t in (ids.reshape(-1).tolist() if isinstance(ids, torch.Tensor) else ids)]
        if not ids:
            raise ConfigError("generate needs at least one prompt token")
        self.reset()
        for t in ids[:-1]:
            self.step(t)
        new, tok = [], ids[-1]
        for _ in range(max_new_tokens):
            tok = int(np.argmax(self.step(tok)))
            new.append(tok)
            if eos_token_id is not None and tok == eos_token_id:
                break
        return new


def _aligned(shape: tuple[int, int]) -> np.ndarray:
    """A zeroed float32 array whose data starts on a 64-byte boundary."""
    n = shape[0] * shape[1]
    raw = np.zeros(n + 16, np.float32)
    off = (-raw.ctypes.data % 64) // 4
    return raw[off:off + n].reshape(shape)


class BatchDecoder:
    """KV caches of `slots` sequences over one engine's packed weights, fed by a batched step.

    Why apart from the engine: the engine's own cache serves `generate` / `logits` (one sequence), while a
    server assigns slots to requests as they come and go; both read the same packed weights. A step takes
    at most `max_entries` entries. The caches grow (doubling) up to the model's context length. Logits
    equal the engine's up to fp32 summation order (the matrix products are bit-identical; norms and
    attention are compiled separately, so their vectorized sums may round differently).
    """

    def __init__(self, engine: DecodeEngine, slots: int, *, max_entries: int = 64) -> None:
        if slots < 1 or max_entries < 1:
            raise ConfigError(f"a batch needs at least one slot and one entry (got {slots}, {max_entries})")
        self.engine, self.slots, self.max_entries = engine, slots, max_entries
        self.limit = engine.context or 1 << 20
        h, nh, nkv, hd, inter = (int(v) for v in engine.cfg[:5])
        wide = max(h, inter, nh * hd) + PAD
        wide = -(-wide // 16) * 16  # rows start on 64-byte lines: the SIMD loads of an input never split a line
        self.x, self.xn, self.att, self.act, self.tmp = (_aligned((max_entries, wide)) for _ in range(5))
        self.qkv = _aligned((max_entries, -(-((nh + 2 * nkv) * hd + PAD) // 16) * 16))
        self.gu = _aligned((max_entries, -(-(2 * inter + PAD) // 16) * 16))
        self.logits = np.zeros((max_entries, engine.vocab), np.float32)
        qd, kd = nh * hd, nkv * hd
        self.offs = np.array([[0, qd, qd + kd], [0, inter, 0], [0, 0, 0]], np.int64)
        self.cfg = engine.cfg.copy()
        self.positions = 0
        self._grow(min(256, self.limit))

    def _grow(self, positions: int) -> None:
        """Caches and RoPE table for `positions` per slot, keeping what the slots hold."""
        _, _, nkv, hd = (int(v) for v in self.engine.cfg[:4])
        kc = np.zeros((self.slots, self.engine.lmats.shape[0], nkv, positions, hd), np.float32)
        vc = np.zeros_like(kc)
        if self.positions:
            kc[:, :, :, : self.positions], vc[:, :, :, : self.positions] = self.kc, self.vc
        self.kc, self.vc, self.positions = kc, vc, positions
        self.cos, self.sin = _rope_table(self.engine.inv_freq, self.engine.attention_scaling, positions)
        self.cfg[C_MAXPOS] = positions

    @property
    def cache_bytes(self) -> int:
        return self.kc.nbytes + self.vc.nbytes

    def step(self, tokens: list[int], slots: list[int], positions: list[int], want: list[bool]) -> np.ndarray:
        """Feed entry e = token `tokens[e]` of sequence slot `slots[e]` at `positions[e]`; the logits
        `(sum(want), vocab)` of the entries with `want[e]`, in entry order (a view, overwritten next step).
        A slot's positions before `positions[e]` must have been fed (earlier, or earlier in this call)."""
        import numba

        n = len(tokens)
        if not 0 < n <= self.max_entries or not len(slots) == len(positions) == len(want) == n:
            raise ConfigError(f"a batched step takes 1..{self.max_entries} entries of token, slot, position, want")
        top = max(positions)
        if top >= self.limit or min(positions) < 0 or not 0 <= min(slots) <= max(slots) < self.slots:
            raise ConfigError(f"position {top} or slot out of range (context {self.limit}, {self.slots} slots)")
        if top >= self.positions:
            self._grow(min(self.limit, max(2 * self.positions, top + 1)))
        self.cfg[C_NCH] = numba.get_num_threads()
        heads = np.flatnonzero(np.asarray(want, bool)).astype(np.int64)
        eng = self.engine
        _step_batch(np.asarray(tokens, np.int64), np.asarray(slots, np.int64), np.asarray(positions, np.int64), heads,
                    self.cfg, np.float32(eng.eps), np.float32(eng.scaling), eng.lmats, self.offs, eng.norms,
                    eng.fnorm, eng.emb_m, eng.head_m, self.cos, self.sin, self.kc, self.vc, *eng.pack.buffers(),
                    self.x[:n], self.xn[:n], self.qkv[:n], self.att[:n], self.gu[:n], self.act[:n], self.tmp[:n],
                    self.logits, eng.fast)
        return self.logits[: heads.size]


def load_decoder(spec: str, *, head: str = "auto", fast: bool | None = None) -> DecodeEngine:
    """Load a (pruned, quantized) Llama-architecture checkpoint and return its decode engine.

    The float model is dropped once packed, so the process holds the stored layout only
    (`engine.resident_bytes`); `engine.tokenizer` is the checkpoint's tokenizer.
    """
    from prunelab.storage import load

    lm = load(spec)
    engine = DecodeEngine.from_model(lm, head=head, fast=fast)
    del lm
    return engine
