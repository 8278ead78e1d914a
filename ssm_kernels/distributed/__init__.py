"""Context parallelism over torch.distributed: one sequence split across the ranks of a group.

Every recurrent op here is linear in its state, so a segment's effect on the state is an affine
map ``H -> A * H + b``: ``A`` is the segment's total decay (the product of its per-step decays,
state-shaped or broadcastable to it) and ``b`` its end state when started from zero. A sequence
split into contiguous segments over the ranks of a group therefore needs no ring of keys and
values, only one exchange of those two small tensors each way (O(batch x state) bytes, independent
of length).

Forward, on every rank (`_CPFunction`):
1. summary: ranks after the first compute their segment's end state from zero (the op itself, or a
   cheaper state-only form: one matmul for linear attention) and its decay product ``A_r``;
   the first rank runs the op from the user's initial state and uses its final state.
2. exchange: one ``all_gather`` of ``(A_r, b_r)``; every rank composes the maps of the ranks before
   it in float32 (float64 for float64 inputs): ``H_r = A_r H_{r-1} + b_r`` gives its true initial
   state ``H_{r-1}`` and the global final state ``H_{R-1}``, returned on every rank.
3. correction: ranks after the first rerun their segment with the true initial state (the public
   op with ``initial_state=``). Exact, the same kernel and numerics as the single-device call on that
   segment, any backend. (A closed-form correction, ``h_t += (prod_{s<=t} a_s) h_in`` or
   ``o_t += scale (q_t * exp(G_t)) S_in``, rounds the outputs twice in low precision and needs a
   kernel of its own to beat a rerun; it is the next step if the rerun shows in the profile.)
   The rerun runs inside a private autograd graph kept for the backward.

Backward, the same right to left:
1. adjoint summary: the gradient reaching this rank's initial state through its own outputs,
   ``mu_r`` (linear attention: one matmul ``sum_t scale (q_t e^{G_t})^T do_t``; other ops: a
   backward of the private graph with a zero final-state gradient);
2. exchange: one ``all_gather`` of ``(mu_r, dL/dFinal_r)``; then ``lambda_{R-1} = sum_r
   dL/dFinal_r`` (every rank returns the final state; their gradients add) and ``lambda_{r-1} =
   mu_r + conj(A_r) lambda_r`` give ``lambda_r = dL/dH_r``;
3. one backward of the private graph with ``(dL/dout, lambda_r)``: every input gradient is rounded
   once, as in the single-device call, and the first rank's gives the initial state's gradient.

Cost per rank after the first: two local forwards (the summary one cheaper for linear attention),
two local backwards (one plus a matmul for linear attention); the first rank: one of each. One
``all_gather`` of O(batch x state) each way per call.

Contract (`process_group=` on the public ops):
- the time axis of every time-indexed input is this rank's contiguous segment of one global
  sequence, ranks in group order (``linear_scan(reverse=True)``: the scan starts on the last rank);
  segments may differ in length (>= 1); every other dimension must agree across ranks;
- ``initial_state`` is read on the rank where the scan starts (rank 0; the last rank with
  ``reverse=True``) and ignored elsewhere; its gradient goes to that rank;
- outputs are this rank's segment of the outputs; final states are the global final state on
  every rank (differentiable on every rank);
- every rank makes the same calls in the same order, with the same arguments apart from the
  segments and the same ``requires_grad``, and runs backward through them (the backward exchange
  is collective). A weight shared over time (selective scan's A, D, delta_bias, time-invariant B/C;
  g_gamma) gets this rank's share of its gradient: all-reduce it (DDP/FSDP over the group do that);
- packed variable-length batches (``cu_seqlens``) are refused; eager only (no torch.compile).

Adding an op: name its tensors, write its local call (the public op with ``initial_state=``) and its
decay product, and hand them to `context_parallel` (`cp_linear_scan` is the smallest example).

This module is imported only when a ``process_group`` is given.
"""
from __future__ import annotations

from .core import context_parallel
from .ops import (cp_chunk_gla, cp_chunk_linear_attn, cp_chunk_simple_gla, cp_linear_scan,
                  cp_mamba_chunk_scan_combined, cp_selective_scan_fn)

__all__ = ["context_parallel", "cp_linear_scan", "cp_selective_scan_fn", "cp_chunk_linear_attn",
           "cp_chunk_simple_gla", "cp_chunk_gla", "cp_mamba_chunk_scan_combined"]
