"""Context parallelism over torch.distributed: one sequence split across the ranks of a group.

Every recurrent op here is linear in its state, so a segment's effect on the state is an affine
map ``H -> A * H + b``: ``A`` is the segment's total decay (the product of its per-step decays,
state-shaped or broadcastable to it) and ``b`` its end state when started from zero. A sequence
split into contiguous segments over the ranks of a group therefore needs no ring of keys and
values, only one exchange of those two small tensors each way (O(batch x state) bytes, independent
of length).

A group of one is the plain call, exactly: the gather is the identity, so every CP wrapper (and
`context_parallel`) calls the op without collective, autograd node or second validation.

Forward (`context_parallel`), with ``pos`` a rank's place in scan order:
- the first rank (pos 0; it holds the true initial state, zero or the user's) runs the plain op
  ONCE, under the caller's autograd, and sends its final state; it computes no decay product
  (nobody reads rank 0's) and builds no private graph: its launches are exactly the plain call's
  (pinned in tests/test_host_path.py);
- a later rank first computes its segment's summary WITHOUT outputs: the decay product ``A_r`` and
  the end state from zero ``b_r`` (a states-only pass: linear_scan's SUMMARY kernel mode, the chunk
  engine's state pass without its output stage for the linear-attention family and SSD; the op
  itself from zero for the selective scan, which has no such mode yet; for the delta rule, whose
  decay is a [K, K] transition matrix ``M`` (``H_r = M_r H_{r-1} + b_r``), one op call on
  ``[v | 0]`` from ``[0 | I]``, whose final state is ``[b_r | M_r]``);
- one ``all_gather`` of ``(A_r, b_r)`` (O(batch x state) bytes); every rank composes the maps of
  the ranks before it in float32 (float64 for float64 inputs): ``H_r = A_r H_{r-1} + b_r`` gives its
  true initial state ``H_{r-1}`` and the global final state ``H_{R-1}``, returned on every rank;
- a later rank then runs the op once from ``H_{pos-1}`` (exact: the same kernels and numerics as a
  single-device call on that segment).
An autograd node (`_CPNode`) placed after the op carries the backward exchange.

Backward, right to left, inside that node:
1. adjoint summary ``mu_r`` = dL/dh_in through this rank's outputs alone (later ranks only): a
   states-only reverse pass reading (a, dout) for linear_scan, (q, do, g) for the linear-attention
   family (the engine's `_state_grad_kernel` with STORE_DH=False), (C, dy * silu(z), dt) for SSD;
   normalized linear attention (output not linear in its key-sum state) reads the output and the
   incoming key sum: the engine pass on do / den plus ``sum_t c_t q_t``; the delta rule
   ``sum_t w_t do_t^T`` with ``w_t`` the summary call's extra output columns; the selective scan
   uses a backward of the op instead;
2. one ``all_gather`` of ``(mu_r, dL/dFinal_r)``; ``lambda_{R-1} = sum_r dL/dFinal_r`` (every rank
   returns the final state; their gradients add) and ``lambda_{r-1} = mu_r + conj(A_r) lambda_r``
   (``A_r^H lambda_r`` for a transition matrix);
3. the node hands ``lambda_pos`` to the op's local final state and autograd runs the op's own
   backward ONCE with ``(dL/dout, lambda_pos)``: every input gradient is rounded once, as in the
   single-device call, deterministic, and the first rank's gives the initial state's gradient.

Cost per call: first rank = the plain call + one all_gather each way (+ a state-sized copy each
way to pack it). Later ranks = plain + one states-only forward pass (reads the inputs that build
the state once, writes O(state)) + one states-only backward pass (reads q/C/a and dout once);
the selective scan's later ranks pay a second forward and a second backward.

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

Adding an op: name its tensors, write its local call (the public op with ``initial_state=``), its
states-only summary (decay product, end state from zero), the decay product's shape and, where one
exists, its adjoint summary, and hand them to `context_parallel` (see `cp_chunk_gla`).

Benchmarks: ``core._SIMULATE_LATER`` makes a group of one play a later rank, ``core._FORCE_EXCHANGE``
the first rank of a real group (the plain call plus the exchange each way) (bench/gpu_cp.py).

This module is imported only when a ``process_group`` is given.
"""
from __future__ import annotations

from .core import context_parallel
from .ops import (cp_chunk_delta_rule, cp_chunk_gated_delta_rule, cp_chunk_gla,
                  cp_chunk_linear_attn, cp_chunk_simple_gla, cp_linear_scan,
                  cp_mamba_chunk_scan_combined, cp_selective_scan_fn)

__all__ = ["context_parallel", "cp_linear_scan", "cp_selective_scan_fn", "cp_chunk_linear_attn",
           "cp_chunk_simple_gla", "cp_chunk_gla", "cp_mamba_chunk_scan_combined",
           "cp_chunk_delta_rule", "cp_chunk_gated_delta_rule"]
