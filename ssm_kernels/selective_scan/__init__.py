from .interface import selective_scan_fn, selective_state_update
from .reference import selective_scan_ref, selective_state_update_ref

__all__ = ["selective_scan_fn", "selective_state_update", "selective_scan_ref",
           "selective_state_update_ref"]
