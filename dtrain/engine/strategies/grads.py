"""Gradient helpers every strategy shares: the total norm, clipping, and a non-finite flag that stays on the device."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from dtrain.compat.torch import foreach_norm


def nonfinite(x: Tensor) -> Tensor:
    """1.0 if the scalar x (no autograd history) is inf or NaN, else 0.0, as a tensor on x's device: x * 0 is NaN
    exactly then (two kernels, and no host read-back)."""
    return (x.float() * 0).nan_to_num(nan=1.0)


def total_norm(grads: list[Tensor], device: torch.device, same_group: bool) -> Tensor:
    """The 2-norm of all gradients together, as a tensor on device. same_group: all gradients share a device and
    dtype (see same_device_and_dtype), so the norm kernels run without get_total_norm's per-call regrouping."""
    if not grads:
        return torch.zeros((), device=device)
    if same_group:
        return torch.linalg.vector_norm(torch.stack(foreach_norm(grads)))
    return torch.nn.utils.get_total_norm(grads)


def same_device_and_dtype(params: list[Tensor]) -> bool:
    return len({(p.device, p.dtype) for p in params}) == 1


def clip(params: list[nn.Parameter], threshold: float | None, mode: str, norm: Tensor) -> None:
    """Clip gradients in place: by total norm (with the norm already measured) or element-wise by value.
    Harmless on a non-finite step (the optimizer skips it)."""
    if threshold is None:
        return
    if mode == "norm":
        torch.nn.utils.clip_grads_with_norm_(params, threshold, norm)
    else:
        torch.nn.utils.clip_grad_value_(params, threshold)


def all_finite(tensors: list[Tensor], device: torch.device) -> Tensor:
    """1-element float tensor on device: 1.0 when every element of every tensor is finite (one fused check)."""
    if not tensors:
        return torch.ones(1, device=device)
    flags = torch.stack([torch.isfinite(t).all() for t in tensors])
    return flags.all().float().reshape(1).to(device)
