"""TRL 1.16's ``GRPOTrainer._compute_loss`` made callable on given arrays, without a model.

:func:`stub_trainer` is a ``GRPOTrainer`` holding only the attributes ``_compute_loss`` reads, set
from a real ``GRPOConfig`` exactly as ``GRPOTrainer.__init__`` sets them; its model is a
:class:`StubPolicy` whose forward returns given per-token log-probs (a leaf tensor, so
``loss.backward()`` gives TRL's gradient w.r.t. the log-probs). :func:`loss_inputs` is the batch
``_compute_loss`` receives. Used by tests/grpo/test_grpo_trl.py and tests/helpers/trl_rollout_is.py.
"""

from __future__ import annotations

import types
from collections import defaultdict

import accelerate
import numpy as np
import torch
from trl import GRPOConfig, GRPOTrainer


class StubPolicy(torch.nn.Module):
    """A "model" whose forward returns given per-token log-probs (and zero entropies) of the
    completion, right-aligned as TRL's fused-lm-head outputs are (TRL keeps the last T)."""

    def __init__(self, logps: torch.Tensor) -> None:
        super().__init__()
        self.logps = logps

    def forward(self, input_ids, attention_mask, labels=None, fused_lm_head=False):
        del attention_mask, labels, fused_lm_head
        n, length = input_ids.shape
        t = self.logps.shape[1]
        pad = torch.zeros((n, length - t), dtype=self.logps.dtype)
        lp = torch.cat([pad, self.logps], dim=1)
        return types.SimpleNamespace(log_probs=lp, entropy=torch.zeros_like(lp))


def stub_trainer(args: GRPOConfig, model: torch.nn.Module, accum: int) -> GRPOTrainer:
    """A GRPOTrainer with the attributes ``_compute_loss`` reads, set as its __init__ does."""
    tr = object.__new__(GRPOTrainer)
    tr.args = args
    tr.loss_type = args.loss_type
    tr.importance_sampling_level = args.importance_sampling_level
    tr.epsilon_low = args.epsilon
    tr.epsilon_high = args.epsilon_high if args.epsilon_high is not None else args.epsilon
    tr.beta = args.beta
    tr.max_completion_length = args.max_completion_length
    tr.top_entropy_quantile = args.top_entropy_quantile
    tr.off_policy_mask_threshold = args.off_policy_mask_threshold
    tr.use_vllm = args.use_vllm
    tr.vllm_importance_sampling_correction = args.vllm_importance_sampling_correction
    tr.entropy_coef = args.entropy_coef
    tr.use_adaptive_entropy = args.use_adaptive_entropy
    tr._entropy_bonus_enabled = tr.entropy_coef != 0.0 or tr.use_adaptive_entropy
    tr.aux_loss_enabled = False
    tr._metrics = {"train": defaultdict(list), "eval": defaultdict(list)}
    tr.current_gradient_accumulation_steps = accum
    # After the GRPOConfig: TrainingArguments resets accelerate's shared state.
    tr.accelerator = accelerate.Accelerator(cpu=True)
    tr.model = model.train()
    return tr


def loss_inputs(
    mask: np.ndarray, adv: np.ndarray, ref: np.ndarray, old: np.ndarray | None
) -> dict[str, torch.Tensor]:
    """The float64 batch ``_compute_loss`` reads for (N, T) completions behind 2-token prompts
    (the ids are zeros: the stub policy ignores them). ``old`` None: on-policy (TRL then uses
    the detached log-probs)."""
    n, t = mask.shape
    inputs = {
        "prompt_ids": torch.zeros((n, 2), dtype=torch.long),
        "prompt_mask": torch.ones((n, 2), dtype=torch.long),
        "completion_ids": torch.zeros((n, t), dtype=torch.long),
        "completion_mask": torch.tensor(mask, dtype=torch.float64),
        "advantages": torch.tensor(adv, dtype=torch.float64),
        "ref_per_token_logps": torch.tensor(ref, dtype=torch.float64),
    }
    if old is not None:
        inputs["old_per_token_logps"] = torch.tensor(old, dtype=torch.float64)
    return inputs
