"""The names of the reward functions (pure Python: ``configs/rewards.py`` builds its blocks
from them without importing JAX).

:data:`BUILT_INS`: the built-in reward functions, in the order their weighted terms are summed;
:data:`CONFIG_BLOCK`: the ``configs/rewards.py`` block holding each one's ``scale`` and
constants (the top-level ``threshold`` is the shared T, so the threshold reward's block has
another name); :data:`CONSTANTS`: the constants each block passes to its function;
:data:`EXTRA_KINDS`: the kinds of plug-in rewards.
"""

from __future__ import annotations

BUILT_INS: tuple[str, ...] = ("format", "accuracy", "threshold", "rank", "thurstone", "overlong")
CONFIG_BLOCK: dict[str, str] = {
    "format": "format",
    "accuracy": "accuracy",
    "threshold": "threshold_reward",
    "rank": "rank",
    "thurstone": "thurstone",
    "overlong": "overlong",
}
CONSTANTS: dict[str, tuple[str, ...]] = {
    "format": (),
    "accuracy": (
        "threshold", "target", "alpha_iqa", "alpha_iaa", "iqa_max_words", "iaa_min_words",
        "iqa_scale", "iaa_scale",
    ),
    "threshold": ("threshold",),
    "rank": ("tau", "m", "eps"),
    "thurstone": ("tau", "m", "eps"),
    "overlong": ("max_length", "cache"),
}  # fmt: skip
EXTRA_KINDS: tuple[str, ...] = ("features", "host")
