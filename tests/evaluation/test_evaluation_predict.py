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
from eval_settings import eval_settings
from PIL import Image

from tatar_jax import sharding
from tatar_jax.data import image as image_mod
from tatar_jax.data import prompts
from tatar_jax.evaluation import runner
from tatar_jax.evaluation.predict import make_predict_fn, sampling_params


@pytest.fixture(scope="module")
def qwen_tok():
    from tatar_jax.data.tokenizer import load_tokenizer

    return load_tokenizer(None)


@dataclasses.dataclass
class Out:
    tokens: jax.Array
    mask: jax.Array


class StandInSampler:
    """Answers sample j of row k with ``<think>row k</think><answer>{50 + k + j}</answer>
    <|im_end|>`` + padding; records the prompt batches it is given."""

    def __init__(self, tok, max_new_tokens, num_samples=1):
        self.tok, self.t, self.calls = tok, max_new_tokens, []
        self.params = types.SimpleNamespace(num_samples=num_samples)

    def generate_prompts(self, prompts, *, rng):
        self.calls.append(dict(prompts=prompts, rng=rng))
        g = self.params.num_samples
        n = np.shape(prompts.input_ids)[0] * g
        tokens = np.full((n, self.t), self.tok.pad_id, np.int32)
        mask = np.zeros((n, self.t), bool)
        for row in range(n):
            k, j = divmod(row, g)
            ids = self.tok.encode(f"<think>row {k}</think><answer>{50 + k + j}</answer>")
            ids = ids + [self.tok.im_end_id]
            tokens[row, : len(ids)] = ids
            mask[row, : len(ids)] = True
        return Out(jax.numpy.asarray(tokens), jax.numpy.asarray(mask))


def _rec(k, size, task="iqa"):
    rng = np.random.default_rng(k)
    im = Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8))
    return {"pil_image": im, "task": task, "gt_100": 10.0 * k, "row_id": k, "image": f"{k}.png"}


def _model_stub(tok):
    import tiny_models

    return types.SimpleNamespace(config=tiny_models.tiny_config_for(tok))


def test_predict_fn_builds_one_prompt_batch(qwen_tok):
    """The records' prompts reach the sampler as one PromptBatch whose layout is the data
    path's (HF-equal preprocessing, the evaluation prompt, left padding, get_rope_index
    positions, the patches in row order at the collated patch bucket): nothing re-bucketed."""
    from tatar_jax.evaluation.predict import batch_key
    from tatar_jax.models.qwen2_5_vl import rope

    ev = eval_settings()
    model = _model_stub(qwen_tok)
    smp = StandInSampler(qwen_tok, ev.max_new_tokens)
    fn = make_predict_fn(model, qwen_tok, ev, mesh=None, rules=None, sampler=smp, seed=7)
    recs = [_rec(0, (64, 48)), _rec(1, (40, 90), "iaa"), _rec(2, (2, 600))]  # 2 x 600: 1:300
    out = fn(recs)

    assert out[0] == "<think>row 0</think><answer>50</answer>"  # <|im_end|> stripped
    assert out[1] == "<think>row 1</think><answer>51</answer>"
    assert isinstance(out[2], runner.RecordFailure) and "aspect" in out[2].reason.lower()

    (call,) = smp.calls
    pb = call["prompts"]
    want_key = jax.random.key_data(batch_key(7, recs))
    np.testing.assert_array_equal(jax.random.key_data(call["rng"]), want_key)
    ids, am = np.asarray(pb.input_ids), np.asarray(pb.attention_mask)
    assert ids.shape[0] == 4 and am[:, -1].all()  # static batch, left padded
    # The pixels are the HF-equal preprocessing of the two good images, in row order, then 0.
    want = [image_mod.preprocess_image(r["pil_image"], 3136, 200_000) for r in recs[:2]]
    n0, n1 = (w[0].shape[0] for w in want)
    pv = np.asarray(pb.vision.pixel_values)
    np.testing.assert_array_equal(pv[:n0], want[0][0])
    np.testing.assert_array_equal(pv[n0 : n0 + n1], want[1][0])
    # Positions and deltas are get_rope_index's of the padded batch (the fillers copy row 1).
    grid = np.stack([w[1] for w in want] + [want[1][1]] * 2)
    pos, deltas = rope.get_rope_index(ids, grid, am, model.config)
    np.testing.assert_array_equal(np.asarray(pb.position_ids) * am, np.asarray(pos) * am)
    np.testing.assert_array_equal(np.asarray(pb.rope_deltas), np.asarray(deltas))
    # Each real row is its task's evaluation prompt with the image expanded.
    for k, r in enumerate(recs[:2]):
        row = ids[k][am[k] == 1]
        text = qwen_tok.decode(row.tolist(), skip_special_tokens=False)
        assert prompts.get_prompts("reference_eval").task_text(r["task"]) in text
        n_img = int(np.prod(want[k][1]) // 4)
        assert int((row == qwen_tok.image_pad_id).sum()) == n_img
        assert text.endswith("<|im_start|>assistant\n")

    # A batch with no usable image never reaches the model.
    assert fn([recs[2]]) == [out[2]] and len(smp.calls) == 1
    with pytest.raises(ValueError, match="batch_size"):
        fn([_rec(k, (30, 30)) for k in range(5)])


def test_predict_fn_groups_k_samples_per_record(qwen_tok):
    ev = eval_settings(batch_size=3)
    smp = StandInSampler(qwen_tok, ev.max_new_tokens, num_samples=3)
    fn = make_predict_fn(_model_stub(qwen_tok), qwen_tok, ev, mesh=None, rules=None, sampler=smp)
    recs = [_rec(0, (2, 600)), _rec(1, (64, 48)), _rec(2, (40, 90))]
    out = fn(recs)
    assert isinstance(out[0], runner.RecordFailure)
    # good record i is prompt row i - 1; its samples j answer 50 + (i - 1) + j
    assert out[1].texts == tuple(f"<think>row 0</think><answer>{50 + j}</answer>" for j in range(3))
    assert out[2].texts == tuple(f"<think>row 1</think><answer>{51 + j}</answer>" for j in range(3))
    assert out[1].forced is None  # no answer constraint


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
    ev = eval_settings(batch_size=2, max_new_tokens=6, max_pixels=40_000)
    smp = generate.Sampler(model, sampling_params(ev, tok), mesh=mesh, rules=sharding.DEFAULT_RULES)

    class Counting:
        params = smp.params

        def generate_prompts(self, prompts, **kw):
            calls.append(np.shape(prompts.input_ids))
            return smp.generate_prompts(prompts, **kw)

    fn = make_predict_fn(
        model, tok, ev, mesh=mesh, rules=sharding.DEFAULT_RULES, sampler=Counting()
    )
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


@pytest.fixture(scope="module")
def tiny_model(qwen_tok):
    import tiny_models
    from flax import nnx

    from tatar_jax.models.qwen2_5_vl.model import Qwen2_5_VLForConditionalGeneration

    cfg = tiny_models.tiny_config_for(qwen_tok)
    return Qwen2_5_VLForConditionalGeneration(cfg, rngs=nnx.Rngs(0), init_std=0.08)


def test_greedy_one_sample_equals_the_strip_and_redo_path(qwen_tok, tiny_model):
    """K = 1 at temperature 0 gives exactly the completions of the path before the one-layout
    batch (collate, strip the patch padding, ``generate.generate`` re-prepares the prompts)."""
    from tatar_jax import generate
    from tatar_jax.data import examples

    tok, model = qwen_tok, tiny_model
    ev = eval_settings(batch_size=3, max_new_tokens=8, max_pixels=40_000)
    recs = [_rec(0, (84, 56)), _rec(1, (56, 84), "iaa"), _rec(2, (60, 60))]
    new = make_predict_fn(model, tok, ev, mesh=None, rules=None)(recs)

    rope_cfg = examples.RopeConfig.from_tokenizer(tok, 2)
    exs = [
        examples.make_prompt_example(
            tok, *image_mod.preprocess_image(r["pil_image"], ev.min_pixels, ev.max_pixels),
            r["task"], variant=ev.prompt_variant, rope_cfg=rope_cfg,
        )
        for r in recs
    ]  # fmt: skip
    batch = examples.collate(
        exs, pad_id=tok.pad_id, seq_buckets=None, padding_side="left", batch_size=3
    )
    n_patch = batch.num_patches
    out = generate.generate(
        model, batch.input_ids, batch.attention_mask,
        pixel_values=batch.vision.pixel_values[:n_patch], image_grid_thw=batch.image_grid_thw,
        max_new_tokens=8, stop_token_ids=tuple(tok.eos_ids), pad_token_id=tok.pad_id,
        rng=jax.random.key(42),
    )  # fmt: skip
    old = generate.decode_completions(tok, out)
    assert new == old and all(new)


def test_k_samples_equal_the_rollout_engines(qwen_tok, tiny_model):
    """K samples per image are the GRPO rollout engine's G samples of the same prompts with the
    same key (one prefill, the same sampler path)."""
    from tatar_jax import generate
    from tatar_jax.data import examples
    from tatar_jax.evaluation.predict import batch_key, eval_prompts, prompt_examples
    from tatar_jax.train import rollout

    tok, model = qwen_tok, tiny_model
    ev = eval_settings(batch_size=2, max_new_tokens=6, max_pixels=40_000, num_samples=4,
                       temperature=1.0, top_k=50, top_p=0.95)  # fmt: skip
    recs = [_rec(3, (84, 56)), _rec(4, (56, 84), "iaa")]
    fn = make_predict_fn(model, tok, ev, mesh=None, rules=None, seed=5)
    ours = fn(recs)
    assert all(len(o.texts) == 4 for o in ours)
    assert len({t for o in ours for t in o.texts}) > 2  # sampled: the samples differ

    grpo_cfg = types.SimpleNamespace(
        max_new_tokens=6, num_generations=4, temperature=1.0, top_k=50, top_p=0.95
    )
    engine = rollout.RolloutEngine(model, tok, grpo_cfg)
    rope_cfg = examples.RopeConfig.from_tokenizer(tok, 2)
    exs, _ = prompt_examples(recs, tok, ev, rope_cfg, 2)
    prompts = eval_prompts(exs, tok, 2, model.config)
    from flax import nnx

    samples = engine.generate(nnx.state(model), prompts, batch_key(5, recs))
    texts = generate.decode_completions(tok, generate.GenerateOutput(
        samples.tokens, samples.mask, samples.logps))  # fmt: skip
    assert [t for o in ours for t in o.texts] == texts
