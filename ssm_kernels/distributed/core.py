"""The op-independent part of context parallelism: the exchange, its autograd node, the recipe
(`context_parallel`). See the package docstring for the algorithm and the contract."""
from __future__ import annotations

from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.distributed as dist
from torch import Tensor

from ..validation import checks_values

# Benchmarks only: make a group of one behave like a later rank whose preceding ranks ended in the
# given states (one tensor per state, or None: off). The rank then runs the later-rank path (summary
# from zero, exchange, output pass from these states; backward: adjoint, exchange, one backward) and
# its results equal the plain call with initial_state = these states.
_SIMULATE_LATER: Optional[Sequence[Tensor]] = None

# Benchmarks and tests only: make a group of one run the first rank's full path (the plain call plus
# the exchange each way) instead of the group-of-one shortcut, to time what the first rank of a real
# group pays.
_FORCE_EXCHANGE = False


# ---- group helpers ----------------------------------------------------------------------------

def _check_group(op: str, group, cu_seqlens=None) -> None:
    if not isinstance(group, dist.ProcessGroup):
        raise TypeError(f"{op}: process_group must be a torch.distributed.ProcessGroup, got "
                        f"{type(group).__name__}")
    if cu_seqlens is not None:
        raise ValueError(f"{op}: cu_seqlens (packed variable-length batches) cannot be combined with "
                         f"process_group (context parallelism); split packed sequences per rank "
                         f"or pass one sequence per batch row")


def _solo(group) -> bool:
    """A group of one (and no benchmark switch): the gather is the identity, the incoming state is
    the user's and the final state is the local one, so every op runs its plain call, exactly (no
    collective, no autograd node, no second validation)."""
    return _SIMULATE_LATER is None and not _FORCE_EXCHANGE and dist.get_world_size(group) == 1


def _position(group, reverse: bool) -> Tuple[int, int]:
    """(this rank's place in scan order, group size)."""
    rank, world = dist.get_rank(group), dist.get_world_size(group)
    return (world - 1 - rank if reverse else rank), world


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    if dtype in (torch.float64, torch.complex128):
        return dtype
    return torch.complex64 if dtype.is_complex else torch.float32


def _real(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype in (torch.float64, torch.complex128) else torch.float32


class _Layout:
    """Where each tensor of one exchange sits in a flat real buffer (complex as (re, im) pairs).
    Every rank builds the same layout from shapes alone, so a rank that has no value for a slot
    (the first rank's decay products, which nobody reads) leaves it unwritten."""

    def __init__(self, shapes: Sequence[torch.Size], dtypes: Sequence[torch.dtype]):
        self.shapes, self.dtypes = list(shapes), list(dtypes)
        self.real = _real(dtypes[0])
        self.offsets, off = [], 0
        for s, d in zip(shapes, dtypes):
            n = s.numel() * (2 if d.is_complex else 1)
            self.offsets.append((off, n))
            off += n
        self.total = off

    def pack(self, like: Tensor, tensors: Sequence[Optional[Tensor]]) -> Tensor:
        buf = like.new_empty((self.total,), dtype=self.real)
        for (off, n), shape, dtype, t in zip(self.offsets, self.shapes, self.dtypes, tensors):
            if t is None:
                continue
            dst = buf[off:off + n]
            if dtype.is_complex:
                torch.view_as_complex(dst.view(*shape, 2)).copy_(t)
            else:
                dst.view(shape).copy_(t)
        return buf

    def unpack(self, part: Tensor) -> List[Tensor]:
        out = []
        for (off, n), shape, dtype in zip(self.offsets, self.shapes, self.dtypes):
            piece = part[off:off + n]
            out.append(torch.view_as_complex(piece.view(*shape, 2)) if dtype.is_complex
                       else piece.view(shape))
        return out


def _all_gather(group, buf: Tensor) -> Tensor:
    """One collective into one flat buffer (all_gather_single; all_gather_into_tensor before
    torch 2.13): returns [world, numel]."""
    world = dist.get_world_size(group)
    out = buf.new_empty((world * buf.numel(),))
    gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    gather(out, buf, group=group)
    return out.view(world, -1)


# ---- the exchange ------------------------------------------------------------------------------

def _decay(spec, A, H, adjoint=False):
    """A segment's decay applied to a state: elementwise ``A * H`` (broadcast), or with
    ``spec.matrix`` a transition matrix on the state's second-to-last axis, ``A @ H`` (the delta
    rule: A [..., K, K], H [..., K, V]); adjoint: ``conj(A) * H`` / ``A^H @ H``."""
    if spec.matrix:
        return (A.mT.conj() if adjoint else A) @ H
    return (A.conj() if adjoint else A) * H


def _exchange_forward(spec, A_loc, b_loc):
    """A_loc: per state, this segment's decay product (broadcastable to the state; None on the
    first rank, which sends none because nobody reads it); b_loc: per state, the end state from
    zero (from the initial state on the first rank). One all_gather.
    Returns (h_in per state (None on the first rank), global final per state, every rank's
    decay products per state in scan order), composed in float32 (float64 for float64 states)."""
    n, A_shapes = spec.n, spec.A_shapes
    shapes = [s for s in A_shapes if s is not None] + [b.shape for b in b_loc]
    cds = [_compute_dtype(b.dtype) for b in b_loc]
    dtypes = [c for s, c in zip(A_shapes, cds) if s is not None] + cds
    lay = _Layout(shapes, dtypes)
    A_send = [None] * (len(shapes) - n) if A_loc is None else \
        [A for A, s in zip(A_loc, A_shapes) if s is not None]
    gathered = _all_gather(spec.group, lay.pack(b_loc[0], A_send + list(b_loc)))
    parts = [lay.unpack(gathered[r]) for r in range(gathered.shape[0])]
    if spec.reverse:
        parts = parts[::-1]  # scan order
    n_A = len(shapes) - n
    pos, world, sim = spec.pos, spec.world, spec.sim
    h_in, finals, As = [], [], []
    j = 0
    for i in range(n):
        if A_shapes[i] is None:
            Ai = [None] * world
        else:
            Ai = [p[j] for p in parts]
            j += 1
        bi = [p[n_A + i] for p in parts]
        # H_r = A_r H_{r-1} + b_r; the first rank's b already holds its initial state
        H = None if sim is None else sim[i].to(cds[i])
        for r in range(world):
            if r == pos:
                h_in.append(H)
            H = bi[r] if H is None else (bi[r] + (H if Ai[r] is None else _decay(spec, Ai[r], H)))
        finals.append(H)
        As.append(Ai)
    return h_in, finals, As


def _exchange_backward(spec, As, mu, d_final):
    """The same exchange right to left. mu: per state, dL/dh_in of this rank through its own
    outputs (None on the first rank: nobody reads it); d_final: per state, the gradient of this
    rank's copy of the global final state. Returns lambda_pos = dL/dH_pos per state:
    lambda_{R-1} = sum over ranks of d_final, lambda_{r-1} = mu_r + conj(A_r) lambda_r."""
    n = spec.n
    cds = [_compute_dtype(d.dtype) for d in d_final]
    lay = _Layout(spec.state_shapes * 2, cds * 2)
    send = ([None] * n if mu is None else list(mu)) + list(d_final)
    gathered = _all_gather(spec.group, lay.pack(d_final[0], send))
    parts = [lay.unpack(gathered[r]) for r in range(gathered.shape[0])]
    if spec.reverse:
        parts = parts[::-1]
    lams = []
    for i in range(n):
        lam = parts[0][n + i]
        for p in parts[1:]:
            lam = lam + p[n + i]
        for r in range(spec.world - 1, spec.pos, -1):
            A = As[i][r]
            lam = parts[r][i] + (lam if A is None else _decay(spec, A, lam, adjoint=True))
        lams.append(lam)
    return lams


class _Spec:
    """What `_CPNode` needs besides tensors (closures, group, position, saved inputs)."""

    matrix = False   # decays are transition matrices (`_decay`)

    def __init__(self, **kw):
        self.__dict__.update(kw)


class _CPNode(torch.autograd.Function):
    """The backward exchange, placed after this rank's single local op call: its inputs are the
    op's output and its local final states, its outputs the output (an alias) and the global
    final states. Backward: this rank's adjoint summary mu (later ranks), one all_gather, then
    the local final states receive lambda = dL/dH_pos and autograd runs the op's own backward
    once, with (dL/dout, lambda): every gradient is rounded once, as in the single-device call."""

    @staticmethod
    def forward(ctx, spec, out, *fin_loc):
        ctx.spec = spec
        ctx.set_materialize_grads(True)
        return (out.detach(), *spec.finals)

    @staticmethod
    def backward(ctx, dout, *d_final):
        spec = ctx.spec
        mu = None
        if not spec.first:
            if spec.adjoint is not None:
                with torch.no_grad():
                    mu = spec.adjoint(spec.x, dout)
            else:   # generic: dL/dh_in through the outputs, a reentrant backward of the op
                got = torch.autograd.grad(spec.out, spec.h_leaves, dout, retain_graph=True,
                                          allow_unused=True)
                mu = [torch.zeros_like(h) if g is None else g for g, h in zip(got, spec.h_leaves)]
        lams = _exchange_backward(spec, spec.As, mu, d_final)
        spec.x = spec.out = spec.h_leaves = None
        return (None, dout, *(lam.to(dt) for lam, dt in zip(lams, spec.fin_dtypes)))


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
                     summary: Callable, decay_shapes: Sequence[Optional[torch.Size]],
                     h0_keys: Sequence[str], reverse: bool = False,
                     adjoint: Optional[Callable] = None, adjoint_reads_out: bool = False,
                     matrix_decay: bool = False):
    """Run one op over a sequence split across `group` (the recipe every CP op follows).

    inputs: every tensor the op reads (None for absent ones), by name; gradients flow to these.
    local(x, h0s) -> (out, finals): the op on this segment from initial states h0s (a tuple, None
        entries meaning zeros); finals a tuple of the end states (float32/64, complex64/128),
        differentiable. Called exactly once per rank, under the caller's autograd.
    summary(x) -> (decays, ends): per state, the segment's decay product (broadcastable to the
        state, shape `decay_shapes[i]`; None where that is None, i.e. no decay) and its end state
        from zero, without outputs (a states-only pass). Later ranks only, no gradient.
    decay_shapes: per state, the shape of the decay product (None: no decay); every rank knows
        it from shapes alone, so the first rank computes no decay product.
    h0_keys: the names in `inputs` of the user's initial states, one per state (the first rank in
        scan order reads them; a missing name means zeros).
    adjoint(x, dout) -> per state, dL/dh0 through `out` alone (linear in dout), without a full
        backward (later ranks). None: a reentrant backward of the op's output computes it. With
        adjoint_reads_out, x also holds "_out" (this rank's output, detached) and "_h_in" (the
        incoming states, a tuple): for ops whose output is not linear in the state (normalized
        linear attention; the adjoint is then linear in dout at the forward's point).
    matrix_decay: the decay products are transition matrices acting on the state's second-to-last
        axis, ``H_r = A_r @ H_{r-1} + b_r`` (backward ``lambda_{r-1} = mu_r + A_r^H @ lambda_r``):
        the delta rule, whose summary is the [K, K] product of its (gated) I - beta k k^T factors.
    Returns (out, global finals tuple).
    """
    if _solo(group):
        out, fin = local(inputs, tuple(inputs.get(k) for k in h0_keys))
        return out, tuple(fin)
    pos, world = _position(group, reverse)
    sim = _SIMULATE_LATER
    first = pos == 0 and sim is None
    need_grad = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in inputs.values())
    spec = _Spec(op=op, group=group, pos=pos, world=world, reverse=bool(reverse), n=len(h0_keys),
                 A_shapes=list(decay_shapes), first=first, sim=sim, adjoint=adjoint,
                 matrix=bool(matrix_decay))
    h_leaves = None
    if first:
        out, fin = local(inputs, tuple(inputs.get(k) for k in h0_keys))
        b = [f.detach() for f in fin]
        A = None
    else:
        with torch.no_grad():
            A, b = summary({k: None if t is None else t.detach() for k, t in inputs.items()})
        got = [None if a is None else tuple(a.shape) for a in A]
        if got != [None if s is None else tuple(s) for s in decay_shapes]:
            raise RuntimeError(f"{op}: internal: decay product shapes {got} != declared "
                               f"{list(decay_shapes)}")
    spec.state_shapes = [f.shape for f in b]
    if checks_values(b[0]):
        sig = tuple(d for s in spec.state_shapes + [s for s in decay_shapes if s is not None]
                    for d in (len(s), *s))
        _check_shapes(group, op, sig, b[0].device)
    h_in, finals, As = _exchange_forward(spec, A, b)
    if not first:
        # with an adjoint the incoming states are constants here (their gradient travels through
        # the exchange); without one, leaves for the reentrant backward
        generic = need_grad and adjoint is None
        h_leaves = [h.to(f.dtype).requires_grad_(generic) for h, f in zip(h_in, b)]
        out, fin = local(inputs, tuple(h_leaves))
        if not generic:
            h_leaves = None
    finals = [H.to(f.dtype) for H, f in zip(finals, b)]
    if not need_grad:
        return out, tuple(finals)
    spec.finals, spec.As = finals, As
    spec.fin_dtypes = [f.dtype for f in fin]
    spec.x = {k: None if t is None else t.detach() for k, t in inputs.items()} \
        if adjoint is not None else None
    if adjoint is not None and adjoint_reads_out:
        spec.x["_out"], spec.x["_h_in"] = out.detach(), tuple(h_in)
    spec.out, spec.h_leaves = (out, h_leaves) if h_leaves is not None else (None, None)
    res = _CPNode.apply(spec, out, *fin)
    return res[0], tuple(res[1:])
