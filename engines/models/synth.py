"""Ultrasound-specific synthetic anomalies (torch, on preprocessed z-scored batches), shared by the synthetic-anomaly
segmenter (``draem``) and the weakly supervised classifier when it has no real abnormal images.

:func:`synthesize` pastes, inside the scan mask, one or more of:

* hypo- or hyperechoic masses, elliptical or irregular (radius modulated by random harmonics), soft-edged, whose inside
  is speckle taken from elsewhere in the *same* frame (so the texture stays speckle-consistent) at a shifted level;
* posterior acoustic shadowing (darker column below a mass, fading with depth) or enhancement (brighter column);
* for lung (``kind="lung"``/``"all"``): B-line-like vertical bright bands from a pleura-like depth to the bottom of the scan,
  and subpleural hypoechoic consolidations (irregular masses near the top);
* optional (``iso_p`` > 0): a share of the masses isoechoic and heterogeneous instead: about the surrounding level, large
  (radius 0.1–0.3 of the frame's height), with coarse blotchy inner structure, speckle at nearly full contrast and,
  often, only a thin echogenic rim or a dark halo to set them off.  The plain masses above are all clearly darker or brighter than their
  surroundings, which is what a model trained on them finds (``benchmarks/detectors.md``: BUSI's missed findings are
  large isoechoic / heterogeneous masses);
* optional (``surface_p`` > 0): a share of the masses placed just under the top of the scan (the skin line in breast),
  small, wide and mildly hypoechoic with heterogeneous texture, where the plain draw (anywhere in the scan) rarely puts one.

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


def _iso_inside(img: torch.Tensor, m: torch.Tensor, shape: torch.Tensor, g: torch.Generator, lo: float,
                hi: float) -> torch.Tensor:
    """The inside of a heterogeneous mass over frame ``img`` ``[H,W]`` (scan mask ``m``): at the frame's level shifted
    by a draw from [``lo``, ``hi``] (about 0: isoechoic), speckle from elsewhere in the frame at nearly full contrast
    (of four random shifts that do not wrap round the frame's edge, the one whose source lies most inside the scan, so
    neither a seam nor the black background shows through),
    blotchy at a coarse scale (darker and brighter lobules); plus, often, a thin rim (echogenic capsule) or a dark halo
    along the edge of ``shape``."""
    h, w = img.shape
    ys, xs = torch.nonzero(shape > 0.01, as_tuple=True)
    y0, y1, x0, x1 = int(ys.min()), int(ys.max()), int(xs.min()), int(xs.max())

    def shift(lo, hi):  # lo <= 0 <= hi: the mass's box moved by it does not wrap round the frame's edge
        return int(torch.randint(lo, hi + 1, (1,), generator=g))

    best, tex = -1.0, img
    for _ in range(4):
        sy = shift(max(y1 - h + 1, -(h // 3)), min(y0, h // 3))
        sx = shift(max(x1 - w + 1, -(w // 3)), min(x0, w // 3))
        cover = float((torch.roll(m, (sy, sx), (0, 1)) * shape).sum())
        if cover > best:
            best, tex = cover, torch.roll(img, (sy, sx), (0, 1))
    cells = int(torch.randint(3, 9, (1,), generator=g))
    blot = F.interpolate(torch.randn(1, 1, cells, cells, generator=g), size=(h, w), mode="bicubic",
                         align_corners=False)[0, 0]
    inside = (img.mean() + float(_u(g, lo, hi)) + float(_u(g, 0.3, 0.8)) * blot
              + float(_u(g, 0.7, 1.1)) * (tex - tex.mean()))
    edge = float(torch.rand((), generator=g))
    if edge < 0.7:  # rim (capsule) or halo: the band where the soft edge is neither in nor out
        ring = (shape * (1 - shape) * 4).clamp(0, 1)
        inside = inside + (float(_u(g, 0.6, 1.5)) if edge < 0.35 else -float(_u(g, 0.6, 1.5))) * ring
    return inside


def synthesize(x: torch.Tensor, g: torch.Generator, kind: str = "all", p: float = 0.5,
               max_items: int = 2, iso_p: float = 0.0, surface_p: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """``x`` ``[N,C,H,W]`` (ch0 z-scored image, ch1 scan mask) -> (altered copy, target ``[N,1,H,W]`` in [0,1]).
    ``iso_p`` / ``surface_p``: shares of the masses that are isoechoic-heterogeneous / at the top of the scan (0: none,
    and then the draws are exactly those of earlier releases, so a seed trains the same model)."""
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    if not (0.0 <= iso_p <= 1.0 and 0.0 <= surface_p <= 1.0):
        raise ValueError(f"iso_p and surface_p must lie in [0, 1], got {iso_p}, {surface_p}")
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
            iso = iso_p > 0 and float(torch.rand((), generator=g)) < iso_p
            surface = not iso and surface_p > 0 and float(torch.rand((), generator=g)) < surface_p
            ry = float(_u(g, 0.1, 0.3) if iso else _u(g, 0.04, 0.09) if surface else _u(g, 0.04, 0.16)) * h
            rx = ry * float(_u(g, 1.2, 2.5) if surface else _u(g, 0.7, 2.0))
            if surface:  # just under the skin line: the top of the scan in the mass's column
                col = ys[xs == int(cx)]
                cy = float(col.min() if len(col) else ymin) + float(_u(g, 0.02, 0.06)) * h + ry
            shape = _mass(h, w, cy, cx, ry, rx, float(_u(g, -0.6, 0.6)), float(torch.rand((), generator=g)) < 0.5, g)
            shape = shape * m[i]
            if shape.sum() < 4:
                continue
            if iso or surface:  # isoechoic, or the mildly hypoechoic heterogeneous skin-line lesion
                inside = _iso_inside(img[i], m[i], shape, g, *((-0.6, 0.2) if iso else (-1.2, -0.3)))
            else:
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
