"""Context parallelism over torch.distributed: one sequence split across the ranks of a group.

Every recurrent op here is a linear recurrence in its state, so a segment's effect on the state is
an affine map ``H -> A * H + b``: ``A`` is the segment's total decay (the product of its per-step
decays: state-shaped or broadcastable to it) and ``b`` its end state when started from zero. So a
sequence split into contiguous segments over the ranks of a group needs no ring of keys and values,
only one exchange of those two small tensors (O(batch x state) bytes, independent of length):

1. summary: every rank runs its segment from a zero state (rank 0 from the user's initial state)
   and computes its decay product ``A_r``.
2. exchange: one ``all_gather`` of ``(A_r, b_r)``; every rank composes the maps of the ranks before
   it in float32 (float64 for float64 inputs): ``H_r = A_r H_{r-1} + b_r``, ``H_{-1} = 0``, giving
   its true initial state ``H_{r-1}`` and, from all of them, the global final state.
3. correction: ranks after the first rerun their segment with the true initial state (the public
   op with ``initial_state=``). That is exact (the same kernel, the same numerics as the
   single-device call on that segment) and reuses every backend. A closed-form correction
   (``h_t += (prod_{s<=t} a_s) h_in``; ``o_t += scale (q_t * exp(G_t)) S_in``) would save part of a
   pass but rounds the output twice in low precision and needs a kernel of its own to be cheaper
   than a rerun; the rerun is what every op does now.

Gradients: each step is differentiable except the exchange, an explicit autograd.Function
(`_Exchange`) whose backward is the same exchange right to left: one ``all_gather`` of the adjoint
summaries (the gradient reaching each rank's initial state from its own outputs, and the gradient of
the returned final state), then ``lambda_r = dL/dH_r`` from the ranks after it:
``lambda_{R-1} = sum_r dL/dFinal_r`` (every rank returns the final state; their gradients add),
``lambda_{r-1} = dL/dh_in_r + conj(A_r) lambda_r``. It returns ``db_r = lambda_r`` and
``dA_r = lambda_r conj(H_{r-1})``; autograd carries them through the summary pass and the decay
product into the local inputs. Cost per rank after the first: two local forwards and two local
backwards (one each on rank 0), one ``all_gather`` each way.

Contract (`process_group=` on the public ops):
- the time axis of every time-indexed input is this rank's contiguous segment of one global
  sequence, ranks in group order (``reverse=True`` scans start on the last rank); segments may
  differ in length (>= 1); every other dimension must agree across ranks;
- ``initial_state`` is read on the rank where the scan starts (rank 0; the last rank with
  ``reverse=True``) and ignored elsewhere; its gradient goes to that rank;
- outputs are this rank's segment of the outputs; final states are the global final state on
  every rank;
- every rank must make the same calls in the same order, with the same arguments apart from the
  segments, and must run backward through them (the backward exchange is collective). A weight
  shared over time (selective scan's A, D, delta_bias; g_gamma) gets this rank's share of its
  gradient: all-reduce it (DDP/FSDP over the same group do that already);
- packed variable-length batches (``cu_seqlens``) are refused; eager only (no torch.compile).

Adding an op: write its local call (public op with ``initial_state=``), its decay product and the
states' list, and hand them to `context_parallel` (see `cp_linear_scan` for the smallest example).

This module is imported only when a ``process_group`` is given.
"""
from __future__ import annotations

from typing import Callable, List, Optional, Sequence, Tuple

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor

from .validation import checks_values

# Benchmarks only: make the first rank do the work of a later one (summary pass + rerun), so a group
# of one measures what every rank but the first pays. Results stay right only without initial state.
_FORCE_CORRECTION = False


# ---- group helpers ----------------------------------------------------------------------------

def _check_group(op: str, group, cu_seqlens=None) -> None:
    if not isinstance(group, dist.ProcessGroup):
        raise TypeError(f"{op}: process_group must be a torch.distributed.ProcessGroup, got "
                        f"{type(group).__name__}")
    if cu_seqlens is not None:
        raise ValueError(f"{op}: cu_seqlens (packed variable-length batches) cannot be combined with "
                         f"process_group (context parallelism); split packed sequences per rank "
                         f"or pass one sequence per batch row")


def _position(group, reverse: bool) -> Tuple[int, int]:
    """(this rank's place in scan order, group size)."""
    rank, world = dist.get_rank(group), dist.get_world_size(group)
    return (world - 1 - rank if reverse else rank), world


class _Packer:
    """Flattens a list of tensors (complex as (re, im) pairs) into one real buffer and back."""

    def __init__(self, like: Sequence[Tensor], cdtype: torch.dtype):
        self.shapes = [t.shape for t in like]
        self.dtypes = [t.dtype for t in like]
        self.real = torch.float64 if cdtype in (torch.float64, torch.complex128) else torch.float32
        self.sizes = [t.numel() * (2 if t.is_complex() else 1) for t in like]

    def pack(self, tensors: Sequence[Tensor]) -> Tensor:
        cplx = torch.complex128 if self.real == torch.float64 else torch.complex64
        return torch.cat([torch.view_as_real(t.to(cplx).contiguous()).reshape(-1) if t.is_complex()
                          else t.to(self.real).reshape(-1) for t in tensors])

    def unpack(self, buf: Tensor) -> List[Tensor]:
        out = []
        for piece, shape, dtype in zip(buf.split(self.sizes), self.shapes, self.dtypes):
            if dtype.is_complex:
                piece = torch.view_as_complex(piece.view(*shape, 2))
            out.append(piece.view(shape))
        return out


def _all_gather(group, buf: Tensor) -> List[Tensor]:
    parts = [torch.empty_like(buf) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, buf.contiguous(), group=group)
    return parts


def _compute_dtype(t: Tensor) -> torch.dtype:
    if t.dtype in (torch.float64, torch.complex128):
        return t.dtype
    return torch.complex64 if t.is_complex() else torch.float32


# ---- the exchange ------------------------------------------------------------------------------

class _Exchange(torch.autograd.Function):
    """(A_1..A_n, b_1..b_n) of this rank -> (h_in_1..h_in_n, final_1..final_n).

    A_i: decay product broadcastable to b_i's shape, or None (no decay, A = 1). b_i: end state
    of this segment from zero (from the initial state on the first rank). One all_gather forward,
    one backward."""

    @staticmethod
    def forward(ctx, group, pos: int, world: int, reverse: bool, n: int, *tensors):
        ctx.set_materialize_grads(False)
        A_in, b_in = list(tensors[:n]), list(tensors[n:])
        cd = [_compute_dtype(b) for b in b_in]
        A_loc = [None if A is None else A.detach().to(c) for A, c in zip(A_in, cd)]
        b_loc = [b.detach().to(c) for b, c in zip(b_in, cd)]
        sent = [A for A in A_loc if A is not None] + b_loc
        packer = _Packer(sent, cd[0])
        parts = [packer.unpack(p) for p in _all_gather(group, packer.pack(sent))]
        if reverse:
            parts = parts[::-1]  # scan order
        n_A = len(sent) - n
        h_in, finals, As = [], [], []
        j = 0
        for i in range(n):
            if A_loc[i] is None:
                Ai = [None] * world
            else:
                Ai = [p[j] for p in parts]
                j += 1
            bi = [p[n_A + i] for p in parts]
            H = torch.zeros_like(b_loc[i])
            for r in range(world):
                if r == pos:
                    h_in.append(H)
                H = bi[r] if r == 0 else (bi[r] + (H if Ai[r] is None else Ai[r] * H))
            finals.append(H)
            As.append(Ai)
        ctx.group, ctx.pos, ctx.world, ctx.reverse, ctx.n = group, pos, world, reverse, n
        ctx.As, ctx.h_in, ctx.cd = As, h_in, cd
        ctx.A_meta = [None if A is None else (A.shape, A.dtype) for A in A_in]
        ctx.b_dtypes = [b.dtype for b in b_in]
        out = [h.to(b.dtype) for h, b in zip(h_in, b_in)] + [H.to(b.dtype) for H, b in zip(finals, b_in)]
        return tuple(out)

    @staticmethod
    def backward(ctx, *grads):
        n, pos, world = ctx.n, ctx.pos, ctx.world
        zeros = [torch.zeros_like(h) for h in ctx.h_in]
        d_in = [z if g is None else g.to(z.dtype) for g, z in zip(grads[:n], zeros)]
        d_fin = [z if g is None else g.to(z.dtype) for g, z in zip(grads[n:], zeros)]
        sent = d_in + d_fin
        packer = _Packer(sent, ctx.cd[0])
        parts = [packer.unpack(p) for p in _all_gather(ctx.group, packer.pack(sent))]
        if ctx.reverse:
            parts = parts[::-1]
        dA, db = [], []
        for i in range(n):
            lam = sum(p[n + i] for p in parts)          # d/dH_{R-1}: every rank's final adds
            for r in range(world - 1, pos, -1):         # lambda_{r-1} = mu_r + conj(A_r) lambda_r
                A = ctx.As[i][r]
                lam = parts[r][i] + (lam if A is None else A.conj() * lam)
            db.append(lam.to(ctx.b_dtypes[i]))
            meta = ctx.A_meta[i]
            if meta is None or not ctx.needs_input_grad[5 + i] or pos == 0:
                dA.append(None)
            else:
                shape, dtype = meta
                g = lam * ctx.h_in[i].conj()
                if not dtype.is_complex and g.is_complex():
                    g = g.real
                dA.append(g.sum_to_size(shape).to(dtype))
        return (None, None, None, None, None, *dA, *db)


def _check_shapes(group, op: str, sig: Tuple[int, ...], device) -> None:
    """Every rank must exchange the same state shapes (else all_gather hangs or mixes data). Costs a
    collective and a host read: runs where value checks run (CPU tensors, debug mode)."""
    t = torch.tensor(list(sig), dtype=torch.int64, device=device)
    parts = _all_gather(group, t)
    if any(not torch.equal(p, t) for p in parts):
        got = [tuple(p.tolist()) for p in parts]
        raise ValueError(f"{op}: with process_group, every dimension but time must agree across "
                         f"ranks; the state shapes (flattened) differ: {got}")


def context_parallel(op: str, group, *, local: Callable, decays: Callable, h0: Sequence,
                     reverse: bool = False, summarize: Optional[Callable] = None):
    """Run one op over a sequence split across `group`.

    local(h0s) -> (out, finals): the op on this segment from initial states h0s (a tuple, None
        entries meaning zeros); finals a tuple of the end states (differentiable).
    decays() -> tuple: per state, the segment's decay product (broadcastable to the state; None
        for no decay), differentiable.
    h0: the user's initial states (used on the first rank in scan order only).
    summarize() -> finals from zero, if cheaper than `local` (default: local from zeros).
    Returns (out, global finals).
    """
    pos, world = _position(group, reverse)
    n = len(h0)
    first = pos == 0 and not _FORCE_CORRECTION
    if first:
        out, b = local(tuple(h0))
    else:
        b = summarize() if summarize is not None else local((None,) * n)[1]
    b = tuple(b)
    if pos == 0:
        with torch.no_grad():  # the first rank's decay multiplies H_{-1} = 0: no gradient
            A = tuple(decays())
    else:
        A = tuple(decays())
    if checks_values(b[0]):
        sig = tuple(s for t in list(b) + [a for a in A if a is not None] for s in (len(t.shape), *t.shape))
        _check_shapes(group, op, sig, b[0].device)
    res = _Exchange.apply(group, pos, world, reverse, n, *A, *b)
    h_in, finals = res[:n], res[n:]
    if not first:
        out, _ = local(tuple(h if pos > 0 else h0_i for h, h0_i in zip(h_in, h0)))
    return out, finals


# ---- the ops -------------------------------------------------------------------------------------

def cp_linear_scan(a, b, initial_state=None, *, dim=1, reverse=False, output_final_state=False,
                   backend=None, process_group=None):
    """`linear_scan` over a sequence split along `dim` across `process_group`. Correction: rerun."""
    from .linear_scan.interface import linear_scan
    from .linear_scan.reference import state_dtype
    _check_group("linear_scan", process_group)

    def local(h0):
        return _pair(linear_scan(a, b, h0[0], dim=dim, reverse=reverse, output_final_state=True,
                                 backend=backend))

    def decays():
        return (torch.prod(a.to(state_dtype(a.dtype)), dim=dim),)

    h, (final,) = context_parallel("linear_scan", process_group, local=local, decays=decays,
                                   h0=(initial_state,), reverse=bool(reverse))
    return (h, final) if output_final_state else h


def _pair(res):
    out, final = res
    return out, (final,)


def cp_selective_scan_fn(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                         return_last_state=False, *, initial_state=None, cu_seqlens=None,
                         backend=None, process_group=None):
    """`selective_scan_fn` over a sequence split along seqlen. Correction: rerun."""
    from .selective_scan.interface import selective_scan_fn
    from .selective_scan.reference import compute_dtype
    _check_group("selective_scan_fn", process_group, cu_seqlens)

    def run(h0, with_out):
        return _pair(selective_scan_fn(
            u, delta, A, B, C, D if with_out else None, z if with_out else None, delta_bias,
            delta_softplus, True, initial_state=h0, backend=backend))

    def decays():
        cd = compute_dtype(u, delta, A)
        dt = delta.to(cd)
        if delta_bias is not None:
            dt = dt + delta_bias.to(cd)[:, None]
        if delta_softplus:
            dt = F.softplus(dt)
        At = A.to(torch.complex128 if cd == torch.float64 else torch.complex64) if A.is_complex() \
            else A.to(cd)
        return (torch.exp(dt.sum(-1)[..., None] * At),)     # (batch, dim, dstate)

    out, (last,) = context_parallel(
        "selective_scan_fn", process_group, local=lambda h0: run(h0[0], True), decays=decays,
        h0=(initial_state,), summarize=lambda: run(None, False)[1])
    return (out, last) if return_last_state else out


def _la_state_dtype(q):
    return torch.float64 if q.dtype == torch.float64 else torch.float32


def _la_summary_math(k, v, g, g_gamma):
    sd = _la_state_dtype(k)
    kf = k.to(sd)
    if g is not None or g_gamma is not None:
        G = g.to(sd) if g is not None else kf.new_zeros(k.shape[:3])
        if g_gamma is not None:
            G = G + g_gamma.to(sd)
        # R_t = sum_{s>t} g_s (the decay from step t to the segment's end), an exclusive reverse
        # cumsum taken directly (no difference of two long sums)
        rev = G.flip(1).cumsum(1).flip(1)
        R = torch.cat([rev[:, 1:], torch.zeros_like(rev[:, :1])], 1)
        w = torch.exp(R)
        kf = kf * (w if G.dim() == 4 else w[..., None])
    return torch.einsum("bthk,bthv->bhkv", kf, v.to(sd))


def _la_summary(k, v, g=None, g_gamma=None):
    """The end state of a segment from zero, ``S = sum_t (k_t * exp(sum_{s>t} g_s))^T v_t``: one
    matmul instead of the chunked op (no intra-chunk attention, no outputs), recomputed in backward
    so it keeps no float32 copies of k, v alive."""
    from torch.utils.checkpoint import checkpoint
    return checkpoint(_la_summary_math, k, v, g, g_gamma, use_reentrant=False)


def cp_chunk_simple_gla(q, k, v, g=None, g_gamma=None, scale=None, initial_state=None,
                        output_final_state=False, cu_seqlens=None, *, backend=None,
                        process_group=None):
    """`chunk_simple_gla` over a sequence split along T. Correction: rerun."""
    from .linear_attn.interface import _validate, _validate_gamma, chunk_simple_gla
    _check_group("chunk_simple_gla", process_group, cu_seqlens)
    _validate("chunk_simple_gla", q, k, v, g, "head", scale, initial_state, None)
    _validate_gamma("chunk_simple_gla", g_gamma, q)

    def local(h0):
        return _pair(chunk_simple_gla(q, k, v, g, g_gamma, scale, h0[0], True, backend=backend))

    def decays():
        if g is None and g_gamma is None:
            return (None,)
        sd = _la_state_dtype(q)
        tot = 0
        if g is not None:
            tot = g.to(sd).sum(1)                             # [B, H]
        if g_gamma is not None:
            tot = tot + q.shape[1] * g_gamma.to(sd)
        tot = tot.expand(q.shape[0], q.shape[2]) if torch.is_tensor(tot) else tot
        return (torch.exp(tot)[:, :, None, None],)            # [B, H, 1, 1]

    o, (ht,) = context_parallel("chunk_simple_gla", process_group, local=local, decays=decays,
                                h0=(initial_state,), summarize=lambda: (_la_summary(k, v, g, g_gamma),))
    return o, (ht if output_final_state else None)


def cp_chunk_gla(q, k, v, g, scale=None, initial_state=None, output_final_state=False,
                 cu_seqlens=None, *, backend=None, process_group=None):
    """`chunk_gla` over a sequence split along T. Correction: rerun."""
    from .linear_attn.interface import _validate, chunk_gla
    _check_group("chunk_gla", process_group, cu_seqlens)
    if g is None:
        raise ValueError("chunk_gla: g ([B, T, H, K] log-decays) is required")
    _validate("chunk_gla", q, k, v, g, "key", scale, initial_state, None)

    def local(h0):
        return _pair(chunk_gla(q, k, v, g, scale, h0[0], True, backend=backend))

    def decays():
        return (torch.exp(g.to(_la_state_dtype(q)).sum(1))[..., None],)   # [B, H, K, 1]

    o, (ht,) = context_parallel("chunk_gla", process_group, local=local, decays=decays,
                                h0=(initial_state,), summarize=lambda: (_la_summary(k, v, g),))
    return o, (ht if output_final_state else None)


def cp_chunk_linear_attn(q, k, v, scale=None, initial_state=None, output_final_state=False,
                         normalize=True, cu_seqlens=None, *, backend=None, process_group=None):
    """`chunk_linear_attn` over a sequence split along T. No decay (A = 1); with normalize the
    running key sum is a second state in the same exchange. Correction: rerun."""
    from .linear_attn.interface import _validate, chunk_linear_attn
    _check_group("chunk_linear_attn", process_group, cu_seqlens)
    if normalize and isinstance(initial_state, (tuple, list)):
        kv0, z0 = initial_state
    else:
        kv0, z0 = initial_state, None
    _validate("chunk_linear_attn", q, k, v, None, "head", scale, kv0, None)
    sd = _la_state_dtype(q)

    if not normalize:
        def local(h0):
            return _pair(chunk_linear_attn(q, k, v, scale, h0[0], True, normalize=False,
                                           backend=backend))

        o, (ht,) = context_parallel("chunk_linear_attn", process_group, local=local,
                                    decays=lambda: (None,), h0=(kv0,),
                                    summarize=lambda: (_la_summary(k, v),))
        return o, (ht if output_final_state else None)

    kf = k.to(sd)

    def local(h0):
        o, ht = chunk_linear_attn(q, k, v, scale, h0[0], True, normalize=False, backend=backend)
        zsum = kf.sum(1, keepdim=True)                         # [B, 1, H, K]
        return (o, h0[1]), (ht, zsum if h0[1] is None else zsum + h0[1].to(sd))

    if z0 is not None:
        from .validation import check_tensor
        check_tensor("initial_state[1] (z_state)", z0)
        if tuple(z0.shape) != (q.shape[0], 1, q.shape[2], q.shape[3]):
            raise ValueError(f"chunk_linear_attn: initial_state[1] (z_state) must have shape "
                             f"[N, 1, H, K] = {(q.shape[0], 1, q.shape[2], q.shape[3])}, got "
                             f"{tuple(z0.shape)}")
    (o, z_in), (ht, z) = context_parallel("chunk_linear_attn", process_group, local=local,
                                          decays=lambda: (None, None), h0=(kv0, z0),
                                          summarize=lambda: (_la_summary(k, v),
                                                             kf.sum(1, keepdim=True)))
    s = q.shape[-1] ** -0.5 if scale is None else float(scale)
    kc = kf.cumsum(1)
    if z_in is not None:
        kc = kc + z_in.to(sd)
    denom = (q.to(sd) * s * kc).sum(-1, keepdim=True) + 1e-10
    o = (o.to(sd) / denom).to(v.dtype)
    return o, ((ht, z) if output_final_state else None)
