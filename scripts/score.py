"""Score your own images for quality (IQA) and/or aesthetics (IAA): reasoning + a 0-100 score.

    python scripts/score.py --hf_dir=/ckpt/tatar-7b --image a.jpg b.png --task both
    python scripts/score.py --hf_dir=/ckpt/tatar-7b --image /photos/ --task iaa --json > out.jsonl
    # a training run (scripts/train.py --workdir): latest step, --step=N, or a step folder
    python scripts/score.py --checkpoint=/runs/grpo [--step=20] --image a.jpg
    # 8 sampled answers per image: mean ± std (parsed count); --seed makes it repeatable
    python scripts/score.py --hf_dir=/ckpt/tatar-7b --image a.jpg --num_samples=8 \
        --temperature=1.0 --top_k=50

The model is loaded once and the images are scored in batches (greedy decoding by default, the
evaluation prompt; ``--num_samples=K`` samples K answers per image from one prefill and prints
``73.4 ± 2.1 (8/8 parsed)``: the mean (``--aggregate=median``) and std of the answers inside
0-100, and how many of the K parsed). An unreadable image (or an animation) is reported, not
skipped silently; an answer that does not parse strictly is shown as such with the raw output,
and a parsed answer outside 0-100 as "out of range" with its value (never clipped into a score).
Exit status: 0 every image scored; 1 an image could not be read or processed; 2 a usage error
(one line naming the flag); 3 no weights given.
"""

from __future__ import annotations

from absl import flags

from tatar_jax import cli_errors
from tatar_jax.evaluation import cli
from tatar_jax.evaluation.predict import build_predict_fn

_CONFIG = cli.define_model_flags("configs/eval.py[:default|tiny]")
flags.DEFINE_multi_string("image", [], "image files or folders (repeat, or list after one flag)")
flags.DEFINE_enum("task", "both", ["iqa", "iaa", "both"], "what to score")
flags.DEFINE_bool("json", False, "one JSON object per (image, task) on stdout")


def main(argv: list[str]) -> int:
    FLAGS = flags.FLAGS
    # `--image a.jpg b.png`: absl keeps the values after the first as positional arguments.
    paths = list(FLAGS.image) + list(argv[1:])

    def body() -> int:
        if not paths:
            raise ValueError("give at least one --image (a file or a folder)")
        keys = ("hf_dir", "batch_size", "max_new_tokens", "max_pixels", "mesh_shape")
        keys += cli.DECODING_FLAGS
        cfg = cli.apply_overrides(_CONFIG.value, {k: FLAGS[k].value for k in keys})
        cli.check_one_source(cfg, FLAGS.checkpoint)
        images = cli.collect_images(paths)
        cli.check_weight_flags(cfg, FLAGS.checkpoint)
        predictor = build_predict_fn(cfg, checkpoint=FLAGS.checkpoint, step=FLAGS.step)
        tasks = ("iqa", "iaa") if FLAGS.task == "both" else (FLAGS.task,)
        results = cli.score_images(
            images,
            tasks,
            predictor.predict_fn,
            batch_size=cfg.eval.batch_size,
            count_tokens=predictor.count_tokens,
            aggregate=cfg.eval.aggregate,
        )
        print(cli.format_results(results, FLAGS.json))
        return 1 if any(r.get("error") for r in results) else 0

    return cli.exit_code(body)


if __name__ == "__main__":
    cli_errors.run_script(main)
