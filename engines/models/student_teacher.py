"""Student–teacher feature distillation (STFPM / EfficientAD style) trained from scratch.

* **Teacher**: a small PDN-like conv net (4 convs, a strided first conv and one 2x average pool: 1/4-resolution
  features, receptive field ~30 px).  No pretrained weights exist offline, so it is pre-trained *self-supervised* on the normal frames: as the
  encoder of a denoising autoencoder (masked patches + noise in, clean image out, through a light decoder).  Its
  features are then frozen and normalised per channel (mean / std over the normal data), as in EfficientAD.
* **Student**: the same architecture from a different initialisation, trained to regress the teacher's features on
  normal frames only, with EfficientAD's hard-feature loss (only the top ``hard_q`` quantile of the squared errors).
* **Optional autoencoder branch** (``ae_branch=True``): a tiny AE predicts the teacher features from the image through a
  4x4-pixel bottleneck grid; a second student head regresses the AE output; the map adds ``|student2 - ae|^2`` (global /
  logical anomalies).  Off by default (it doubles the cost and did not help on these data).

Anomaly map (in-graph): mean over channels of ``(student - teacher)^2`` at 1/4 resolution inside the scan mask.  Score:
mean of the top-k cells inside the eroded mask.  Input ``[1,2,H,W]``.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .common import erode, flip_aug, mask_at, run_steps, split_input, topk_score

FAMILY = "student_teacher"


def pdn(width: int = 32, out: int = 64) -> nn.Sequential:
    """PDN-small-like (cheaper first stage for CPU): strided conv, conv-relu-pool, conv-relu, conv -> 1/4 resolution."""
    return nn.Sequential(
        nn.Conv2d(1, width, 3, 2, 1, padding_mode="reflect"), nn.ReLU(inplace=True),
        nn.Conv2d(width, 2 * width, 3, 1, 1, padding_mode="reflect"), nn.ReLU(inplace=True), nn.AvgPool2d(2, 2),
        nn.Conv2d(2 * width, 2 * width, 3, 1, 1, padding_mode="reflect"), nn.ReLU(inplace=True),
        nn.Conv2d(2 * width, out, 3, 1, 1, padding_mode="reflect"),
    )


class StudentTeacher(nn.Module):
    def __init__(self, size=(256, 256), in_channels: int = 2, width: int = 32, feat: int = 64, hard_q: float = 0.9,
                 teacher_epochs: int = 4, ae_branch: bool = False, topk_frac: float = 0.01, score_erode: int = 2,
                 seed: int = 0, lr: float = 2e-3):
        super().__init__()
        self.size = (int(size[0]), int(size[1]))
        self.in_channels, self.width, self.feat = int(in_channels), int(width), int(feat)
        self.hard_q, self.teacher_epochs, self.ae_branch = float(hard_q), int(teacher_epochs), bool(ae_branch)
        self.topk_frac, self.score_erode, self.seed, self.lr = float(topk_frac), int(score_erode), int(seed), float(lr)
        self.factor = 4
        self.map_hw = (self.size[0] // 4, self.size[1] // 4)
        self.k = max(1, int(round(self.topk_frac * self.map_hw[0] * self.map_hw[1])))
        torch.manual_seed(self.seed)
        self.teacher = pdn(self.width, self.feat)
        torch.manual_seed(self.seed + 1000)
        self.student = pdn(self.width, self.feat * (2 if self.ae_branch else 1))
        if self.ae_branch:
            self.ae = nn.Sequential(
                nn.Conv2d(1, 16, 4, 4), nn.ReLU(inplace=True), nn.Conv2d(16, 32, 4, 4), nn.ReLU(inplace=True),
                nn.Conv2d(32, 32, 4, 4), nn.ReLU(inplace=True), nn.Upsample(scale_factor=16, mode="bilinear"),
                nn.Conv2d(32, self.feat, 3, 1, 1), nn.ReLU(inplace=True), nn.Conv2d(self.feat, self.feat, 1))
        self.register_buffer("t_mean", torch.zeros(1, self.feat, 1, 1))
        self.register_buffer("t_std", torch.ones(1, self.feat, 1, 1))

    def config(self) -> dict:
        return dict(size=list(self.size), in_channels=self.in_channels, width=self.width, feat=self.feat,
                    hard_q=self.hard_q, teacher_epochs=self.teacher_epochs, ae_branch=self.ae_branch,
                    topk_frac=self.topk_frac, score_erode=self.score_erode, seed=self.seed, lr=self.lr)

    def t_feat(self, img):
        return (self.teacher(img) - self.t_mean) / self.t_std

    def forward(self, x):
        img, m = split_input(x)
        t = self.t_feat(img)
        s = self.student(img)
        d = ((s[:, : self.feat] - t) ** 2).mean(1, keepdim=True)
        if self.ae_branch:
            a = self.ae(img)
            d = 0.5 * d + 0.5 * ((s[:, self.feat:] - a) ** 2).mean(1, keepdim=True)
        mm = mask_at(m, self.factor)
        amap = d * mm
        return amap, topk_score(amap, erode(mm, self.score_erode), self.k)

    def fit(self, batches, *, epochs: int = 8, progress: bool = True, max_seconds=None, **_) -> dict:
        g = torch.Generator().manual_seed(self.seed)
        torch.manual_seed(self.seed)
        # 1) self-supervised teacher: denoising / inpainting autoencoder encoder
        dec = nn.Sequential(nn.Conv2d(self.feat, 32, 3, 1, 1), nn.ReLU(inplace=True), nn.Upsample(scale_factor=2),
                            nn.Conv2d(32, 16, 3, 1, 1), nn.ReLU(inplace=True), nn.Upsample(scale_factor=2),
                            nn.Conv2d(16, 1, 3, 1, 1))
        opt = torch.optim.Adam(list(self.teacher.parameters()) + list(dec.parameters()), lr=self.lr)
        self.train()

        def t_step(x, y, i):
            x = flip_aug(x, g)
            img, m = split_input(x)
            n, _, h, w = img.shape
            keep = (torch.rand(n, 1, h // 16, w // 16, generator=g) > 0.3).float()
            keep = F.interpolate(keep, size=(h, w), mode="nearest")
            noisy = img * keep + 0.3 * torch.randn(img.shape, generator=g) * m
            rec = dec(self.teacher(noisy))
            loss = (((rec - img) ** 2) * m).sum() / m.sum().clamp(min=1.0)
            opt.zero_grad()
            loss.backward()
            opt.step()
            return float(loss.detach())

        t_info = run_steps(self, batches, self.teacher_epochs, t_step, progress=progress,
                           max_seconds=max_seconds and max_seconds * 0.3, label="teacher (self-supervised)")
        for p in self.teacher.parameters():
            p.requires_grad_(False)
        self.teacher.eval()
        # 2) channel normalisation of the teacher features on normal data
        with torch.no_grad():
            s1 = torch.zeros(self.feat, dtype=torch.float64)
            s2 = torch.zeros(self.feat, dtype=torch.float64)
            cnt = 0.0
            for item in batches():
                img, m = split_input(item[0] if isinstance(item, (tuple, list)) else item)
                f = self.teacher(img).double()
                mm = mask_at(m, self.factor).double()
                s1 += (f * mm).sum((0, 2, 3))
                s2 += (f * f * mm).sum((0, 2, 3))
                cnt += float(mm.sum())
            mu = s1 / max(cnt, 1.0)
            sd = (s2 / max(cnt, 1.0) - mu * mu).clamp(min=1e-8).sqrt()
            self.t_mean.copy_(mu.float().reshape(1, -1, 1, 1))
            self.t_std.copy_(sd.float().reshape(1, -1, 1, 1))
        # 3) student (and AE branch)
        params = list(self.student.parameters()) + (list(self.ae.parameters()) if self.ae_branch else [])
        opt = torch.optim.Adam(params, lr=self.lr)

        def s_step(x, y, i):
            x = flip_aug(x, g)
            img, m = split_input(x)
            with torch.no_grad():
                t = self.t_feat(img)
            s = self.student(img)
            mm = mask_at(m, self.factor)
            d = (s[:, : self.feat] - t) ** 2 * mm
            vals = d[mm.expand_as(d) > 0]
            thr = torch.quantile(vals.detach()[: 2_000_000], self.hard_q) if vals.numel() else 0.0
            loss = vals[vals >= thr].mean()
            if self.ae_branch:
                a = self.ae(img)
                loss = loss + (((a - t) ** 2) * mm).mean() + (((s[:, self.feat:] - a.detach()) ** 2) * mm).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            return float(loss.detach())

        self.student.train()
        s_info = run_steps(self, batches, epochs, s_step, progress=progress,
                           max_seconds=max_seconds and max_seconds * 0.7, label="student")
        self.eval()
        return {**s_info, "teacher": t_info}
