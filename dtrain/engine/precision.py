"""Mixed precision as one small object: the autocast context and, for fp16, the gradient scaler."""

from __future__ import annotations

import contextlib
from contextlib import AbstractContextManager as ContextManager

import torch

DTYPES = {"32": None, "bf16-mixed": torch.bfloat16, "fp16-mixed": torch.float16}


class Precision:
    """autocast for bf16/fp16 mixed precision; a GradScaler for fp16 (bf16 has fp32's range and needs none)."""

    def __init__(self, kind: str, device: torch.device) -> None:
        self.kind, self.device = kind, device
        self.dtype = DTYPES[kind]
        self.scaler = torch.amp.GradScaler(device.type, enabled=kind == "fp16-mixed")

    def autocast(self) -> ContextManager:
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.dtype)
