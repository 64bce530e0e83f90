"""Evaluate a checkpoint on the eight benchmarks (or any manifest): SRCC / PLCC tables + plots.

    # the eight benchmarks (label files ship with tatar-jax), one image folder per dataset
    python scripts/eval.py --hf_dir=/ckpt/tatar-7b \\
        --image_roots=KonIQ-10K=/data/koniq10k/1024x768,SPAQ=/data/spaq/TestImage,... \\
        --out_dir=/tmp/eval/tatar-7b
    # a training run (scripts/train.py --workdir; latest step, or --step=N, or a step folder),
    # two datasets, 100 images each; architecture and tokenizer are the run's
    python scripts/eval.py --checkpoint=/runs/grpo [--step=100] --datasets=KADID,PIPAL \\
        --image_roots=KADID=/data/kadid/images,PIPAL=/data/pipal --limit=100 \\
        --out_dir=/tmp/eval/quick
    # any other labelled set
    python scripts/eval.py --hf_dir=... --manifest=/data/my/labels.jsonl --task=iqa \\
        --score_range=1,5 --image_root=/data/my/images --out_dir=/tmp/eval/my

    # 8 sampled answers per image (one prefill): the mean's SRCC/PLCC, per-image std, all
    # answers in predictions.jsonl; --seed makes it repeatable
    python scripts/eval.py --hf_dir=... --datasets=KADID --num_samples=8 --temperature=1.0 \
        --top_k=50 --out_dir=/tmp/eval/k8

    # one table over several finished runs (no model needed)
    python scripts/eval.py --compare=/tmp/eval/sft,/tmp/eval/grpo

Re-running the same command resumes (rows already in predictions.jsonl are not generated again).
Exit status: 0 done; 1 a requested dataset has no scored row (e.g. no image could be read: a line
on stderr says why); 2 a usage error (one line naming the flag); 3 no weights given.
``--reference_compat`` reproduces the authors' evaluation (bugs B1, B2, B12) for comparison only.
Every other setting: ``--config.eval.<field>`` / ``--config.model.<field>`` (configs/eval.py).
"""

from __future__ import annotations

import sys

from absl import app, flags

from tatar_jax import cli_errors
from tatar_jax.evaluation import cli

_CONFIG = cli.define_model_flags("configs/eval.py[:default|reference|tiny]")
flags.DEFINE_string("datasets", None, "comma-separated built-in names (default: all eight)")
flags.DEFINE_string(
    "benchmark_root", None, "folder with IQA/<name>/<name>.json, IAA/... (default: shipped labels)"
)
flags.DEFINE_string("image_roots", "", "per-dataset image folders: KonIQ-10K=/x,SPAQ=/y")
flags.DEFINE_string("image_root", None, "image folder of --manifest")
flags.DEFINE_string("manifest", None, "a custom label file (JSON list or JSONL)")
flags.DEFINE_string("task", None, "task of --manifest: iqa | iaa")
flags.DEFINE_string("score_range", None, "declared native range of --manifest labels: LO,HI")
flags.DEFINE_integer("limit", None, "first N records per dataset")
flags.DEFINE_bool(
    "allow_absolute_images", None, "accept absolute image paths in --manifest (default: every "
    "image entry must stay inside --image_root)",
)  # fmt: skip
flags.DEFINE_string("out_dir", None, "output folder (resumable)")
flags.DEFINE_bool("reference_compat", None, "reproduce the reference evaluation (B1, B2, B12)")
flags.DEFINE_string("prompt_variant", None, "reference_eval (default) | train")
flags.DEFINE_string("dcn_shape", "", "multi-slice / multi-node factor, e.g. data=4")
flags.DEFINE_list(
    "compare",
    [],
    "only print one paper-layout table over finished evaluation "
    "folders (out_dirs of earlier runs); no model is loaded",
)

_SHORT = (
    "hf_dir", "datasets", "benchmark_root", "image_root", "manifest", "task", "score_range",
    "batch_size", "max_new_tokens", "max_pixels", "limit", "out_dir", "reference_compat",
    "prompt_variant", "mesh_shape", "dcn_shape", "allow_absolute_images", *cli.DECODING_FLAGS,
)  # fmt: skip


def main(argv: list[str]) -> int:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    FLAGS = flags.FLAGS

    def body() -> int:
        if FLAGS.compare:
            from tatar_jax.evaluation import report

            print(report.compare_markdown(FLAGS.compare))
            return 0
        cfg = cli.apply_overrides(_CONFIG.value, {k: FLAGS[k].value for k in _SHORT})
        results = cli.run_eval_from_config(
            cfg, checkpoint=FLAGS.checkpoint, step=FLAGS.step, image_roots=FLAGS.image_roots
        )
        empty = cli.unscored(results, cfg.eval.out_dir)
        for line in empty:
            print(f"error: {line}", file=sys.stderr)
        return 1 if empty else 0

    return cli.exit_code(body)


if __name__ == "__main__":
    cli_errors.run_script(main)
