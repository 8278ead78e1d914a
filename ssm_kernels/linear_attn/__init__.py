from .interface import (chunk_gla, chunk_linear_attn, chunk_simple_gla, fused_recurrent_gla,
                        fused_recurrent_linear_attn, fused_recurrent_simple_gla)
from .reference import linear_attn_chunk_ref, linear_attn_recurrent_ref

__all__ = ["chunk_linear_attn", "chunk_simple_gla", "chunk_gla", "fused_recurrent_linear_attn",
           "fused_recurrent_simple_gla", "fused_recurrent_gla", "linear_attn_recurrent_ref",
           "linear_attn_chunk_ref"]
