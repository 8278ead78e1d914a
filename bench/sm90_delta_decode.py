"""Offline sm_90 audit of the delta-rule decode kernel (`_recurrent_fwd_kernel`, T = 1, K = V = 128,
bf16 q/k/v, gated, l2 norm, in place) for every tile of bench/gpu_delta_decode.py's sweep:
registers, spills, shared memory (and SASS with --sass DIR). No GPU: bench/sm90_audit.py's stub
driver. Run: PYTHONPATH=$PWD python bench/sm90_delta_decode.py [--sass DIR]"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import sm90_audit  # noqa: E402

TILES = [None, (8, 1), (16, 1), (16, 2), (32, 1), (32, 2), (32, 4), (64, 2), (64, 4), (64, 8),
         (128, 4), (128, 8)]


def delta_decode_cases():
    import torch
    import torch.nn.functional as F
    import ssm_kernels as sk
    from ssm_kernels.delta_rule import triton as tri
    for tile in TILES:
        def thunk(tile=tile):
            tri.FWD_TILE = tile
            try:
                q, k = (torch.randn(2, 1, 16, 128).bfloat16() for _ in range(2))
                v = torch.randn(2, 1, 16, 128).bfloat16()
                g, beta = F.logsigmoid(torch.randn(2, 1, 16)), torch.rand(2, 1, 16)
                st = torch.zeros(2, 16, 128, 128)
                with torch.no_grad():
                    sk.fused_recurrent_gated_delta_rule(q, k, v, g, beta, initial_state=st,
                                                        inplace_final_state=True,
                                                        use_qk_l2norm_in_kernel=True,
                                                        backend="triton")
            finally:
                tri.FWD_TILE = None
        yield f"decode tile {tile}", thunk


if __name__ == "__main__":
    sm90_audit.FAMILIES["delta_decode"] = delta_decode_cases
    sys.exit(sm90_audit.main(["--ops", "delta_decode", *sys.argv[1:]]))
