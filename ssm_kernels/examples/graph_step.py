"""One whole training step in one CUDA graph (the recall example's fast path): AdamW after
global-norm clipping on one flat parameter buffer, its learning rate and beta1 read per replay from
a one-cycle table on the device, and the capture itself. Nothing here holds a host scalar that a
replay would freeze."""
from __future__ import annotations

import torch


def onecycle_table(lr: float, steps: int, device=None) -> torch.Tensor:
    """``[steps, 2]`` float64: the learning rate and AdamW's beta1 that ``OneCycleLR(opt, lr,
    total_steps=steps, pct_start=0.1)`` (momentum cycled, the eager path's schedule) gives the
    optimizer step of each row, read off a scheduler on a dummy optimizer."""
    dummy = torch.zeros(1, requires_grad=True)
    opt = torch.optim.AdamW([dummy], lr=lr)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, lr, total_steps=steps, pct_start=0.1)
    rows = []
    for s in range(steps):
        g = opt.param_groups[0]
        rows.append((g["lr"], g["betas"][0]))
        if s < steps - 1:
            opt.step()  # no gradient: updates nothing, keeps the scheduler's order check quiet
            sched.step()
    return torch.tensor(rows, dtype=torch.float64, device=device)


class FlatAdamW:
    """AdamW (decoupled weight decay, as ``torch.optim.AdamW``) after global-norm gradient clipping
    (as ``clip_grad_norm_``), on one flat float32 buffer holding every parameter (the model's
    parameters become views of it), with the learning rate and beta1 of each step read from a
    device table (`onecycle_table`) at a device step counter: a step holds no host scalar and makes
    no host sync, so it can be captured in a CUDA graph with the schedule still applied on every
    replay, and it costs ~30 launches whatever the number of parameters. ``groups`` are
    ``param_groups``'s two groups: the first decays by ``weight_decay``, the second does not.
    Unlike torch's AdamW, a parameter without a gradient in a step is updated with a zero one (a
    captured step cannot skip it); every parameter of the example's models gets one each step."""

    def __init__(self, groups: list, table: torch.Tensor, weight_decay: float,
                 max_norm: float = 1.0, beta2: float = 0.999, eps: float = 1e-8):
        groups = [dict(g, params=[p for p in g["params"] if p.requires_grad]) for g in groups]
        params = [p for g in groups for p in g["params"]]
        bad = [tuple(p.shape) for p in params if p.dtype != torch.float32]
        if bad:
            raise TypeError(f"FlatAdamW needs float32 parameters; got others of shapes {bad}")
        self.params = params
        self.n_decay = sum(p.numel() for p in groups[0]["params"])
        flat = torch.cat([p.detach().reshape(-1) for p in params])
        off = 0
        for p in params:
            p.data = flat[off:off + p.numel()].view_as(p)
            off += p.numel()
        self.flat, self.grad = flat, torch.zeros_like(flat)
        self.m, self.v = torch.zeros_like(flat), torch.zeros_like(flat)
        self.table = table.to(flat.device)
        self.idx = torch.zeros(1, dtype=torch.long, device=flat.device)        # next table row
        self.t = torch.zeros((), dtype=torch.float64, device=flat.device)      # AdamW's step
        self.wd, self.max_norm, self.beta2, self.eps = weight_decay, max_norm, beta2, eps
        self._zeros = {}

    def zero_grad(self):
        for p in self.params:
            p.grad = None

    def _zero(self, i: int) -> torch.Tensor:   # the gradient of a parameter the loss does not use
        if i not in self._zeros:
            self._zeros[i] = torch.zeros_like(self.params[i])
        return self._zeros[i]

    @torch.no_grad()
    def step(self):
        grads = [p.grad if p.grad is not None else self._zero(i) for i, p in enumerate(self.params)]
        g = torch.cat([x.reshape(-1) for x in grads], out=self.grad)
        # clip_grad_norm_(params, max_norm): one global L2 norm, coefficient clamped at 1
        coef = (self.max_norm / (torch.linalg.vector_norm(g) + 1e-6)).clamp_(max=1.0)
        g.mul_(coef)
        row = self.table.index_select(0, self.idx)[0]
        lr, beta1 = row[0], row[1]
        self.idx += 1
        self.t += 1
        if self.wd:
            self.flat[:self.n_decay].mul_(1 - lr * self.wd)
        self.m.lerp_(g, (1 - beta1).float())
        self.v.mul_(self.beta2).addcmul_(g, g, value=1 - self.beta2)
        step_size = lr / (1 - beta1 ** self.t)
        bc2_sqrt = (1 - self.beta2 ** self.t).sqrt()
        denom = (self.v.sqrt() / bc2_sqrt).add_(self.eps).div_(-step_size)
        self.flat.addcdiv_(self.m, denom)


class CaptureError(RuntimeError):
    """The training step could not be captured in a CUDA graph (the caller runs eager steps)."""


def capture_cuda(step, opt):
    """Captures ``step()`` (one whole training step) in a CUDA graph: returns (replay, outputs),
    where replay() runs the step again, writing into the same output tensors. As every capture,
    recording runs nothing: the step's first execution is the first replay."""
    if opt.flat.device.type != "cuda":
        raise CaptureError(f"CUDA graphs need a CUDA device, not {opt.flat.device.type}")
    g = torch.cuda.CUDAGraph()
    try:
        opt.zero_grad()   # backward allocates the gradients from the graph's pool
        with torch.cuda.graph(g):
            out = step()
    except Exception as e:
        raise CaptureError(f"{type(e).__name__}: {e}") from e
    return g.replay, out
