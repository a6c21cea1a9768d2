"""Reference backend: rebuild the torch module from ``card.family`` + ``card.family_config`` and load ``model.pt``."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from ..card import ModelCard
from ..models import build


class TorchBackend:
    name = "torch"

    def __init__(self, model_dir: str | Path, card: ModelCard, *, threads: int | None = None, **_):
        self.card = card
        path = Path(model_dir) / card.files.get("torch", "model.pt")
        if not path.exists():
            raise FileNotFoundError(f"{path}: torch state dict missing")
        if threads:
            torch.set_num_threads(int(threads))
        self.model = build(card.family, **card.family_config)
        state = torch.load(path, map_location="cpu", weights_only=True)
        self.model.load_state_dict(state)
        self.model.eval()

    @torch.no_grad()
    def infer(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        amap, score = self.model(torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)))
        return amap.numpy(), score.numpy()
