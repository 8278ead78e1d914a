"""Drop-in sequence-mixing layers on ssm_kernels' ops, each with a decode `step` and a cache.

Every layer maps ``[B, T, d_model] -> [B, T, d_model]``, takes ``cu_seqlens`` for packed batches
where its op supports them, and has ``allocate_cache(batch)`` + ``step(x_t, cache)`` that agree
with the parallel form token by token. ``backend="reference"`` runs them anywhere (CPU, float64).
"""
from .mamba import Mamba

__all__ = ["Mamba"]
