"""Evaluation on the eight benchmarks (or any manifest) and the scoring CLI (spec §9).

    python scripts/eval.py --hf_dir=/ckpt/tatar-7b --benchmark_root=shared/benchmarks \\
        --image_roots=KonIQ-10K=/data/koniq10k/1024x768,SPAQ=/data/spaq/TestImage \\
        --out_dir=/tmp/eval
    python scripts/eval.py --config=configs/eval.py:reference ...      # the authors' protocol

Every field can also be set as ``--config.<field>=...``; the short flags of ``scripts/eval.py``
(``--hf_dir``, ``--datasets``, ...) override the matching field below.

Presets (``:arg``): ``default`` (fixed protocol: labels by declared range, strict parsing, SRCC
with average ranks, evaluation prompt wording), ``reference`` (adds ``reference_compat``: the
reference's value-based labels B1, lenient parsing + rescaling B2 and ordinal SRCC B12, for
comparison only) and ``tiny`` (tests: float32, few tokens).
"""

from __future__ import annotations

import ml_collections
from ml_collections import config_dict

from configs import common

PRESETS = ("default", "reference", "tiny")
BENCHMARKS = ("KonIQ-10K", "SPAQ", "KADID", "PIPAL", "ArtiMuse-10K", "AVA", "TAD66K", "FLICKR-AES")


def eval_block() -> ml_collections.ConfigDict:
    """What to evaluate and how to decode (spec §9)."""
    c = ml_collections.ConfigDict()
    # Built-in declarations (tatar_jax.data.datasets): names, the label-file root with the
    # <IQA|IAA>/<name>/<name>.json layout, and one image folder per dataset (default: the
    # folder of its label file).
    c.datasets = ",".join(BENCHMARKS)
    c.benchmark_root = ""
    c.image_roots = ml_collections.ConfigDict({name: "" for name in BENCHMARKS})
    # Any other set instead: a manifest + its task + its declared native score range.
    c.manifest = ""
    c.name = ""  # dataset name for a custom manifest ("" = the file's stem)
    c.task = ""  # "iqa" | "iaa"
    c.score_range = config_dict.placeholder(tuple)  # (lo, hi) of the labels, mapped to 0-100
    c.image_root = ""  # image folder of the custom manifest ("" = the manifest's folder)
    c.label_field = "gt_score"
    # Image entries must stay inside the image folder; True also accepts absolute paths.
    c.allow_absolute_images = False
    # Prompts per generate call of one process, split over the mesh's batch axes (padded to a
    # multiple of them); with several processes each scores its own rows (reference: 4 per GPU).
    c.batch_size = 16
    c.max_new_tokens = 256  # spec §9
    # Decoding: greedy, one completion per image (spec §9) by default. num_samples K > 1 draws K
    # completions per image from one prefill (the rollout engine's G-sample path) at
    # temperature / top_k (0 = off) / top_p, keyed by the config's seed; the prediction is the
    # aggregate ("mean" | "median") of the parsed answers.
    c.num_samples = 1
    c.temperature = 0.0
    c.top_k = 0
    c.top_p = 1.0
    c.aggregate = "mean"
    # After </think> only <answer> + a number in 0-100 + </answer> may be written (a token mask
    # per decode step, tatar_jax.generate.answer_constraint); off = the model's own tokens.
    c.constrained_answer = False
    c.min_pixels = common.MIN_PIXELS  # spec §3
    c.max_pixels = common.MAX_PIXELS
    c.prompt_variant = "reference_eval"  # the evaluation wording (spec §3, D7) | "train"
    c.limit = -1  # first N records per dataset (-1 = all)
    c.reference_compat = False
    c.bad_rows = "error"  # label rows outside the declared range: "error" | "skip" (listed)
    c.image_threads = 8  # image decoding ahead of the model
    c.plots = True
    c.progress = True
    c.out_dir = ""
    return c


def model_block() -> ml_collections.ConfigDict:
    """The weights to evaluate (``model.hf_dir``, else ``--checkpoint``), the compute dtype and
    the attention implementation: the fields of ``common.model_config`` that evaluation reads."""
    m = common.model_config()
    keep = ("hf_dir", "dtype", "attention_impl")
    return ml_collections.ConfigDict({k: m[k] for k in keep})


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    preset = common.parse_preset(arg, PRESETS)
    c = ml_collections.ConfigDict()
    c.preset = preset
    c.seed = common.SEED
    c.model = model_block()
    c.mesh = common.mesh_config()
    c.eval = eval_block()
    if preset == "reference":
        c.eval.reference_compat = True
        c.eval.batch_size = 4  # spec §9 (per GPU in the reference)
    elif preset == "tiny":
        c.model.dtype = "float32"
        c.eval.max_new_tokens = 8
        c.eval.batch_size = 2
        c.eval.plots = False
        c.eval.progress = False
    return c
