"""Config blocks shared by the SFT and GRPO configs (big_vision style: a config file is code).

Each function returns a fresh ``ml_collections.ConfigDict`` block; ``configs/sft.py`` and
``configs/grpo.py`` assemble them and set the stage-specific values. Every hyper-parameter has one
home here, with the spec section it comes from. Overrides on the command line:

    python scripts/train.py --config=configs/grpo.py:reference \\
        --config.optimizer.learning_rate=5e-7 --config.mesh.shape.fsdp=8

Presets are selected with the ``:arg`` suffix of ``--config`` (``get_config(arg)``):
``default`` (no suffix; the embedded tiny model on the synthetic data, runs on a laptop CPU),
``tiny`` (a few steps, for tests) and ``reference`` (the authors' runs, spec §6.3 / §7.4).

Sizes of unknown type use ``config_dict.placeholder`` so a flag can still set them.
"""

from __future__ import annotations

import ml_collections
from ml_collections import config_dict

SEED = 42  # spec §6.3 / §7.4 (seed and data_seed)
MIN_PIXELS = 3_136  # spec §6.3 (4 x 28 x 28)
MAX_PIXELS = 1_572_864  # spec §6.3 (2,006 x 28 x 28)
TASKS = ("iqa", "iaa")


def model_config() -> ml_collections.ConfigDict:
    """Where the weights come from and how the model computes.

    Source, first non-empty wins: ``init_checkpoint`` (an orbax training checkpoint of a previous
    stage: its ``params``), then ``hf_dir`` (a Hugging Face Qwen2.5-VL directory, safetensors),
    else the embedded tiny random model ``preset`` (no download, no files).
    """
    c = ml_collections.ConfigDict()
    c.hf_dir = ""
    c.init_checkpoint = ""  # a workdir (latest step) or a step directory of a previous stage
    c.init_step = -1  # -1 = latest step of init_checkpoint
    c.preset = "tiny"  # embedded model size when no weights are given
    c.dtype = "bfloat16"  # compute dtype of activations / matmuls
    c.param_dtype = "float32"  # master parameters and optimizer state
    # Rematerialisation (gradient checkpointing; the reference trains with it on). remat=False
    # disables both; the policies are the model's (None | "full" | "dots_saveable" | ...).
    c.remat = True
    c.remat_policy = "full"
    c.vision_remat_policy = "full"
    # tatar_jax.models.layers.attention: auto (cuDNN on NVIDIA GPUs, splash on TPU, chunked
    # elsewhere) | xla (the parity reference, O(L^2) float32 scores) | chunked | cudnn | splash.
    c.attention_impl = "auto"
    c.init_std = 0.02  # random init of the embedded model (checkpoints overwrite it)
    c.freeze_vision = False  # True: the vision tower (incl. merger) gets no updates, no opt. state
    c.logprob_chunk_size = 1024  # tokens per chunk of the lm_head log-softmax (tatar_jax.logprobs)
    c.lora = lora_config()
    return c


def lora_config() -> ml_collections.ConfigDict:
    """LoRA adapters (``tatar_jax.models.lora``, computed by qwix); ``rank`` 0 = off.

    With a rank, only the adapters train and have optimizer state (the base weights stay
    bit-identical); checkpoints hold them, the HF export merges them into full weights, and a
    later stage or evaluation that loads such a checkpoint merges them on load.
    ``targets``: regexes fully matching '/'-joined module paths of linear layers, e.g.
    ``language_model/layers/self_attn/q_proj`` or ``visual/blocks/attn/qkv``.
    """
    c = ml_collections.ConfigDict()
    c.rank = 0
    c.alpha = 32.0  # the adapters' output is scaled by alpha / rank (PEFT's lora_alpha)
    c.targets = (r"language_model/layers/(self_attn|mlp)/\w+_proj",)  # all decoder projections
    return c


def dataset_source(
    task: str = "iqa",
    *,
    builtin: str = "",
    manifest: str = "",
    image_root: str = "",
    score_range: tuple[float, float] = (0.0, 100.0),
    label_field: str = "gt_score",
    target_field: str = "",
    sampling: str = "all",
) -> ml_collections.ConfigDict:
    """One dataset declaration (fields of ``tatar_jax.data.manifest.DatasetSpec``).

    ``builtin``: a name of ``tatar_jax.data.datasets.BUILTINS`` (e.g. "koniq-train"); its task,
    range, label field and path under ``data.root`` are used unless ``manifest`` overrides the path.
    Otherwise ``task``/``manifest``/``score_range``/``label_field`` declare the set.
    """
    if task not in TASKS:
        raise ValueError(f"task must be one of {TASKS}, got {task!r}")
    c = ml_collections.ConfigDict()
    c.builtin = builtin
    c.task = task
    c.manifest = manifest  # JSON/JSONL manifest; "" = built-in path under data.root
    c.image_root = image_root  # "" = the manifest's folder
    c.score_range = tuple(float(x) for x in score_range)  # native (lo, hi) -> 0-100
    c.label_field = label_field
    c.image_field = "image"
    c.target_field = target_field  # SFT rationale field ("" for GRPO / eval)
    # Image entries must stay inside image_root; True also accepts absolute paths (as written).
    c.allow_absolute_images = False
    c.sampling = sampling  # "all" | "first:N" | "random:N" | "P%" (manifest.sample_indices)
    return c


def user_sources() -> ml_collections.ConfigDict:
    """Two empty declarations a user fills from the command line (flags cannot add new keys):
    ``--config.data.sources.user_iqa.manifest=/x.jsonl --config.data.train="('user_iqa',)"``."""
    c = ml_collections.ConfigDict()
    c.user_iqa = dataset_source("iqa")
    c.user_iaa = dataset_source("iaa")
    return c


def data_config() -> ml_collections.ConfigDict:
    """Datasets by name, preprocessing and batching (spec §2, §6.1, §7.1).

    ``train`` names entries of ``sources``; the reserved name "synthetic" is the embedded
    synthetic set (``tatar_jax.data.synthetic``, both tasks, built under the workdir), so the
    default configs need no files.
    """
    c = ml_collections.ConfigDict()
    c.root = ""  # folder of the built-in manifests (tatar_jax.data.datasets)
    c.train = ("synthetic",)
    c.sources = user_sources()  # name -> dataset_source(...)
    c.synthetic = ml_collections.ConfigDict()
    c.synthetic.image_size = 128
    # "" = the model's hf_dir, else the init_checkpoint run's, else (the embedded random model)
    # the embedded tokenizer (tatar_jax.data.embedded_tokenizer: Qwen2.5's, cut to the corpus).
    c.tokenizer_dir = ""
    c.prompt_variant = "train"
    c.min_pixels = MIN_PIXELS
    c.max_pixels = MAX_PIXELS
    # Static padded lengths (one compile per bucket); an example longer than the last is an
    # error, never truncated.
    c.seq_buckets = (256, 512, 1024, 2048)
    c.patch_buckets = ()  # () = the pipeline's default vision-patch buckets
    # Mixing of the tasks (spec §6.1): random interleave with P(IQA) = p_iqa, "all_exhausted".
    # "interleave" | "concat" (GRPO reference: concatenated, shuffled) | "stratified" (every
    # batch round(p_iqa * batch) IQA records, the rest IAA: tatar_jax.data.pipeline)
    c.mixing = "interleave"
    c.p_iqa = 0.5
    c.stopping = "all_exhausted"  # "all_exhausted" | "first_exhausted"
    # Asymmetric thought dropout (spec D1): P(replace the thought by an empty one) per task.
    c.p_drop_think = ml_collections.ConfigDict({"iqa": 0.0, "iaa": 0.0})
    # Unreadable image / bad record: "error" names the file and row and stops (fixes B5);
    # "skip" drops the record and logs it (counted in the metrics), never substitutes.
    c.bad_record = "error"
    # "skip" only: stop when one dataset loses more than this share of its manifest rows. Public
    # IQA/IAA sets have far fewer unreadable files than 1 %; a wrong image_root or a damaged
    # copy fails most reads and stops after ~1 % of the set instead of training on the rest.
    c.max_skip_fraction = 0.01
    c.num_epochs = 1
    c.shuffle = True
    c.seed = SEED
    c.worker_count = 0  # grain worker processes (0 = in-process)
    c.prefetch = 2
    return c


def mesh_config() -> ml_collections.ConfigDict:
    """Device mesh (tatar_jax.sharding.make_mesh): ICI shape, DCN factor, rules table."""
    c = ml_collections.ConfigDict()
    c.shape = ml_collections.ConfigDict({"data": 1, "fsdp": -1, "tensor": 1})  # -1 = inferred
    c.dcn_shape = ml_collections.ConfigDict({"data": 1, "fsdp": 1, "tensor": 1})
    c.rules = "default"  # tatar_jax.sharding.RULE_SETS: default | fsdp | tensor | replicated
    c.distributed = config_dict.placeholder(bool)  # None: auto (only with coordinator given)
    c.coordinator_address = config_dict.placeholder(str)
    c.num_processes = config_dict.placeholder(int)
    c.process_id = config_dict.placeholder(int)
    return c


def optimizer_config(learning_rate: float) -> ml_collections.ConfigDict:
    """optax AdamW + schedule + clipping + accumulation (spec §6.3, §7.4: TRL defaults)."""
    c = ml_collections.ConfigDict()
    c.name = "adamw"
    c.learning_rate = learning_rate
    c.b1 = 0.9
    c.b2 = 0.999
    c.eps = 1e-8
    c.weight_decay = 0.0
    # AdamW's first moment: "params" (the parameters' dtype) | "float32" | "bfloat16" (half its
    # memory; the second moment stays in the parameters' dtype: tatar_jax.train.optim.MU_DTYPES)
    c.mu_dtype = "params"
    c.schedule = "linear"  # "linear" (to end_lr_factor * lr) | "cosine" | "constant"
    c.warmup_steps = 0
    c.end_lr_factor = 0.0
    c.max_grad_norm = 1.0  # global-norm clipping; <= 0 disables
    c.grad_accum_steps = 1  # micro-batches per optimizer step (summed inside one jitted step)
    c.max_consecutive_nonfinite = 10  # stop after this many skipped updates in a row
    c.freeze = ()  # extra regexes on '/'-joined parameter paths to freeze
    return c


def checkpoint_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.every_steps = 100
    c.keep = 3  # keep-N newest
    c.async_save = True
    c.save_at_end = True
    c.export_hf = False  # also write an HF directory of the policy at the end
    return c


def logging_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.every_steps = 1
    c.tensorboard = True
    c.jsonl = True
    c.progress = True  # tqdm bar with ETA on the console
    c.samples = 4  # GRPO: completions per logged step appended to <workdir>/samples.jsonl
    return c


def eval_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.every_steps = 0  # 0 = only at the end
    c.at_end = True
    c.at_start = False  # also evaluate the initial weights (step 0; "before" numbers)
    c.datasets = ("synthetic_test",)  # names of data.sources entries or "synthetic_test"
    c.max_examples = -1
    c.batch_size = 16
    c.max_new_tokens = 512
    return c


def base_config(learning_rate: float) -> ml_collections.ConfigDict:
    """Fields common to both stages; stage files add ``sft`` or ``grpo``."""
    c = ml_collections.ConfigDict()
    c.stage = ""
    c.seed = SEED
    c.model = model_config()
    c.data = data_config()
    c.mesh = mesh_config()
    # Training only: 0 = every device; n = the first n (one process; e.g. a 1-device baseline).
    c.mesh.num_devices = 0
    c.optimizer = optimizer_config(learning_rate)
    c.checkpoint = checkpoint_config()
    c.logging = logging_config()
    c.eval = eval_config()
    c.total_steps = -1  # -1: data.num_epochs over the training data; else a positive step count
    # Testing aid: 1-based steps whose update is made non-finite (a NaN pixel), to exercise the
    # skip-and-count guard and the stop after max_consecutive_nonfinite.
    c.inject_nonfinite_steps = ()
    # Resuming a workdir whose run_config.json differs in a hyper-parameter is refused unless
    # this is True (scripts/train.py --allow_config_change); the change is then recorded in
    # <workdir>/config_changes.jsonl (tatar_jax.train.run_records).
    c.allow_config_change = False
    return c


def reference_grpo_sources() -> ml_collections.ConfigDict:
    """GRPO training sets (spec §7.1): DeQA KonIQ train (gt_score_norm) + ArtiMuse train."""
    c = user_sources()
    c.koniq_train = dataset_source(
        "iqa", builtin="koniq-train", score_range=(1.0, 5.0), label_field="gt_score_norm"
    )
    c.artimuse_train = dataset_source("iaa", builtin="artimuse-train", score_range=(0.0, 10.0))
    return c


def reference_sft_sources() -> ml_collections.ConfigDict:
    """SFT sets (spec §6.1): judged IQA reversal rationales and IAA narratives (user paths).

    IQA labels are DeQA's raw ``gt_score`` on 1-5 (25 * (gt - 1)); IAA ``gt_score`` on 0-10.
    """
    c = user_sources()
    c.iqa_sft = dataset_source(
        "iqa", score_range=(1.0, 5.0), label_field="gt_score", target_field="reversal_thinking"
    )
    c.iaa_sft = dataset_source(
        "iaa", score_range=(0.0, 10.0), label_field="gt_score", target_field="cot_reasoning"
    )
    return c


def reference_run(
    c: ml_collections.ConfigDict,
    sources: ml_collections.ConfigDict,
    train: tuple[str, ...],
    *,
    num_epochs: int,
    checkpoint_every: int,
) -> None:
    """What both stages' ``reference`` presets share (spec §6.3, §7.4): bf16 on 8 devices,
    4,096-token buckets (2,006 visual tokens max + text; never truncated), two accumulation
    micro-steps, every step logged, keep 5 checkpoints, no periodic evaluation; the stage's
    data ``sources`` of which ``train`` are trained on for ``num_epochs`` epochs, a checkpoint
    every ``checkpoint_every`` steps."""
    c.model.preset = ""
    c.data.sources = sources
    c.data.train = train
    c.data.num_epochs = num_epochs
    c.checkpoint.every_steps = checkpoint_every
    c.data.seq_buckets = (1024, 2048, 4096)
    c.optimizer.grad_accum_steps = 2
    c.checkpoint.keep = 5
    c.logging.every_steps = 1
    c.eval.every_steps = 0
    c.eval.datasets = ()


def default_run(c: ml_collections.ConfigDict, *, seq_len: int) -> None:
    """What both stages' ``default`` presets (the embedded tiny random model on the synthetic
    set, CPU minutes) share: one compiled sequence length ``seq_len`` and one patch bucket."""
    # qvl.preset("tiny") with the embedded tokenizer's vocabulary: 200 SFT steps of it rank the
    # held-out set (seed 42: IQA / IAA SRCC 0.866 / 0.631) where the wider "embedded" preset's
    # rank IAA backwards (128 x 4: −0.239; 192 x 4 at 120 steps: −0.234); sweep 6.
    c.model.preset = "tiny"
    c.model.dtype = "float32"  # CPU: XLA's bf16 matmuls are slower than f32 there
    c.model.remat = False  # a tiny model: recomputation would only cost time
    c.data.seq_buckets = (seq_len,)
    c.data.patch_buckets = (1024,)  # 8 images of <= 10 x 10 patches: one compiled step
    c.eval.max_new_tokens = 96  # the synthetic IAA rationales are ~70 tokens


def tiny_run(c: ml_collections.ConfigDict, *, seq_len: int) -> None:
    """What both stages' ``tiny`` presets (tests: a few steps of the embedded model on small
    synthetic images, one compiled sequence length ``seq_len``) share."""
    c.model.dtype = "float32"
    c.data.synthetic.image_size = 56
    c.data.seq_buckets = (seq_len,)
    c.checkpoint.every_steps = 2
    c.checkpoint.async_save = False
    c.logging.every_steps = 1
    c.logging.progress = False
    c.eval.max_examples = 8
    c.eval.max_new_tokens = 32


def parse_preset(arg: str | None, allowed: tuple[str, ...], what: str = "preset") -> str:
    """The ``:arg`` of ``--config=file.py:arg``; none = the first of ``allowed``."""
    preset = (arg or allowed[0]).strip() or allowed[0]
    if preset not in allowed:
        raise ValueError(f"unknown {what} {preset!r}; choose one of {allowed}")
    return preset
