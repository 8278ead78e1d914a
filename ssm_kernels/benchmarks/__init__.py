"""Benchmark cases per family (`python -m ssm_kernels bench`); harness in harness.py.

Each family module exposes a generator `cases(device: str, quick: bool)` yielding `harness.Case`s
one at a time (inputs are allocated when a case is built and freed when the harness moves on).
"""
FAMILIES = {
    "linear_scan": "ssm_kernels.benchmarks.linear_scan",
    "selective_scan": "ssm_kernels.benchmarks.selective_scan",
    "linear_attn": "ssm_kernels.benchmarks.linear_attn",
    "based": "ssm_kernels.benchmarks.based",
    "delta_rule": "ssm_kernels.benchmarks.delta_rule",
    "ssd": "ssm_kernels.benchmarks.ssd",
    "fft_conv": "ssm_kernels.benchmarks.fft_conv",
    "causal_conv1d": "ssm_kernels.benchmarks.causal_conv1d",
}
