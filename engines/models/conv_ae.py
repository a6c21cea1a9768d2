"""Small convolutional autoencoder: anomaly map = local reconstruction error of the z-scored image.

Trained from scratch on normal frames (masked L2 loss inside the scan); convs pad by reflection so the crop border is
not an anomaly.  The map is the mean absolute residual in
4x4 cells (``[1,1,H/4,W/4]``); the score is the mean of the top-k cells inside the eroded scan mask (in-graph).
Input: ``[1, 2, H, W]`` (z-scored grayscale, 0/1 scan mask).
"""
from __future__ import annotations

import sys
import time
from typing import Callable, Iterable

import torch
import torch.nn as nn
import torch.nn.functional as F

from .common import erode, mask_at, split_input, topk_score

FAMILY = "conv_ae"


def _block(cin, cout, stride):
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1, padding_mode="reflect"), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class ConvAE(nn.Module):
    def __init__(self, size=(256, 256), in_channels: int = 2, widths=(16, 32, 48, 64), bottleneck: int = 16,
                 topk_frac: float = 0.01, score_erode: int = 2, seed: int = 0, lr: float = 2e-3):
        super().__init__()
        self.size = (int(size[0]), int(size[1]))
        self.in_channels = int(in_channels)
        self.widths = tuple(int(w) for w in widths)
        self.bottleneck = int(bottleneck)
        self.topk_frac = float(topk_frac)
        self.score_erode = int(score_erode)
        self.seed = int(seed)
        self.lr = float(lr)
        self.factor = 4
        self.map_hw = (self.size[0] // 4, self.size[1] // 4)
        self.k = max(1, int(round(self.topk_frac * self.map_hw[0] * self.map_hw[1])))
        torch.manual_seed(self.seed)
        enc, cin = [], 1
        for w in self.widths:
            enc.append(_block(cin, w, 2))
            cin = w
        enc.append(nn.Conv2d(cin, self.bottleneck, 1))
        self.enc = nn.Sequential(*enc)
        dec, cin = [nn.Conv2d(self.bottleneck, self.widths[-1], 1), nn.ReLU(inplace=True)], self.widths[-1]
        for w in reversed(self.widths[:-1]):
            dec += [nn.Upsample(scale_factor=2, mode="nearest"), _block(cin, w, 1)]
            cin = w
        dec += [nn.Upsample(scale_factor=2, mode="nearest"), nn.Conv2d(cin, 1, 3, 1, 1, padding_mode="reflect")]
        self.dec = nn.Sequential(*dec)

    def config(self) -> dict:
        return dict(size=list(self.size), in_channels=self.in_channels, widths=list(self.widths),
                    bottleneck=self.bottleneck, topk_frac=self.topk_frac, score_erode=self.score_erode, seed=self.seed,
                    lr=self.lr)

    def forward(self, x: torch.Tensor):
        img, m = split_input(x)
        rec = self.dec(self.enc(img))
        err = F.avg_pool2d((rec - img).abs() * m, self.factor)
        mm = mask_at(m, self.factor)
        amap = err * mm
        return amap, topk_score(amap, erode(mm, self.score_erode), self.k)

    def fit(self, batches: Callable[[], Iterable[torch.Tensor]], *, epochs: int = 5, progress: bool = True,
            max_seconds: float | None = None, **_) -> dict:
        torch.manual_seed(self.seed)
        opt = torch.optim.Adam(self.parameters(), lr=self.lr)
        self.train()
        t0 = time.time()
        steps, last = 0, float("nan")
        for ep in range(epochs):
            for xb in batches():
                img, m = split_input(xb)
                rec = self.dec(self.enc(img))
                loss = (((rec - img) ** 2) * m).sum() / m.sum().clamp(min=1.0)
                opt.zero_grad()
                loss.backward()
                opt.step()
                steps += 1
                last = float(loss.detach())
                if progress and steps % 5 == 0:
                    print(f"\r  epoch {ep + 1}/{epochs} step {steps} loss {last:.4f} ({time.time() - t0:.0f}s)",
                          end="", file=sys.stderr, flush=True)
                if max_seconds and time.time() - t0 > max_seconds:
                    break
            if max_seconds and time.time() - t0 > max_seconds:
                break
        if progress:
            print(file=sys.stderr)
        self.eval()
        return {"steps": steps, "epochs": epochs, "final_loss": round(last, 5), "seconds": round(time.time() - t0, 2)}
