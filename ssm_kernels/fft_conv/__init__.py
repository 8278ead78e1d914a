from .interface import fft_conv, s4d_kernel
from .reference import fft_conv_ref, s4d_kernel_ref

__all__ = ["fft_conv", "fft_conv_ref", "s4d_kernel", "s4d_kernel_ref"]
