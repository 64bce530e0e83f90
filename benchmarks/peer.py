"""What the benchmarks that time ours against transformers (the peer, measured in the same run)
share: ``--repeats`` and ``--torch_threads``, and the interleaved timing rounds.

``benchmarks/bench_eval.py`` and ``benchmarks/bench_generate.py`` import it as a sibling module
(a script's own folder is on ``sys.path``).
"""

from __future__ import annotations

import statistics
from collections.abc import Callable, Mapping
from typing import TypeVar

from absl import flags

REPEATS = flags.DEFINE_integer(
    "repeats", 3, "timed rounds after one warm-up; each round runs every engine once"
)
TORCH_THREADS = flags.DEFINE_integer("torch_threads", 0, "torch intra-op threads (0 = default)")

Key = TypeVar("Key")


def set_torch_threads() -> None:
    """Applies ``--torch_threads`` to the transformers peer (0 keeps torch's default)."""
    import torch

    if TORCH_THREADS.value:
        torch.set_num_threads(TORCH_THREADS.value)


def interleaved_medians(
    calls: Mapping[Key, Callable[[int], float]],
    describe: Callable[[int, Mapping[Key, float]], str],
) -> dict[Key, float]:
    """Median seconds of each timed call over ``--repeats`` rounds. A round runs every call once,
    in ``calls``' order, with the round's index (so drifting machine load hits every engine
    alike), then prints ``describe(round, that round's seconds)``."""
    times: dict[Key, list[float]] = {key: [] for key in calls}
    for r in range(REPEATS.value):
        for key, call in calls.items():
            times[key].append(call(r))
        print(describe(r, {key: t[-1] for key, t in times.items()}))
    return {key: statistics.median(t) for key, t in times.items()}
