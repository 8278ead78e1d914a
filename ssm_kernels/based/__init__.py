from .interface import chunk_based, fused_recurrent_based
from .reference import based_chunk_ref, based_parallel_ref, based_recurrent_ref

__all__ = ["chunk_based", "fused_recurrent_based", "based_recurrent_ref", "based_parallel_ref",
           "based_chunk_ref"]
