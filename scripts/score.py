"""Score your own images for quality (IQA) and/or aesthetics (IAA): reasoning + a 0-100 score.

    python scripts/score.py --hf_dir=/ckpt/tatar-7b --image a.jpg b.png --task both
    python scripts/score.py --hf_dir=/ckpt/tatar-7b --image /photos/ --task iaa --json > out.jsonl

The model is loaded once and the images are scored in batches (greedy decoding, the evaluation
prompt). An unreadable image is reported, not skipped silently; an answer that does not parse
strictly is shown as such with the raw output.
"""

from __future__ import annotations

import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from tatar_jax.evaluation import cli  # noqa: E402
from tatar_jax.evaluation.predict import ModelUnavailableError, build_predict_fn  # noqa: E402

_DEFAULT_CONFIG = str(pathlib.Path(__file__).resolve().parents[1] / "configs" / "eval.py")
_CONFIG = config_flags.DEFINE_config_file(
    "config", _DEFAULT_CONFIG, "configs/eval.py[:default|tiny]", lock_config=False
)
flags.DEFINE_multi_string("image", [], "image files or folders (repeat, or list after one flag)")
flags.DEFINE_enum("task", "both", ["iqa", "iaa", "both"], "what to score")
flags.DEFINE_bool("json", False, "one JSON object per (image, task) on stdout")
flags.DEFINE_string("checkpoint", "", "orbax checkpoint (training workdir or exported model)")
flags.DEFINE_string("hf_dir", None, "Hugging Face Qwen2.5-VL directory")
flags.DEFINE_integer("batch_size", None, "prompts per generate call")
flags.DEFINE_integer("max_new_tokens", None, "generation budget (default 256)")
flags.DEFINE_integer("max_pixels", None, "image pixel budget")
flags.DEFINE_string("mesh_shape", "", "ICI mesh, e.g. data=8")


def main(argv: list[str]) -> int:
    FLAGS = flags.FLAGS
    # `--image a.jpg b.png`: absl keeps the values after the first as positional arguments.
    paths = list(FLAGS.image) + list(argv[1:])
    try:
        if not paths:
            raise ValueError("give at least one --image (a file or a folder)")
        images = cli.collect_images(paths)
        keys = ("hf_dir", "batch_size", "max_new_tokens", "max_pixels", "mesh_shape")
        cfg = cli.apply_overrides(_CONFIG.value, {k: FLAGS[k].value for k in keys})
        predictor = build_predict_fn(cfg, checkpoint=FLAGS.checkpoint)
        tasks = ("iqa", "iaa") if FLAGS.task == "both" else (FLAGS.task,)
        results = cli.score_images(
            images,
            tasks,
            predictor.predict_fn,
            batch_size=cfg.eval.batch_size,
            count_tokens=predictor.count_tokens,
        )
    except ModelUnavailableError as err:
        print(f"error: {err}", file=sys.stderr)
        return 3
    except (ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(cli.format_results(results, FLAGS.json))
    return 1 if any(r.get("error") for r in results) else 0


if __name__ == "__main__":
    app.run(main)
