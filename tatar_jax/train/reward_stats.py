"""A GRPO step's reward statistics (per task and over all completions) for the run's metrics."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np


def grpo_reward_metrics(
    rewards: Mapping[str, Any],
    tasks: Sequence[str],
    *,
    group_size: int,
    completion_lengths: Any = None,
    parsed: Any = None,
    weights: Mapping[str, Mapping[str, float]] | None = None,
) -> dict[str, float]:
    """Reward statistics of one GRPO step's completions.

    Args:
      rewards: function name -> (N,) rewards, N = prompts x group_size, group-major (the G
        completions of a prompt are consecutive).
      tasks: (N,) task name of each completion ("iqa" / "iaa").
      completion_lengths: (N,) completion tokens (incl. EOS). parsed: (N,) bool, answer parsed.
      weights: task -> function -> weight of the total reward (None: unweighted sum).
    Returns (per task t and for "all"):
      reward/<fn>/<t> mean; reward_total/<t> mean of the weighted sum; reward_std/<t> std (ddof 0)
      of the totals; reward_group_std/<t> mean within-group std (ddof 1, as in the advantages);
      zero_std_groups/<t> fraction of groups with identical totals (no learning signal);
      completion_len/<t>; parsed_frac/<t>.
    """
    tasks = np.asarray(tasks)
    n = tasks.shape[0]
    if n % group_size:
        raise ValueError(f"{n} completions are not a multiple of group size {group_size}")
    r = {k: np.asarray(v, np.float64).reshape(-1) for k, v in rewards.items()}
    for k, v in r.items():
        if v.shape[0] != n:
            raise ValueError(f"reward {k!r} has {v.shape[0]} values for {n} completions")
    total = np.zeros(n)
    for k, v in r.items():
        w = np.array([(weights or {}).get(t, {}).get(k, 1.0) if weights else 1.0 for t in tasks])
        total += w * v
    groups_task = tasks.reshape(-1, group_size)[:, 0]
    if np.any(tasks.reshape(-1, group_size) != groups_task[:, None]):
        raise ValueError("a group mixes tasks: completions must be group-major, G per prompt")
    g_total = total.reshape(-1, group_size)
    g_std = g_total.std(axis=1, ddof=1) if group_size > 1 else np.zeros(len(g_total))
    # Identical totals exactly (a rounded std need not be 0): their advantages are all 0.
    g_same = np.ptp(g_total, axis=1) == 0
    out: dict[str, float] = {}
    for t in [*sorted(set(tasks.tolist())), "all"]:
        sel = np.ones(n, bool) if t == "all" else tasks == t
        gsel = np.ones(len(groups_task), bool) if t == "all" else groups_task == t
        for k, v in r.items():
            out[f"reward/{k}/{t}"] = float(v[sel].mean())
        out[f"reward_total/{t}"] = float(total[sel].mean())
        out[f"reward_std/{t}"] = float(total[sel].std())
        out[f"reward_group_std/{t}"] = float(g_std[gsel].mean())
        out[f"zero_std_groups/{t}"] = float(np.mean(g_same[gsel]))
        if completion_lengths is not None:
            out[f"completion_len/{t}"] = float(np.asarray(completion_lengths)[sel].mean())
        if parsed is not None:
            out[f"parsed_frac/{t}"] = float(np.asarray(parsed, bool)[sel].mean())
    return out


# --- FLOPs, parameters, MFU --------------------------------------------------------------------
