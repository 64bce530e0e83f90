"""The pipeline's batch type (:mod:`tatar_jax.data.batch`): frozen, static fields static, and a
GRPO batch's walk from the pipeline through the rollout to the update computes its positions and
its vision layout once, where the batch is made."""

from __future__ import annotations

import dataclasses
import importlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tiny_models as tm
from flax import nnx

from configs import grpo as grpo_config
from tatar_jax import generate
from tatar_jax.data import batch as batch_mod
from tatar_jax.data import pipeline, synthetic
from tatar_jax.data.tokenizer import load_tokenizer
from tatar_jax.generate import prompts as prompts_mod
from tatar_jax.generate import sampler as sampler_mod
from tatar_jax.models import qwen2_5_vl as qvl
from tatar_jax.models.qwen2_5_vl import rope
from tatar_jax.train import grpo_step, rollout, scoring
from tatar_jax.train import inputs as step_inputs

# (the package re-exports the function ``vision_layout`` under the module's name)
layout_mod = importlib.import_module("tatar_jax.models.qwen2_5_vl.vision_layout")


def test_batch_is_frozen_and_replaced():
    b = tm.prompt_batch(qvl.tiny())
    with pytest.raises(dataclasses.FrozenInstanceError):
        b.input_ids = np.zeros_like(b.input_ids)
    with pytest.raises(dataclasses.FrozenInstanceError):
        b.meta.valid = np.zeros(2, bool)
    with pytest.raises(dataclasses.FrozenInstanceError):
        b.vision.layout = None
    valid = np.array([True, False])
    new = b.replace(meta=b.meta.replace(valid=valid))
    assert new.meta.valid is valid and b.meta.valid.tolist() == [True, True]
    assert new.position_ids is b.position_ids and new.vision is b.vision  # nothing copied


def test_static_fields_are_not_leaves():
    """Arrays are pytree leaves; sizes, padding side, the vision config, the strings and the
    read counters are static (in the tree structure, never traced or transferred)."""
    b = tm.prompt_batch(qvl.tiny(), patch_bucket=64)
    b = b.replace(meta=b.meta.replace(dataset=("d0", "d1"), image_path=("a.png", "b.png")))
    leaves = jax.tree.leaves(b)
    assert all(isinstance(x, np.ndarray) for x in leaves)
    paths = {jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(b)[0]}
    assert (
        ".input_ids" in paths and ".meta.valid" in paths and ".vision.layout.patch_index" in paths
    )
    for static in ("num_patches", "padding_side", "vision_config", "stats", "process_rows"):
        assert not any(static in p for p in paths), static
    assert not any("dataset" in p or "image_path" in p for p in paths)
    # A static field's change is a change of the tree structure, an array's is not.
    treedef = jax.tree.structure(b)
    assert jax.tree.structure(b.replace(padding_side="right")) != treedef
    assert jax.tree.structure(b.replace(num_patches=b.num_patches + 4)) != treedef
    assert jax.tree.structure(b.replace(input_ids=b.input_ids + 1)) == treedef
    assert b.num_patches == 48 and b.vision.pixel_values.shape == (64, 1176)


def test_layout_is_made_for_one_vision_config():
    cfg = qvl.tiny()
    b = tm.prompt_batch(cfg)
    assert b.layout_for(cfg.vision) is b.vision
    other = dataclasses.replace(cfg.vision, window_size=112)
    with pytest.raises(ValueError, match=r"made for \(patch, merge, window\) \(14, 2, 56\).*112"):
        b.layout_for(other)
    with pytest.raises(ValueError, match="no vision layout.*PipelineOptions"):
        b.replace(vision=b.vision.replace(layout=None)).layout_for(cfg.vision)
    with pytest.raises(ValueError, match="left-padded"):
        generate.prompt_batch(b.replace(padding_side="right"), cfg)


def test_labels_follow_the_label_mask():
    b = tm.prompt_batch(qvl.tiny())
    assert b.labels is None
    mask = np.zeros_like(b.input_ids)
    mask[:, -2:] = 1
    labels = b.replace(label_mask=mask).labels
    np.testing.assert_array_equal(labels[:, -2:], b.input_ids[:, -2:])
    assert (labels[:, :-2] == -100).all() and labels.dtype == np.int32


def _forbid(monkeypatch):
    """Every function that computes positions, a patch bucket or a vision layout raises."""

    def forbidden(name):
        def fn(*args, **kwargs):
            raise AssertionError(f"{name} called after the batch was made")

        return fn

    for mod, name in (
        (rope, "get_rope_index"), (rope, "text_position_ids"),
        (layout_mod, "vision_layout"), (layout_mod, "fixed_bucket"),
        (layout_mod, "vision_bucket"), (sampler_mod, "vision_layout"),
        (sampler_mod, "patch_bucket"), (prompts_mod, "patch_bucket"),
        (prompts_mod, "vision_bucket"), (batch_mod, "vision_inputs"),
    ):  # fmt: skip
        monkeypatch.setattr(mod, name, forbidden(f"{mod.__name__}.{name}"))
    monkeypatch.setattr(generate.Sampler, "prepare", forbidden("Sampler.prepare"))


def test_pipeline_batch_reaches_the_update_without_re_derivation(tmp_path, monkeypatch):
    """pipeline -> ``generate.prompt_batch`` -> rollout -> scoring -> the update's batch: the
    positions and vision inputs the sampler and the update read are the pipeline's objects
    (nothing computes positions, a bucket or a layout after the batch is made), and the update's
    log-probs of the sampled tokens equal the sampler's (the two saw the same layout)."""
    tok = load_tokenizer(None)
    model = qvl.Qwen2_5_VLForConditionalGeneration(
        tm.tiny_config_for(tok), dtype=jnp.float32, param_dtype=jnp.float32, init_std=0.08,
        rngs=nnx.Rngs(0),
    )  # fmt: skip
    cfg = model.config
    specs = synthetic.ensure_synthetic(tmp_path / "synthetic", image_size=56)
    opts = pipeline.PipelineOptions(
        stage="grpo", batch_size=2, seq_buckets=(256,), process_index=0, process_count=1,
        read_threads=1, vision=cfg.vision,
    )  # fmt: skip
    batch = next(iter(pipeline.make_dataset(pipeline.sources_from_synthetic(specs), opts)))
    run = grpo_config.get_config("tiny")
    run.grpo.num_generations, run.grpo.max_new_tokens = 2, 5
    engine = rollout.RolloutEngine(model, tok, run.grpo)
    scorer = scoring.Scorer(tok, run.grpo, run.rewards, cfg)

    _forbid(monkeypatch)
    prompts = generate.prompt_batch(batch, cfg)
    assert prompts.position_ids is batch.position_ids and prompts.rope_deltas is batch.rope_deltas
    assert prompts.input_ids is batch.input_ids and prompts.vision is batch.vision
    samples = engine.generate(nnx.state(model), prompts, jax.random.key(0))
    update = scorer(batch, prompts, samples).batch
    assert update.vision is batch.vision and update.vision.layout is batch.vision.layout

    g, t = samples.group_size, samples.tokens.shape[1]
    lp = batch.input_ids.shape[1]
    pos = np.asarray(update.rows.position_ids)  # (B*G, 3, Lp + T)
    np.testing.assert_array_equal(
        pos[:, :, :lp], np.repeat(batch.position_ids.swapaxes(0, 1), g, 0)
    )
    # The completions continue where the decode loop put them: real tokens + step + rope delta.
    after = batch.attention_mask.sum(1)[:, None] + np.arange(t)[None] + batch.rope_deltas
    for axis in range(3):
        np.testing.assert_array_equal(pos[:, axis, lp:], np.repeat(after, g, 0))
    np.testing.assert_array_equal(update.rows.task_id, np.repeat(batch.meta.task_id, g))

    graphdef, state = nnx.split(model)
    fn = jax.jit(grpo_step.make_logps_fn(graphdef, temperature=float(run.grpo.temperature)))
    got = np.asarray(fn(state, jax.tree.map(jnp.asarray, update)))
    m = samples.mask.astype(bool)
    assert m.sum() >= len(m)
    np.testing.assert_allclose(got[m], samples.logps[m], atol=5e-5, rtol=0)
    assert step_inputs.step_flops(cfg, update) > 0
