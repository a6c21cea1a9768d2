"""Reconstruction autoencoder (MedIAnomaly's AE): loss options L1 / MSE / SSIM, configurable latent size.

Encoder: strided conv blocks down to 1/16 and a ``latent``-channel 1x1 bottleneck; decoder mirrors it.  Anomaly map
(1/4 resolution, in-graph): the 4x4-cell mean of ``|x - x̂|`` (``l1``), ``(x - x̂)^2`` (``mse``) or ``1 - SSIM``
(``ssim``, 7x7 box windows).  Score: mean of the top-k cells inside the eroded scan mask.
Input ``[1,2,H,W]`` (z-scored image, scan mask).
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .common import erode, flip_aug, mask_at, run_steps, split_input, topk_score

FAMILY = "ae"
LOSSES = ("l1", "mse", "ssim")


def _block(cin, cout, stride):
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1, padding_mode="reflect"), nn.BatchNorm2d(cout),
                         nn.ReLU(inplace=True))


def ssim_map(a: torch.Tensor, b: torch.Tensor, win: int = 7, c1: float = 0.01 ** 2 * 64, c2: float = 0.03 ** 2 * 64):
    """Local SSIM with box windows (constants for z-scored data of range ~8)."""
    p = win // 2
    mu_a, mu_b = F.avg_pool2d(a, win, 1, p, count_include_pad=False), F.avg_pool2d(b, win, 1, p, count_include_pad=False)
    saa = F.avg_pool2d(a * a, win, 1, p, count_include_pad=False) - mu_a ** 2
    sbb = F.avg_pool2d(b * b, win, 1, p, count_include_pad=False) - mu_b ** 2
    sab = F.avg_pool2d(a * b, win, 1, p, count_include_pad=False) - mu_a * mu_b
    return ((2 * mu_a * mu_b + c1) * (2 * sab + c2)) / ((mu_a ** 2 + mu_b ** 2 + c1) * (saa + sbb + c2))


class AutoEncoder(nn.Module):
    def __init__(self, size=(256, 256), in_channels: int = 2, widths=(16, 32, 48, 64), latent: int = 16,
                 loss: str = "l1", topk_frac: float = 0.01, score_erode: int = 2, seed: int = 0, lr: float = 2e-3):
        super().__init__()
        if loss not in LOSSES:
            raise ValueError(f"loss must be one of {LOSSES}, got {loss!r}")
        self.size = (int(size[0]), int(size[1]))
        self.in_channels, self.widths, self.latent, self.loss = int(in_channels), tuple(int(w) for w in widths), int(latent), loss
        self.topk_frac, self.score_erode, self.seed, self.lr = float(topk_frac), int(score_erode), int(seed), float(lr)
        self.factor = 4
        self.map_hw = (self.size[0] // 4, self.size[1] // 4)
        self.k = max(1, int(round(self.topk_frac * self.map_hw[0] * self.map_hw[1])))
        torch.manual_seed(self.seed)
        enc, cin = [], 1
        for w in self.widths:
            enc.append(_block(cin, w, 2))
            cin = w
        enc.append(nn.Conv2d(cin, self.latent, 1))
        self.enc = nn.Sequential(*enc)
        dec, cin = [nn.Conv2d(self.latent, self.widths[-1], 1), nn.ReLU(inplace=True)], self.widths[-1]
        for w in reversed(self.widths[:-1]):
            dec += [nn.Upsample(scale_factor=2, mode="nearest"), _block(cin, w, 1)]
            cin = w
        dec += [nn.Upsample(scale_factor=2, mode="nearest"), nn.Conv2d(cin, 1, 3, 1, 1, padding_mode="reflect")]
        self.dec = nn.Sequential(*dec)

    def config(self) -> dict:
        return dict(size=list(self.size), in_channels=self.in_channels, widths=list(self.widths), latent=self.latent,
                    loss=self.loss, topk_frac=self.topk_frac, score_erode=self.score_erode, seed=self.seed, lr=self.lr)

    def residual(self, img, rec):
        if self.loss == "l1":
            return (rec - img).abs()
        if self.loss == "mse":
            return (rec - img) ** 2
        return (1.0 - ssim_map(img, rec)).clamp(min=0.0)

    def forward(self, x):
        img, m = split_input(x)
        rec = self.dec(self.enc(img))
        err = F.avg_pool2d(self.residual(img, rec) * m, self.factor)
        mm = mask_at(m, self.factor)
        amap = err * mm
        return amap, topk_score(amap, erode(mm, self.score_erode), self.k)

    def fit(self, batches, *, epochs: int = 10, progress: bool = True, max_seconds=None, **_) -> dict:
        torch.manual_seed(self.seed)
        g = torch.Generator().manual_seed(self.seed)
        opt = torch.optim.Adam(self.parameters(), lr=self.lr)
        self.train()

        def step(x, y, i):
            x = flip_aug(x, g)
            img, m = split_input(x)
            rec = self.dec(self.enc(img))
            loss = (self.residual(img, rec) * m).sum() / m.sum().clamp(min=1.0)
            opt.zero_grad()
            loss.backward()
            opt.step()
            return float(loss.detach())

        info = run_steps(self, batches, epochs, step, progress=progress, max_seconds=max_seconds, label=f"ae/{self.loss}")
        self.eval()
        return info
