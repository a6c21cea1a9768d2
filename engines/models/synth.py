"""Ultrasound-specific synthetic anomalies (torch, on preprocessed z-scored batches), shared by the synthetic-anomaly
segmenter (``draem``) and the weakly supervised classifier when it has no real abnormal images.

:func:`synthesize` pastes, inside the scan mask, one or more of:

* hypo- or hyperechoic masses, elliptical or irregular (radius modulated by random harmonics), soft-edged, whose inside
  is speckle taken from elsewhere in the *same* frame (so the texture stays speckle-consistent) at a shifted level;
* posterior acoustic shadowing (darker column below a mass, fading with depth) or enhancement (brighter column);
* for lung (``kind="lung"``/``"all"``): B-line-like vertical bright bands from a pleura-like depth to the bottom of the scan,
  and subpleural hypoechoic consolidations (irregular masses near the top).

Returns the altered batch and the soft target mask ``[N,1,H,W]`` (mass / B-line pixels; shadowing is context, not target).
Deterministic for a given ``torch.Generator``.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

KINDS = ("breast", "lung", "all")


def _u(g, lo, hi, n=()):
    return lo + (hi - lo) * torch.rand(n, generator=g)


def _blur(x: torch.Tensor, s: int = 5) -> torch.Tensor:
    return F.avg_pool2d(x, s, 1, s // 2, count_include_pad=False)


def _mass(h, w, cy, cx, ry, rx, ang, irregular, g):
    yy = torch.arange(h, dtype=torch.float32)[:, None] - cy
    xx = torch.arange(w, dtype=torch.float32)[None, :] - cx
    c, s = math.cos(ang), math.sin(ang)
    u, v = (c * xx + s * yy) / rx, (-s * xx + c * yy) / ry
    r = torch.sqrt(u * u + v * v)
    if irregular:
        th = torch.atan2(v, u)
        mod = torch.ones_like(th)
        for k in (2, 3, 5, 7):
            mod = mod + float(_u(g, 0.0, 0.35 / k * 2)) * torch.cos(k * th + float(_u(g, 0, 6.283)))
        r = r / mod.clamp(min=0.4)
    return (1.0 - r).clamp(min=0.0, max=0.15) / 0.15  # soft edge, 1 inside


def synthesize(x: torch.Tensor, g: torch.Generator, kind: str = "all", p: float = 0.5,
               max_items: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    """``x`` ``[N,C,H,W]`` (ch0 z-scored image, ch1 scan mask) -> (altered copy, target ``[N,1,H,W]`` in [0,1])."""
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    x = x.clone()
    n, _, h, w = x.shape
    img = x[:, 0]
    m = x[:, 1] if x.shape[1] >= 2 else (img != 0).float()
    target = torch.zeros(n, 1, h, w)
    for i in range(n):
        if float(torch.rand((), generator=g)) >= p:
            continue
        ys, xs = torch.nonzero(m[i] > 0.5, as_tuple=True)
        if len(ys) < 16:
            continue
        ymin, ymax = int(ys.min()), int(ys.max())
        for _ in range(1 + int(torch.randint(0, max_items, (1,), generator=g))):
            choice = float(torch.rand((), generator=g))
            blines = kind in ("lung", "all") and choice < (0.45 if kind == "lung" else 0.2)
            if blines:
                # B-line: vertical bright band from a pleura-like depth to the bottom, slightly widening
                top = ymin + int(_u(g, 0.1, 0.4) * (ymax - ymin))
                j = int(torch.randint(0, len(ys), (1,), generator=g))
                cx = float(xs[j])
                bw = float(_u(g, 0.015, 0.05)) * w
                xx = torch.arange(w, dtype=torch.float32)[None, :]
                yy = torch.arange(h, dtype=torch.float32)[:, None]
                width = bw * (1 + 0.5 * (yy - top).clamp(min=0) / h)
                prof = (1 - ((xx - cx).abs() / width)).clamp(min=0) ** 0.5
                prof = prof * (yy >= top).float() * torch.exp(-(yy - top).clamp(min=0) / (h * float(_u(g, 0.6, 3.0))))
                prof = prof * m[i]
                amp = float(_u(g, 1.0, 2.5))
                img[i] = img[i] * (1 - 0.5 * prof) + amp * prof
                target[i, 0] = torch.maximum(target[i, 0], (prof > 0.3).float())
                continue
            j = int(torch.randint(0, len(ys), (1,), generator=g))
            cy, cx = float(ys[j]), float(xs[j])
            if kind in ("lung", "all") and choice < 0.6 and kind == "lung":
                cy = ymin + float(_u(g, 0.1, 0.35)) * (ymax - ymin)  # subpleural consolidation
            ry = float(_u(g, 0.04, 0.16)) * h
            rx = ry * float(_u(g, 0.7, 2.0))
            shape = _mass(h, w, cy, cx, ry, rx, float(_u(g, -0.6, 0.6)), float(torch.rand((), generator=g)) < 0.5, g)
            shape = shape * m[i]
            if shape.sum() < 4:
                continue
            hyper = float(torch.rand((), generator=g)) < 0.3
            # speckle from elsewhere in the same frame, re-levelled
            sy, sx = int(torch.randint(-h // 3, h // 3 + 1, (1,), generator=g)), int(torch.randint(-w // 3, w // 3 + 1, (1,), generator=g))
            tex = torch.roll(img[i], (sy, sx), (0, 1))
            level = float(_u(g, 0.8, 2.0)) if hyper else -float(_u(g, 0.8, 1.8))
            gain = float(_u(g, 0.2, 0.7))
            inside = (img[i].mean() + level) + gain * (tex - tex.mean())
            img[i] = img[i] * (1 - shape) + inside * shape
            # posterior shadow / enhancement below the mass
            post = float(torch.rand((), generator=g))
            if post < 0.6:
                col = (shape.amax(0) > 0.5).float()[None, :]
                yy = torch.arange(h, dtype=torch.float32)[:, None]
                bottom = cy + ry
                fall = torch.exp(-(yy - bottom).clamp(min=0) / (h * float(_u(g, 0.2, 1.0)))) * (yy > bottom).float()
                col = _blur(col[None, None] * torch.ones(1, 1, h, 1), 7)[0, 0]
                amt = float(_u(g, 0.4, 1.2)) * (-1.0 if post < 0.4 else 1.0)
                img[i] = img[i] + amt * fall * col * m[i]
            target[i, 0] = torch.maximum(target[i, 0], (shape > 0.5).float())
        img[i] = img[i].clamp(-4.0, 4.0) * m[i]
    return x, target
