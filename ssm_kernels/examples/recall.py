"""Multi-query associative recall (MQAR, Zoology / Based): what each sequence mixer buys per byte
of recurrent state.

Each sequence holds ``pairs`` key-value pairs, then queries of those keys scattered over the rest;
at every query the model must output the key's value. Small two-layer models, one per mixer
(softmax attention via SDPA, Mamba, Mamba-2, GLA, Based, Gated DeltaNet, Hyena, MinGRU, RG-LRU)
at a few model widths, are trained for a fixed number of steps on data generated on the fly; the
script prints accuracy vs the bytes of state a mixer carries while decoding (attention's KV cache
and Hyena's history grow with the sequence) and writes a plot if matplotlib is installed.

    python -m ssm_kernels.examples.recall                 # default size: a few minutes on one GPU
    python -m ssm_kernels.examples.recall --tiny          # CPU smoke run in seconds (CI)
    python -m ssm_kernels.examples.recall --mixers mamba gla --dims 64 128 --steps 2000
    python -m ssm_kernels.examples.recall --pairs 16 --seq-len 128 --steps 3000  # harder, longer
    python -m ssm_kernels.examples.recall --no-graph      # eager steps (the plain PyTorch loop)

At these sizes a step is a few hundred tiny kernels: from Python it costs 10-20 ms of host time.
On CUDA the whole step (forward, backward, gradient clipping, AdamW, the one-cycle schedule) is
captured once per model in a CUDA graph and replayed (`FlatAdamW`: every parameter in one flat
buffer, the schedule a device table), the same computation as the eager loop on the same data;
a model whose capture fails is trained again with eager steps (printed). Every model's Triton
kernels are compiled ahead, at once, in a thread pool (`--no-ahead` to skip).

MQAR is a phase-transition task: the loss sits at ln(values) (chance), then at ln(pairs) (the
model copies *some* value of the context), and only then drops to ~0 once a previous-token +
match circuit forms. How soon depends on the vocabulary (smaller learns far sooner), the batch,
the number of pairs (more: a longer plateau), the number of steps at a high learning rate (the
one-cycle schedule anneals: a short run ends on the plateau) and, for attention, on positions
(rotary here); the defaults are sized so the transition comes early. Measurements:
bench/NOTES.md "recall example".

Mamba (Mamba-1) leaves the ln(pairs) plateau late: on the CPU at a size where GLA reaches 0.997
and Mamba-2 0.63 in 400 steps, Mamba-1 sits at 0.23-0.34 after 400 steps (every learning rate,
initialisation, d_state, dt rank and depth tried) and 0.375 after 1200, then reaches 0.990 in a
3000-step run (the transition at step ~700-900, still at the peak lr) -- its layer agrees with mamba-ssm's `Mamba`
(`tests/test_nn.py::test_mamba_is_the_definition`); bench/NOTES.md "mamba10". So it trains for
`STEPS_SCALE` times --steps (``--steps-scale`` with no values: equal steps for all mixers).
`bench/gpu_mamba_recall.py` measures its knobs at the default size.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import csv
import os
import sys
import time
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

import ssm_kernels
import ssm_kernels.nn as snn
from ssm_kernels.examples.graph_step import (  # noqa: F401  (names of this example too)
    CaptureError, FlatAdamW, capture_cuda, onecycle_table)

MIXERS = ("attention", "mamba", "mamba2", "gla", "based", "gated_deltanet", "hyena", "mingru",
          "rglru")


# ---- data -------------------------------------------------------------------------------------

def mqar_batch(batch: int, seq_len: int, pairs: int, vocab: int, device, generator=None):
    """tokens [B, L] and labels [B, L] (-100 except at query positions, where the label is the
    value bound to the queried key). Keys come from the lower half of the vocabulary (token 0 is
    padding), values from the upper half; queries sit on even slots after the pairs."""
    if seq_len < 4 * pairs:
        raise ValueError(f"seq_len must be >= 4 * pairs, got {seq_len} < {4 * pairs}")
    half = vocab // 2
    g = dict(generator=generator, device=device)
    keys = torch.rand(batch, half - 1, **g).argsort(-1)[:, :pairs] + 1          # distinct keys
    values = torch.randint(half, vocab, (batch, pairs), **g)
    tokens = torch.zeros(batch, seq_len, dtype=torch.long, device=device)
    tokens[:, 0:2 * pairs:2], tokens[:, 1:2 * pairs:2] = keys, values
    slots = (seq_len - 2 * pairs) // 2
    pos = 2 * pairs + 2 * torch.rand(batch, slots, **g).argsort(-1)[:, :pairs]   # query positions
    which = torch.rand(batch, pairs, **g).argsort(-1)                           # which key asked
    rows = torch.arange(batch, device=device)[:, None]
    tokens[rows, pos] = keys.gather(1, which)
    labels = torch.full_like(tokens, -100)
    labels[rows, pos] = values.gather(1, which)
    return tokens, labels


# ---- mixers -----------------------------------------------------------------------------------

def rotary(x, base: float = 10000.0):
    """Rotary position embedding (RoFormer, as in Zoology's attention) on ``[B, H, T, hd]``:
    rotates channel pairs ``(i, i + hd/2)`` by ``t * base^(-2i/hd)``."""
    T, hd = x.shape[-2], x.shape[-1]
    inv = base ** (-torch.arange(0, hd, 2, device=x.device, dtype=torch.float32) / hd)
    ang = torch.arange(T, device=x.device, dtype=torch.float32)[:, None] * inv
    cos, sin = ang.cos().to(x.dtype), ang.sin().to(x.dtype)
    x1, x2 = x[..., : hd // 2], x[..., hd // 2:]
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)


class Attention(nn.Module):
    """Causal softmax attention (SDPA) with rotary positions (as Zoology's attention). Without
    positions a layer has no direct previous-token head (it can only infer position from causal
    averaging), which MQAR needs to bind each value to its key: it learns the task far later
    (NOTES: 0.60 vs 1.00 at the same step)."""

    def __init__(self, d: int, heads: int, rope: bool = True):
        super().__init__()
        self.heads, self.rope = heads, rope
        self.qkv = nn.Linear(d, 3 * d, bias=False)
        self.out = nn.Linear(d, d, bias=False)

    def forward(self, x):
        B, T, d = x.shape
        q, k, v = self.qkv(x).view(B, T, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        if self.rope:
            q, k = rotary(q), rotary(k)
        o = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.out(o.transpose(1, 2).reshape(B, T, d))


class Based(nn.Module):
    """Based linear attention (Taylor feature map of dimension ``feature_dim``) on
    `ssm_kernels.chunk_based`, with a short convolution on the input (as in the Based model)."""

    def __init__(self, d: int, heads: int, feature_dim: int = 16, backend=None):
        super().__init__()
        self.h, self.f, self.backend = heads, feature_dim, backend
        self.conv = snn.ShortConvolution(d, 4, activation="silu", backend=backend)
        self.q_proj = nn.Linear(d, heads * feature_dim, bias=False)
        self.k_proj = nn.Linear(d, heads * feature_dim, bias=False)
        self.v_proj = nn.Linear(d, d, bias=False)
        self.o_proj = nn.Linear(d, d, bias=False)

    def forward(self, x):
        B, T, d = x.shape
        x = self.conv(x)
        q = self.q_proj(x).view(B, T, self.h, self.f)
        k = self.k_proj(x).view(B, T, self.h, self.f)
        v = self.v_proj(x).view(B, T, self.h, d // self.h)
        o, _ = ssm_kernels.chunk_based(q, k, v, backend=self.backend)
        return self.o_proj(o.reshape(B, T, d))


def make_mixer(name: str, d: int, seq_len: int, backend):
    """(module, recurrent state bytes per sequence while decoding at the full length)."""
    f32 = 4
    heads = max(1, d // 32)
    if name == "attention":
        return Attention(d, heads), 2 * seq_len * d * f32           # the KV cache
    if name == "mamba":
        m = snn.Mamba(d, d_state=16, d_conv=4, expand=2, backend=backend)
        return m, m.d_inner * (16 + 3) * f32
    if name == "mamba2":
        m = snn.Mamba2(d, d_state=64, d_conv=4, expand=2, headdim=min(32, 2 * d), backend=backend)
        return m, (m.nheads * m.headdim * m.d_state + m.conv_dim * 3) * f32
    if name == "gla":
        m = snn.GatedLinearAttention(hidden_size=d, num_heads=heads, expand_k=0.5, expand_v=1.0,
                                     use_short_conv=True, backend=backend)
        return m, heads * m.head_k_dim * m.head_v_dim * f32 + 3 * (d + d // 2) * f32
    if name == "based":
        m = Based(d, heads, 16, backend)
        return m, heads * (1 + 16 + 256) * (d // heads + 1) * f32 + 3 * d * f32
    if name == "gated_deltanet":
        m = snn.GatedDeltaNet(hidden_size=d, expand_v=1, head_dim=d // heads, num_heads=heads,
                              use_short_conv=True, backend=backend)
        return m, (m.num_v_heads * m.head_k_dim * m.head_v_dim
                   + 3 * (2 * m.key_dim + m.value_dim)) * f32
    if name == "hyena":
        m = snn.HyenaOperator(d, l_max=seq_len, order=2, filter_order=64, backend=backend)
        return m, d * seq_len * f32 + 3 * 2 * d * f32               # the input history
    if name == "mingru":
        m = snn.MinGRU(d, expansion_factor=2.0, backend=backend)
        return m, m.dim_inner * f32
    if name == "rglru":
        m = snn.RGLRU(d, d_rnn=2 * d, num_heads=max(1, d // 64), backend=backend)
        return m, m.d_rnn * (1 + 3) * f32
    raise ValueError(f"unknown mixer {name!r}; known: {', '.join(MIXERS)}")


class Model(nn.Module):
    def __init__(self, mixer: str, vocab: int, d: int, seq_len: int, layers: int, backend):
        super().__init__()
        self.embed = nn.Embedding(vocab, d)
        self.mixers = nn.ModuleList()
        self.mlps = nn.ModuleList()
        self.norms = nn.ModuleList()
        self.state_bytes = 0
        for _ in range(layers):
            m, sb = make_mixer(mixer, d, seq_len, backend)
            self.mixers.append(m)
            self.state_bytes += sb
            self.mlps.append(nn.Sequential(nn.Linear(d, 2 * d), nn.GELU(), nn.Linear(2 * d, d)))
            self.norms.append(nn.ModuleList([nn.LayerNorm(d), nn.LayerNorm(d)]))
        self.norm = nn.LayerNorm(d)
        self.head = nn.Linear(d, vocab, bias=False)

    def forward(self, tokens):
        x = self.embed(tokens)
        for mix, mlp, (n1, n2) in zip(self.mixers, self.mlps, self.norms):
            x = x + mix(n1(x))
            x = x + mlp(n2(x))
        return self.head(self.norm(x))


# ---- training ----------------------------------------------------------------------------------

NO_DECAY = ("A_log", "D", "dt_bias", "a_param")


def param_groups(model: nn.Module, weight_decay: float) -> list:
    """Weight decay on the matrices of the mixers and MLPs only: not on the embedding and output
    head (each row belongs to one token; decay shrinks the rows of tokens a batch lacks), norms,
    biases, or the recurrences' decay parameters (``A_log``, ``D``, ``dt_bias``, RG-LRU's
    ``a_param``; mamba-ssm also exempts ``A_log`` and ``D``)."""
    special = {id(model.embed.weight), id(model.head.weight)}
    decay, rest = [], []
    for name, p in model.named_parameters():
        skip = p.ndim < 2 or id(p) in special or name.rsplit(".", 1)[-1] in NO_DECAY
        (rest if skip else decay).append(p)
    return [dict(params=decay, weight_decay=weight_decay), dict(params=rest, weight_decay=0.0)]


def _loss(model, tokens, labels, amp: bool, device):
    # cache_enabled=False: autocast's cache of casted weights must not outlive a graph capture
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp, cache_enabled=False):
        logits = model(tokens)
    loss = F.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), ignore_index=-100)
    return loss, logits


CAPTURE = capture_cuda   # (step, opt) -> (replay, outputs); tests put a CPU stand-in here


def _flat_steps(model, args, device, amp, gen, graph: bool):
    """Yields (step, loss, logits, labels) for the FlatAdamW training loop: every step eager
    (``graph=False``), or ``WARMUP`` eager steps (on a side stream on CUDA), then the whole step --
    forward, backward, clipping, optimizer, schedule -- captured once (`CAPTURE`) and replayed,
    each replay fed by copying a fresh batch into the graph's static input buffers."""
    try:
        opt = FlatAdamW(param_groups(model, args.weight_decay),
                        onecycle_table(args.lr, args.steps), args.weight_decay)
    except TypeError as e:
        raise CaptureError(str(e)) if graph else e
    tokens_s = torch.zeros(args.batch, args.seq_len, dtype=torch.long, device=device)
    labels_s = torch.zeros_like(tokens_s)

    def feed():
        tokens, labels = mqar_batch(args.batch, args.seq_len, args.pairs, args.vocab, device, gen)
        tokens_s.copy_(tokens)
        labels_s.copy_(labels)

    def step():
        opt.zero_grad()
        loss, logits = _loss(model, tokens_s, labels_s, amp, device)
        loss.backward()
        opt.step()
        return loss, logits

    warm = args.steps if not graph else min(WARMUP, args.steps)
    side = None
    if graph and device.type == "cuda":  # warm-up on a side stream (torch.cuda.graphs' recipe),
        side = torch.cuda.Stream(device)  # after the model and the buffers made on this one
        side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side) if side is not None else contextlib.nullcontext():
        for s in range(1, warm + 1):
            feed()
            try:
                loss, logits = step()
            except Exception as e:  # eager steps from scratch then show whether it is the graph's
                if not graph:
                    raise
                raise CaptureError(f"warm-up step {s}: {type(e).__name__}: {e}") from e
            yield s, loss, logits, labels_s
    if side is not None:
        torch.cuda.current_stream(device).wait_stream(side)
    if warm == args.steps:
        return
    replay, (loss, logits) = CAPTURE(step, opt)
    for s in range(warm + 1, args.steps + 1):
        feed()
        replay()
        yield s, loss, logits, labels_s


def _eager_steps(model, args, device, amp, gen):
    """Yields (step, loss, logits, labels): torch.optim.AdamW + OneCycleLR + clip_grad_norm_, every
    step from Python (the reference loop; CPU default, ``--step eager``)."""
    opt = torch.optim.AdamW(param_groups(model, args.weight_decay), lr=args.lr)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, args.lr, total_steps=args.steps,
                                                pct_start=0.1)
    for s in range(1, args.steps + 1):
        tokens, labels = mqar_batch(args.batch, args.seq_len, args.pairs, args.vocab, device, gen)
        loss, logits = _loss(model, tokens, labels, amp, device)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        yield s, loss, logits, labels


def first_steps(model, tokens, labels, device) -> None:
    """What a model launches first: a training step's forward and backward, and the evaluation's
    forward without gradients (the ops' inference paths can take other kernels)."""
    loss, _ = _loss(model, tokens, labels, True, device)
    loss.backward()
    with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16):
        model(tokens)


def compile_all_ahead(args, device, backend) -> None:
    """CUDA: one dry run of every (mixer, width) model's `first_steps` inside one
    `compiling_ahead` block, so all their Triton kernels compile at once in a thread pool (one
    compile per distinct kernel, overlapped) instead of one after another in each mixer's first
    step. Best effort: a dry run that fails stops there and the real step compiles the rest."""
    if device.type != "cuda" or args.no_ahead:
        return
    from ssm_kernels._config import triton_interpret
    from ssm_kernels._warmup import compiling_ahead
    if triton_interpret():
        return
    t0 = time.time()
    gen = torch.Generator(device=device).manual_seed(args.seed + 2)
    tokens, labels = mqar_batch(args.batch, args.seq_len, args.pairs, args.vocab, device, gen)
    failed = []
    with compiling_ahead(min(16, os.cpu_count() or 1)) as info:
        for mixer in args.mixers:
            for d in args.dims:
                try:
                    model = Model(mixer, args.vocab, d, args.seq_len, args.layers, backend)
                    first_steps(model.to(device), tokens, labels, device)
                except Exception as e:  # the real step compiles what the dry run did not reach
                    failed.append(f"{mixer} d={d}: {type(e).__name__}: {str(e)[:120]}")
    torch.cuda.synchronize(device)
    print(f"compiled ahead: {info['kernels']} Triton kernels in {time.time() - t0:.1f}s"
          + (f", {info['errors']} failed" if info["errors"] else "")
          + "".join(f"\n  dry run stopped: {f}" for f in failed), flush=True)


WARMUP = 3   # eager steps before the capture (Triton compiles, plans memoised, allocator settled)


def step_mode(args, device) -> str:
    if args.step != "auto":
        return args.step
    return "graph" if device.type == "cuda" else "eager"


# Mixers that get more steps than --steps (the same one-cycle schedule, stretched): Mamba-1 leaves
# the ln(pairs) plateau only after ~700-900 steps at the peak lr where GLA / attention need
# 200-300 (CPU, NOTES "mamba10": 0.375 after 1200 steps, 0.990 after 3000). ``--steps-scale`` sets it.
STEPS_SCALE = {"mamba": 3.0}


def mixer_steps(mixer: str, args) -> int:
    """Training steps of ``mixer``: ``--steps`` times its ``--steps-scale`` factor (default 1)."""
    return max(1, round(args.steps * args.steps_scale.get(mixer, 1.0)))


def train_one(mixer: str, d: int, args, device, backend) -> dict:
    """Trains one (mixer, width) model for `mixer_steps` steps; in ``graph`` mode a failed
    capture is printed and the model is trained again from scratch with eager steps (the same
    result as ``--step eager`` up to rounding)."""
    steps = mixer_steps(mixer, args)
    if steps != args.steps:
        args = copy.copy(args)
        args.steps = steps
    mode = step_mode(args, device)
    if mode == "graph":
        try:
            return _train(mixer, d, args, device, backend, "graph")
        except CaptureError as e:
            print(f"\n  {mixer} d={d}: CUDA graph capture failed ({e}); training again with eager "
                  "steps", flush=True)
            mode = "eager"
    return _train(mixer, d, args, device, backend, mode)


def _train(mixer: str, d: int, args, device, backend, mode: str) -> dict:
    torch.manual_seed(args.seed)
    gen = torch.Generator(device=device).manual_seed(args.seed)
    model = Model(mixer, args.vocab, d, args.seq_len, args.layers, backend).to(device)
    amp = device.type == "cuda"
    t0 = time.time()
    if mode == "eager":
        steps = _eager_steps(model, args, device, amp, gen)
    else:
        steps = _flat_steps(model, args, device, amp, gen, graph=mode == "graph")
    loss = float("nan")
    marks = []   # (step, time) at the logged steps, after their sync: the steady ms per step
    for step, loss_t, logits, labels in steps:
        if step % max(1, args.steps // 20) == 0 or step == args.steps:
            loss = loss_t.item()
            marks.append((step, time.time()))
            m = labels != -100
            bacc = (logits.detach().argmax(-1)[m] == labels[m]).float().mean().item()
            print(f"\r  {mixer:<9} d={d:<4} step {step:>5}/{args.steps}  loss {loss:.3f}  "
                  f"batch acc {bacc:.2f}  {time.time() - t0:5.1f}s", end="", flush=True)
    acc = evaluate(model, args, device, amp)
    secs = time.time() - t0
    step_ms = ((marks[-1][1] - marks[0][1]) * 1e3 / (marks[-1][0] - marks[0][0])
               if len(marks) > 1 else float("nan"))
    print(f"\r  {mixer:<9} d={d:<4} {args.steps} steps  loss {loss:.3f}  accuracy {acc:6.3f}  "
          f"state {model.state_bytes / 1024:8.1f} KiB  {secs:5.1f}s  {step_ms:6.2f} ms/step "
          f"({mode})", flush=True)
    return dict(mixer=mixer, d_model=d, state_bytes=model.state_bytes, accuracy=round(acc, 4),
                loss=round(loss, 4), steps=args.steps, seconds=round(secs, 1),
                step_ms=round(step_ms, 3), mode=mode)


@torch.no_grad()
def evaluate(model, args, device, amp) -> float:
    gen = torch.Generator(device=device).manual_seed(args.seed + 1)  # held-out draws
    right = total = 0
    for _ in range(args.eval_batches):
        tokens, labels = mqar_batch(args.batch, args.seq_len, args.pairs, args.vocab, device, gen)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            pred = model(tokens).argmax(-1)
        m = labels != -100
        right += (pred[m] == labels[m]).sum().item()
        total += m.sum().item()
    return right / max(total, 1)


def plot(rows, path) -> Optional[str]:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for mixer in dict.fromkeys(r["mixer"] for r in rows):
        sel = sorted((r for r in rows if r["mixer"] == mixer), key=lambda r: r["state_bytes"])
        ax.plot([r["state_bytes"] for r in sel], [r["accuracy"] for r in sel], "o-", label=mixer)
    ax.set_xscale("log")
    ax.set_xlabel("recurrent state while decoding (bytes per sequence, all layers)")
    ax.set_ylabel("MQAR accuracy")
    ax.set_ylim(-0.02, 1.02)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return path


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tiny", action="store_true", help="CPU smoke size (seconds)")
    p.add_argument("--mixers", nargs="+", default=list(MIXERS), choices=MIXERS)
    p.add_argument("--dims", nargs="+", type=int, default=[64, 128], help="model widths")
    p.add_argument("--steps", type=int, default=1500)
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--pairs", type=int, default=8, help="key-value pairs per sequence")
    p.add_argument("--vocab", type=int, default=64)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--steps-scale", nargs="*", default=None, metavar="MIXER=K",
                   help="train MIXER for K x --steps (default: "
                   + " ".join(f"{m}={k:g}" for m, k in STEPS_SCALE.items())
                   + "; Mamba-1 leaves the copy plateau late); give none for equal steps")
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--weight-decay", type=float, default=0.1)
    p.add_argument("--eval-batches", type=int, default=4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default=None, help="default: cuda if available")
    p.add_argument("--step", default="auto", choices=("auto", "graph", "flat", "eager"),
                   help="training step: graph = the whole step (forward, backward, clipping, "
                   "AdamW, schedule) captured once in a CUDA graph and replayed (CUDA default; "
                   "falls back to eager per model if the capture fails), flat = the same step "
                   "without the graph, eager = torch.optim.AdamW + OneCycleLR from Python (CPU "
                   "default)")
    p.add_argument("--no-graph", action="store_true", help="same as --step eager")
    p.add_argument("--no-ahead", action="store_true",
                   help="do not compile every model's Triton kernels ahead, in parallel")
    p.add_argument("--backend", default=None,
                   help="kernel backend for the layers (default: auto; reference on CPU)")
    p.add_argument("--out", default=None, help="folder for recall.csv / recall.png "
                   "(default: $OUT or the current folder)")
    args = p.parse_args(argv)
    if args.no_graph:
        args.step = "eager"
    if args.steps_scale is None:
        args.steps_scale = {} if args.tiny else dict(STEPS_SCALE)
    else:
        try:
            args.steps_scale = {m: float(k) for m, k in (e.split("=") for e in args.steps_scale)}
        except ValueError:
            p.error(f"--steps-scale takes MIXER=K pairs, got {args.steps_scale}")
        if set(args.steps_scale) - set(MIXERS):
            p.error(f"--steps-scale: unknown mixer(s) {sorted(set(args.steps_scale) - set(MIXERS))}")
    if args.tiny:
        args.dims, args.steps, args.batch, args.seq_len = [16], 3, 4, 32
        args.pairs, args.vocab, args.layers, args.eval_batches = 4, 64, 1, 1
    return args


def main(argv=None) -> list:
    args = parse_args(argv)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    backend = args.backend or ("reference" if device.type == "cpu" else None)
    print(f"MQAR: seq_len {args.seq_len}, {args.pairs} pairs, vocab {args.vocab}, batch "
          f"{args.batch}, {args.steps} steps"
          + "".join(f" ({mixer_steps(m, args)} for {m})" for m in args.mixers
                    if mixer_steps(m, args) != args.steps)
          + f", {args.layers} layers, on {device} "
          f"(backend {backend or 'auto'}, {step_mode(args, device)} steps)", flush=True)
    rows = []
    t0 = time.time()
    compile_all_ahead(args, device, backend)
    for mixer in args.mixers:
        for d in args.dims:
            rows.append(train_one(mixer, d, args, device, backend))
    print(f"\naccuracy by model width ({time.time() - t0:.0f}s in all)")
    dims = sorted({r["d_model"] for r in rows})
    print(f"{'mixer':<10}" + "".join(f"{'d=' + str(d):>18}" for d in dims))
    for mixer in args.mixers:
        cells = []
        for d in dims:
            r = next((r for r in rows if r["mixer"] == mixer and r["d_model"] == d), None)
            cells.append(f"{r['accuracy']:.3f} @ {_kib(r['state_bytes'])}" if r else "-")
        print(f"{mixer:<10}" + "".join(f"{c:>18}" for c in cells))
    out = args.out or os.environ.get("OUT") or "."
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "recall.csv"), "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    png = plot(rows, os.path.join(out, "recall.png"))
    print(f"wrote {os.path.join(out, 'recall.csv')}" + (f" and {png}" if png else
                                                          " (no matplotlib: no plot)"))
    return rows


def _kib(b: int) -> str:
    return f"{b / 1024:.0f}KiB" if b >= 10240 else f"{b / 1024:.1f}KiB"


if __name__ == "__main__":
    main(sys.argv[1:])
