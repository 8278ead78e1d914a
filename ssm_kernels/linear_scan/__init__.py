from .interface import linear_scan
from .reference import linear_scan_ref

__all__ = ["linear_scan", "linear_scan_ref"]
