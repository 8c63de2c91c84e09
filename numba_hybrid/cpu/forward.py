"""The CPU backend: the decoder forward pass driven through the Numba kernels.

Per step (one BatchPlan) each layer is a handful of kernel calls over all T tokens; the
stateful ones (conv, delta-net scan, attention) take the plan's run arrays and update
their slots in place. In precision="fast" (the default) Q6_K and Q4_K matrices are repacked
once at load into the row panels of panels.py, and Q8_0 matrices are read in place by the
kernel of rows.py; in "exact" Q8_0, Q6_K, Q4_0, Q4_1 and Q4_K are repacked into the flat
float32-activation layouts of matmul.repack_*. Every other weight stays in the file's
memory map as raw GGML blocks.
"""

from __future__ import annotations

import ctypes
import ctypes.util
from dataclasses import dataclass

import numpy as np
from gguf import GGMLQuantizationType as QT

from ..models import RECURRENT
from ..quants import ACT_NONE, activation_kind
from . import attention as attn_k
from . import blocks as blocks_k
from . import conv as conv_k
from . import deltanet as dn_k
from . import matmul as mm_k
from . import moe as moe_k
from . import norm as norm_k
from . import panels
from . import quantize as quant_k

L2_NORM_EPS = 1e-6


def _malloc_trim():
    """libc's malloc_trim, or None where the C library has none (not glibc)."""
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or None).malloc_trim
    except (OSError, AttributeError):
        return None


_MALLOC_TRIM = _malloc_trim()


def trim_heap() -> None:
    """Hand the C heap's free pages back to the system (a no-op without glibc)."""
    if _MALLOC_TRIM is not None:
        _MALLOC_TRIM(0)


@dataclass(frozen=True)
class QWeight:
    """A weight matrix as the kernels take it.

    ``raw``: the file's GGML rows ``uint8 [(E,) N, bytes]`` (a view of the memory map).
    ``packed``: the load-time repacking its kernels read, or None for types read straight
    from ``raw``. ``int_kernel``: whether the kernel takes 8-bit activations (precision
    "fast"); then ``packed`` is the row panels of matmul.panel_* and their type code (Q6_K,
    Q4_K), or ``rows`` the file's Q8_0 matrices whose rows this weight stacks (read in
    place by rows.py). Otherwise ``packed`` is a float32-activation layout of
    matmul.repack_* (Q8_0, Q6_K, Q4_0, Q4_1, Q4_K; its last element the scale block's
    shift), or None for the generic dequantise-a-tile kernel."""

    raw: np.ndarray
    qtype: int
    n_rows: int
    row_len: int
    act: int            # how precision="fast" rounds this matrix's input (quants.ACT_*)
    packed: tuple | None = None
    int_kernel: bool = False
    rows: tuple | None = None


REPACK = {int(QT.Q8_0): mm_k.repack_q8_0, int(QT.Q6_K): mm_k.repack_q6_k,
          int(QT.Q4_0): mm_k.repack_q4_0, int(QT.Q4_1): mm_k.repack_q4_1,
          int(QT.Q4_K): mm_k.repack_q4_k}
INT8_PACKED = (int(QT.Q8_0), int(QT.Q6_K))
Q4_PACKED = (int(QT.Q4_0), int(QT.Q4_1), int(QT.Q4_K))
# Types with an integer kernel for 8-bit activations (precision="fast"); in that precision
# the other types multiply the rounded activations in float32, with the same values.
REPACK_INT = {int(QT.Q6_K): panels.Q6_K, int(QT.Q4_K): panels.Q4_K}   # their panel type codes
ROWS_INT = (int(QT.Q8_0),)      # read in place, in the file's layout (rows.py)
INT_TYPES = tuple(REPACK_INT) + ROWS_INT


def raw_rows(t) -> np.ndarray:
    """Tensor t's GGML rows as bytes: uint8 [(E,) N, bytes] (a view of the memory map)."""
    return np.ascontiguousarray(t.data).view(np.uint8).reshape(tuple(reversed(t.ne))[:-1]
                                                                 + (-1,))


def read_only(a: np.ndarray) -> np.ndarray:
    """A read-only view of a: the matrices a rows kernel takes together must have one type
    (most are views of the read-only map; a few were made at load)."""
    v = a.view()
    v.flags.writeable = False
    return v


def qweight(t, repack: bool = True, fast: bool = False) -> QWeight:
    """The kernels' view of tensor t; with ``fast``, the integer layout where there is one."""
    raw = raw_rows(t)
    lead = raw.shape[:-1]
    qtype = int(t.qtype)
    kind = activation_kind(t.qtype)
    if repack and fast and qtype in REPACK_INT:
        return QWeight(raw, qtype, lead[-1], int(t.ne[0]), kind,
                       mm_k.panels_of(raw, REPACK_INT[qtype]), True)
    if repack and fast and qtype in ROWS_INT:
        return QWeight(raw, qtype, lead[-1], int(t.ne[0]), kind, None, True, (read_only(raw),))
    packed = REPACK[qtype](raw) if repack and qtype in REPACK else None
    return QWeight(raw, qtype, lead[-1], int(t.ne[0]), kind, packed)


def linear(x: np.ndarray, w: QWeight, out: np.ndarray) -> None:
    """out [T, N] = x [T, K] @ W^T through the kernel for W's type and packing."""
    if w.packed is not None and w.qtype in INT8_PACKED:
        mm_k.matmul_i8(x, *w.packed, out)
    elif w.packed is not None and w.qtype in Q4_PACKED:
        mm_k.matmul_q4(*split_q4(x, w.packed[-1]), *w.packed, out)
    else:
        mm_k.matmul(x, w.raw, w.qtype, out)


def expert_linear(x, src, w: QWeight, exp_start, tasks, out) -> None:
    """out[p] = W_e x[src[p]] for the pairs p of each expert e (see moe.py), through the
    kernel for W's type and packing."""
    if w.packed is not None and w.qtype in INT8_PACKED:
        moe_k.expert_matmul_i8(x, src, *w.packed, exp_start, tasks, out)
    elif w.packed is not None and w.qtype in Q4_PACKED:
        moe_k.expert_matmul_q4(*split_q4(x, w.packed[-1]), src, *w.packed, exp_start, tasks,
                               out)
    else:
        moe_k.expert_matmul(x, src, w.raw, w.qtype, exp_start, tasks, out)


def quantize(x: np.ndarray, kind: int):
    """Activations [T, K] -> ggml's 8-bit blocks of ``kind``: (xq, xd, n16, n32), see
    quantize.quantize_int8."""
    return quant_k.quantized_int8(x, kind)


def linear_int(q, w: QWeight, out: np.ndarray) -> None:
    """out [T, N] = the 8-bit activations q (quantize) @ W^T, W in panels or rows."""
    if w.rows is not None:
        mm_k.matmul_q8_0_rows(*q, w.rows, out)
    else:
        mm_k.matmul_panels(*q, *w.packed, out)


def expert_tasks(counts: np.ndarray, w: QWeight):
    """The (expert, block) work list of expert_linear or expert_linear_int for w; for
    panels, (tasks, panels per task)."""
    if w.packed is not None and w.int_kernel:
        wp, kind = w.packed
        return moe_k.task_list(counts, wp.shape[1], kind)
    return moe_k.task_list(counts, w.n_rows, -1)[0]


def expert_linear_int(q, src, w: QWeight, exp_start, tasks, out) -> None:
    """expert_linear on 8-bit activations, W in panels or rows (tasks: expert_tasks)."""
    if w.rows is not None:
        moe_k.expert_matmul_q8_0_rows(*q, src, w.rows, exp_start, tasks, out)
        return
    wp, kind = w.packed
    work, gp = tasks
    moe_k.expert_matmul_panels(*q, src, wp, kind, gp, exp_start, work, out)


def split_q4(x: np.ndarray, shift: int):
    """Activations [T, K] split for the repacked 4-bit kernels with groups of 1 << shift
    bytes: (xl, xh, sl, sh)."""
    T, K = x.shape
    xl = np.empty((T, K // 2), np.float32)
    xh = np.empty_like(xl)
    sl = np.empty((T, K >> (shift + 1)), np.float32)
    sh = np.empty_like(sl)
    mm_k.split_q4_activations(x, shift, xl, xh, sl, sh)
    return xl, xh, sl, sh


class Input:
    """A matmul input and its 8-bit quantisations, each made once, when first needed.
    Wrap an array only while its contents stay as they are."""

    __slots__ = ("x", "_quantized")

    def __init__(self, x: np.ndarray):
        self.x = x
        self._quantized: dict = {}

    def quantized(self, kind: int):
        q = self._quantized.get(kind)
        if q is None:
            q = self._quantized[kind] = quantize(self.x, kind)
        return q


# Matrices that multiply the same input, fused at load into one product where they are
# panels or rows of one type (fewer kernel calls per step; each call costs ~10-20 us on one
# token).
DELTANET_IN = ("attn_qkv", "attn_gate", "ssm_beta", "ssm_alpha")
ATTENTION_IN = ("attn_q", "attn_k", "attn_v")
# Batches of at most this many tokens take the compiled blocks (blocks.py, moe.moe_block);
# larger ones the Python sequence of kernel calls, which gives the same bits. The blocks
# save a step's dispatch (decode 1.4-2% faster), but their large intermediates, allocated
# in compiled code, cost more to fault in: Q4_K_M bench model, in one process, a 512-token
# prompt 590 tok/s with every block against 616 without, 8 prompts of 128 tokens 524
# against 598.
BLOCK_TOKENS = 16
# After a batch of at least this many tokens the C heap's free memory goes back to the
# system. Its intermediates of a few MB each come from the heap (glibc raises its mmap
# threshold to the largest block freed so far, up to 32 MB) and up to twice that stays
# resident afterwards: ~45 MB on the bench model after a 512-token prompt. The trim takes
# ~1 ms, against ~1 s for such a batch.
TRIM_TOKENS = 256
FUSED = (DELTANET_IN, ATTENTION_IN, ("ffn_gate", "ffn_up"), ("ffn_gate_shexp", "ffn_up_shexp"),
         ("ffn_gate_exps", "ffn_up_exps"))


def fusable_runs(tensors: dict, names, fast: bool) -> list:
    """The runs of consecutive matrices among ``names`` (those present) that fast precision
    gives an integer kernel of one type and row length, all but the last of a run a whole
    number of panels where they are panels: each run of two or more is fused into one
    product."""
    present = [n for n in names if n in tensors]
    runs, i = [], 0
    while i < len(present):
        first, j = tensors[present[i]], i + 1
        while (fast and int(first.qtype) in INT_TYPES and j < len(present)
               and tensors[present[j]].qtype == first.qtype
               and tensors[present[j]].ne[0] == first.ne[0]
               and tuple(tensors[present[j]].ne[2:]) == tuple(first.ne[2:])
               and (int(first.qtype) in ROWS_INT
                    or int(tensors[present[j - 1]].ne[1]) % panels.PANEL == 0)):
            j += 1
        if j - i > 1:
            runs.append(present[i:j])
        i = j
    return runs


def fused_qweight(ts: list) -> tuple[QWeight, list]:
    """One QWeight for the matrices ts (a fusable run), their panels written straight into
    one buffer (or their rows read in place, one after the other); and each member's
    (first row, end row)."""
    raws = [raw_rows(t) for t in ts]
    qtype = int(ts[0].qtype)
    edges = np.cumsum([0] + [r.shape[-2] for r in raws])
    spans = [(int(a), int(b)) for a, b in zip(edges[:-1], edges[1:])]
    if qtype in ROWS_INT:
        return QWeight(raws[0], qtype, int(edges[-1]), int(ts[0].ne[0]),
                       activation_kind(ts[0].qtype), None, True,
                       tuple(read_only(r) for r in raws)), spans
    kind = REPACK_INT[qtype]
    shapes = [mm_k.panel_shape(r, kind) for r in raws]
    total = shapes[0][:-2] + (sum(sh[-2] for sh in shapes), shapes[0][-1])
    out = mm_k.panel_buffer(total, zero=raws[-1].shape[-2] % panels.PANEL != 0)
    g0 = 0
    for raw, sh in zip(raws, shapes):
        mm_k.panels_into(raw, kind, out, g0)
        g0 += sh[-2]
    w = QWeight(raws[0], qtype, int(edges[-1]), int(ts[0].ne[0]), activation_kind(ts[0].qtype),
                (out, kind), True)
    return w, spans


def vector(t) -> np.ndarray:
    return np.ascontiguousarray(np.asarray(t.data, dtype=np.float32).reshape(-1))


class CpuBackend:
    name = "cpu"
    state_dtype = np.float32
    kv_dtype = np.float32

    def __init__(self, model, precision: str = "fast"):
        self.model = model
        self.fast = precision == "fast"
        a = self.args = model.args
        self.kq_map = a.kq_head_map().astype(np.int64)
        half = a.n_rot // 2
        self.inv_freq = a.rope_theta ** (-np.arange(half, dtype=np.float64) * 2.0 / a.n_rot)
        self.embd = qweight(model.token_embd, repack=False)
        self.output = qweight(model.output, fast=self.fast)
        self.output_norm = vector(model.output_norm)
        self.layers = [self._prepare(layer, self.fast) for layer in model.layers]
        # Repacking read the repacked tensors' pages; don't keep them resident beside the copy.
        model.file.release_pages()

    @staticmethod
    def _prepare(layer, fast: bool) -> dict:
        out = {"kind": layer.kind, "fused": {}}
        for run in (r for names in FUSED for r in fusable_runs(layer.tensors, names, fast)):
            w, edges = fused_qweight([layer.tensors[n] for n in run])
            for name, (a, b) in zip(run, edges):
                out["fused"][name] = (w, a, b)
        for name, t in layer.tensors.items():
            if name in out["fused"]:
                continue
            is_matrix = len(t.ne) >= 2 and name != "ssm_conv1d"
            if is_matrix:
                out[name] = qweight(t, fast=fast)
            elif name == "ssm_conv1d":
                out[name] = np.ascontiguousarray(np.asarray(t.data, np.float32).T)  # [Kc, C]
            else:
                out[name] = vector(t)
        moe = CpuBackend._moe_block(out)
        if moe is not None:
            out["moe_block"] = moe
        mixer = CpuBackend._mixer_block(out, DELTANET_IN if layer.kind == RECURRENT
                                        else ATTENTION_IN,
                                        "ssm_out" if layer.kind == RECURRENT else "attn_output")
        if mixer is not None:
            out["mixer_block"] = mixer
        return out

    @staticmethod
    def _mixer_block(p: dict, names, output: str):
        """The weights of blocks_k.deltanet_block or attention_block where a prepared
        layer's mixer has their layout, else None: (act, ws, kinds, widths) for the input
        projections ``names`` (a run of products, in panels of one activation rounding, or
        one product of Q8_0 rows), the rows of each name, and the output projection as
        int_weight gives it with its rounding."""
        products, rows, rows_end = [], [], 0
        for name in names:
            w, start, stop = p["fused"].get(name, (p.get(name), 0, None))
            if w is None or not w.int_kernel:
                return None
            if products and products[-1] is w:
                if start != rows_end:
                    return None
            elif start != 0:
                return None
            else:
                products.append(w)
            rows_end = w.n_rows if stop is None else stop
            rows.append(rows_end - start)
        out_w = p.get(output)
        if (out_w is None or not out_w.int_kernel or len({w.act for w in products}) != 1
                or any(w.rows is not None for w in products) and len(products) > 1):
            return None
        ws = tuple(int_weight(w)[0] for w in products)
        kinds = tuple(int(int_weight(w)[1]) for w in products)
        widths = tuple(int(w.n_rows) for w in products)
        return (products[0].act, ws, kinds, widths), tuple(rows), (*int_weight(out_w), out_w.act)

    @staticmethod
    def _moe_block(p: dict):
        """moe_k.moe_block's weights where a prepared layer's MoE block has its layout (a
        float router; the experts' gate and up fused, their down, both with an integer
        kernel; a shared expert likewise, with its gate vector, or none), else None: the
        rounding of the block's input for gate|up, the router, and the arguments after k."""
        fused = p["fused"]

        def fused_pair(gate, up):
            w = fused.get(gate, (None,))[0]
            return w if w is not None and fused.get(up, (None,))[0] is w else None

        gu = fused_pair("ffn_gate_exps", "ffn_up_exps")
        router, down = p.get("ffn_gate_inp"), p.get("ffn_down_exps")
        if (gu is None or router is None or down is None or not gu.int_kernel
                or not down.int_kernel or router.int_kernel or router.packed is not None
                or router.act != ACT_NONE):
            return None
        if "ffn_down_shexp" not in p:
            shared = (False, *_NO_SHARED)
        else:
            sh, sh_down = fused_pair("ffn_gate_shexp", "ffn_up_shexp"), p["ffn_down_shexp"]
            if (sh is None or not sh.int_kernel or sh.act != gu.act or not sh_down.int_kernel
                    or "ffn_gate_inp_shexp" not in p):
                return None
            shared = (True, *int_weight(sh), sh.n_rows, *int_weight(sh_down), sh_down.act,
                      p["ffn_gate_inp_shexp"])
        return gu.act, (router.raw, router.qtype), (*int_weight(gu), gu.n_rows,
                                                    *int_weight(down), down.act, *shared)

    def matmuls(self, x, layer, names) -> list:
        """x @ W^T for each matrix named (one product for those fused at load)."""
        x = x if isinstance(x, Input) else Input(x)
        products, outs = {}, []
        for name in names:
            if name not in layer["fused"]:
                outs.append(self.matmul(x, layer[name]))
                continue
            w, start, stop = layer["fused"][name]
            if id(w) not in products:
                products[id(w)] = self.matmul(x, w)
            outs.append(np.ascontiguousarray(products[id(w)][..., start:stop]))
        return outs

    def swiglu(self, x, layer, gate: str, up: str, out) -> None:
        """out = silu(x @ W_gate^T) * (x @ W_up^T); a gate and up fused at load are one
        product, [gate | up], read in place."""
        fused = layer["fused"]
        if gate in fused and up in fused and fused[gate][0] is fused[up][0]:
            norm_k.swiglu_halves(self.matmul(x, fused[gate][0]), out)
        else:
            norm_k.swiglu(*self.matmuls(x, layer, (gate, up)), out)

    # ---- one step ---------------------------------------------------------------------

    def forward(self, state, plan) -> np.ndarray:
        a = self.args
        T, H = plan.n_tokens, a.n_embd
        x = np.empty((T, H), np.float32)
        mm_k.gather_rows(self.embd.raw, self.embd.qtype, plan.tokens, x)
        h = np.empty_like(x)
        norm_k.rms_norm(x, self.layers[0]["attn_norm"], a.rms_eps, h)
        for l, layer in enumerate(self.layers):
            if layer["kind"] == RECURRENT:
                m = self.deltanet(l, layer, h, state, plan)
            else:
                m = self.attention(l, layer, h, state, plan)
            norm_k.add_rms_norm(x, m, layer["post_attention_norm"], a.rms_eps, h)
            f = self.ffn(layer, h)
            if l + 1 < len(self.layers):
                norm_k.add_rms_norm(x, f, self.layers[l + 1]["attn_norm"], a.rms_eps, h)
            else:
                norm_k.add(x, f)
        xo = np.ascontiguousarray(x[plan.out_rows])
        xn = np.empty_like(xo)
        norm_k.rms_norm(xo, self.output_norm, a.rms_eps, xn)
        logits = self.matmul(xn, self.output)
        if T >= TRIM_TOKENS:
            del x, h, xo, xn
            trim_heap()
        return logits

    def int_input(self, x: Input, w: QWeight):
        """For a weight in an integer layout (fast precision): x quantised for it, else
        None."""
        return x.quantized(w.act) if w.int_kernel else None

    def rounded(self, x, w: QWeight) -> np.ndarray:
        """The input of a product with w: x itself, or in fast precision x rounded the way
        ggml quantises activations for w's type."""
        if not self.fast or w.act == ACT_NONE:
            return x
        out = np.empty_like(x)
        quant_k.round_activations(x, w.act, out)
        return out

    def matmul(self, x, w: QWeight) -> np.ndarray:
        """x @ W^T; x an array or an Input (to share its quantisation between products)."""
        x = x if isinstance(x, Input) else Input(x)
        out = np.empty((x.x.shape[0], w.n_rows), np.float32)
        q = self.int_input(x, w)
        if q is not None:
            linear_int(q, w, out)
        else:
            linear(self.rounded(x.x, w), w, out)
        return out

    def expert_matmul(self, x, src, w: QWeight, exp_start, tasks, out) -> None:
        """out[p] = W_e x[src[p]] for the pairs p of each expert e (see moe.py)."""
        x = x if isinstance(x, Input) else Input(x)
        q = self.int_input(x, w)
        if q is not None:
            expert_linear_int(q, src, w, exp_start, tasks, out)
        else:
            expert_linear(self.rounded(x.x, w), src, w, exp_start, tasks, out)

    def deltanet(self, l, layer, h, state, plan):
        a = self.args
        T = h.shape[0]
        if "mixer_block" in layer and T <= BLOCK_TOKENS:
            (act, ws, kinds, widths), (n_qkv, n_z, n_b, _), out_w = layer["mixer_block"]
            out = np.empty((T, a.n_embd), np.float32)
            blocks_k.deltanet_block(h, act, ws, kinds, widths, n_qkv, n_z, n_b, layer["ssm_dt"],
                                    layer["ssm_a"], layer["ssm_conv1d"], state.conv[l],
                                    state.ssm[l], self.kq_map, a.ssm_k_heads, a.ssm_k_dim,
                                    L2_NORM_EPS, plan.run_start, plan.run_len, plan.run_slot,
                                    layer["ssm_norm"], a.rms_eps, *out_w, out)
            return out
        h = Input(h)
        qkv, z, beta, g = self.matmuls(h, layer, ("attn_qkv", "attn_gate", "ssm_beta",
                                                  "ssm_alpha"))
        dn_k.gates(beta, g, layer["ssm_dt"], layer["ssm_a"], beta, g)
        c = np.empty_like(qkv)
        conv_k.causal_conv(qkv, layer["ssm_conv1d"], state.conv[l], plan.run_start,
                           plan.run_len, plan.run_slot, c)
        o = np.empty((T, a.ssm_v_heads * a.ssm_v_dim), np.float32)
        dn_k.scan(c, beta, g, state.ssm[l], self.kq_map, a.ssm_k_heads, a.ssm_k_dim,
                  L2_NORM_EPS, plan.run_start, plan.run_len, plan.run_slot, o)
        y = np.empty_like(o)
        norm_k.gated_rms_norm(o, z, layer["ssm_norm"], a.rms_eps, y)
        return self.matmul(y, layer["ssm_out"])

    def attention(self, l, layer, h, state, plan):
        a = self.args
        T = h.shape[0]
        if "mixer_block" in layer and T <= BLOCK_TOKENS:
            (act, ws, kinds, widths), (n_q, n_k, _), out_w = layer["mixer_block"]
            out = np.empty((T, a.n_embd), np.float32)
            blocks_k.attention_block(h, act, ws, kinds, widths, n_q, n_k, layer["attn_q_norm"],
                                     layer["attn_k_norm"], a.rms_eps, self.inv_freq,
                                     state.k[l], state.v[l], plan.positions, plan.run_len,
                                     plan.run_slot, *out_w, out)
            return out
        h = Input(h)
        qg, k, v = self.matmuls(h, layer, ("attn_q", "attn_k", "attn_v"))
        o = np.empty((T, a.n_head * a.head_dim), np.float32)
        tok_slot = np.repeat(plan.run_slot, plan.run_len)
        attn_k.attention(qg, k, v, layer["attn_q_norm"], layer["attn_k_norm"], a.rms_eps,
                         self.inv_freq, state.k[l], state.v[l], plan.positions, tok_slot, o)
        return self.matmul(o, layer["attn_output"])

    def ffn(self, layer, h_array):
        a = self.args
        T, k = h_array.shape[0], a.n_expert_used
        h = Input(h_array)
        if a.ffn_kind == "dense":
            act = np.empty((T, a.n_ff), np.float32)
            self.swiglu(h, layer, "ffn_gate", "ffn_up", act)
            return self.matmul(act, layer["ffn_down"])
        if "moe_block" in layer and T <= BLOCK_TOKENS:
            return self.moe_block(layer["moe_block"], h)
        experts = np.empty((T, k), np.int64)
        weights = np.empty((T, k), np.float32)
        moe_k.route(self.matmul(h, layer["ffn_gate_inp"]), k, experts, weights)
        src, exp_start, pair_of, counts = moe_k.group_pairs(experts, a.n_expert)
        P = T * k
        if "ffn_gate_exps" in layer["fused"]:
            w = layer["fused"]["ffn_gate_exps"][0]
            both = np.empty((P, 2 * a.n_ff_exp), np.float32)
            self.expert_matmul(h, src, w, exp_start, expert_tasks(counts, w), both)
            gate = np.empty((P, a.n_ff_exp), np.float32)
            norm_k.swiglu_halves(both, gate)
        else:
            gate_w, up_w = layer["ffn_gate_exps"], layer["ffn_up_exps"]
            gate = np.empty((P, a.n_ff_exp), np.float32)
            up = np.empty_like(gate)
            tasks = expert_tasks(counts, gate_w)      # the same for up unless its type differs
            up_tasks = tasks if up_w.qtype == gate_w.qtype else expert_tasks(counts, up_w)
            self.expert_matmul(h, src, gate_w, exp_start, tasks, gate)
            self.expert_matmul(h, src, up_w, exp_start, up_tasks, up)
            norm_k.swiglu(gate, up, gate)
        down_w = layer["ffn_down_exps"]
        y = np.empty((P, a.n_embd), np.float32)
        self.expert_matmul(gate, np.arange(P, dtype=np.int64), down_w, exp_start,
                           expert_tasks(counts, down_w), y)
        out = np.zeros((T, a.n_embd), np.float32)
        moe_k.combine(y, pair_of, weights, out)
        if "ffn_down_shexp" in layer:
            act = np.empty((T, a.n_ff_shexp), np.float32)
            self.swiglu(h, layer, "ffn_gate_shexp", "ffn_up_shexp", act)
            moe_k.shared_gate(h_array, layer["ffn_gate_inp_shexp"],
                              self.matmul(act, layer["ffn_down_shexp"]), out)
        return out

    def moe_block(self, weights, h: Input) -> np.ndarray:
        """ffn's MoE block in one compiled call (moe_k.moe_block), with the weights
        CpuBackend._moe_block prepared."""
        act, router, rest = weights
        out = np.empty_like(h.x)
        moe_k.moe_block(h.x, h.quantized(act), *router, self.args.n_expert_used, *rest, out)
        return out


def int_weight(w: QWeight) -> tuple:
    """An integer-kernel weight as the compiled blocks take it: (panels, type code), or
    (the tuple of Q8_0 matrices it stacks, -1)."""
    return (w.rows, -1) if w.rows is not None else w.packed


# moe_block's arguments for a block without a shared expert (of types it compiles for)
_NO_SHARED = (np.zeros((1, 1), np.uint8), 0, 0, np.zeros((1, 1), np.uint8), 0, 0,
              np.zeros(1, np.float32))
