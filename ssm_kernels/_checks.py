"""Registry for `python -m ssm_kernels check`: family name -> module with `check(backend, device)`."""
FAMILIES = {
    "based": "ssm_kernels.based.check",
    "linear_attn": "ssm_kernels.linear_attn.check",
    "linear_scan": "ssm_kernels.linear_scan.check",
    "selective_scan": "ssm_kernels.selective_scan.check",
    "fft_conv": "ssm_kernels.fft_conv.check",
    "causal_conv1d": "ssm_kernels.causal_conv1d.check",
}
