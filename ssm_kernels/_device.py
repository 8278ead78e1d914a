"""Device facts launchers need on every call, queried once per device (queries cost host time)."""
from functools import lru_cache

import torch


@lru_cache(maxsize=None)
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def sm_count(device) -> int:
    """Streaming multiprocessors of a CUDA device (a torch.device, an index or a string)."""
    device = torch.device(device) if not isinstance(device, torch.device) else device
    return _sm_count(device.index if device.index is not None else torch.cuda.current_device())
