"""Stage 1 — supervised fine-tuning on the judged rationales (spec §6).

    python scripts/train.py --config=configs/sft.py --workdir=/tmp/sft            # embedded default
    python scripts/train.py --config=configs/sft.py:reference --workdir=... \\
        --config.model.hf_dir=/ckpt/Qwen2.5-VL-7B-Instruct \\
        --config.data.sources.iqa_sft.manifest=... --config.data.sources.iaa_sft.manifest=...

Presets (``:arg``): ``default`` (embedded tiny model + synthetic data), ``tiny`` (tests),
``reference`` (spec §6.3: 128 sequences/step = 8 devices x 8 x accumulation 2, 2 epochs,
AdamW lr 2e-5 linear decay, clip 1.0, bf16 + remat, save every 40 steps).
"""

from __future__ import annotations

import ml_collections

from configs import common

PRESETS = ("default", "tiny", "reference")


def sft_block() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    # Loss: assistant-only cross-entropy from explicit span labels (fixes B3; the closing
    # <|im_end|> is always a target, fixes B4). Normalisation = total assistant tokens of the
    # optimizer step (HF token mean), summed over accumulation micro-batches, not a mean of means.
    c.loss_normalization = "token_mean"  # "token_mean" | "sequence_mean"
    c.global_batch_size = 128  # sequences per optimizer step (spec §6.3)
    # Only the target tokens go through the 152k-vocabulary lm_head, packed over the rows of a
    # micro-batch into one of `pack_buckets` static sizes; 0 = per-row slots. token_mean only
    # (the trainer does not pack for sequence_mean).
    # Flattening rows gathers hidden states across devices: off for the multi-device reference.
    c.pack_buckets = 4
    return c


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    preset = common.parse_preset(arg, PRESETS)
    c = common.base_config(learning_rate=2e-5)  # TRL SFTConfig default (spec §6.3)
    c.stage = "sft"
    c.preset = preset
    c.sft = sft_block()
    c.data.mixing = "interleave"
    c.data.p_iqa = 0.5
    c.data.stopping = "all_exhausted"

    if preset == "reference":
        sources = common.reference_sft_sources()
        common.reference_run(c, sources, ("iqa_sft", "iaa_sft"), num_epochs=2, checkpoint_every=40)
        c.model.hf_dir = ""  # required: a Qwen2.5-VL-7B-Instruct directory
        c.sft.global_batch_size = 128
        c.sft.pack_buckets = 0
    elif preset == "default":
        # Prompt + image + the longest synthetic IAA rationale is ~290 tokens at 128 px.
        common.default_run(c, seq_len=384)
        # A random tiny model needs a far larger learning rate than a pretrained 7B to move.
        c.optimizer.learning_rate = 1e-2
        c.optimizer.warmup_steps = 10
        c.sft.global_batch_size = 8
        c.total_steps = 200
        # Ranking underexposure needs more IQA rows than 150 steps at 0.5 give (the IQA answer
        # stayed constant; IQA only: held-out SRCC 0.21; 200 steps at 0.6: 0.51).
        c.data.p_iqa = 0.6
        c.checkpoint.every_steps = 20
        c.logging.every_steps = 5
    else:  # tiny: a few steps for tests
        common.tiny_run(c, seq_len=384)  # IAA rationales reach ~260 tokens at 56 px
        c.optimizer.learning_rate = 1e-3
        c.sft.global_batch_size = 4
        c.sft.pack_buckets = 0  # per-row slots: one compiled step per test subprocess
        c.optimizer.grad_accum_steps = 2
        c.total_steps = 4
    return c
