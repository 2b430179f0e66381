"""Wall-time measurement with ``torch.utils.benchmark`` (warm-up, spread, noise warnings)."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from torch.utils.benchmark import Measurement


def measure(
    fn: Callable[[], object], min_run_time: float = 0.2, threads: int | None = None
) -> Measurement:
    """Time ``fn()`` with ``Timer.blocked_autorange``: ``.median`` and ``.iqr`` in seconds."""
    from torch.utils.benchmark import Timer  # loads the C++ toolchain helpers: only when timing

    timer = Timer(
        stmt="fn()",
        globals={"fn": fn},
        num_threads=threads if threads is not None else torch.get_num_threads(),
    )
    return timer.blocked_autorange(min_run_time=min_run_time)
