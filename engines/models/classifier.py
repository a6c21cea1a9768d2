"""Supervised / weakly supervised classifier (MobileNetV3-small-like) with a Grad-CAM heatmap in the static graph.

Backbone: hard-swish stem, inverted-residual blocks with depthwise convs and squeeze-excitation (MobileNetV3-small
pattern, narrower, stopping at 1/8 resolution so the map keeps detail), then a 1x1 "abnormal" head.  With
global-average pooling and a linear head, Grad-CAM's channel weights (the gradient of the logit w.r.t. each feature map,
averaged) are exactly the head weights divided by the number of cells, so Grad-CAM = ReLU(head applied per location)
up to a constant: the exported graph computes that map directly (no gradients at run time).
``pool="mil"`` instead scores the image by multiple-instance pooling: the mean of the top ``mil_frac`` per-location
logits (a patch-level MIL classifier whose instance map *is* the heatmap).

Labels: when the training data include abnormal images (``labels`` 1), it trains on them (supervised); otherwise
(normal frames only) the positives are synthetic lesions (:mod:`.synth`) — weak supervision.
Map: softplus(per-location logit) (a smooth ReLU: Grad-CAM's ReLU, but still ranked where every logit is
negative) upsampled to 1/4 resolution, inside the scan mask; score: the pooled logit.
Input ``[1,2,H,W]``.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .common import flip_aug, mask_at, run_steps, split_input
from .synth import synthesize

FAMILY = "classifier"


class SE(nn.Module):
    def __init__(self, c, r=4):
        super().__init__()
        self.fc1, self.fc2 = nn.Conv2d(c, max(8, c // r), 1), nn.Conv2d(max(8, c // r), c, 1)

    def forward(self, x):
        s = F.adaptive_avg_pool2d(x, 1)
        return x * F.hardsigmoid(self.fc2(F.relu(self.fc1(s))))


class IR(nn.Module):
    """Inverted residual: 1x1 expand, kxk depthwise (stride), SE, 1x1 project."""

    def __init__(self, cin, exp, cout, k, stride, se, act):
        super().__init__()
        A = nn.Hardswish if act == "hs" else nn.ReLU
        self.block = nn.Sequential(
            nn.Conv2d(cin, exp, 1, bias=False), nn.BatchNorm2d(exp), A(),
            nn.Conv2d(exp, exp, k, stride, k // 2, groups=exp, bias=False), nn.BatchNorm2d(exp), A(),
            SE(exp) if se else nn.Identity(),
            nn.Conv2d(exp, cout, 1, bias=False), nn.BatchNorm2d(cout))
        self.res = stride == 1 and cin == cout

    def forward(self, x):
        y = self.block(x)
        return x + y if self.res else y


# (cin, expand, cout, kernel, stride, SE, activation)
_CFG = [(16, 16, 16, 3, 2, True, "re"), (16, 64, 24, 3, 2, False, "re"), (24, 72, 24, 3, 1, False, "re"),
        (24, 96, 40, 5, 1, True, "hs"), (40, 120, 40, 5, 1, True, "hs"), (40, 144, 48, 5, 1, True, "hs")]


class CamClassifier(nn.Module):
    def __init__(self, size=(256, 256), in_channels: int = 2, pool: str = "gap", mil_frac: float = 0.05,
                 synth: str = "all", seed: int = 0, lr: float = 2e-3, head_width: int = 96):
        super().__init__()
        if pool not in ("gap", "mil"):
            raise ValueError(f"pool must be 'gap' or 'mil', got {pool!r}")
        self.size = (int(size[0]), int(size[1]))
        self.in_channels, self.pool, self.mil_frac, self.synth = int(in_channels), pool, float(mil_frac), synth
        self.seed, self.lr, self.head_width = int(seed), float(lr), int(head_width)
        self.factor = 4
        self.map_hw = (self.size[0] // 4, self.size[1] // 4)
        cells = (self.size[0] // 8) * (self.size[1] // 8)
        self.k = max(1, int(round(self.mil_frac * cells)))
        torch.manual_seed(self.seed)
        self.stem = nn.Sequential(nn.Conv2d(1, 16, 3, 2, 1, bias=False), nn.BatchNorm2d(16), nn.Hardswish())
        self.blocks = nn.Sequential(*[IR(*c) for c in _CFG])
        self.last = nn.Sequential(nn.Conv2d(48, self.head_width, 1, bias=False), nn.BatchNorm2d(self.head_width),
                                  nn.Hardswish())
        self.head = nn.Conv2d(self.head_width, 1, 1)

    def config(self) -> dict:
        return dict(size=list(self.size), in_channels=self.in_channels, pool=self.pool, mil_frac=self.mil_frac,
                    synth=self.synth, seed=self.seed, lr=self.lr, head_width=self.head_width)

    def cam_logits(self, img, m):
        f = self.last(self.blocks(self.stem(img)))  # 1/8
        return self.head(f), mask_at(m, 8)

    def pooled(self, cl, m8):
        if self.pool == "gap":
            return (cl * m8).sum((1, 2, 3)) / m8.sum((1, 2, 3)).clamp(min=1.0)
        flat = (cl * m8 + (m8 - 1.0) * 1e4).flatten(1)
        return torch.topk(flat, self.k, dim=1).values.mean(1)

    def forward(self, x):
        img, m = split_input(x)
        cl, m8 = self.cam_logits(img, m)
        score = self.pooled(cl, m8)
        cam = F.interpolate(F.softplus(cl), scale_factor=2.0, mode="bilinear", align_corners=False)
        return cam * mask_at(m, self.factor), score

    def fit(self, batches, *, epochs: int = 10, progress: bool = True, max_seconds=None, **_) -> dict:
        torch.manual_seed(self.seed)
        g = torch.Generator().manual_seed(self.seed)
        opt = torch.optim.Adam(self.parameters(), lr=self.lr, weight_decay=1e-4)
        self.train()
        mode = {"mode": None}

        def step(x, y, i):
            x = flip_aug(x, g)
            if y is None or not bool((y > 0).any()):
                x, tgt = synthesize(x, g, self.synth, p=0.5)
                y = (tgt.flatten(1).amax(1) > 0).float()
                mode["mode"] = mode["mode"] or "weak (synthetic lesions as positives)"
            else:
                y = y.float()
                mode["mode"] = "supervised (image labels)"
            img, m = split_input(x)
            cl, m8 = self.cam_logits(img, m)
            logit = self.pooled(cl, m8)
            npos = float(y.sum())
            pw = torch.tensor(max(1.0, (len(y) - npos) / max(npos, 1.0)))
            loss = F.binary_cross_entropy_with_logits(logit, y, pos_weight=pw)
            opt.zero_grad()
            loss.backward()
            opt.step()
            return float(loss.detach())

        info = run_steps(self, batches, epochs, step, progress=progress, max_seconds=max_seconds, label="classifier")
        self.eval()
        return {**info, "labels": mode["mode"]}
