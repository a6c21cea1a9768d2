"""The unit that travels from grab to screen: one captured image and its timing record."""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np


def now_ns() -> int:
    """The one clock of the pipeline: monotonic nanoseconds (same clock for capture, stages and receivers)."""
    return time.monotonic_ns()


@dataclass
class Frame:
    """One captured frame.

    ``image`` is always ``H x W x 3`` ``uint8`` BGR (sources convert grayscale, palette, YBR and 16-bit input).
    ``t_capture_ns`` is :func:`now_ns` at the moment the source delivered the frame.
    ``meta`` holds source metadata (``source``, ``fps``, ``index``, ``signal``...) and never patient data.
    ``stages`` maps a stage name to ``(start_ns, end_ns)``; every stage of the pipeline stamps itself here.
    """

    id: int
    t_capture_ns: int
    image: np.ndarray
    meta: dict[str, Any] = field(default_factory=dict)
    stages: dict[str, tuple[int, int]] = field(default_factory=dict)

    @property
    def signal(self) -> bool:
        """False for the placeholder frames a reconnecting source emits while its input is gone."""
        return bool(self.meta.get("signal", True))

    def stamp(self, stage: str, start_ns: int, end_ns: int | None = None) -> None:
        self.stages[stage] = (start_ns, now_ns() if end_ns is None else end_ns)

    def stage_ms(self) -> dict[str, float]:
        return {k: (b - a) / 1e6 for k, (a, b) in self.stages.items()}
