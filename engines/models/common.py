"""Pieces shared by the detector families (all plain ops that export to ONNX opset 17 and run in ORT)."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def mask_at(mask: torch.Tensor, factor: int) -> torch.Tensor:
    """Input-resolution 0/1 mask ``[N,1,H,W]`` -> map-resolution 0/1 mask (a cell is inside if > half of it is)."""
    if factor > 1:
        mask = F.avg_pool2d(mask, factor, factor)
    return (mask > 0.5).to(mask.dtype)


def erode(mask: torch.Tensor, radius: int) -> torch.Tensor:
    """Binary erosion of a 0/1 mask by a (2r+1)^2 square (as 1 - maxpool(1 - m))."""
    if radius <= 0:
        return mask
    return 1.0 - F.max_pool2d(1.0 - mask, 2 * radius + 1, 1, radius)


def topk_score(amap: torch.Tensor, mask: torch.Tensor, k: int) -> torch.Tensor:
    """Image score = mean of the ``k`` largest map values inside ``mask`` (``amap`` >= 0): ``[N,1,h,w]`` -> ``[N]``."""
    flat = (amap * mask).flatten(1)
    return torch.topk(flat, k, dim=1).values.mean(dim=1)


def split_input(x: torch.Tensor):
    """``[N,C,H,W]`` -> (image channel ``[N,1,H,W]``, mask ``[N,1,H,W]``); without a mask channel: image != 0."""
    img = x[:, 0:1]
    if x.shape[1] >= 2:
        m = x[:, 1:2]
    else:
        m = (img != 0).to(img.dtype)
    return img, m
