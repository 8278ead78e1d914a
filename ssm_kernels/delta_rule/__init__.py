from .interface import (chunk_delta_rule, chunk_gated_delta_rule, fused_recurrent_delta_rule,
                        fused_recurrent_gated_delta_rule)
from .reference import delta_rule_chunk_ref, delta_rule_recurrent_ref

__all__ = ["chunk_gated_delta_rule", "chunk_delta_rule", "fused_recurrent_gated_delta_rule",
           "fused_recurrent_delta_rule", "delta_rule_recurrent_ref", "delta_rule_chunk_ref"]
