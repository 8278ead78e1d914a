"""The op-independent part of context parallelism: the exchange, its autograd, the recipe
(`context_parallel`). See the package docstring for the algorithm and the contract."""
from __future__ import annotations

from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.distributed as dist
from torch import Tensor

from ..validation import checks_values

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
    """One collective into one flat buffer (all_gather_single; all_gather_into_tensor before
    torch 2.13), split into the ranks' parts."""
    world = dist.get_world_size(group)
    out = buf.new_empty((world * buf.numel(),))
    gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    gather(out, buf.contiguous().view(-1), group=group)
    return list(out.view(world, -1).unbind(0))


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
        # the private graph only when a backward can come (inference builds and keeps nothing)
        grad = torch.enable_grad if spec.need_grad else torch.no_grad
        leaves = {k: None if t is None else t.detach().requires_grad_(t.requires_grad)
                  for k, t in x.items()} if spec.need_grad else x
        h_leaves = None
        if first:
            with grad():
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
            h_leaves = [h.to(f.dtype).requires_grad_(spec.need_grad) for h, f in zip(h_in, b)]
            with grad():
                out, fin_loc = spec.local(leaves, tuple(h_leaves))
        ctx.spec, ctx.first, ctx.As = spec, first, As
        ctx.graph = (out, tuple(fin_loc), leaves, h_leaves) if spec.need_grad else None
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
    need_grad = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in inputs.values())
    spec = _Spec(op=op, group=group, pos=pos, world=world, reverse=bool(reverse), keys=keys,
                 local=local, decays=decays, h0_keys=tuple(h0_keys), n=len(h0_keys),
                 summarize=summarize, adjoint=adjoint, force=_FORCE_CORRECTION,
                 need_grad=need_grad)
    res = _CPFunction.apply(spec, *(inputs[k] for k in keys))
    return res[0], tuple(res[1:])
