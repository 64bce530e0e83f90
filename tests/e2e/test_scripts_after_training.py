"""The road after training, from the user's side: ``scripts/eval.py`` / ``scripts/score.py`` on a
``scripts/train.py`` workdir (latest step, ``--step``, a step folder), ``convert_checkpoint.py
--workdir`` to a complete HF directory, and that export read back by our scripts (the same greedy
completions as the workdir it came from) and by transformers.

One tiny run directory (embedded model, checkpoints at steps 1 and 2) is shared by the module.
"""

from __future__ import annotations

import json
import pathlib

import numpy as np
import pytest
from PIL import Image
from train_runs import run_script, train_env

EVAL_TINY = "--config=configs/eval.py:tiny"


@pytest.fixture(scope="module")
def env(tmp_path_factory, xla_cache_dir):
    return train_env(tmp_path_factory.mktemp("tok_cache"), xla_cache_dir)


def _run(script, args, env, timeout=600):
    return run_script(script, args, env, timeout)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A scripts/train.py workdir of the embedded tiny model with checkpoints at steps 1 and 2,
    written the trainer's way (``config.json``, ``run_config.json``, the trainer's Checkpointer)
    without the minutes of compiling a training step (tests/train/test_train_run.py runs
    train.py itself)."""
    import jax
    from flax import nnx

    from configs import sft
    from tatar_jax import loading
    from tatar_jax.data import tokenizer
    from tatar_jax.train import checkpointing, optim

    wd = tmp_path_factory.mktemp("run") / "sft"
    wd.mkdir()
    # The embedded model's own vocabulary (the run records no tokenizer folder, as a real
    # embedded run does not): eval/score/convert find it from the run's config.json.
    arch = loading.embedded_config(tokenizer.load_tokenizer(loading.tokenizer_dir(
        loading.PolicySource())), "tiny")  # fmt: skip
    assert arch.text.vocab_size < 2048
    arch.to_json_file(str(wd / "config.json"))
    (wd / "run_config.json").write_text(sft.get_config("tiny").to_json_best_effort(indent=1))
    ckpt = checkpointing.Checkpointer(wd, every_steps=1, async_save=False, with_data=False)
    for step in (1, 2):
        model = loading.build_model(arch, seed=step)
        tx = optim.make_optimizer(1e-3)
        ckpt.save(step, optim.TrainState.create(nnx.state(model), tx, jax.random.key(0)))
    ckpt.close()
    assert sorted(p.name for p in (wd / "checkpoints").iterdir()) == ["1", "2"]
    return wd


@pytest.fixture(scope="module")
def labelled(tmp_path_factory):
    """Three small images and an IQA manifest on a 1-5 scale."""
    d = tmp_path_factory.mktemp("labelled")
    rng = np.random.default_rng(0)
    rows = []
    for i in range(3):
        pixels = rng.integers(0, 256, (56, 84, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(d / f"{i}.png")
        rows.append({"image": f"{i}.png", "gt_score": 1.0 + i})
    (d / "labels.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return d


def _eval(weights, labelled, out, env, *extra):
    args = [
        EVAL_TINY, *weights, f"--manifest={labelled / 'labels.jsonl'}", "--task=iqa",
        "--score_range=1,5", f"--image_root={labelled}", f"--out_dir={out}", *extra,
    ]  # fmt: skip
    r = _run("eval.py", args, env)
    assert r.returncode == 0, r.stderr[-3000:]
    info = json.loads((out / "run_info.json").read_text())
    preds = [json.loads(x) for x in (out / "labels" / "predictions.jsonl").read_text().splitlines()]
    return info, {p["image"]: p["completion"] for p in preds}


@pytest.fixture(scope="module")
def from_run(run_dir, labelled, tmp_path_factory, env):
    """eval.py --checkpoint=<workdir>: (run_info, completions by image) of the latest step."""
    return _eval([f"--checkpoint={run_dir}"], labelled, tmp_path_factory.mktemp("ev"), env)


def test_eval_a_training_workdir_latest_and_chosen_step(run_dir, from_run, labelled, tmp_path, env):
    info, latest = from_run
    assert info["model"] == "sft@2" and len(latest) == 3
    info, first = _eval([f"--checkpoint={run_dir}", "--step=1"], labelled, tmp_path / "s1", env)
    assert info["model"] == "sft@1" and len(first) == 3

    r = _run("eval.py", [EVAL_TINY, f"--checkpoint={run_dir}", "--step=7",
                         f"--manifest={labelled / 'labels.jsonl'}", "--task=iqa",
                         "--score_range=1,5", f"--out_dir={tmp_path / 'bad'}"], env)  # fmt: skip
    assert r.returncode == 2
    assert r.stderr.strip().splitlines()[-1].startswith("error: step 7 not in ")
    assert "(have [1, 2])" in r.stderr


def test_score_a_step_folder(run_dir, labelled, env):
    args = [EVAL_TINY, f"--checkpoint={run_dir / 'checkpoints' / '2'}", "--task=iqa", "--json",
            "--image", str(labelled / "0.png"), str(labelled / "1.png")]  # fmt: skip
    r = _run("score.py", args, env)
    assert r.returncode == 0, r.stderr[-3000:]
    lines = [json.loads(x) for x in r.stdout.splitlines() if x.startswith("{")]
    assert [pathlib.Path(x["image"]).name for x in lines] == ["0.png", "1.png"]
    assert all(x["error"] is None and isinstance(x["completion"], str) for x in lines)


@pytest.fixture(scope="module")
def export_dir(run_dir, tmp_path_factory, env):
    out = tmp_path_factory.mktemp("export") / "hf"
    r = _run("convert_checkpoint.py", [f"--workdir={run_dir}", f"--hf_out={out}"], env)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "step 2" in r.stdout
    return out


def test_export_is_a_complete_hf_directory(export_dir):
    names = {p.name for p in export_dir.iterdir()}
    assert {
        "model.safetensors", "config.json", "generation_config.json", "tokenizer.json",
        "tokenizer_config.json", "chat_template.jinja", "preprocessor_config.json",
    } <= names  # fmt: skip


def test_export_evaluates_like_the_workdir(from_run, export_dir, labelled, tmp_path, env):
    info, from_export = _eval([f"--hf_dir={export_dir}"], labelled, tmp_path / "hf", env)
    assert info["model"] == "hf"
    assert from_export == from_run[1]  # same weights, tokenizer and prompt: same greedy text
    r = _run("score.py", [EVAL_TINY, f"--hf_dir={export_dir}", "--image", str(labelled / "2.png")],
             env)  # fmt: skip
    assert r.returncode == 0 and "[IQA]" in r.stdout and "[IAA]" in r.stdout, r.stderr[-2000:]


def test_transformers_loads_the_export(export_dir, labelled):
    import transformers

    from tatar_jax import loading
    from tatar_jax.data import image, prompts, tokenizer

    model, info = transformers.Qwen2_5_VLForConditionalGeneration.from_pretrained(
        export_dir, output_loading_info=True
    )
    assert not info["missing_keys"] and not info["unexpected_keys"]
    tok = transformers.AutoTokenizer.from_pretrained(export_dir)
    msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Rate."}]}]
    text = tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
    assert text == prompts.render_chat(msgs, None, add_generation_prompt=True)
    ours = tokenizer.load_tokenizer(loading.tokenizer_dir(loading.PolicySource()))
    assert len(tok) == len(ours) < 2048  # the embedded tokenizer went with the weights
    assert tok(text)["input_ids"] == ours.encode(text)
    assert (tok.eos_token, tok.pad_token) == ("<|im_end|>", "<|endoftext|>")

    im = Image.open(labelled / "0.png")
    proc = transformers.AutoImageProcessor.from_pretrained(export_dir)
    got = proc(images=[im], return_tensors="np")
    pv, thw = image.preprocess_image(im)
    np.testing.assert_array_equal(got["image_grid_thw"][0], thw)
    np.testing.assert_allclose(got["pixel_values"], pv, atol=1e-6)


def test_auto_processor_loads_the_export(export_dir):
    # transformers builds Qwen2.5-VL's video processor with torchvision, which this project does
    # not install (no CPU wheel beside torch 2.13): AutoProcessor needs it for any Qwen2.5-VL
    # folder, the hub's own included.
    pytest.importorskip("torchvision")
    import transformers

    proc = transformers.AutoProcessor.from_pretrained(export_dir)
    assert type(proc).__name__ == "Qwen2_5_VLProcessor"


def test_eval_exits_1_when_no_image_could_be_read(run_dir, labelled, tmp_path, env):
    args = [
        EVAL_TINY, f"--checkpoint={run_dir}", f"--manifest={labelled / 'labels.jsonl'}",
        "--task=iqa", "--score_range=1,5", f"--image_root={tmp_path / 'typo'}",
        f"--out_dir={tmp_path / 'out'}",
    ]  # fmt: skip
    r = _run("eval.py", args, env)
    assert r.returncode == 1, r.stderr[-2000:]
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("error: dataset labels: no row was scored (3 records: 3 unreadable")
    assert str(tmp_path / "out" / "labels" / "errors.jsonl") in last


def test_eval_resume_is_keyed_by_the_weights_not_the_folder_name(
    run_dir, export_dir, labelled, tmp_path, env
):
    """Issue 32 item 2 (and the item-7 case of a changed --max_new_tokens): two exports both
    named ``hf`` (steps 2 and 1 of a run) into one --out_dir: the second is refused with one
    line naming the weights, exit 2, before loading; the stored predictions are untouched; the
    same weights copied elsewhere resume."""
    import shutil

    other = tmp_path / "step1" / "hf"
    r = _run("convert_checkpoint.py", [f"--workdir={run_dir}", "--step=1", f"--hf_out={other}"],
             env)  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    out = tmp_path / "out"
    info, _ = _eval([f"--hf_dir={export_dir}"], labelled, out, env)
    assert info["model"] == "hf" and info["weights"].startswith("sha256:")
    assert info["dtype"] == "float32" and str(export_dir / "model.safetensors") in (
        info["weights_files"]
    )
    preds = (out / "labels" / "predictions.jsonl").read_bytes()
    args = [
        EVAL_TINY, f"--hf_dir={other}", f"--manifest={labelled / 'labels.jsonl'}", "--task=iqa",
        "--score_range=1,5", f"--image_root={labelled}", f"--out_dir={out}",
    ]  # fmt: skip
    r = _run("eval.py", args, env)
    assert r.returncode == 2, r.stderr[-3000:]
    assert r.stderr.strip().splitlines() == [
        f"error: {out / 'run_info.json'}: this out_dir holds the predictions of other weights "
        f"({info['weights']} of hf; now sha256:"
        + r.stderr.split("now sha256:")[1].split(")")[0]
        + "); stored predictions would be mixed with new ones - use a fresh out_dir"
    ]
    assert (out / "labels" / "predictions.jsonl").read_bytes() == preds
    r = _run("eval.py", [*args[:1], f"--hf_dir={export_dir}", *args[2:], "--max_new_tokens=9"],
             env)  # fmt: skip
    assert r.returncode == 2 and r.stderr.strip().splitlines() == [
        f"error: {out / 'run_info.json'}: this out_dir was written with max_new_tokens=8, now 9; "
        "stored predictions would be mixed with new ones - use a fresh out_dir"
    ], r.stderr[-3000:]
    moved = tmp_path / "elsewhere" / "hf"
    shutil.copytree(export_dir, moved)  # the same weights in another folder: the same model
    info2, _ = _eval([f"--hf_dir={moved}"], labelled, out, env)
    assert info2["weights"] == info["weights"]
    assert (out / "labels" / "predictions.jsonl").read_bytes() == preds  # resumed: nothing new
