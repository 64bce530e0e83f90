"""Logic behind ``scripts/eval.py`` and ``scripts/score.py`` (the scripts only parse flags).

The predictor factory is a parameter (default :func:`tatar_jax.evaluation.predict.build_predict_fn`)
so the wiring can be exercised without a model.
"""

from __future__ import annotations

import json
import math
import os
import sys
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from tatar_jax import answer_format, cli_errors
from tatar_jax.evaluation import outputs, runner, scoring, shards, specs

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".gif")


def define_model_flags(config_help: str) -> Any:
    """The flags ``scripts/eval.py`` and ``scripts/score.py`` share: ``--config`` (configs/eval.py)
    and where the weights come from / how they run. Returns the config flag holder."""
    from absl import flags
    from ml_collections import config_flags

    default = os.path.join(os.path.dirname(__file__), "..", "..", "configs", "eval.py")
    try:  # with a default file, config_flags reads sys.argv's --config / overrides right here
        holder = config_flags.DEFINE_config_file(
            "config", os.path.normpath(default), config_help, lock_config=False
        )
    except Exception as err:  # noqa: BLE001 - any of them is a usage error of the command line
        print(f"error: {usage_line(err, sys.argv)}", file=sys.stderr)
        sys.exit(2)
    flags.DEFINE_string(
        "checkpoint", "", "orbax checkpoint: a training workdir / step dir, or an exported model "
        "dir (config.json + params)",
    )  # fmt: skip
    flags.DEFINE_integer(
        "step", -1, "training step of a --checkpoint run (-1 = the latest complete one)"
    )
    flags.DEFINE_string("hf_dir", None, "Hugging Face Qwen2.5-VL directory")
    flags.DEFINE_integer("batch_size", None, "prompts per generate call (global)")
    flags.DEFINE_integer("max_new_tokens", None, "generation budget (default 256)")
    flags.DEFINE_integer("max_pixels", None, "image pixel budget (default 1572864)")
    flags.DEFINE_string("mesh_shape", "", "ICI mesh, e.g. data=8,fsdp=1,tensor=1 (-1 = inferred)")
    flags.DEFINE_integer(
        "num_samples", None, "completions per image from one prefill (default 1: greedy); the "
        "prediction is their --aggregate, with the per-image std and parsed count",
    )  # fmt: skip
    flags.DEFINE_float("temperature", None, "sampling temperature (default 0 = greedy)")
    flags.DEFINE_integer("top_k", None, "sample among the k most likely tokens (0 = off)")
    flags.DEFINE_float("top_p", None, "nucleus sampling mass (1 = off)")
    flags.DEFINE_integer(
        "seed", None, "sampling seed (default 42): the same command, the same samples"
    )
    flags.DEFINE_enum("aggregate", None, ["mean", "median"], "prediction of K samples")
    flags.DEFINE_bool(
        "constrained_answer", None, "after </think> allow only <answer>NUMBER</answer> with a "
        "number in 0-100, so every answer parses (n_would_be_unparsed counts the forced ones)",
    )  # fmt: skip
    return holder


# The decoding flags define_model_flags adds (scripts pass them to apply_overrides).
DECODING_FLAGS = (
    "num_samples", "temperature", "top_k", "top_p", "seed", "aggregate", "constrained_answer",
)  # fmt: skip


# The scripts' one-line error contract lives in tatar_jax.cli_errors (every script uses it).
usage_line = cli_errors.usage_line
run_script = cli_errors.run_script


def exit_code(body: Callable[[], int]) -> int:
    """``body()``, with the scripts' documented exit statuses: 3 without weights, 2 for a usage
    error, 1 for a damaged label file (a one-line ``error: ...`` on stderr)."""
    from tatar_jax.data.manifest import ManifestError
    from tatar_jax.evaluation.predict import ModelUnavailableError

    try:
        return body()
    except ModelUnavailableError as err:
        print(f"error: {err}", file=sys.stderr)
        return 3
    except outputs.ResumeMismatchError as err:  # another evaluation's out_dir: a usage error
        print(f"error: {err}", file=sys.stderr)
        return 2
    except ManifestError as err:  # a damaged label file: the message names it (and the row)
        print(f"error: {err}", file=sys.stderr)
        return 1
    except (ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


def parse_range(text: str) -> tuple[float, float]:
    """``"1,5"`` -> ``(1.0, 5.0)``; ValueError unless two finite numbers with lo < hi."""
    parts = [p.strip() for p in str(text).split(",")]
    try:
        lo, hi = (float(p) for p in parts)
    except ValueError:
        raise ValueError(f"--score_range must be LO,HI (two numbers), got {text!r}") from None
    if not (math.isfinite(lo) and math.isfinite(hi)):
        raise ValueError(f"--score_range needs two finite numbers, got {text!r}")
    if not lo < hi:
        raise ValueError(f"--score_range needs LO < HI, got {text!r}")
    return lo, hi


def parse_axes(text: str, what: str) -> dict[str, int]:
    """``"data=4,fsdp=2"`` -> ``{"data": 4, "fsdp": 2}`` (mesh flags)."""
    out: dict[str, int] = {}
    for item in (text or "").split(","):
        if not item.strip():
            continue
        name, sep, value = item.partition("=")
        if not sep or name.strip() not in ("data", "fsdp", "tensor"):
            raise ValueError(f"--{what}: entry {item!r} is not data|fsdp|tensor=N")
        out[name.strip()] = int(value)
    return out


def apply_overrides(cfg: Any, flags: Mapping[str, Any]) -> Any:
    """Sets the short flags that were given (not None) on ``cfg`` (``configs/eval.py``)."""
    ev = cfg.eval
    if flags.get("manifest") and flags.get("datasets"):
        raise ValueError("give either --datasets (built-in) or --manifest (a custom set), not both")
    direct = (
        "datasets",
        "benchmark_root",
        "manifest",
        "task",
        "image_root",
        "batch_size",
        "max_new_tokens",
        "max_pixels",
        "limit",
        "out_dir",
        "reference_compat",
        "prompt_variant",
        "allow_absolute_images",
        "num_samples",
        "temperature",
        "top_k",
        "top_p",
        "aggregate",
        "constrained_answer",
    )
    for key in direct:
        if flags.get(key) is not None:
            setattr(ev, key, flags[key])
    if flags.get("seed") is not None:
        cfg.seed = flags["seed"]
    sampled_defaults(ev, flags)
    if flags.get("score_range") is not None:
        ev.score_range = parse_range(flags["score_range"])
    if flags.get("hf_dir") is not None:
        cfg.model.hf_dir = flags["hf_dir"]
    if flags.get("mesh_shape"):
        cfg.mesh.shape.update(parse_axes(flags["mesh_shape"], "mesh_shape"))
    if flags.get("dcn_shape"):
        cfg.mesh.dcn_shape.update(parse_axes(flags["dcn_shape"], "dcn_shape"))
    return cfg


# What --num_samples > 1 samples with when no --temperature is given: the settings of the
# reasoning IQA scorers' demos (VisualQuality-R1, Q-Insight: temperature 1.0, top-k 50).
SAMPLED_DEFAULTS = {"temperature": 1.0, "top_k": 50}


def sampled_defaults(ev: Any, flags: Mapping[str, Any]) -> None:
    """``--num_samples`` > 1 without ``--temperature`` on a greedy config: samples at
    :data:`SAMPLED_DEFAULTS` (``--top_k`` likewise when not given) and says so on stderr; K
    greedy samples would be K equal copies."""
    if not flags.get("num_samples") or int(flags["num_samples"]) <= 1:
        return
    if flags.get("temperature") is not None or float(ev.temperature) > 0:
        return
    ev.temperature = SAMPLED_DEFAULTS["temperature"]
    said = f"--temperature={ev.temperature:g}"
    if flags.get("top_k") is None and int(ev.top_k) == 0:
        ev.top_k = SAMPLED_DEFAULTS["top_k"]
        said += f" --top_k={ev.top_k}"
    print(
        f"note: --num_samples={flags['num_samples']} samples with {said} (give --temperature to "
        "choose)",
        file=sys.stderr,
    )


def check_eval_numbers(ev: Any) -> None:
    """ValueError naming the flag of a number evaluation cannot run with (``--limit=-3`` is not
    "everything": only -1 is)."""
    if int(ev.limit) < -1 or int(ev.limit) == 0:
        raise ValueError(f"--limit: must be -1 (every record) or a positive count, got {ev.limit}")
    for name in ("batch_size", "max_new_tokens", "min_pixels", "max_pixels"):
        if int(ev[name]) < 1:
            raise ValueError(f"--{name}: must be a positive number, got {ev[name]}")
    if int(ev.min_pixels) > int(ev.max_pixels):
        raise ValueError(f"--max_pixels: {ev.max_pixels} is below min_pixels {ev.min_pixels}")
    check_decoding(ev)


def check_decoding(ev: Any) -> None:
    """ValueError naming the flag of a decoding setting that cannot run (or that would silently
    mean something else: K greedy samples are K equal copies)."""
    if int(ev.num_samples) < 1:
        raise ValueError(f"--num_samples: must be >= 1, got {ev.num_samples}")
    t = float(ev.temperature)
    if not (t >= 0 and math.isfinite(t)):
        raise ValueError(f"--temperature: must be a finite number >= 0, got {ev.temperature}")
    if int(ev.num_samples) > 1 and t == 0:
        raise ValueError(
            f"--num_samples={ev.num_samples} needs --temperature > 0 (greedy samples are equal)"
        )
    if int(ev.top_k) < 0:
        raise ValueError(f"--top_k: must be >= 0 (0 = off), got {ev.top_k}")
    if not 0 < float(ev.top_p) <= 1:
        raise ValueError(f"--top_p: must be in (0, 1], got {ev.top_p}")
    if ev.aggregate not in scoring.AGGREGATES:
        raise ValueError(f"--aggregate: must be one of {scoring.AGGREGATES}, got {ev.aggregate!r}")


def check_one_source(cfg: Any, checkpoint: str = "") -> None:
    """ValueError when both ``--hf_dir`` and ``--checkpoint`` are given: one set of weights is
    evaluated, never a silent choice between two."""
    if cfg.model.hf_dir and checkpoint:
        raise ValueError(
            "give either --hf_dir or --checkpoint, not both (a training run or an export carries "
            "its own architecture and tokenizer)"
        )


def check_weight_flags(cfg: Any, checkpoint: str = "") -> None:
    """The weight paths exist (before anything is loaded): FileNotFoundError naming the flag;
    ValueError when both are given (:func:`check_one_source`)."""
    check_one_source(cfg, checkpoint)
    check_eval_numbers(cfg.eval)
    if cfg.model.hf_dir and not os.path.isdir(cfg.model.hf_dir):
        raise FileNotFoundError(f"--hf_dir: no such directory: {cfg.model.hf_dir}")
    if checkpoint and not os.path.exists(checkpoint):
        raise FileNotFoundError(f"--checkpoint: no such file or directory: {checkpoint}")


def unscored(results: Mapping[str, Mapping[str, Any]], out_dir: str) -> list[str]:
    """One line per dataset of ``results`` (``run_eval``'s metrics) without a single scored row,
    saying why (``scripts/eval.py`` then exits 1: an empty table is no result)."""
    lines = []
    for name, m in results.items():
        if m.get("n_scored", 0):
            continue
        counts = ", ".join(
            f"{m.get(k, 0)} {what}"
            for k, what in (
                ("n_image_errors", "unreadable images"),
                ("n_bad_rows", "bad label rows"),
                ("n_predict_errors", "model errors"),
            )
        )
        where = os.path.join(out_dir, name, "errors.jsonl")
        lines.append(
            f"dataset {name}: no row was scored ({m.get('n_records', 0)} records: {counts}; "
            f"see {where})"
        )
    return lines


def run_eval_from_config(
    cfg: Any,
    *,
    checkpoint: str = "",
    step: int = -1,
    image_roots: str = "",
    predictor_factory: Callable[..., Any] | None = None,
) -> dict[str, dict[str, Any]]:
    """Declarations + predictor + runner; returns metrics by dataset and prints the summary.

    Everything that can be checked without the model (flags, label files) is checked before the
    model is loaded.
    """
    ev = cfg.eval
    if not ev.out_dir:
        raise ValueError("--out_dir is required")
    check_eval_numbers(ev)
    dataset_specs = specs.specs_from_config(ev, specs.parse_mapping(image_roots))
    for s in dataset_specs:  # fail on a wrong path before spending minutes loading weights
        if not os.path.isfile(s.manifest):
            raise FileNotFoundError(f"dataset {s.name}: label file {s.manifest} not found")
    check_weight_flags(cfg, checkpoint)
    # What the out_dir was written with is checked before minutes of loading: the decoding
    # settings, and the weights unless a training run's step is chosen while loading.
    from tatar_jax.evaluation import fingerprint

    known = None
    if not checkpoint or fingerprint.is_export(checkpoint):
        known = _weights_info(cfg, checkpoint, {})
    early = {
        "reference_compat": ev.reference_compat,
        **_decoding_info(ev, cfg.seed),
        **(known or {}),
    }
    shards.check_run_info(os.path.join(ev.out_dir, outputs.RUN_INFO), early)
    if predictor_factory is None:
        from tatar_jax.evaluation.predict import build_predict_fn as predictor_factory
    predictor = predictor_factory(cfg, checkpoint=checkpoint, step=step)
    weights = known if known is not None else _weights_info(cfg, checkpoint, predictor.info)
    is_writer = True
    if "jax" in sys.modules:
        import jax

        is_writer = jax.process_index() == 0
    options = runner.EvalOptions(
        batch_size=ev.batch_size,
        limit=ev.limit,
        reference_compat=ev.reference_compat,
        bad_rows=ev.bad_rows,
        image_threads=ev.image_threads,
        progress=ev.progress and is_writer,
        is_writer=is_writer,
        plots=ev.plots,
        aggregate=ev.aggregate,
        run_info={**predictor.info, **weights},
    )
    results = runner.run_eval(
        dataset_specs,
        predictor.predict_fn,
        ev.out_dir,
        options,
        count_tokens=predictor.count_tokens,
        title=predictor.name,
    )
    if is_writer:
        with open(os.path.join(ev.out_dir, "summary.md"), encoding="utf-8") as f:
            print(f.read())
    return results


def _decoding_info(ev: Any, seed: int) -> dict[str, Any]:
    """The decoding settings of ``configs/eval.py``'s ``eval`` block as ``run_info.json`` holds
    them (:func:`tatar_jax.evaluation.predict.build_predict_fn`'s ``info``)."""
    from tatar_jax.evaluation.predict import decoding_info

    return {
        "max_new_tokens": int(ev.max_new_tokens),
        "min_pixels": int(ev.min_pixels),
        "max_pixels": int(ev.max_pixels),
        "prompt_variant": ev.prompt_variant,
        "decoding": decoding_info(ev, seed),
    }


def _weights_info(cfg: Any, checkpoint: str, info: Mapping[str, Any]) -> dict[str, Any]:
    """What was evaluated (:mod:`tatar_jax.evaluation.fingerprint`): the weights' files'
    fingerprint and the compute dtype, the keys of a resume besides the decoding settings."""
    from tatar_jax import cli_errors
    from tatar_jax.evaluation import fingerprint

    model = str(info.get("model", ""))
    # A training run's step actually loaded (the latest that restores): "<run>@<step>".
    step = int(model.rsplit("@", 1)[1]) if "@" in model and checkpoint else None
    info_path = os.path.join(cfg.eval.out_dir, outputs.RUN_INFO)
    previous = cli_errors.read_json(info_path) if os.path.isfile(info_path) else {}
    return fingerprint.run_info(
        hf_dir="" if checkpoint else cfg.model.hf_dir, checkpoint=checkpoint, step=step,
        dtype=str(cfg.model.dtype), previous=previous if isinstance(previous, dict) else {},
    )  # fmt: skip


# ---------------------------------------------------------------------------------------------
# score.py


def collect_images(paths: Sequence[str]) -> list[str]:
    """Files as given, folders expanded to their images (sorted, non-recursive).

    FileNotFoundError naming a path that does not exist; ValueError if nothing is left.
    """
    out: list[str] = []
    for p in paths:
        if os.path.isdir(p):
            out += sorted(
                os.path.join(p, f)
                for f in os.listdir(p)
                if f.lower().endswith(IMAGE_EXTENSIONS) and os.path.isfile(os.path.join(p, f))
            )
        elif os.path.exists(p):
            out.append(p)
        else:
            from tatar_jax.data.image import symlink_problem

            raise FileNotFoundError(f"--image: {p} {symlink_problem(p) or 'does not exist'}")
    if not out:
        raise ValueError(f"no images found in {list(paths)}")
    return out


def score_images(
    paths: Sequence[str],
    tasks: Sequence[str],
    predict_fn: runner.PredictFn,
    *,
    batch_size: int,
    count_tokens: scoring.CountTokens | None = None,
    aggregate: str = "mean",
) -> list[dict[str, Any]]:
    """Scores every image for every task; one result dict per (image, task), input order.

    Result: ``image, task, score`` (0-100; None when the answer does not parse or lies outside
    0-100), ``answer`` (the parsed value as written), ``out_of_range``, ``reasoning``
    (:func:`tatar_jax.answer_format.think_text`, stripped), ``completion``, ``think_tokens``,
    ``error`` (why an image was not scored). K samples (a
    :class:`~tatar_jax.evaluation.scoring.Samples` entry) add :func:`_sampled_result`'s fields.
    """
    from tatar_jax.data import image as image_mod

    jobs: list[dict[str, Any]] = []
    results: list[dict[str, Any]] = []
    for i, path in enumerate(paths):
        try:
            im = image_mod.load_image(path)
            err = None
        except image_mod.ImageLoadError as e:
            im, err = None, e.reason
        for task in tasks:
            res = {"image": path, "task": task, "score": None, "reasoning": "", "error": err}
            results.append(res)
            if err is None:
                rec = {"image": path, "image_name": os.path.basename(path), "task": task}
                jobs.append(
                    {**rec, "row_id": i, "dataset": "score", "pil_image": im, "_result": res}
                )
    for k in range(0, len(jobs), batch_size):
        chunk = jobs[k : k + batch_size]
        texts = list(predict_fn([{kk: v for kk, v in j.items() if kk != "_result"} for j in chunk]))
        if len(texts) != len(chunk):
            raise outputs.EvalError(f"predict_fn returned {len(texts)} texts for {len(chunk)}")
        for job, text in zip(chunk, texts, strict=True):
            if isinstance(text, runner.RecordFailure):
                job["_result"]["error"] = text.reason
            elif isinstance(text, scoring.Samples):
                job["_result"].update(_sampled_result(text, job["task"], count_tokens, aggregate))
            else:
                scored = scoring.score_completion(text, job["task"], count_tokens=count_tokens)
                out_of_range = scored["out_of_range"]
                job["_result"].update(
                    score=None if out_of_range else scored["prediction"],
                    answer=scored["answer"],
                    out_of_range=out_of_range,
                    reasoning=answer_format.think_text(text).strip(),
                    completion=text,
                    think_tokens=scored["think_tokens"],
                )
    return results


def _sampled_result(
    samples: scoring.Samples, task: str, count_tokens: Any, aggregate: str
) -> dict[str, Any]:
    """score.py's result of K samples: ``score`` the ``aggregate`` of the answers inside 0-100
    (never clipped; None when none), ``std`` their population std, ``n_parsed`` their count of
    ``n_samples``, ``out_of_range`` the parsed answers outside 0-100, ``answers`` every sample's
    parsed value (None: unparsed), ``samples`` the K completions; reasoning / completion /
    think_tokens of the first sample."""
    import numpy as np

    row = scoring.score_samples(samples, task, aggregate=aggregate, count_tokens=count_tokens)
    raw = row["raw_answers"]
    inside = [a for a in raw if a is not None and not answer_format.out_of_scale(a)]
    first = samples.texts[0] if samples.texts else ""
    return {
        "score": scoring.aggregate_answers(inside, aggregate) if inside else None,
        "std": float(np.std(inside)) if inside else None,
        "n_parsed": len(inside),
        "n_samples": len(samples.texts),
        "out_of_range": int(row["out_of_range"]),
        "answers": raw,
        "reasoning": answer_format.think_text(first).strip(),
        "completion": first,
        "samples": list(samples.texts),
        "think_tokens": row["think_tokens"],
        **({"n_forced": row["n_forced"]} if "n_forced" in row else {}),
    }


def format_results(results: Sequence[Mapping[str, Any]], as_json: bool) -> str:
    """Human-readable text (reasoning, then the score) or one JSON object per line."""
    if as_json:
        return "\n".join(json.dumps(r, ensure_ascii=False) for r in results)
    lines = []
    for r in results:
        head = f"{r['image']}  [{r['task'].upper()}]"
        if r.get("error"):
            lines.append(f"{head}  error: {r['error']}")
            continue
        if "n_samples" in r:
            score = _sampled_line(r)
        elif r.get("out_of_range"):
            score = f"out of range: the model answered {r['answer']:g}, outside 0-100"
        elif r["score"] is None:
            score = "unparsed answer"
        else:
            score = f"{r['score']:.2f} / 100"
        lines.append(f"{head}  score: {score}")
        if r.get("reasoning"):
            lines.append(f"  reasoning: {r['reasoning']}")
        if r["score"] is None:
            lines.append(f"  raw output: {r.get('completion', '')!r}")
    return "\n".join(lines)


def _sampled_line(r: Mapping[str, Any]) -> str:
    """``73.4 ± 2.1 (8/8 parsed)``; answers outside 0-100 and forced answers named after."""
    counts = f"{r['n_parsed']}/{r['n_samples']} parsed"
    if r.get("out_of_range"):
        counts += f", {r['out_of_range']} outside 0-100"
    if r.get("n_forced"):
        counts += f", {r['n_forced']} forced by the answer constraint"
    if r["score"] is None:
        return f"no answer inside 0-100 ({counts})"
    return f"{r['score']:.1f} ± {r['std']:.1f} ({counts})"
