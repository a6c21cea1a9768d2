"""Patch-Gaussian detector (PaDiM-style) on the features of a tiny fixed random conv net.

No pretrained weights exist offline, so the feature extractor is a small conv stack with fixed, seeded random weights
(random conv features are a known workable stand-in for texture statistics).  The convs pad by reflection, so the
image border (a linear probe's rectangle often touches the crop edge) does not look like an anomaly.  Multi-scale features (1/4 resolution,
receptive field about 31 input pixels) are concatenated and projected to ``dim`` channels with a fixed random
orthonormal matrix.  Normal feature vectors are modelled by ``bands`` Gaussians along the image *depth* (rows): lung
ultrasound is layered by depth (skin, muscle, pleura, lung), while it is roughly invariant left-right, so the model is
shared across columns and interpolated linearly between depth bands.  Memory is bounded: ``bands x dim x dim`` floats (the random projection
reduces the features to ``dim``; fitting streams sufficient statistics, never storing vectors), and ``cov_fp16=True``
stores the Cholesky factors in float16 (half the size; cast to float32 in-graph).

The anomaly map is the Mahalanobis distance, computed in-graph as plain matmuls (a 1x1 conv with the Cholesky factor of
each band's inverse covariance, squared and summed), so ONNX Runtime / TensorRT run exactly the same maths.
The image score is the mean of the top-k map values inside the (eroded) scan mask, also in-graph.

Input: ``[1, 2, H, W]`` (z-scored grayscale, 0/1 scan mask).  Outputs: ``anomaly_map [1,1,H/4,W/4]``, ``score [1]``.
"""
from __future__ import annotations

import math
import sys
import time
from typing import Callable, Iterable

import torch
import torch.nn as nn
import torch.nn.functional as F

from .common import erode, mask_at, split_input, topk_score

FAMILY = "patch_gaussian"


class PatchGaussian(nn.Module):
    def __init__(
        self,
        size: tuple[int, int] | list[int] = (256, 256),
        in_channels: int = 2,
        widths: tuple[int, ...] | list[int] = (16, 32, 64, 64),
        dim: int = 48,
        bands: int = 4,
        topk_frac: float = 0.01,
        score_erode: int = 2,
        eps: float = 0.01,
        seed: int = 0,
        cov_fp16: bool = False,
    ):
        super().__init__()
        self.size = (int(size[0]), int(size[1]))
        self.in_channels = int(in_channels)
        self.widths = tuple(int(w) for w in widths)
        self.dim = int(dim)
        self.bands = int(bands)
        self.topk_frac = float(topk_frac)
        self.score_erode = int(score_erode)
        self.eps = float(eps)
        self.seed = int(seed)
        self.cov_fp16 = bool(cov_fp16)
        self.factor = 4
        self.map_hw = (self.size[0] // self.factor, self.size[1] // self.factor)
        self.k = max(1, int(round(self.topk_frac * self.map_hw[0] * self.map_hw[1])))

        g = torch.Generator().manual_seed(self.seed)
        convs = []
        cin = 1
        for w in self.widths:
            conv = nn.Conv2d(cin, w, 3, 2, 1, bias=True, padding_mode="reflect")
            with torch.no_grad():
                conv.weight.copy_(torch.randn(conv.weight.shape, generator=g) * math.sqrt(2.0 / (cin * 9)))
                conv.bias.copy_(torch.randn(w, generator=g) * 0.1)
            convs.append(conv)
            cin = w
        self.convs = nn.ModuleList(convs)
        for p in self.convs.parameters():
            p.requires_grad_(False)
        feat = sum(self.widths)
        q, _ = torch.linalg.qr(torch.randn(feat, feat, generator=g))
        self.register_buffer("proj", q[:, : self.dim].T.contiguous().reshape(self.dim, feat, 1, 1))
        # Per band: mean [B, D] and Cholesky factor L of the inverse covariance (inv = L L^T), stored as the weight and
        # bias of one 1x1 conv: y_b = L_b^T (f - mu_b)  ->  d2_b = |y_b|^2.
        self.register_buffer("w_maha", torch.eye(self.dim).repeat(self.bands, 1).reshape(self.bands * self.dim, self.dim, 1, 1)
                             .to(torch.float16 if self.cov_fp16 else torch.float32))
        self.register_buffer("b_maha", torch.zeros(self.bands * self.dim))
        self.register_buffer("band_weights", self._band_weights())
        self.register_buffer("fitted", torch.zeros((), dtype=torch.bool))

    def config(self) -> dict:
        return dict(size=list(self.size), in_channels=self.in_channels, widths=list(self.widths), dim=self.dim,
                    bands=self.bands, topk_frac=self.topk_frac, score_erode=self.score_erode, eps=self.eps, seed=self.seed,
                    cov_fp16=self.cov_fp16)

    def _band_weights(self) -> torch.Tensor:
        """``[1, B, h, 1]`` triangular interpolation weights over map rows (sum to 1 per row)."""
        h = self.map_hw[0]
        y = (torch.arange(h, dtype=torch.float64) + 0.5) / h
        if self.bands == 1:
            return torch.ones(1, 1, h, 1)
        centres = (torch.arange(self.bands, dtype=torch.float64) + 0.5) / self.bands
        step = 1.0 / self.bands
        w = (1.0 - (y[None, :] - centres[:, None]).abs() / step).clamp(min=0.0)
        w[0, y < centres[0]] = 1.0
        w[-1, y > centres[-1]] = 1.0
        w = w / w.sum(0, keepdim=True)
        return w.float().reshape(1, self.bands, h, 1)

    # ---- forward ---------------------------------------------------------------------------------------------------
    def features(self, img: torch.Tensor) -> torch.Tensor:
        """``[N,1,H,W]`` -> ``[N, dim, H/4, W/4]``."""
        h, w = self.map_hw
        feats = []
        x = img
        for i, conv in enumerate(self.convs):
            x = F.relu(conv(x))
            s = 2 ** (i + 1)
            if s < self.factor:
                feats.append(F.avg_pool2d(x, self.factor // s))
            elif s == self.factor:
                feats.append(x)
            else:
                feats.append(F.interpolate(x, size=(h, w), mode="bilinear", align_corners=False))
        f = torch.cat(feats, 1)
        return F.conv2d(f, self.proj)

    def distance2(self, f: torch.Tensor) -> torch.Tensor:
        n, d, h, w = f.shape
        y = F.conv2d(f, self.w_maha.float(), self.b_maha)  # [N, B*D, h, w]
        d2 = (y * y).reshape(n, self.bands, d, h, w).sum(2)  # [N, B, h, w]
        return (d2 * self.band_weights).sum(1, keepdim=True)

    def forward(self, x: torch.Tensor):
        img, m = split_input(x)
        f = self.features(img)
        mm = mask_at(m, self.factor)
        amap = torch.sqrt(self.distance2(f).clamp(min=0.0)) * mm
        score = topk_score(amap, erode(mm, self.score_erode), self.k)
        return amap, score

    # ---- fitting -----------------------------------------------------------------------------------------------------
    @torch.no_grad()
    def fit(self, batches: Callable[[], Iterable[torch.Tensor]], *, epochs: int = 1, progress: bool = True, **_) -> dict:
        """One pass over normal batches ``[N,C,H,W]``: per-band weighted mean / covariance, then inverse + Cholesky."""
        t0 = time.time()
        B, D = self.bands, self.dim
        s0 = torch.zeros(B, dtype=torch.float64)
        s1 = torch.zeros(B, D, dtype=torch.float64)
        s2 = torch.zeros(B, D, D, dtype=torch.float64)
        n_frames = 0
        bw = self.band_weights[0, :, :, 0].double()  # [B, h]
        for xb in batches():
            img, m = split_input(xb)
            f = self.features(img).double()  # [N, D, h, w]
            mm = mask_at(m, self.factor).double()[:, 0]  # [N, h, w]
            # weight of each vector for each band: band weight of its row * inside-mask
            wgt = bw[None, :, :, None] * mm[:, None]  # [N, B, h, w]
            s0 += wgt.sum((0, 2, 3))
            s1 += torch.einsum("nbhw,ndhw->bd", wgt, f)
            s2 += torch.einsum("nbhw,ndhw,nehw->bde", wgt, f, f)
            n_frames += xb.shape[0]
            if progress:
                print(f"\r  fitting gaussians: {n_frames} frames", end="", file=sys.stderr, flush=True)
        if progress:
            print(file=sys.stderr)
        if (s0 < D + 1).any():
            raise ValueError(f"not enough normal data to fit {B} bands of dim {D}: weights per band {s0.tolist()}")
        mu = s1 / s0[:, None]
        cov = s2 / s0[:, None, None] - mu[:, :, None] * mu[:, None, :]
        cov = cov + self.eps * torch.eye(D, dtype=torch.float64)
        inv = torch.linalg.inv(cov)
        inv = 0.5 * (inv + inv.transpose(1, 2))
        L = torch.linalg.cholesky(inv)  # inv = L L^T ; d2 = |L^T (f - mu)|^2
        W = L.transpose(1, 2)  # [B, D(out), D(in)]
        bias = -(W @ mu[:, :, None])[:, :, 0]
        self.w_maha.copy_(W.reshape(B * D, D, 1, 1).to(self.w_maha.dtype))
        self.b_maha.copy_(bias.reshape(B * D).float())
        self.fitted.fill_(True)
        return {"frames": n_frames, "epochs": 1, "seconds": round(time.time() - t0, 2),
                "vectors_per_band": [round(v) for v in s0.tolist()]}
