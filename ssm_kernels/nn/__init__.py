"""Drop-in sequence-mixing layers on ssm_kernels' ops, each with a decode `step` and a cache.

Every layer maps ``[B, T, d_model] -> [B, T, d_model]``, takes ``cu_seqlens`` for packed batches
where its op supports them, and has ``allocate_cache(batch)`` + ``step(x_t, cache)`` that agree
with the parallel form token by token; ``forward(x, cache=cache)`` continues from the cache and
leaves the final states in it (prefill). ``backend="reference"`` runs them anywhere (CPU, float64).
"""
from ._common import ShortConvolution
from .deltanet import DeltaNet, GatedDeltaNet
from .gla import GatedLinearAttention
from .hyena import HyenaOperator
from .mamba import Mamba
from .mamba2 import Mamba2, RMSNormGated
from .scan_layers import LRU, RGLRU, MinGRU, MinLSTM

__all__ = ["Mamba", "Mamba2", "GatedLinearAttention", "GatedDeltaNet", "DeltaNet", "HyenaOperator",
           "MinGRU", "MinLSTM", "RGLRU", "LRU", "ShortConvolution", "RMSNormGated"]
