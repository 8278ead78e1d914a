"""Importing peers for side-by-side runs; each returns None when the peer is not installed."""
from __future__ import annotations

import importlib
import importlib.util
import os
import sys
import types


def mamba_ssm_module(name: str):
    """Import `mamba_ssm.<name>` without running mamba_ssm/__init__.py (which imports whole models
    and their optional dependencies); None if mamba-ssm's source is not on sys.path."""
    full = f"mamba_ssm.{name}"
    if full in sys.modules:
        return sys.modules[full]
    if "mamba_ssm" not in sys.modules:
        root = None
        for p in sys.path:
            if os.path.isfile(os.path.join(p or ".", "mamba_ssm", "__init__.py")):
                root = os.path.join(p or ".", "mamba_ssm")
                break
        if root is None:
            return None
        pkg = types.ModuleType("mamba_ssm")
        pkg.__path__ = [root]
        sys.modules["mamba_ssm"] = pkg
    try:
        return importlib.import_module(full)
    except Exception:
        return None


def accelerated_scan():
    try:
        from accelerated_scan.scalar import scan
        return scan
    except Exception:
        return None


_FLA_PATHS = {
    "chunk_linear_attn": "fla.ops.linear_attn", "fused_recurrent_linear_attn": "fla.ops.linear_attn",
    "chunk_simple_gla": "fla.ops.simple_gla", "fused_recurrent_simple_gla": "fla.ops.simple_gla",
    "chunk_gla": "fla.ops.gla", "fused_recurrent_gla": "fla.ops.gla",
}


def fla_function(name: str):
    """flash-linear-attention's function of that name, or None when fla is not importable."""
    try:
        return getattr(importlib.import_module(_FLA_PATHS[name]), name)
    except Exception:
        return None
