from .interface import mamba_chunk_scan_combined
from .reference import ssd_chunked, ssd_recurrent, ssd_ref

__all__ = ["mamba_chunk_scan_combined", "ssd_ref", "ssd_chunked", "ssd_recurrent"]
