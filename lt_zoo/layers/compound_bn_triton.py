"""The map passes of Compound BN as Triton kernels, for CUDA maps (``kernel='triton'``).

The same four passes as the native CPU kernel (:mod:`compound_bn_native`), with the same arguments, so
``compound_bn_functional`` chains them with the same (M, C) statistics in between (torch ops, which
``torch.compile`` fuses):

- :func:`estep_moments`: posteriors R (N, M, L) of the E-step (Eq. 8) and the sums (M, 2 + 2C)
  [sum r, sum r^2, sum r x_c, sum r x_c^2] of the M-step (Eq. 9-10); two kernels, one read of x each;
- :func:`combine`: x (R^T A) [+ g (R^T B)] + R^T D per position, the output and the input gradient;
- :func:`grad_moments`: R^T g and R^T (g x), the sums of the analytic backward;
- :func:`folded_eval`: E-step and output of eval in one kernel.

A training step of the layer is then three passes over the map forward (E-step, moments, output) and
two backward (sums, input gradient), against BN's two and two; no tensor of size P x M or P x C other
than R (M/C of the map) is written.  The map may be float32, bfloat16 or float16 (the layer runs outside
autocast, so a bf16 activation arrives as it is), contiguous or channels_last; every sum and R are
float32 (float64 for a float64 map), and y keeps x's dtype.  Sums over positions are per-program partial
sums added by ``torch.sum`` afterwards, never atomics, so a result depends only on the map's shape.

Each pass is a ``torch.library`` custom op (``lt_zoo::cbn_triton_*``) with a fake implementation: a
compiled graph holds it as one node, without a graph break.  With ``TRITON_INTERPRET=1`` set before
Triton is imported, the kernels also run on CPU tensors in Triton's interpreter (slow, exact): that is
how ``tests/test_compound_bn_triton.py`` checks them on a machine without a GPU.
"""
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

try:
    import triton
    import triton.language as tl
except ImportError:  # torch's Linux wheels bring Triton; elsewhere kernel='triton' says what is missing
    triton = None

__all__ = ['available', 'interpreting', 'supports', 'estep_moments', 'combine', 'grad_moments', 'folded_eval',
           'R_FLOOR']

# posteriors at or below this are zeroed, as compound_bn_functional._R_FLOOR (subnormals are slow)
R_FLOOR = 1e-30
_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


def interpreting() -> bool:
    """Whether the kernels were defined for Triton's interpreter (CPU tensors) rather than for a GPU:
    TRITON_INTERPRET=1 when this module was imported (Triton reads it when it defines a kernel)."""
    return _INTERPRETED


def available() -> bool:
    """Whether Triton is importable."""
    return triton is not None


def runs_on(device: torch.device) -> bool:
    """Whether the kernels run on ``device``: CUDA with Triton installed, or the CPU under the interpreter."""
    return available() and (device.type == 'cuda' or (device.type == 'cpu' and interpreting()))


def supports(x: Tensor) -> bool:
    """Whether the kernels take this map: a 4-D float tensor on a device they run on (:func:`runs_on`)."""
    return runs_on(x.device) and x.dim() == 4 and x.dtype in _DTYPES


def why_not(x: Tensor) -> str:
    """Why :func:`supports` refuses x (for the error of kernel='triton')."""
    if not available():
        return 'Triton is not installed (pip install triton)'
    if x.dim() != 4 or x.dtype not in _DTYPES:
        return f'it takes a 4-D float32/bfloat16/float16/float64 map, got {x.dim()}-D {x.dtype}'
    return (f'it needs a CUDA map, got one on {x.device} (CPU tensors only under TRITON_INTERPRET=1, '
            f"Triton's interpreter)")


def _compute(x: Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


# ------------------------------------------------------------------------------------------------ kernels
if triton is not None:
    @triton.jit
    def _positions(pstart, P, L, sxn, sxl, BLOCK_P: tl.constexpr):
        """Positions p = n L + l of one block: (image n, position l, in range, offset of (n, l) in the map)."""
        p = pstart + tl.arange(0, BLOCK_P)
        pmask = p < P
        n = p // L
        l = p - n * L
        return n, l, pmask, n.to(tl.int64) * sxn + l.to(tl.int64) * sxl

    @triton.jit
    def _shifted_tile(x_ptr, shift_ptr, xoff, pmask, c, cmask, sxc, COMPUTE: tl.constexpr):
        """x - s on a [BLOCK_P, BLOCK_C] tile, 0 outside the map."""
        m2 = pmask[:, None] & cmask[None, :]
        xt = tl.load(x_ptr + xoff[:, None] + c[None, :].to(tl.int64) * sxc, mask=m2, other=0.0).to(COMPUTE)
        s = tl.load(shift_ptr + c, mask=cmask, other=0.0).to(COMPUTE)
        return tl.where(m2, xt - s[None, :], 0.0)

    @triton.jit
    def _store_tile(out_ptr, n, l, pmask, c, cmask, son, soc, sol, value):
        """A [BLOCK_P, BLOCK_C] tile of a map, in the map's dtype."""
        off = n.to(tl.int64) * son + l.to(tl.int64) * sol
        tl.store(out_ptr + off[:, None] + c[None, :].to(tl.int64) * soc, value.to(out_ptr.dtype.element_ty),
                 mask=pmask[:, None] & cmask[None, :])

    @triton.jit
    def _coef_tile(w_ptr, k, kmask, c, cmask, C, COMPUTE: tl.constexpr):
        """An (M, C) coefficient as a [BLOCK_M, BLOCK_C] tile, 0 outside."""
        return tl.load(w_ptr + k[:, None] * C + c[None, :], mask=kmask[:, None] & cmask[None, :],
                       other=0.0).to(COMPUTE)

    @triton.jit
    def _mixed(r, w_ptr, k, kmask, c, cmask, C, COMPUTE: tl.constexpr):
        """sum_k r[p, k] w[k, c]: [BLOCK_P, BLOCK_C]."""
        w = _coef_tile(w_ptr, k, kmask, c, cmask, C, COMPUTE)
        return tl.sum(r[:, :, None] * w[None, :, :], axis=1)

    @triton.jit
    def _posteriors(x_ptr, shift_ptr, w1_ptr, w2_ptr, const_ptr, xoff, pmask, C, M, sxc,
                    BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_M: tl.constexpr, COMPUTE: tl.constexpr,
                    FLOOR: tl.constexpr):
        """r = softmax_k(l / T), l/T = sum_c (x-s) (w1 + (x-s) w2) + const: [BLOCK_P, BLOCK_M]."""
        k = tl.arange(0, BLOCK_M)
        kmask = k < M
        # elementwise partial sums per (position, component, channel lane), reduced over lanes once at the end
        acc = tl.zeros([BLOCK_P, BLOCK_M, BLOCK_C], dtype=COMPUTE)
        for c0 in range(0, C, BLOCK_C):
            c = c0 + tl.arange(0, BLOCK_C)
            cmask = c < C
            xs = _shifted_tile(x_ptr, shift_ptr, xoff, pmask, c, cmask, sxc, COMPUTE)
            w1 = _coef_tile(w1_ptr, k, kmask, c, cmask, C, COMPUTE)
            w2 = _coef_tile(w2_ptr, k, kmask, c, cmask, C, COMPUTE)
            acc += xs[:, None, :] * (w1[None, :, :] + xs[:, None, :] * w2[None, :, :])
        logits = tl.sum(acc, axis=2)
        cst = tl.load(const_ptr + k, mask=kmask, other=0.0).to(COMPUTE)
        logits = tl.where(kmask[None, :], logits + cst[None, :], -float('inf'))
        top = tl.max(logits, axis=1)
        e = tl.exp(logits - top[:, None])
        r = e / tl.sum(e, axis=1)[:, None]
        return tl.where(r <= FLOOR, 0.0, r)  # NaN stays NaN, as F.threshold

    @triton.jit
    def _estep_kernel(x_ptr, shift_ptr, w1_ptr, w2_ptr, const_ptr, r_ptr, scale_ptr, offset_ptr, out_ptr,
                      P, C, L, M, sxn, sxc, sxl, son, soc, sol,
                      OUTPUT: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_M: tl.constexpr,
                      COMPUTE: tl.constexpr, FLOOR: tl.constexpr):
        """The E-step of one block of positions; then, without OUTPUT, R[n, k, l] (contiguous (N, M, L)) is
        stored, with OUTPUT (eval) out = sum_k r (scale_k (x-s) + offset_k), channel block by block."""
        n, l, pmask, xoff = _positions(tl.program_id(0) * BLOCK_P, P, L, sxn, sxl, BLOCK_P)
        r = _posteriors(x_ptr, shift_ptr, w1_ptr, w2_ptr, const_ptr, xoff, pmask, C, M, sxc,
                        BLOCK_P, BLOCK_C, BLOCK_M, COMPUTE, FLOOR)
        k = tl.arange(0, BLOCK_M)
        kmask = k < M
        if OUTPUT:
            for c0 in range(0, C, BLOCK_C):
                c = c0 + tl.arange(0, BLOCK_C)
                cmask = c < C
                xs = _shifted_tile(x_ptr, shift_ptr, xoff, pmask, c, cmask, sxc, COMPUTE)
                out = xs * _mixed(r, scale_ptr, k, kmask, c, cmask, C, COMPUTE) + \
                    _mixed(r, offset_ptr, k, kmask, c, cmask, C, COMPUTE)
                _store_tile(out_ptr, n, l, pmask, c, cmask, son, soc, sol, out)
        else:
            roff = n.to(tl.int64)[:, None] * (M * L) + k[None, :] * L + l[:, None]
            tl.store(r_ptr + roff, r, mask=pmask[:, None] & kmask[None, :])

    @triton.jit
    def _r_tile(r_ptr, n, l, pmask, k, kmask, srn, srk, srl, COMPUTE: tl.constexpr):
        """R at a block of positions, [BLOCK_P, BLOCK_M] (srl = 0: one weight per image), 0 outside."""
        roff = n.to(tl.int64)[:, None] * srn + k[None, :] * srk + l[:, None] * srl
        return tl.load(r_ptr + roff, mask=pmask[:, None] & kmask[None, :], other=0.0).to(COMPUTE)

    @triton.jit
    def _map_tile(ptr, n, l, pmask, c, cmask, sn, sc, sl, COMPUTE: tl.constexpr):
        """A map (g) on a [BLOCK_P, BLOCK_C] tile, 0 outside."""
        off = n.to(tl.int64) * sn + l.to(tl.int64) * sl
        return tl.load(ptr + off[:, None] + c[None, :].to(tl.int64) * sc, mask=pmask[:, None] & cmask[None, :],
                       other=0.0).to(COMPUTE)

    @triton.jit
    def _moments_kernel(x_ptr, g_ptr, shift_ptr, r_ptr, out1_ptr, out2_ptr, P, C, L, M, sxn, sxc, sxl,
                        sgn, sgc, sgl, srn, srk, srl, blocks_per_group,
                        HAS_G: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr,
                        BLOCK_M: tl.constexpr, COMPUTE: tl.constexpr):
        """Partial sums over one group of position blocks, for one block of channels:
        without g, out1 = sum_p r (x-s), out2 = sum_p r (x-s)^2; with g, out1 = sum_p r g, out2 = sum_p r g (x-s).
        out[group, k, c], (groups, M, C)."""
        c = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
        cmask = c < C
        k = tl.arange(0, BLOCK_M)
        kmask = k < M
        # elementwise partial sums per (position lane, component, channel), reduced over lanes once at the end
        acc1 = tl.zeros([BLOCK_P, BLOCK_M, BLOCK_C], dtype=COMPUTE)
        acc2 = tl.zeros([BLOCK_P, BLOCK_M, BLOCK_C], dtype=COMPUTE)
        first = tl.program_id(1) * blocks_per_group
        for b in range(0, blocks_per_group):
            n, l, pmask, xoff = _positions((first + b) * BLOCK_P, P, L, sxn, sxl, BLOCK_P)
            xs = _shifted_tile(x_ptr, shift_ptr, xoff, pmask, c, cmask, sxc, COMPUTE)
            r = _r_tile(r_ptr, n, l, pmask, k, kmask, srn, srk, srl, COMPUTE)
            if HAS_G:
                a = _map_tile(g_ptr, n, l, pmask, c, cmask, sgn, sgc, sgl, COMPUTE)
                b2 = a * xs
            else:
                a = xs
                b2 = xs * xs
            acc1 += r[:, :, None] * a[:, None, :]
            acc2 += r[:, :, None] * b2[:, None, :]
        ooff = tl.program_id(1).to(tl.int64) * (M * C) + k[:, None] * C + c[None, :]
        omask = kmask[:, None] & cmask[None, :]
        tl.store(out1_ptr + ooff, tl.sum(acc1, axis=0), mask=omask)
        tl.store(out2_ptr + ooff, tl.sum(acc2, axis=0), mask=omask)

    @triton.jit
    def _combine_kernel(x_ptr, g_ptr, shift_ptr, r_ptr, a_ptr, b_ptr, d_ptr, out_ptr, P, C, L,
                        sxn, sxc, sxl, sgn, sgc, sgl, srn, srk, srl, son, soc, sol,
                        M: tl.constexpr, HAS_G: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr,
                        COMPUTE: tl.constexpr):
        """out = (x-s) (R^T A) [+ g (R^T B)] + R^T D on a [BLOCK_P, BLOCK_C] tile: per component one column
        of R and one row of each coefficient, so the sum over components is M fused multiply-adds."""
        n, l, pmask, xoff = _positions(tl.program_id(0) * BLOCK_P, P, L, sxn, sxl, BLOCK_P)
        c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
        cmask = c < C
        xs = _shifted_tile(x_ptr, shift_ptr, xoff, pmask, c, cmask, sxc, COMPUTE)
        ra = tl.zeros([BLOCK_P, BLOCK_C], dtype=COMPUTE)
        rb = tl.zeros([BLOCK_P, BLOCK_C], dtype=COMPUTE)
        rd = tl.zeros([BLOCK_P, BLOCK_C], dtype=COMPUTE)
        roff = n.to(tl.int64) * srn + l.to(tl.int64) * srl
        for k in tl.static_range(M):
            rk = tl.load(r_ptr + roff + k * srk, mask=pmask, other=0.0).to(COMPUTE)[:, None]
            ra += rk * tl.load(a_ptr + k * C + c, mask=cmask, other=0.0).to(COMPUTE)[None, :]
            rd += rk * tl.load(d_ptr + k * C + c, mask=cmask, other=0.0).to(COMPUTE)[None, :]
            if HAS_G:
                rb += rk * tl.load(b_ptr + k * C + c, mask=cmask, other=0.0).to(COMPUTE)[None, :]
        out = xs * ra + rd
        if HAS_G:
            out += _map_tile(g_ptr, n, l, pmask, c, cmask, sgn, sgc, sgl, COMPUTE) * rb
        _store_tile(out_ptr, n, l, pmask, c, cmask, son, soc, sol, out)


_INTERPRETED = triton is not None and type(_estep_kernel).__name__ == 'InterpretedFunction'


# ------------------------------------------------------------------------------------------------ launches
# Tiles and warps: not yet timed on a GPU.  Chosen so that every kernel compiles for sm_80 and sm_90 without
# spilling, at 48-108 registers a thread (25-62% occupancy) for fp32/bf16/fp16 maps up to M = 8
# (benchmarks/results/triton_resources.md: compiled without a GPU).  Module attributes, read at every launch.
_BLOCK_P, _BLOCK_C = 32, 32  # E-step and eval: [BLOCK_P, BLOCK_M, BLOCK_C] accumulator
_COMBINE_P, _COMBINE_C = 32, 32  # output pass: three [BLOCK_P, BLOCK_C] sums
_MOMENT_P, _MOMENT_C = 32, 16  # moments: two [BLOCK_P, BLOCK_M, BLOCK_C] accumulators
_WARPS = 8
_PROGRAMS_PER_SM = 4  # moment passes: position groups so that about this many programs run per multiprocessor


def _standard(x: Tensor) -> Tensor:
    """x itself when (N, C, L) is a view of it (contiguous or channels_last), else a contiguous copy."""
    return x if x.is_contiguous() or x.is_contiguous(memory_format=torch.channels_last) else x.contiguous()


def _strides(t: Tensor) -> Tuple[int, int, int]:
    """(n, c, l) strides of the (N, C, L) view of a 4-D map in a standard layout."""
    n, c, h, w = t.shape
    return t.stride(0), t.stride(1), (t.stride(3) if w > 1 else t.stride(2)) if h * w > 1 else 0


def _r_strides(R: Tensor) -> Tuple[int, int, int]:
    """(n, k, l) strides of R (N, M, L), l's 0 for one weight per image (N, M, 1)."""
    return R.stride(0), R.stride(1), R.stride(2) if R.shape[2] > 1 else 0


def _block_m(m: int) -> int:
    return max(2, triton.next_power_of_2(m))


def _tl_dtype(dt: torch.dtype):
    return tl.float64 if dt == torch.float64 else tl.float32


def _small(t: Tensor, cdt: torch.dtype) -> Tensor:
    return t.detach().to(cdt).contiguous()


def _multiprocessors(x: Tensor) -> int:
    if x.device.type == 'cuda':
        return torch.cuda.get_device_properties(x.device).multi_processor_count
    return 1  # the interpreter: fewest programs


def _maps(x: Tensor, g: Optional[Tensor] = None):
    """(x, g) in standard layouts (g may be None), C, L = H*W, the positions N*L and the compute dtype."""
    x = _standard(x)
    n, c, h, w = x.shape
    return x, (_standard(g) if g is not None else None), c, h * w, n * h * w, _compute(x)


def _in_layout_of(out: Tensor, x: Tensor) -> Tensor:
    """out with the strides torch.empty_like(x) gives, which the fake implementations promise (a map in
    neither standard layout was computed in a contiguous copy)."""
    if out.stride() == x.stride():
        return out
    return torch.empty_like(x).copy_(out)


def _g_strides(g: Optional[Tensor]) -> Tuple[int, int, int]:
    return _strides(g) if g is not None else (0, 0, 0)


def _estep_impl(x: Tensor, shift: Tensor, w1: Tensor, w2: Tensor, const: Tensor) -> Tensor:
    x, _, c, L, P, cdt = _maps(x)
    m = w1.shape[0]
    R = torch.empty(x.shape[0], m, L, dtype=cdt, device=x.device)
    w1 = _small(w1, cdt)
    _estep_kernel[(triton.cdiv(P, _BLOCK_P),)](
        x, _small(shift, cdt), w1, _small(w2, cdt), _small(const, cdt), R, w1, w1, x, P, c, L, m,
        *_strides(x), 0, 0, 0, OUTPUT=False, BLOCK_P=_BLOCK_P, BLOCK_C=_BLOCK_C, BLOCK_M=_block_m(m),
        COMPUTE=_tl_dtype(cdt), FLOOR=R_FLOOR, num_warps=_WARPS)
    return R


def _moments_impl(x: Tensor, g: Optional[Tensor], shift: Tensor, R: Tensor) -> Tuple[Tensor, Tensor]:
    x, g, c, L, P, cdt = _maps(x, g)
    m = R.shape[1]
    cblocks, pblocks = triton.cdiv(c, _MOMENT_C), triton.cdiv(P, _MOMENT_P)
    want = max(1, _PROGRAMS_PER_SM * _multiprocessors(x) // cblocks)
    per_group = triton.cdiv(pblocks, min(want, pblocks))
    groups = triton.cdiv(pblocks, per_group)
    parts = torch.empty(2, groups, m, c, dtype=cdt, device=x.device)
    _moments_kernel[(cblocks, groups)](
        x, g if g is not None else x, _small(shift, cdt), R, parts[0], parts[1], P, c, L, m, *_strides(x),
        *_g_strides(g), *_r_strides(R), per_group, HAS_G=g is not None, BLOCK_P=_MOMENT_P, BLOCK_C=_MOMENT_C,
        BLOCK_M=_block_m(m), COMPUTE=_tl_dtype(cdt), num_warps=_WARPS)
    return parts[0].sum(0), parts[1].sum(0)  # two tensors: a custom op's outputs may not share storage


def _combine_impl(x_in: Tensor, g: Optional[Tensor], shift: Tensor, R: Tensor, A: Tensor, B: Optional[Tensor],
                  D: Tensor) -> Tensor:
    x, g, c, L, P, cdt = _maps(x_in, g)
    out = torch.empty_like(x)
    A, D = _small(A, cdt), _small(D, cdt)
    _combine_kernel[(triton.cdiv(P, _COMBINE_P), triton.cdiv(c, _COMBINE_C))](
        x, g if g is not None else x, _small(shift, cdt), R, A, _small(B, cdt) if B is not None else A, D, out,
        P, c, L, *_strides(x), *_g_strides(g), *_r_strides(R), *_strides(out), M=R.shape[1], HAS_G=g is not None,
        BLOCK_P=_COMBINE_P, BLOCK_C=_COMBINE_C, COMPUTE=_tl_dtype(cdt), num_warps=_WARPS)
    return _in_layout_of(out, x_in)


def _eval_impl(x_in: Tensor, shift: Tensor, w1: Tensor, w2: Tensor, const: Tensor, scale: Tensor,
               offset: Tensor) -> Tensor:
    x, _, c, L, P, cdt = _maps(x_in)
    out = torch.empty_like(x)
    shift, w1, w2, const, scale, offset = (_small(t, cdt) for t in (shift, w1, w2, const, scale, offset))
    _estep_kernel[(triton.cdiv(P, _BLOCK_P),)](
        x, shift, w1, w2, const, w1, scale, offset, out, P, c, L, w1.shape[0], *_strides(x), *_strides(out),
        OUTPUT=True, BLOCK_P=_BLOCK_P, BLOCK_C=_BLOCK_C, BLOCK_M=_block_m(w1.shape[0]), COMPUTE=_tl_dtype(cdt),
        FLOOR=R_FLOOR, num_warps=_WARPS)
    return _in_layout_of(out, x_in)


# ------------------------------------------------------------------------------------------------ custom ops
# One op per pass, opaque to torch.compile (its fake implementation gives the shapes); the (M, C) math
# between them stays in the graph.  Registered for CUDA, and for CPU where the kernels then run in Triton's
# interpreter; the layouts are flexible, as compound_bn_ops' (every pass takes either standard layout and
# its output follows its input's).
_LIB = torch.library.Library('lt_zoo', 'FRAGMENT')
_FLEXIBLE = (torch.Tag.flexible_layout,)


def _cpu_guard(fn):
    def run(*args):
        if not interpreting():
            raise RuntimeError("kernel='triton' runs on CUDA maps; on CPU only in Triton's interpreter "
                               "(TRITON_INTERPRET=1 set before Triton is imported)")
        return fn(*args)
    return run


def _define(schema: str, fn, fake):
    name = schema.split('(', 1)[0]
    _LIB.define(schema, tags=_FLEXIBLE)
    if triton is not None:
        _LIB.impl(name, fn, 'CUDA')
        _LIB.impl(name, _cpu_guard(fn), 'CPU')
    torch.library.register_fake(f'lt_zoo::{name}')(fake)
    return getattr(torch.ops.lt_zoo, name).default


def _map_fake(x, *args):
    return torch.empty_like(x)


def _estep_fake(x, shift, w1, w2, const):
    n, c, h, w = x.shape
    return x.new_empty((n, w1.shape[0], h * w), dtype=_compute(x))


def _moments_fake(x, g, shift, R):
    m, c = R.shape[1], x.shape[1]
    return x.new_empty((m, c), dtype=_compute(x)), x.new_empty((m, c), dtype=_compute(x))


_estep_op = _define('cbn_triton_estep(Tensor x, Tensor shift, Tensor w1, Tensor w2, Tensor const) -> Tensor',
                    _estep_impl, _estep_fake)
_moments_op = _define('cbn_triton_moments(Tensor x, Tensor? g, Tensor shift, Tensor R) -> (Tensor, Tensor)',
                      _moments_impl, _moments_fake)
_combine_op = _define('cbn_triton_combine(Tensor x, Tensor? g, Tensor shift, Tensor R, Tensor A, Tensor? B, '
                      'Tensor D) -> Tensor', _combine_impl, _map_fake)
_eval_op = _define('cbn_triton_eval(Tensor x, Tensor shift, Tensor w1, Tensor w2, Tensor const, Tensor scale, '
                   'Tensor offset) -> Tensor', _eval_impl, _map_fake)


# ------------------------------------------------------------------------------------------------ API
# compound_bn_native's signatures: shift (C,) is subtracted inside the passes (None: x is already shifted).
def _shift_or_zero(shift: Optional[Tensor], x: Tensor) -> Tensor:
    return shift if shift is not None else x.new_zeros(x.shape[1], dtype=_compute(x))


def estep_moments(x: Tensor, m: int, coef, groups: Optional[Tensor],
                  shift: Optional[Tensor] = None) -> Tuple[Tensor, Tensor]:
    """(R, sums) of the map x (N, C, H, W): R (N, M, H*W) posteriors from the E-step coefficients ``coef``
    (w1, w2, const), or (N, M, 1) one-hot ``groups`` (N,) on the split path; sums (M, 2 + 2C) =
    [sum r, sum r^2, sum r x_c, sum r x_c^2] over the batch's positions (float32; float64 maps: float64)."""
    shift = _shift_or_zero(shift, x)
    if groups is None:
        R = _estep_op(x, shift, *coef)
        counts, sumsq = R.sum((0, 2)), (R * R).sum((0, 2))
    else:  # one-hot: r^2 = r, each image's weight counted at its H*W positions
        R = F.one_hot(groups.to(torch.int64), m).to(_compute(x)).unsqueeze(2)
        counts = R.sum((0, 2)) * (x.shape[2] * x.shape[3])
        sumsq = counts
    s1, s2 = _moments_op(x, None, shift, R)
    return R, torch.cat([counts.unsqueeze(1), sumsq.unsqueeze(1), s1, s2], 1)


def combine(x: Tensor, g: Optional[Tensor], R: Tensor, A: Tensor, B: Optional[Tensor], D: Tensor,
            shift: Optional[Tensor] = None) -> Tensor:
    """out = (x-s) * (R^T A) [+ g * (R^T B)] + R^T D per position, in x's layout and dtype; A, B, D (M, C)."""
    return _combine_op(x, g, _shift_or_zero(shift, x), R, A, B, D)


def grad_moments(x: Tensor, g: Tensor, R: Tensor, shift: Optional[Tensor] = None) -> Tuple[Tensor, Tensor]:
    """(R^T g, R^T (g (x-s))) summed over the batch's positions, each (M, C)."""
    return _moments_op(x, g, _shift_or_zero(shift, x), R)


def folded_eval(x: Tensor, coef, scale: Tensor, offset: Tensor, shift: Optional[Tensor] = None) -> Tensor:
    """Eval output from folded constants (E-step and mixing in one kernel), in x's layout and dtype."""
    return _eval_op(x, _shift_or_zero(shift, x), *coef, scale, offset)
