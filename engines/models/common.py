"""Pieces shared by the detector families (all plain ops that export to ONNX opset 17 and run in ORT)."""
from __future__ import annotations

import math

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


def progress_bar(done: int, total: int, t0: float, msg: str = "", width: int = 24) -> None:
    """One-line progress bar on stderr (``\\r``-updated; a newline when done)."""
    import sys
    import time

    total = max(int(total), 1)
    frac = min(done / total, 1.0)
    el = time.time() - t0
    eta = el / frac - el if frac > 0 else float("nan")
    bar = "#" * int(frac * width) + "-" * (width - int(frac * width))
    print(f"\r  [{bar}] {done}/{total} {msg} {el:.0f}s (eta {eta:.0f}s)", end="", file=sys.stderr, flush=True)
    if done >= total:
        print(file=sys.stderr, flush=True)


def flip_aug(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Random left-right flips (ultrasound is roughly mirror-symmetric across the beam axis)."""
    flip = torch.rand(x.shape[0], generator=g) < 0.5
    if flip.any():
        x = x.clone()
        x[flip] = x[flip].flip(-1)
    return x


def photo_aug(x: torch.Tensor, g: torch.Generator, extra: torch.Tensor | None = None, *, p: float = 0.8,
              gamma: tuple[float, float] = (0.6, 1.6), zoom: tuple[float, float] = (0.85, 1.2),
              shift: float = 0.06, clip: float = 4.0):
    """Acquisition-like augmentation of preprocessed inputs ``[N,C,H,W]`` (channel 0 z-scored inside the mask of
    channel 1): with probability ``p`` per item, a random gamma of the in-mask intensities (re-z-scored, as
    :func:`..processing.preprocess` would have done: a scanner's gain / dynamic-range setting), and a random zoom and
    shift (depth / field-of-view setting).  ``extra`` ``[N,k,H,W]`` (e.g. lesion masks) gets the same geometry.
    Returns ``(x, extra)``; items not drawn are unchanged."""
    n, c, h, w = x.shape
    pick = torch.rand(n, generator=g) < p
    if not bool(pick.any()):
        return x, extra
    x = x.clone()
    extra = None if extra is None else extra.clone()
    idx = torch.nonzero(pick, as_tuple=True)[0]
    xi = x[idx]
    # zoom + shift (one affine per item): bilinear for the image, nearest for masks
    s = zoom[0] + (zoom[1] - zoom[0]) * torch.rand(len(idx), generator=g)
    t = (2 * torch.rand(len(idx), 2, generator=g) - 1) * shift
    theta = torch.zeros(len(idx), 2, 3)
    theta[:, 0, 0] = 1.0 / s
    theta[:, 1, 1] = 1.0 / s
    theta[:, :, 2] = t
    grid = F.affine_grid(theta, list(xi.shape), align_corners=False)
    im = F.grid_sample(xi[:, :1], grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    mk = F.grid_sample(xi[:, 1:], grid, mode="nearest", padding_mode="zeros", align_corners=False) if c > 1 else None
    if mk is not None:
        im = im * (mk[:, :1] > 0.5)
        xi = torch.cat([im, mk], 1)
    else:
        xi = im
    img, m = split_input(xi)
    inside = m > 0.5
    # gamma on [0, 1]-scaled in-mask values, then z-score inside the mask again
    lo = torch.where(inside, img, torch.full_like(img, float("inf"))).flatten(1).amin(1).view(-1, 1, 1, 1)
    hi = torch.where(inside, img, torch.full_like(img, float("-inf"))).flatten(1).amax(1).view(-1, 1, 1, 1)
    u = ((img - lo) / (hi - lo).clamp(min=1e-6)).clamp(0, 1)
    lg0, lg1 = math.log(gamma[0]), math.log(gamma[1])
    gam = torch.exp(lg0 + (lg1 - lg0) * torch.rand(len(idx), generator=g))
    u = u ** gam.view(-1, 1, 1, 1)
    cnt = inside.flatten(1).sum(1).clamp(min=1).view(-1, 1, 1, 1)
    mean = (u * inside).flatten(1).sum(1).view(-1, 1, 1, 1) / cnt
    var = (((u - mean) ** 2) * inside).flatten(1).sum(1).view(-1, 1, 1, 1) / cnt
    z = torch.nan_to_num(((u - mean) / var.sqrt().clamp(min=1e-3)).clamp(-clip, clip)) * inside  # no-mask items: 0
    xi = torch.cat([z, xi[:, 1:]], 1)
    x[idx] = xi
    if extra is not None:
        extra[idx] = F.grid_sample(extra[idx], grid, mode="nearest", padding_mode="zeros", align_corners=False)
    return x, extra


def unpack(item):
    """A batch is a tensor ``x`` or a tuple ``(x, labels)``."""
    if isinstance(item, (tuple, list)):
        return item[0], item[1]
    return item, None


def run_steps(module, batches, epochs: int, step_fn, *, progress: bool, max_seconds: float | None, label: str):
    """Generic epoch loop with a progress bar: ``step_fn(x, y, step) -> loss float``."""
    import time

    t0 = time.time()
    steps, last = 0, float("nan")
    n_per_epoch = None
    stop = False
    for ep in range(epochs):
        k = 0
        for item in batches():
            x, y = unpack(item)
            last = step_fn(x, y, steps)
            steps += 1
            k += 1
            if progress and n_per_epoch:
                progress_bar(min(steps, n_per_epoch * epochs), n_per_epoch * epochs, t0, f"{label} loss {last:.4f}")
            if max_seconds and time.time() - t0 > max_seconds:
                stop = True
                break
        n_per_epoch = n_per_epoch or k
        if stop:
            break
    if progress:
        progress_bar(1, 1, t0, f"{label} loss {last:.4f} ({steps} steps)")
    return {"steps": steps, "epochs": epochs, "final_loss": round(float(last), 5), "seconds": round(time.time() - t0, 2)}
