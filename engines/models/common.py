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
