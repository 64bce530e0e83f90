"""Stage 2 — GRPO with the TATAR rewards (spec §7, §8).

    python scripts/train.py --config=configs/grpo.py --workdir=/tmp/grpo   # embedded default
    python scripts/train.py --config=configs/grpo.py --workdir=/tmp/grpo_ref \
        --config.rewards.preset=reference      # same run, the reference's symmetric rewards
    python scripts/plot_run.py --workdir=/tmp/grpo --workdir=/tmp/grpo_ref   # side by side
    python scripts/train.py --config=configs/grpo.py:reference --workdir=... \\
        --config.model.init_checkpoint=/runs/sft --config.model.init_step=120 \\
        --config.data.root=/data/tatar   # built-in manifests (tatar_jax.data.datasets)

Presets (``:arg``): ``default`` (embedded tiny model + synthetic data), ``tiny`` (tests),
``reference`` (spec §7: 16 prompts x G = 8 = 128 completions per step, beta 0.001, eps 0.2,
mu = 1, temperature 1.0, top-k 50, 256 new tokens, AdamW lr 1e-6 linear decay, clip 1.0,
3 epochs, save every 100, initialised from SFT step 120), ``lora_1gpu`` / ``lora_1gpu_3b``
(the reference run as rank-16 LoRA on one 48 GB / 24 GB GPU: :func:`one_gpu_lora`).
"""

from __future__ import annotations

import ml_collections
from ml_collections import config_dict

from configs import common, sft
from configs import rewards as rewards_configs

PRESETS = ("default", "tiny", "reference", "lora_1gpu", "lora_1gpu_3b")
# SFT steps of the embedded default's warm-up (benchmarks/sweeps/grpo_default.md, sweep 6: 100
# steps of the tiny-sized model leave 67 % of the held-out IAA answers unparsed, 200 do not).
WARMUP_STEPS = 200


def grpo_block() -> ml_collections.ConfigDict:
    """GRPO objective and rollout (spec §7.2, §7.3)."""
    c = ml_collections.ConfigDict()
    c.num_generations = 8  # G
    c.prompts_per_step = 16  # unique prompts per optimizer step (B_u)
    c.beta = 0.001  # k3 KL weight; 0 skips the reference model entirely
    # Reference-model weights: "compute" (model.dtype: it only runs forward, half the memory
    # in bf16) | "float32" (the master weights' precision).
    c.ref_param_dtype = "compute"
    c.epsilon = 0.2  # PPO clip (lower)
    c.epsilon_high = config_dict.placeholder(float)  # None = epsilon (symmetric clip)
    c.num_iterations = 1  # mu: optimisation passes per rollout; 1 => old log-probs = rollout's
    c.mini_batch_size = 0  # completions per gradient micro-batch; 0 = all of a step at once
    # Only the completion tokens that count go through the 152k-vocabulary lm_head, packed into
    # one of `pack_buckets` static sizes (one compiled update each); 0 = score all T positions.
    # Packing flattens the rows, so on a sharded batch it gathers hidden states across devices:
    # off for the multi-device reference preset.
    c.pack_buckets = 4
    # Advantages (tatar_jax.grpo.group_advantages): "grpo" = (R - mean_G) / (std_G + eps) with
    # the unbiased std (ddof 1) over the G completions (reference) | "dr_grpo" | "rloo" |
    # "batch_std".
    c.advantage = "grpo"
    c.advantage_eps = 1e-4
    c.advantage_std_ddof = 1
    # Loss aggregation (tatar_jax.grpo.grpo_loss): "seq_mean_token_mean" = token mean per
    # completion, then mean over completions (reference) | "token_mean" (DAPO, over the step's
    # tokens) | "bnpo" | "fixed_length" (Dr. GRPO).
    c.loss_aggregation = "seq_mean_token_mean"
    # bnpo (TRL): like token_mean, but each gradient micro-batch is normalised by its own tokens.
    # Ratio: "token" rho_t = exp(logp_t - old_t) (reference) | "sequence" (GSPO) rho =
    # exp(mean_t(logp_t - old_t)) per completion, applied to each of its tokens.
    c.importance_sampling_level = "token"
    # True: the k3 KL term is multiplied by the (undetached) ratio, TRL's use_bias_correction_kl
    # (its default): same value on-policy, unbiased reverse-KL gradient. False = the reference.
    c.kl_bias_correction = False
    # Rollout (spec §7.2). Temperature 1.0 is what the reference actually used (B11).
    c.temperature = 1.0
    c.top_k = 50  # HF GenerationConfig default; 0 = off
    c.top_p = 1.0
    c.max_new_tokens = 256
    c.mask_truncated_completions = False
    c.rollout_correction = rollout_correction_block()
    # True: pi_old = the sampler's log-probs (no pi_old forward when mu > 1; with mu = 1 the
    # PPO ratio is then pi_theta / pi_rollout). False: pi_old is recomputed by the trainer.
    c.old_logps_from_rollout = False
    c.dynamic_sampling = dynamic_sampling_block()
    return c


def rollout_correction_block() -> ml_collections.ConfigDict:
    """Rollout/trainer mismatch correction (docs/grpo.md), as TRL 1.16's
    ``vllm_importance_sampling_*``: each token's clipped surrogate is weighted by pi_old /
    pi_rollout, per token or per sequence (product over its tokens), truncated (TIS) or
    masked (MIS) at [clip_min, clip_max]. The mismatch itself is logged whatever ``mode``."""
    c = ml_collections.ConfigDict()
    # "off" | "token_truncate" | "token_mask" | "sequence_truncate" | "sequence_mask"
    c.mode = "off"
    c.clip_max = 3.0  # TRL's default C_max; None = no upper bound
    c.clip_min = config_dict.placeholder(float)  # None = no lower bound (TRL's default)
    return c


def dynamic_sampling_block() -> ml_collections.ConfigDict:
    """DAPO dynamic sampling (docs/grpo.md): groups whose total-reward std (over the G
    completions) is <= the threshold are dropped, and further prompts (the next batches of the
    data stream) are rolled out until the step holds ``prompts_per_step`` informative groups or
    ``max_extra_batches`` extra batches were drawn (the step then trains on what it has, the
    empty slots masked)."""
    c = ml_collections.ConfigDict()
    c.enabled = False
    c.std_threshold = 0.0  # drop groups with reward std <= this (0: all-equal groups)
    # per task (None = std_threshold)
    c.std_threshold_iqa = config_dict.placeholder(float)
    c.std_threshold_iaa = config_dict.placeholder(float)
    c.max_extra_batches = 4  # extra batches of prompts_per_step prompts a step may draw
    return c


def rollout_block() -> ml_collections.ConfigDict:
    """Layout of the rollout's weights (``tatar_jax.train.rollout.rollout_mesh``): once per step
    the policy parameters are cast to the compute dtype and placed on this mesh (over the
    training devices), so decoding never all-gathers a parameter.

    ``mesh``: "auto" (replicated when the weights take <= 1/4 of a device's memory, else
    tensor-parallel over the smallest ``tensor`` axis that fits; the rest of the devices split
    the batch), "train" (the training mesh) or ``axis=size,...`` (e.g. "data=4,tensor=2").
    ``rules``: "auto" (replicated, or "tensor" with a tensor axis) or a sharding.RULE_SETS name.
    """
    c = ml_collections.ConfigDict()
    c.mesh = "auto"
    c.rules = "auto"
    return c


def offload_block() -> ml_collections.ConfigDict:
    """Host offload (``tatar_jax.train.offload``): ``mode`` "never" | "rollout" (the ``parts``
    wait in host memory from one update to the next) | "always" (they come back only for the
    program that reads them); ``parts``: "opt_state" (AdamW moments), "reference" (the
    full-parameter reference copy), "params" (the float32 master weights of a full-parameter
    run: the rollout reads its own compute-dtype copy). Exact copies: results and resumes are
    unchanged."""
    c = ml_collections.ConfigDict()
    c.mode = "never"
    c.parts = ("opt_state",)
    return c


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    preset = common.parse_preset(arg, PRESETS)
    c = common.base_config(learning_rate=1e-6)  # authors' GRPOConfig (spec §7.4)
    c.stage = "grpo"
    c.preset = preset
    c.grpo = grpo_block()
    c.rollout = rollout_block()
    c.offload = offload_block()
    c.rewards = rewards_configs.get_config("reference" if preset == "reference" else "tatar")
    # GRPO data: the two training lists concatenated and shuffled (spec §7.1), each prompt
    # repeated G times inside the step (never re-loaded per copy: fixes B5).
    c.data.mixing = "concat"
    c.data.stopping = "first_exhausted"  # incomplete final chunk of prompts dropped

    if preset in ("reference", "lora_1gpu", "lora_1gpu_3b"):
        train = ("koniq_train", "artimuse_train")
        sources = common.reference_grpo_sources()
        common.reference_run(c, sources, train, num_epochs=3, checkpoint_every=100)
        c.model.init_checkpoint = ""  # required: the SFT workdir
        c.model.init_step = 120  # spec §6.3: GRPO starts from SFT checkpoint-120
        c.grpo.mini_batch_size = 64  # 128 completions = 2 micro-steps of 64 (8 dev x 8)
        c.grpo.pack_buckets = 0
        if preset != "reference":
            one_gpu_lora(c)
    elif preset == "default":
        # Embedded tiny random model on the synthetic set, CPU minutes: an SFT warm-up teaches the
        # format and a first ranking, GRPO's rewards refine it.
        common.default_run(c, seq_len=256)
        # On a CPU the lm_head log-softmax is fastest in small chunks (cache-sized logits).
        c.model.logprob_chunk_size = 128
        c.eval.at_start = True
        # Dr. GRPO advantages (R - group mean): the std division would turn reward differences of
        # 1e-3 (Gaussian tails, near-tied Thurstone groups) into unit advantages. The SFT warm-up
        # is WARMUP_STEPS; 40 GRPO steps (sweep 6). What it reaches: docs/embedded_default.md.
        c.grpo.advantage = "dr_grpo"
        c.optimizer.learning_rate = 5e-4
        c.optimizer.warmup_steps = 2
        c.grpo.beta = 0.01
        c.grpo.prompts_per_step = 8
        c.grpo.num_generations = 8
        c.grpo.max_new_tokens = 96  # the synthetic IAA rationales are ~45 tokens
        c.total_steps = 40
        c.eval.max_examples = -1  # the whole synthetic test split (144 IQA + 108 IAA images)
        c.eval.batch_size = 36
        c.checkpoint.every_steps = 10
        c.logging.every_steps = 2
    else:  # tiny: a few steps for tests
        common.tiny_run(c, seq_len=256)
        c.optimizer.learning_rate = 1e-4
        c.grpo.prompts_per_step = 2
        c.grpo.num_generations = 4
        c.grpo.max_new_tokens = 16
        c.total_steps = 3
    c.warmup = warmup_block(c, steps=WARMUP_STEPS if preset == "default" else 0)
    return c


def one_gpu_lora(c: ml_collections.ConfigDict) -> None:
    """``lora_1gpu`` (Qwen2.5-VL-7B on one 48 GB GPU) and ``lora_1gpu_3b`` (3B on one 24 GB
    GPU): the reference GRPO shape (16 prompts x G = 8, 256 new tokens) on one device, rank-16
    LoRA on every decoder projection over one bfloat16 base (policy, reference and rollout read
    it: tatar_jax.train.frozen), 16 micro-batches of 8 completions. The model size is the
    weights' (``--config.model.init_checkpoint`` / ``hf_dir``); memory plans: docs/scaling.md."""
    c.mesh.num_devices = 1
    c.model.param_dtype = "bfloat16"  # the frozen base in the compute dtype: the rollout's own
    c.model.lora.rank = 16
    c.model.lora.alpha = 32.0
    c.grpo.mini_batch_size = 8  # 128 completions = 16 micro-batches


def warmup_block(c: ml_collections.ConfigDict, steps: int) -> ml_collections.ConfigDict:
    """The SFT warm-up of the embedded default: ``configs/sft.py`` of the same preset run for
    ``steps`` steps in ``<workdir>/sft`` before GRPO starts from its last checkpoint. It runs
    only when the model is embedded (no ``model.hf_dir`` / ``model.init_checkpoint``): a random
    model has never seen the answer format. 0 steps = none.

    The warm-up trains the GRPO run's model with its mesh, seed, image size, tokenizer and
    held-out evaluation (at its end, not at its start): those fields are shared (sub-blocks by
    reference, scalars by field reference), so a command-line override of the GRPO field reaches
    the warm-up too.
    ``--config.warmup.<field>`` sets any other SFT field of the warm-up.
    """
    w = sft.get_config(c.preset if c.preset in sft.PRESETS else "reference")
    w.total_steps = steps
    w.seed = c.get_ref("seed")
    w.model = c.model
    w.mesh = c.mesh
    w.data.synthetic = c.data.synthetic
    w.data.tokenizer_dir = c.data.get_ref("tokenizer_dir")
    for name in ("datasets", "max_examples", "max_new_tokens", "batch_size"):
        setattr(w.eval, name, c.eval.get_ref(name))
    # Not at its start: the random model parses no answer (SRCC undefined) and every one of its
    # completions runs to max_new_tokens, the costliest evaluation of the job (sweep 6: 285 s of
    # a loaded 2-core machine). ``--config.warmup.eval.at_start=True`` still asks for it.
    w.eval.at_start = False
    w.eval.at_end = True
    w.logging.progress = c.logging.get_ref("progress")
    return w
