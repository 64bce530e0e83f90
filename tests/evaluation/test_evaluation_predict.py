"""The model-side predict function's wiring (preprocessing, prompt, collation, mesh, decoding).

``tatar_jax.generate.generate`` is replaced by ``StandInGenerate``, a recording test double that
checks the arrays it is given against the data path (HF-equal preprocessing, the evaluation prompt,
left padding) and returns canned token ids with a stop mask. The real Qwen tokenizer (offline
rebuild) encodes the prompts and decodes the canned answers.
"""

from __future__ import annotations

import dataclasses
import json
import types

import jax
import numpy as np
import pytest
from PIL import Image

from tatar_jax import sharding
from tatar_jax.data import image as image_mod
from tatar_jax.data import prompts
from tatar_jax.evaluation import runner
from tatar_jax.evaluation.predict import make_predict_fn


@pytest.fixture(scope="module")
def qwen_tok():
    from tatar_jax.data.tokenizer import load_tokenizer

    return load_tokenizer(None)


@dataclasses.dataclass
class Out:
    tokens: jax.Array
    mask: jax.Array


class StandInGenerate:
    """Answers row k with ``<think>row k</think><answer>{50 + k}</answer><|im_end|>`` + padding."""

    def __init__(self, tok, max_new_tokens):
        self.tok, self.t, self.calls = tok, max_new_tokens, []

    def __call__(self, model, input_ids, attention_mask, *, pixel_values, image_grid_thw, **kw):
        self.calls.append(
            dict(
                input_ids=np.asarray(input_ids),
                attention_mask=np.asarray(attention_mask),
                pixel_values=np.asarray(pixel_values),
                grid=np.asarray(image_grid_thw),
                **kw,
            )
        )
        b = input_ids.shape[0]
        tokens = np.full((b, self.t), self.tok.pad_id, np.int32)
        mask = np.zeros((b, self.t), bool)
        for k in range(b):
            ids = self.tok.encode(f"<think>row {k}</think><answer>{50 + k}</answer>")
            ids = ids + [self.tok.im_end_id]
            tokens[k, : len(ids)] = ids
            mask[k, : len(ids)] = True
        return Out(jax.numpy.asarray(tokens), jax.numpy.asarray(mask))


def _ev(**kw):
    base = dict(
        batch_size=4,
        max_new_tokens=40,
        min_pixels=3136,
        max_pixels=200_000,
        prompt_variant="reference_eval",
    )
    base.update(kw)
    return types.SimpleNamespace(**base)


def _rec(k, size, task="iqa"):
    rng = np.random.default_rng(k)
    im = Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8))
    return {"pil_image": im, "task": task, "gt_100": 10.0 * k, "row_id": k, "image": f"{k}.png"}


def test_predict_fn_wiring_with_stand_in_generate(qwen_tok):
    mesh = sharding.make_mesh({"data": 2, "fsdp": 1, "tensor": 1}, devices=jax.devices()[:2])
    ev = _ev()
    gen = StandInGenerate(qwen_tok, ev.max_new_tokens)
    fn = make_predict_fn(
        object(), qwen_tok, ev, mesh=mesh, rules=sharding.DEFAULT_RULES, generate_fn=gen
    )
    recs = [_rec(0, (64, 48)), _rec(1, (40, 90), "iaa"), _rec(2, (2, 600))]  # 2 x 600: 1:300
    out = fn(recs)

    assert out[0] == "<think>row 0</think><answer>50</answer>"  # <|im_end|> stripped
    assert out[1] == "<think>row 1</think><answer>51</answer>"
    assert isinstance(out[2], runner.RecordFailure) and "aspect" in out[2].reason.lower()

    (call,) = gen.calls
    assert call["temperature"] == 0.0 and call["num_samples"] == 1
    assert call["max_new_tokens"] == 40
    assert set(call["stop_token_ids"]) == set(qwen_tok.eos_ids)
    ids, am = call["input_ids"], call["attention_mask"]
    assert ids.shape[0] == 4 and am[:, -1].all()  # static batch, left padded
    assert call["pad_token_id"] == qwen_tok.pad_id
    # The pixels are the HF-equal preprocessing of the two good images, in row order.
    want = [image_mod.preprocess_image(r["pil_image"], 3136, 200_000) for r in recs[:2]]
    n0, n1 = (w[0].shape[0] for w in want)
    np.testing.assert_array_equal(call["grid"][:2], np.stack([w[1] for w in want]))
    np.testing.assert_array_equal(call["pixel_values"][:n0], want[0][0])
    np.testing.assert_array_equal(call["pixel_values"][n0 : n0 + n1], want[1][0])
    # Each real row is its task's evaluation prompt with the image expanded.
    for k, r in enumerate(recs[:2]):
        row = ids[k][am[k] == 1]
        text = qwen_tok.decode(row.tolist(), skip_special_tokens=False)
        assert prompts.get_prompts("reference_eval").task_text(r["task"]) in text
        n_img = int(np.prod(want[k][1]) // 4)
        assert int((row == qwen_tok.image_pad_id).sum()) == n_img
        assert text.endswith("<|im_start|>assistant\n")

    # A batch with no usable image never reaches the model.
    assert fn([recs[2]]) == [out[2]] and len(gen.calls) == 1
    with pytest.raises(ValueError, match="batch_size"):
        fn([_rec(k, (30, 30)) for k in range(5)])


@pytest.mark.slow
def test_tiny_random_model_end_to_end_and_resume(tmp_path, qwen_tok):
    """A tiny random Qwen2.5-VL with the real tokenizer's ids, real greedy generation, the runner:
    all outputs are written and a resumed run gives identical metrics without generating."""
    import tiny_models
    from flax import nnx

    from tatar_jax import generate
    from tatar_jax.data import manifest
    from tatar_jax.models.qwen2_5_vl.model import Qwen2_5_VLForConditionalGeneration

    tok = qwen_tok
    cfg = tiny_models.tiny_config_for(tok)
    model = Qwen2_5_VLForConditionalGeneration(cfg, rngs=nnx.Rngs(0))
    mesh = sharding.make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, devices=jax.devices()[:1])
    calls = []

    def gen(*a, **k):
        calls.append(a[1].shape)
        return generate.generate(*a, **k)

    ev = _ev(batch_size=2, max_new_tokens=6, max_pixels=40_000)
    fn = make_predict_fn(model, tok, ev, mesh=mesh, rules=sharding.DEFAULT_RULES, generate_fn=gen)
    rows = []
    for i in range(3):
        _rec(i, (84, 56))["pil_image"].save(tmp_path / f"{i}.png")
        rows.append({"image": f"{i}.png", "gt_score": 1.0 + i})
    (tmp_path / "m.json").write_text(json.dumps(rows))
    spec = manifest.DatasetSpec("syn", "iqa", str(tmp_path / "m.json"), score_range=(1.0, 5.0))
    opts = runner.EvalOptions(batch_size=2, progress=False)
    count = lambda s: len(tok.encode(s))  # noqa: E731
    first = runner.run_eval([spec], fn, tmp_path / "out", opts, count_tokens=count)
    assert len(calls) == 2 and calls[0][0] == 2  # 3 rows in static batches of 2
    for f in ("syn/predictions.jsonl", "syn/metrics.json", "syn/scatter.png", "summary.md"):
        assert (tmp_path / "out" / f).is_file(), f
    stored = runner.read_jsonl(str(tmp_path / "out" / "syn" / "predictions.jsonl"))
    assert [r["row_id"] for r in stored] == [0, 1, 2]
    assert all(isinstance(r["completion"], str) and r["completion"] for r in stored)
    m = first["syn"]
    assert m["n_scored"] == 3 and m["n_unparsed"] + m["n_pairs"] == 3
    again = runner.run_eval([spec], fn, tmp_path / "out", opts, count_tokens=count)
    assert again == first and len(calls) == 2  # nothing regenerated
