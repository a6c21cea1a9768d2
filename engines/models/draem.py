"""Synthetic-anomaly self-supervised segmenter (DRAEM / NSA style, one stage) with ultrasound lesion synthesis.

Trained on normal frames only: half of each batch gets synthetic anomalies (:mod:`.synth`: hypo/hyperechoic elliptical
and irregular masses with speckle-consistent texture, posterior shadowing / enhancement, and for lung B-line-like
vertical artefacts and subpleural consolidations), and a small U-Net learns to segment them (BCE + soft Dice).
Anomaly map (in-graph): the sigmoid probability at 1/4 resolution (``fine``: 1/2, one more decoder stage) inside the scan mask; score: mean of the top-k
cells inside the eroded mask.  Because the map is a probability, the pixel threshold chosen on held-out normals is
floored at ``prob_floor`` (0.5: "more likely lesion than not" by the model's own objective; no abnormal data used).
Input ``[1,2,H,W]``.

Real lesions (optional, ``real_p`` > 0 and a bank set by :meth:`SyntheticSegmenter.set_lesion_bank`): where the user
has abnormal images *with lesion masks*, a share ``real_p`` of the batch items also learns from them — half of those
items are the real abnormal images with their masks as the target, the other half normal frames with a real lesion
(its pixels, soft-edged) pasted at a random place inside the scan (copy-paste, as in NSA / CutPaste but with real
lesions).  The threshold is still chosen on held-out normal frames only.

Hard negatives (optional, ``img_loss`` > 0): the pixel loss averages over every cell, so a few hot cells on a
lesion-free frame cost it almost nothing although they set that frame's image score.  With ``img_loss`` the loss also
charges each lesion-free item's image logit (the mean of its top-k in-scan logits, the quantity the image score
ranks) towards 0, weighted by ``img_loss``.  Measured on BUSI (``benchmarks/detectors.md``, ``draem+ens2s160neg``)
it lowers every metric — the maps learn to stay cold, lesions included — so it is off by default.

Frame context (optional, ``context``): a cell's logit otherwise sees only its receptive field (~110 px), so a dark
fat lobule looks like a mass whatever the rest of the scan shows.  With ``context`` the frame's mean bottleneck
feature, through a 1x1 layer, is added to every bottleneck cell before decoding (a few thousand parameters per member,
static shapes, exported in-graph).  Measured on BUSI in ``benchmarks/detectors.md`` (``draem+ens2ctx``).
``context_pool="scan"`` takes that mean over the scan's cells only (the mask channel at 1/16): with the default
(``"frame"``, every cell) the black background outside the fan, whose share differs from frame to frame, dilutes it.

Harder synthesis (optional, ``synth_iso`` / ``synth_surface``: shares of the synthetic masses): isoechoic,
heterogeneous, large masses set off only by texture and a rim or halo, and small masses just under the skin line —
the two kinds of BUSI lesion the plain synthesis misses (see :mod:`.synth`).
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .common import erode, flip_aug, mask_at, photo_aug, run_steps, split_input, topk_score
from .synth import synthesize

FAMILY = "draem"


def _cbr(cin, cout, stride=1):
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1, padding_mode="reflect"), nn.BatchNorm2d(cout),
                         nn.ReLU(inplace=True))


class SyntheticSegmenter(nn.Module):
    prob_floor = 0.5

    def __init__(self, size=(256, 256), in_channels: int = 2, widths=(16, 32, 48, 64), synth: str = "all",
                 topk_frac: float = 0.01, score_erode: int = 2, seed: int = 0, lr: float = 2e-3, p_anomaly: float = 0.5,
                 real_p: float = 0.0, aug: str = "flip", members: int = 1, tta_flip: bool = False,
                 img_loss: float = 0.0, fine: bool = False, context: bool = False, context_pool: str = "frame",
                 synth_iso: float = 0.0, synth_surface: float = 0.0):
        super().__init__()
        self.size = (int(size[0]), int(size[1]))
        self.in_channels, self.widths, self.synth = int(in_channels), tuple(int(w) for w in widths), synth
        self.topk_frac, self.score_erode, self.seed, self.lr = float(topk_frac), int(score_erode), int(seed), float(lr)
        self.p_anomaly, self.real_p = float(p_anomaly), float(real_p)
        if aug not in ("flip", "photo"):
            raise ValueError(f"draem: aug must be 'flip' or 'photo', got {aug!r}")
        self.aug = aug
        if int(members) < 1:
            raise ValueError(f"draem: members must be >= 1, got {members}")
        self.members, self.tta_flip = int(members), bool(tta_flip)
        if float(img_loss) < 0:
            raise ValueError(f"draem: img_loss must be >= 0, got {img_loss}")
        self.img_loss = float(img_loss)
        self.fine, self.context = bool(fine), bool(context)
        if context_pool not in ("frame", "scan"):
            raise ValueError(f"draem: context_pool must be 'frame' or 'scan', got {context_pool!r}")
        self.context_pool = context_pool
        if not (0.0 <= float(synth_iso) <= 1.0 and 0.0 <= float(synth_surface) <= 1.0):
            raise ValueError(f"draem: synth_iso and synth_surface must lie in [0, 1], got {synth_iso}, {synth_surface}")
        self.synth_iso, self.synth_surface = float(synth_iso), float(synth_surface)
        self._bank: tuple[torch.Tensor, torch.Tensor] | None = None
        self.factor = 2 if self.fine else 4  # fine: one more decoder stage, the map at 1/2 resolution
        self.map_hw = (self.size[0] // self.factor, self.size[1] // self.factor)
        self.k = max(1, int(round(self.topk_frac * self.map_hw[0] * self.map_hw[1])))
        torch.manual_seed(self.seed)
        _unet_layers(self, self.widths, self.fine, self.context)
        # further ensemble members: the same U-Net, each from its own initialisation (member 0 is this module's own
        # layers, so a one-member model keeps the state-dict keys it always had)
        more = []
        for i in range(1, self.members):
            torch.manual_seed(self._member_seed(i))
            more.append(_UNet(self.widths, self.fine, self.context))
        self.more = nn.ModuleList(more)

    def config(self) -> dict:
        return dict(size=list(self.size), in_channels=self.in_channels, widths=list(self.widths), synth=self.synth,
                    topk_frac=self.topk_frac, score_erode=self.score_erode, seed=self.seed, lr=self.lr,
                    p_anomaly=self.p_anomaly, real_p=self.real_p, aug=self.aug, members=self.members,
                    tta_flip=self.tta_flip, img_loss=self.img_loss, fine=self.fine, context=self.context,
                    context_pool=self.context_pool, synth_iso=self.synth_iso, synth_surface=self.synth_surface)

    def set_lesion_bank(self, x: torch.Tensor, masks: torch.Tensor) -> None:
        """Real abnormal inputs ``[M,C,H,W]`` (preprocessed like the normal frames) and their lesion masks ``[M,1,H,W]``
        (0/1 at input resolution), used in :meth:`fit` when ``real_p`` > 0.  Items without lesion pixels are dropped."""
        keep = masks.flatten(1).amax(1) > 0.5
        if x.shape[0] != masks.shape[0] or x.shape[-2:] != masks.shape[-2:]:
            raise ValueError(f"lesion bank: {tuple(x.shape)} inputs vs {tuple(masks.shape)} masks")
        self._bank = (x[keep].float(), (masks[keep] > 0.5).float()) if bool(keep.any()) else None

    def _real_mix(self, xs: torch.Tensor, tgt: torch.Tensor, g: torch.Generator):
        """Replace a share ``real_p`` of the items by a real lesion: the abnormal image itself, or its lesion pasted."""
        bank_x, bank_m = self._bank
        xs, tgt = xs.clone(), tgt.clone()
        n, _, h, w = xs.shape
        for i in range(n):
            if float(torch.rand((), generator=g)) >= self.real_p:
                continue
            j = int(torch.randint(0, bank_x.shape[0], (1,), generator=g))
            src, les = bank_x[j], bank_m[j, 0]
            if float(torch.rand((), generator=g)) < 0.5:
                src, les = src.flip(-1), les.flip(-1)
            if self.aug == "photo":
                a, b = photo_aug(src[None], g, les[None, None])
                src, les = a[0], b[0, 0]
            if float(torch.rand((), generator=g)) < 0.5:  # the real abnormal image, as it is
                xs[i], tgt[i, 0] = src, les
                continue
            # copy-paste: the lesion's pixels (and a soft rim) moved to a random point inside this frame's scan
            ys, xs_ = torch.nonzero(les > 0.5, as_tuple=True)
            m_i = xs[i, 1] if xs.shape[1] >= 2 else (xs[i, 0] != 0).float()
            ty, tx = torch.nonzero(m_i > 0.5, as_tuple=True)
            if len(ys) < 4 or len(ty) < 16:
                continue
            k = int(torch.randint(0, len(ty), (1,), generator=g))
            dy = int(ty[k]) - int(ys.float().mean())
            dx = int(tx[k]) - int(xs_.float().mean())
            dy = max(-int(ys.min()), min(h - 1 - int(ys.max()), dy))  # keep the lesion inside the frame
            dx = max(-int(xs_.min()), min(w - 1 - int(xs_.max()), dx))
            alpha = F.avg_pool2d(F.max_pool2d(les[None, None], 5, 1, 2), 5, 1, 2, count_include_pad=False)[0, 0]
            alpha = torch.roll(alpha, (dy, dx), (0, 1)) * m_i
            moved = torch.roll(src[0], (dy, dx), (0, 1))
            xs[i, 0] = (xs[i, 0] * (1 - alpha) + moved * alpha) * m_i
            tgt[i, 0] = torch.maximum(tgt[i, 0], torch.roll(les, (dy, dx), (0, 1)) * m_i)
        return xs, tgt

    def _pool_mask(self, m):
        """The cells the context averages over: the scan's (``context_pool="scan"``, given the input-resolution mask
        ``m``) or all of them (``None``)."""
        return mask_at(m, 16) if m is not None and self.context and self.context_pool == "scan" else None

    def logits(self, img, m=None):
        """Member 0's logits at map resolution (1/4, or 1/2 with ``fine``); ``m``: the input-resolution scan mask
        (used by ``context_pool="scan"``)."""
        return _unet_logits(self, img, self._pool_mask(m))

    def member(self, i: int) -> nn.Module:
        return self if i == 0 else self.more[i - 1]

    def _member_seed(self, i: int) -> int:
        """Seed of member ``i``'s initialisation and of its training draws (member 0: the model's own seed)."""
        return self.seed + 1000 * i

    def probability(self, img, m=None):
        """The map: the members' sigmoid probabilities averaged (and over a left-right flip with ``tta_flip``)."""
        pm = self._pool_mask(m)
        views = [(img, pm), (img.flip(-1), None if pm is None else pm.flip(-1))] if self.tta_flip else [(img, pm)]
        acc = None
        for i in range(self.members):
            for j, (v, vm) in enumerate(views):
                p = torch.sigmoid(_unet_logits(self.member(i), v, vm))
                p = p.flip(-1) if j else p
                acc = p if acc is None else acc + p
        return acc * (1.0 / (self.members * len(views)))

    def forward(self, x):
        img, m = split_input(x)
        mm = mask_at(m, self.factor)
        amap = self.probability(img, m) * mm
        return amap, topk_score(amap, erode(mm, self.score_erode), self.k)

    def fit(self, batches, *, epochs: int = 12, progress: bool = True, max_seconds=None, **_) -> dict:
        """Train the members one after the other (each its own optimiser, synthesis and augmentation draws; the
        batch order is the caller's), ``max_seconds`` shared out evenly."""
        infos = []
        for i in range(self.members):
            share = None if not max_seconds else max_seconds / self.members
            infos.append(self._fit_member(i, batches, epochs, progress, share))
        self.eval()
        info = dict(infos[0])
        if self.members > 1:
            info["steps"] = sum(x["steps"] for x in infos)
            info["seconds"] = round(sum(x["seconds"] for x in infos), 2)
            info["members"] = [{k: x[k] for k in ("steps", "final_loss", "seconds")} for x in infos]
        info["lesions"] = ("synthetic + real (masks of %d abnormal images, p=%g)" % (self._bank[0].shape[0], self.real_p)
                           if self._bank is not None and self.real_p > 0 else "synthetic only")
        return info

    def _fit_member(self, i: int, batches, epochs: int, progress: bool, max_seconds) -> dict:
        net = self.member(i)
        params = [p for n, p in self.named_parameters() if not n.startswith("more.")] if i == 0 else list(net.parameters())
        torch.manual_seed(self._member_seed(i))
        g = torch.Generator().manual_seed(self._member_seed(i))
        opt = torch.optim.Adam(params, lr=self.lr)
        self.train()

        def step(x, y, i):
            x = flip_aug(x, g)
            if self.aug == "photo":
                x, _ = photo_aug(x, g)
            xs, tgt = synthesize(x, g, self.synth, p=self.p_anomaly, iso_p=self.synth_iso,
                                 surface_p=self.synth_surface)
            if self._bank is not None and self.real_p > 0:
                xs, tgt = self._real_mix(xs, tgt, g)
            img, m = split_input(xs)
            mm = mask_at(m, self.factor)
            t = F.avg_pool2d(tgt, self.factor)
            lg = _unet_logits(net, img, self._pool_mask(m))
            bce = (F.binary_cross_entropy_with_logits(lg, t, reduction="none", pos_weight=torch.tensor(3.0)) * mm).sum() / mm.sum().clamp(min=1)
            p = torch.sigmoid(lg) * mm
            dice = 1 - (2 * (p * t).sum() + 1) / (p.sum() + t.sum() + 1)
            loss = bce + dice
            if self.img_loss > 0:  # the image score itself: the top-k cells of lesion-free frames pushed down
                loss = loss + self.img_loss * _topk_image_loss(lg, mm, t, self.k)
            opt.zero_grad()
            loss.backward()
            opt.step()
            return float(loss.detach())

        label = "draem" if self.members == 1 else f"draem {i + 1}/{self.members}"
        return run_steps(self, batches, epochs, step, progress=progress, max_seconds=max_seconds, label=label)


def _topk_image_loss(lg: torch.Tensor, mm: torch.Tensor, t: torch.Tensor, k: int) -> torch.Tensor:
    """Hard negatives: the BCE towards 0 of each lesion-free item's image logit (the mean of its ``k`` largest in-scan
    logits: what the image score ranks), averaged over those items (0 when the batch has none).  The pixel loss
    averages over every cell, so a few hot cells on a normal frame cost it almost nothing while they set that frame's
    image score; this term charges them directly.  Items with a lesion are left to the pixel loss."""
    flat = lg.masked_fill(mm < 0.5, -1e4).flatten(1)
    k = max(1, min(int(k), flat.shape[1]))
    z = torch.topk(flat, k, dim=1).values.mean(dim=1)
    free = t.flatten(1).amax(1) <= 0.0
    if not bool(free.any()):
        return z.sum() * 0.0
    return F.softplus(z[free]).mean()


class _UNet(nn.Module):
    """A further ensemble member: the layers of :class:`SyntheticSegmenter`'s own U-Net."""

    def __init__(self, widths, fine: bool = False, context: bool = False):
        super().__init__()
        _unet_layers(self, widths, fine, context)


def _unet_layers(net: nn.Module, widths, fine: bool = False, context: bool = False) -> None:
    """The U-Net's layers, set on ``net``: encoder to 1/16, decoder back to 1/4 (``fine``: to 1/2), a 1x1 logit head;
    ``context``: the frame's (or the scan's) mean bottleneck feature, through a 1x1 layer, added to every bottleneck
    cell (what the rest of the scan looks like, for cells whose own neighbourhood is ambiguous)."""
    w0, w1, w2, w3 = widths
    net.e0 = nn.Sequential(_cbr(1, w0, 2), _cbr(w0, w0))          # 1/2
    net.e1 = nn.Sequential(_cbr(w0, w1, 2), _cbr(w1, w1))         # 1/4
    net.e2 = nn.Sequential(_cbr(w1, w2, 2), _cbr(w2, w2))         # 1/8
    net.e3 = nn.Sequential(_cbr(w2, w3, 2), _cbr(w3, w3))         # 1/16
    net.d2 = _cbr(w3 + w2, w2)
    net.d1 = _cbr(w2 + w1, w1)
    if fine:
        net.d0 = _cbr(w1 + w0, w0)
    net.head = nn.Conv2d(w0 if fine else w1, 1, 1)
    if context:
        net.ctx = nn.Sequential(nn.Conv2d(w3, w3, 1), nn.ReLU(inplace=True))


def _unet_logits(net, img, pool_mask=None):
    """Logits at map resolution; ``pool_mask`` (0/1 at 1/16, optional): the cells the context's mean is taken over
    (the scan's, so that the dark background outside the fan, whose share varies from frame to frame, does not dilute
    it); ``None``: every cell."""
    a = net.e0(img)
    b = net.e1(a)
    c = net.e2(b)
    d = net.e3(c)
    if hasattr(net, "ctx"):  # context: the frame's mean feature, broadcast to every cell
        if pool_mask is None:
            mean = d.mean((2, 3), keepdim=True)
        else:
            mean = (d * pool_mask).sum((2, 3), keepdim=True) / pool_mask.sum((2, 3), keepdim=True).clamp(min=1.0)
        d = d + net.ctx(mean)
    c = net.d2(torch.cat([F.interpolate(d, scale_factor=2.0, mode="nearest"), c], 1))
    b = net.d1(torch.cat([F.interpolate(c, scale_factor=2.0, mode="nearest"), b], 1))
    if hasattr(net, "d0"):  # fine: 1/2 resolution
        return net.head(net.d0(torch.cat([F.interpolate(b, scale_factor=2.0, mode="nearest"), a], 1)))
    return net.head(b)  # 1/4 resolution
