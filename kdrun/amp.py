"""Mixed precision: which autocast dtype a device gets, and the autocast context.

``resolve_amp("auto", device)`` picks bf16 on GPUs with native bf16 (Ampere and newer) and fp16
(with a GradScaler, which the trainer enables) on older ones; on CPUs bf16 only where the CPU has
native bf16 (oneDNN's check), else fp32 — emulated bf16 is slower than fp32 there.
"""

from __future__ import annotations

import contextlib

import torch


def resolve_amp(amp: str, device: torch.device) -> str:
    """``auto`` -> ``bf16`` / ``fp16`` / ``off`` for ``device`` (other values pass through)."""
    if amp != "auto":
        return amp
    if device.type == "cuda":
        # native bf16 only: emulated bf16 is slower than fp16 + GradScaler
        return "bf16" if torch.cuda.is_bf16_supported(including_emulation=False) else "fp16"
    try:
        fast_bf16 = bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        fast_bf16 = False
    return "bf16" if fast_bf16 else "off"


def autocast(device: torch.device, amp: str):
    """The autocast context for a resolved ``amp`` (a no-op for ``off``)."""
    if amp == "off":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if amp == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)
