"""TRL 1.16's own rollout importance-sampling code, run on given arrays.

TRL computes the vLLM importance-sampling ratio (``vllm_importance_sampling_mode``) and logs its
statistics inline, inside ``GRPOTrainer._generate_and_score_completions`` (no separate method).
:func:`trl_is_ratio` runs exactly those two blocks of TRL's installed source (found by their
opening lines, dedented, executed in the module's namespace with a stand-in ``self``): nothing
is re-typed here, so a change in TRL shows up as a failing comparison, and a TRL whose source
no longer holds the blocks fails with a message naming them.
"""

from __future__ import annotations

import inspect
import textwrap
import types
from collections import defaultdict

import numpy as np
import torch
from trl.trainer import grpo_trainer
from trl_stub_trainer import StubPolicy, loss_inputs, stub_trainer

_RATIO_START = "mask = completion_mask if tool_mask is None else completion_mask * tool_mask"
_RATIO_END = "# Compute the per-token log probabilities for the reference model"
_METRICS_START = "delta = torch.abs(old_per_token_logps - sampling_per_token_logps)"
_METRICS_END = "output = {"


def _block(src: list[str], start: str, end: str) -> str:
    """The body of the ``if self.use_vllm and self.vllm_importance_sampling_correction:``
    block whose first statement is ``start`` (up to the line holding ``end``), dedented."""
    first = next((i for i, line in enumerate(src) if line.strip() == start), None)
    if first is None:
        raise AssertionError(f"TRL's GRPOTrainer source has no line {start!r}: not TRL 1.16?")
    last = next(i for i in range(first, len(src)) if src[i].strip().startswith(end))
    return textwrap.dedent("\n".join(src[first:last]))


def trl_is_ratio(
    old: np.ndarray,
    sampling: np.ndarray,
    mask: np.ndarray,
    mode: str,
    clip_max: float | None,
    clip_min: float | None = None,
) -> tuple[np.ndarray, dict[str, float]]:
    """(TRL's importance-sampling ratio, (N, T) or (N, 1), and its logged metrics) in float64."""
    src = inspect.getsource(grpo_trainer.GRPOTrainer._generate_and_score_completions)
    lines = src.splitlines()
    metrics = defaultdict(list)
    self = types.SimpleNamespace(
        vllm_importance_sampling_mode=mode,
        vllm_importance_sampling_clip_max=clip_max,
        vllm_importance_sampling_clip_min=clip_min,
        accelerator=types.SimpleNamespace(gather=lambda x: x.reshape(1)),
        _metrics={"train": metrics},
    )
    env = dict(vars(grpo_trainer))
    env.update(
        self=self,
        mode="train",
        device="cpu",
        tool_mask=None,
        completion_mask=torch.tensor(mask, dtype=torch.float64),
        old_per_token_logps=torch.tensor(old, dtype=torch.float64),
        sampling_per_token_logps=torch.tensor(sampling, dtype=torch.float64),
    )
    exec(_block(lines, _RATIO_START, _RATIO_END), env)  # noqa: S102 - TRL's installed code
    exec(_block(lines, _METRICS_START, _METRICS_END), env)  # noqa: S102
    ratio = env["vllm_importance_sampling_ratio"].numpy().copy()
    return ratio, {k: v[-1] for k, v in metrics.items()}


def trl_loss_with_is(
    logp: np.ndarray,
    old: np.ndarray | None,
    ref: np.ndarray,
    adv: np.ndarray,
    mask: np.ndarray,
    is_ratio: np.ndarray,
    *,
    loss_type: str,
    beta: float,
    epsilon: float = 0.2,
    epsilon_high: float | None = None,
    level: str = "token",
    bias_kl: bool = False,
) -> tuple[float, np.ndarray]:
    """TRL's ``GRPOTrainer._compute_loss`` (one micro-batch, no accumulation, float64) with the
    vLLM importance-sampling correction on and ``is_ratio`` as its ratio: (loss, d loss / d logp).
    ``old`` None: on-policy (TRL uses the detached log-probs)."""
    import warnings

    t = logp.shape[1]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        args = grpo_trainer.GRPOConfig(
            output_dir="/tmp/trl_unused", report_to=[], use_cpu=True, loss_type=loss_type,
            beta=beta, epsilon=epsilon, epsilon_high=epsilon_high,
            importance_sampling_level=level, max_completion_length=t,
            use_bias_correction_kl=bias_kl,
        )  # fmt: skip
    leaf = torch.tensor(logp, dtype=torch.float64, requires_grad=True)
    tr = stub_trainer(args, StubPolicy(leaf), 1)
    tr.use_vllm, tr.vllm_importance_sampling_correction = True, True
    inputs = loss_inputs(mask, adv, ref, old)
    inputs["importance_sampling_ratio"] = torch.tensor(is_ratio, dtype=torch.float64)
    inputs["num_items_in_batch"] = torch.tensor(float(mask.sum()), dtype=torch.float64)
    loss = tr._compute_loss(tr.model, inputs)
    loss.backward()
    return float(loss.detach()), leaf.grad.numpy().copy()
