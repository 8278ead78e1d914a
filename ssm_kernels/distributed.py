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

from typing import Callable, Dict, List, Optional, Sequence, Tuple

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

def _exchange_forward(group, pos: int, world: int, reverse: bool, A_loc, b_loc):
    """A_loc: per state, this segment's decay product (broadcastable to the state) or None (A = 1);
    b_loc: per state, its end state from zero (from the initial state on the first rank).
    Returns (h_in per state, global final per state, every rank's A per state in scan order),
    composed in float32 (float64 for float64 states); one all_gather."""
    n = len(b_loc)
    cd = [_compute_dtype(b) for b in b_loc]
    A_loc = [None if A is None else A.to(c) for A, c in zip(A_loc, cd)]
    b_loc = [b.to(c) for b, c in zip(b_loc, cd)]
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
    return h_in, finals, As


def _exchange_backward(group, pos: int, world: int, reverse: bool, As, mu, d_final):
    """The same exchange right to left. mu: per state, dL/dh_in of this rank through its own
    outputs; d_final: per state, the gradient of this rank's copy of the global final state.
    Returns lambda_pos = dL/dH_pos per state: lambda_{R-1} = sum over ranks of d_final,
    lambda_{r-1} = mu_r + conj(A_r) lambda_r."""
    n = len(mu)
    packer = _Packer(list(mu) + list(d_final), mu[0].dtype)
    parts = [packer.unpack(p) for p in _all_gather(group, packer.pack(list(mu) + list(d_final)))]
    if reverse:
        parts = parts[::-1]
    lams = []
    for i in range(n):
        lam = sum(p[n + i] for p in parts)
        for r in range(world - 1, pos, -1):
            A = As[i][r]
            lam = parts[r][i] + (lam if A is None else A.conj() * lam)
        lams.append(lam)
    return lams


class _Spec:
    """What `_CPFunction` needs besides tensors (closures, group, position)."""

    def __init__(self, **kw):
        self.__dict__.update(kw)


class _CPFunction(torch.autograd.Function):
    """One op over a sequence split across a group. Forward: summary from zero (no graph), the
    exchange, then the local op from the true initial states inside a private autograd graph.
    Backward: this rank's adjoint summary (the gradient reaching its initial states from its own
    outputs; ranks after the first), the reverse exchange, then ONE backward of the private graph
    with the true final-state gradient lambda, so every gradient is rounded once, as in the
    single-device call."""

    @staticmethod
    def forward(ctx, spec, *tensors):
        x = dict(zip(spec.keys, tensors))
        first = spec.pos == 0 and not spec.force
        leaves = {k: None if t is None else t.detach().requires_grad_(t.requires_grad)
                  for k, t in x.items()}
        h_leaves = None
        if first:
            with torch.enable_grad():
                out, fin_loc = spec.local(leaves, tuple(leaves.get(k) for k in spec.h0_keys))
            b = [f.detach() for f in fin_loc]
        else:
            b = spec.summarize(x) if spec.summarize is not None else \
                spec.local(x, (None,) * spec.n)[1]
        A = spec.decays(x)
        if checks_values(b[0]):
            sig = tuple(d for t in list(b) + [a for a in A if a is not None]
                        for d in (len(t.shape), *t.shape))
            _check_shapes(spec.group, spec.op, sig, b[0].device)
        h_in, finals, As = _exchange_forward(spec.group, spec.pos, spec.world, spec.reverse, A, b)
        if not first:
            h_leaves = [h.to(f.dtype).requires_grad_() for h, f in zip(h_in, b)]
            with torch.enable_grad():
                out, fin_loc = spec.local(leaves, tuple(h_leaves))
        ctx.spec, ctx.first, ctx.As = spec, first, As
        ctx.graph = (out, tuple(fin_loc), leaves, h_leaves)
        ctx.fin_dtypes = [f.dtype for f in b]
        return (out.detach(), *(H.to(f.dtype) for H, f in zip(finals, b)))

    @staticmethod
    def backward(ctx, dout, *d_final):
        spec = ctx.spec
        out, fin_loc, leaves, h_leaves = ctx.graph
        ctx.graph = None
        if ctx.first:
            mu = [torch.zeros_like(f, dtype=_compute_dtype(f)) for f in fin_loc]
        elif spec.adjoint is not None:
            mu = [m.to(_compute_dtype(f)) for m, f in zip(spec.adjoint(leaves, dout), fin_loc)]
        else:
            got = torch.autograd.grad(out, h_leaves, dout, retain_graph=True, allow_unused=True)
            mu = [torch.zeros_like(h, dtype=_compute_dtype(h)) if g is None else
                  g.to(_compute_dtype(h)) for g, h in zip(got, h_leaves)]
        d_final = [d.to(_compute_dtype(f)) for d, f in zip(d_final, fin_loc)]
        lams = _exchange_backward(spec.group, spec.pos, spec.world, spec.reverse, ctx.As, mu,
                                  d_final)
        targets, gouts = [], []
        for t, g in [(out, dout)] + [(f, lam.to(f.dtype)) for f, lam in zip(fin_loc, lams)]:
            if t.requires_grad:
                targets.append(t)
                gouts.append(g)
        wanted = [k for k, t in leaves.items() if t is not None and t.requires_grad]
        grads = dict(zip(wanted, torch.autograd.grad(targets, [leaves[k] for k in wanted], gouts,
                                                     allow_unused=True))) if targets else {}
        return (None, *(grads.get(k) for k in spec.keys))


def _check_shapes(group, op: str, sig: Tuple[int, ...], device) -> None:
    """Every rank must exchange the same state shapes (else all_gather hangs or mixes data). Costs a
    collective and a host read: runs where value checks run (CPU tensors, debug mode)."""
    t = torch.tensor(list(sig), dtype=torch.int64, device=device)
    parts = _all_gather(group, t)
    if any(not torch.equal(p, t) for p in parts):
        got = [tuple(p.tolist()) for p in parts]
        raise ValueError(f"{op}: with process_group, every dimension but time must agree across "
                         f"ranks; the state shapes (flattened) differ: {got}")


def context_parallel(op: str, group, inputs: Dict[str, Optional[Tensor]], *, local: Callable,
                     decays: Callable, h0_keys: Sequence[str], reverse: bool = False,
                     summarize: Optional[Callable] = None, adjoint: Optional[Callable] = None):
    """Run one op over a sequence split across `group` (the recipe every CP op follows).

    inputs: every tensor the op reads (None for absent ones), by name; gradients flow to these.
    local(x, h0s) -> (out, finals): the op on this segment (x: `inputs` as given or as graph
        leaves) from initial states h0s (a tuple, None entries meaning zeros); finals a tuple of
        the end states, differentiable.
    decays(x) -> tuple: per state, the segment's decay product (broadcastable to the state; None
        for no decay). Called without gradient.
    h0_keys: the names in `inputs` of the user's initial states, one per state (the first rank in
        scan order reads them; a missing name means zeros).
    summarize(x) -> finals from zero, if cheaper than `local` (no gradient needed).
    adjoint(x, dout) -> per state, dL/dh0 through `out` alone (linear in dout), if cheaper than a
        backward of `local` (no gradient needed).
    Returns (out, global finals tuple).
    """
    pos, world = _position(group, reverse)
    keys = tuple(inputs)
    spec = _Spec(op=op, group=group, pos=pos, world=world, reverse=bool(reverse), keys=keys,
                 local=local, decays=decays, h0_keys=tuple(h0_keys), n=len(h0_keys),
                 summarize=summarize, adjoint=adjoint, force=_FORCE_CORRECTION)
    res = _CPFunction.apply(spec, *(inputs[k] for k in keys))
    return res[0], tuple(res[1:])


# ---- the ops -------------------------------------------------------------------------------------

def cp_linear_scan(a, b, initial_state=None, *, dim=1, reverse=False, output_final_state=False,
                   backend=None, process_group=None):
    """`linear_scan` over a sequence split along `dim` across `process_group`. Summary: the op
    from zero; correction: rerun with the true initial state."""
    from .linear_scan.interface import linear_scan
    from .linear_scan.reference import state_dtype
    _check_group("linear_scan", process_group)

    def local(x, h0):
        h, fin = linear_scan(x["a"], x["b"], h0[0], dim=dim, reverse=reverse,
                             output_final_state=True, backend=backend)
        return h, (fin,)

    def decays(x):
        return (torch.prod(x["a"].to(state_dtype(a.dtype)), dim=dim),)

    h, (final,) = context_parallel("linear_scan", process_group,
                                   {"a": a, "b": b, "h0": initial_state}, local=local,
                                   decays=decays, h0_keys=("h0",), reverse=bool(reverse))
    return (h, final) if output_final_state else h


def cp_selective_scan_fn(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                         return_last_state=False, *, initial_state=None, cu_seqlens=None,
                         backend=None, process_group=None):
    """`selective_scan_fn` over a sequence split along seqlen. Summary: the op from zero without
    D and z; correction: rerun with the true initial state."""
    from .selective_scan.interface import selective_scan_fn
    from .selective_scan.reference import compute_dtype
    _check_group("selective_scan_fn", process_group, cu_seqlens)

    def run(x, h0, with_out):
        out, last = selective_scan_fn(
            x["u"], x["delta"], x["A"], x["B"], x["C"], x["D"] if with_out else None,
            x["z"] if with_out else None, x["delta_bias"], delta_softplus, True,
            initial_state=h0, backend=backend)
        return out, (last,)

    def decays(x):
        cd = compute_dtype(u, delta, A)
        dt = x["delta"].to(cd)
        if delta_bias is not None:
            dt = dt + x["delta_bias"].to(cd)[:, None]
        if delta_softplus:
            dt = F.softplus(dt)
        At = x["A"]
        At = At.to(torch.complex128 if cd == torch.float64 else torch.complex64) if At.is_complex() \
            else At.to(cd)
        return (torch.exp(dt.sum(-1)[..., None] * At),)     # (batch, dim, dstate)

    inputs = {"u": u, "delta": delta, "A": A, "B": B, "C": C, "D": D, "z": z,
              "delta_bias": delta_bias, "h0": initial_state}
    out, (last,) = context_parallel(
        "selective_scan_fn", process_group, inputs, local=lambda x, h0: run(x, h0[0], True),
        decays=decays, h0_keys=("h0",), summarize=lambda x: run(x, None, False)[1])
    return (out, last) if return_last_state else out


def _la_state_dtype(q):
    return torch.float64 if q.dtype == torch.float64 else torch.float32


def _la_gate(x, sd):
    """Per-step log-decay [B, T, H] or [B, T, H, K] in sd, or None (no decay)."""
    g, gam = x.get("g"), x.get("g_gamma")
    if g is None and gam is None:
        return None
    G = g.to(sd) if g is not None else x["k"].new_zeros(x["k"].shape[:3], dtype=sd)
    return G if gam is None else G + gam.to(sd)


def _la_summary(x):
    """The end state of a segment from zero, ``S = sum_t (k_t * exp(sum_{s>t} g_s))^T v_t``: one
    matmul instead of the chunked op (no intra-chunk attention, no outputs)."""
    k, v = x["k"], x["v"]
    sd = _la_state_dtype(k)
    kf = k.to(sd)
    G = _la_gate(x, sd)
    if G is not None:
        # sum_{s>t} g_s, an exclusive reverse cumsum taken directly (no difference of long sums)
        rev = G.flip(1).cumsum(1).flip(1)
        w = torch.exp(torch.cat([rev[:, 1:], torch.zeros_like(rev[:, :1])], 1))
        kf = kf * (w if G.dim() == 4 else w[..., None])
    return (torch.einsum("bthk,bthv->bhkv", kf, v.to(sd)),)


def _la_adjoint(scale):
    """dL/dS_in through the outputs alone, ``sum_t scale (q_t * exp(sum_{s<=t} g_s))^T do_t``: one
    matmul instead of a backward pass of the chunked op."""
    def adjoint(x, do):
        q = x["q"]
        sd = _la_state_dtype(q)
        s = q.shape[-1] ** -0.5 if scale is None else float(scale)
        qf = q.detach().to(sd) * s
        G = _la_gate({k: (None if t is None else t.detach()) for k, t in x.items()}, sd)
        if G is not None:
            w = torch.exp(G.cumsum(1))
            qf = qf * (w if G.dim() == 4 else w[..., None])
        return (torch.einsum("bthk,bthv->bhkv", qf, do.to(sd)),)
    return adjoint


def cp_chunk_simple_gla(q, k, v, g=None, g_gamma=None, scale=None, initial_state=None,
                        output_final_state=False, cu_seqlens=None, *, backend=None,
                        process_group=None):
    """`chunk_simple_gla` over a sequence split along T. Summary and adjoint summary: one matmul
    each; correction: rerun with the true initial state."""
    from .linear_attn.interface import _validate, _validate_gamma, chunk_simple_gla
    _check_group("chunk_simple_gla", process_group, cu_seqlens)
    _validate("chunk_simple_gla", q, k, v, g, "head", scale, initial_state, None)
    _validate_gamma("chunk_simple_gla", g_gamma, q)

    def local(x, h0):
        o, ht = chunk_simple_gla(x["q"], x["k"], x["v"], x["g"], x["g_gamma"], scale, h0[0], True,
                                 backend=backend)
        return o, (ht,)

    def decays(x):
        G = _la_gate(x, _la_state_dtype(q))
        return (None,) if G is None else (torch.exp(G.sum(1))[:, :, None, None],)  # [B, H, 1, 1]

    inputs = {"q": q, "k": k, "v": v, "g": g, "g_gamma": g_gamma, "h0": initial_state}
    o, (ht,) = context_parallel("chunk_simple_gla", process_group, inputs, local=local,
                                decays=decays, h0_keys=("h0",), summarize=_la_summary,
                                adjoint=_la_adjoint(scale))
    return o, (ht if output_final_state else None)


def cp_chunk_gla(q, k, v, g, scale=None, initial_state=None, output_final_state=False,
                 cu_seqlens=None, *, backend=None, process_group=None):
    """`chunk_gla` over a sequence split along T. Summary and adjoint summary: one matmul each;
    correction: rerun with the true initial state."""
    from .linear_attn.interface import _validate, chunk_gla
    _check_group("chunk_gla", process_group, cu_seqlens)
    if g is None:
        raise ValueError("chunk_gla: g ([B, T, H, K] log-decays) is required")
    _validate("chunk_gla", q, k, v, g, "key", scale, initial_state, None)

    def local(x, h0):
        o, ht = chunk_gla(x["q"], x["k"], x["v"], x["g"], scale, h0[0], True, backend=backend)
        return o, (ht,)

    def decays(x):
        return (torch.exp(x["g"].to(_la_state_dtype(q)).sum(1))[..., None],)   # [B, H, K, 1]

    o, (ht,) = context_parallel("chunk_gla", process_group,
                                {"q": q, "k": k, "v": v, "g": g, "h0": initial_state},
                                local=local, decays=decays, h0_keys=("h0",),
                                summarize=_la_summary, adjoint=_la_adjoint(scale))
    return o, (ht if output_final_state else None)


def cp_chunk_linear_attn(q, k, v, scale=None, initial_state=None, output_final_state=False,
                         normalize=True, cu_seqlens=None, *, backend=None, process_group=None):
    """`chunk_linear_attn` over a sequence split along T. No decay (A = 1); with normalize the
    running key sum is a second state in the same exchange and the normalisation runs inside the
    local step. Summary: one matmul; correction: rerun with the true initial state."""
    from .linear_attn.interface import _validate, chunk_linear_attn
    from .validation import check_tensor
    _check_group("chunk_linear_attn", process_group, cu_seqlens)
    if normalize and isinstance(initial_state, (tuple, list)):
        kv0, z0 = initial_state
    else:
        kv0, z0 = initial_state, None
    _validate("chunk_linear_attn", q, k, v, None, "head", scale, kv0, None)
    inputs = {"q": q, "k": k, "v": v, "h0": kv0}

    if not normalize:
        def local(x, h0):
            o, ht = chunk_linear_attn(x["q"], x["k"], x["v"], scale, h0[0], True, normalize=False,
                                      backend=backend)
            return o, (ht,)

        o, (ht,) = context_parallel("chunk_linear_attn", process_group, inputs, local=local,
                                    decays=lambda x: (None,), h0_keys=("h0",),
                                    summarize=_la_summary, adjoint=_la_adjoint(scale))
        return o, (ht if output_final_state else None)

    if z0 is not None:
        check_tensor("initial_state[1] (z_state)", z0)
        if tuple(z0.shape) != (q.shape[0], 1, q.shape[2], q.shape[3]):
            raise ValueError(f"chunk_linear_attn: initial_state[1] (z_state) must have shape "
                             f"[N, 1, H, K] = {(q.shape[0], 1, q.shape[2], q.shape[3])}, got "
                             f"{tuple(z0.shape)}")
    sd = _la_state_dtype(q)
    s = q.shape[-1] ** -0.5 if scale is None else float(scale)

    def local(x, h0):
        o, ht = chunk_linear_attn(x["q"], x["k"], x["v"], scale, h0[0], True, normalize=False,
                                  backend=backend)
        kf = x["k"].to(sd)
        kc = kf.cumsum(1)
        zsum = kc[:, -1:]                                     # [B, 1, H, K]
        if h0[1] is not None:
            kc = kc + h0[1].to(sd)
            zsum = zsum + h0[1].to(sd)
        denom = (x["q"].to(sd) * s * kc).sum(-1, keepdim=True) + 1e-10
        return (o.to(sd) / denom).to(v.dtype), (ht, zsum)

    def summarize(x):
        return _la_summary(x) + (x["k"].to(sd).sum(1, keepdim=True),)

    o, (ht, z) = context_parallel("chunk_linear_attn", process_group, {**inputs, "z0": z0},
                                  local=local, decays=lambda x: (None, None),
                                  h0_keys=("h0", "z0"), summarize=summarize)
    return o, ((ht, z) if output_final_state else None)
