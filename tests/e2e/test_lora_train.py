"""Tiny SFT and GRPO runs with LoRA rank 4 (embedded tiny model, synthetic data, one device):
the adapters learn, the base stays bit-identical, resume is bit-identical, the HF export gives
transformers the adapted model's logits, and GRPO started from the LoRA SFT run merges its
adapters on load.

One SFT run and one GRPO run (in this process) are shared by the tests of this module.
"""

from __future__ import annotations

import json
import pathlib
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tiny_models as tm
import torch
from flax import nnx
from transformers import Qwen2_5_VLForConditionalGeneration

from configs import grpo as grpo_configs
from configs import sft as sft_configs
from tatar_jax import grpo, loading
from tatar_jax.data import tokenizer as tokenizer_mod
from tatar_jax.models import lora
from tatar_jax.models import qwen2_5_vl as qvl
from tatar_jax.train import checkpointing, grpo_step, optim, sources, trainer

RANK = 4


def _common(c):
    c.mesh.num_devices = 1
    c.eval.datasets = ()
    c.model.remat = False
    c.model.lora.rank = RANK
    c.model.lora.alpha = 8.0
    c.checkpoint.every_steps = 1
    c.checkpoint.keep = 10
    return c


def _sft_config():
    c = _common(sft_configs.get_config("tiny"))
    c.optimizer.learning_rate = 1e-2  # adapters of a random tiny model: a visible drop in 4 steps
    c.checkpoint.export_hf = True
    return c


def _grpo_config(sft_dir):
    c = _common(grpo_configs.get_config("tiny"))
    c.total_steps = 1
    c.model.init_checkpoint = str(sft_dir)
    c.checkpoint.export_hf = True
    return c


def _losses(wd):
    lines = (pathlib.Path(wd) / "metrics.jsonl").read_text().splitlines()
    return [json.loads(x)["loss"] for x in lines if '"loss"' in x]


def _params(wd, step, target):
    params, _ = checkpointing.load_params(wd, target, step=step)
    return params


def _split(state):
    """(adapter leaves, base leaves) of a params state, by '/'-joined path."""
    flat = {"/".join(map(str, k)): np.asarray(v[...]) for k, v in nnx.to_flat_state(state)}
    adapters = {k: v for k, v in flat.items() if "_lora_" in k}
    base = {k: v for k, v in flat.items() if "_lora_" not in k and k != "lora_scale"}
    return adapters, base


def make_runs(root):
    """SFT (4 steps), the same SFT resumed after step 2, GRPO (1 step) from the SFT run."""
    sft_cfg = _sft_config()
    trainer.run(sft_cfg, root / "sft")
    # Resume: the run's directory as it was after step 2, continued to the end.
    resumed = root / "sft_resumed"
    shutil.copytree(root / "sft", resumed)
    for step in (3, 4):
        shutil.rmtree(resumed / "checkpoints" / str(step))
    shutil.rmtree(resumed / "hf")
    trainer.run(_sft_config(), resumed)
    trainer.run(_grpo_config(root / "sft"), root / "grpo")
    tok = tokenizer_mod.load_tokenizer(sources.tokenizer_dir(sft_cfg))
    return root, sft_cfg, tok


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    return make_runs(tmp_path_factory.mktemp("lora_runs"))


def _initial(cfg, tok):
    """The policy a run starts from (adapters included) — what its checkpoints restore into."""
    return trainer.load_policy(cfg, tok).model


@pytest.mark.slow
def test_sft_learns_only_the_adapters_and_resumes_bit_identically(runs):
    root, cfg, tok = runs
    losses = _losses(root / "sft")
    assert len(losses) == 4 and losses[-1] < losses[0] - 0.05, losses
    model = _initial(cfg, tok)
    target = nnx.state(model)
    a0, b0 = _split(target)
    a4, b4 = _split(_params(root / "sft", 4, target))
    assert b0.keys() == b4.keys() and len(a0) == 7 * 2
    for k in b0:
        np.testing.assert_array_equal(b4[k], b0[k], err_msg=k)  # base bit-identical
    for k in a0:
        if k.endswith("kernel_lora_b/value") or k.endswith("kernel_lora_b"):
            assert not np.any(a0[k]) and np.any(a4[k]), k  # B left zero
        assert not np.array_equal(a0[k], a4[k]), k  # every adapter moved
    # The optimizer state holds moments for the adapters only.
    ckpt = checkpointing.param_shapes(root / "sft", 4)
    assert len([k for k in ckpt if "_lora_" in k]) == len(a0)
    with open(root / "sft" / "checkpoints" / "4" / "state" / "_METADATA") as f:
        meta = f.read()
    assert "opt_state" in meta and "mu" in meta
    # Resume from step 2: every leaf of the final train state bit-identical.
    import orbax.checkpoint as ocp

    with ocp.PyTreeCheckpointer() as c:
        want = c.restore(root / "sft" / "checkpoints" / "4" / "state")
        got = c.restore(root / "sft_resumed" / "checkpoints" / "4" / "state")
    lw, lg = jax.tree_util.tree_leaves_with_path(want), jax.tree_util.tree_leaves_with_path(got)
    assert [p for p, _ in lw] == [p for p, _ in lg]
    for (p, x), (_, y) in zip(lw, lg, strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y), err_msg=str(p))
    assert _losses(root / "sft_resumed")[-2:] == losses[-2:]


def _text_batch(seed=0):
    rng = np.random.default_rng(seed)
    # ordinary tokens of the embedded tokenizer (741 ids; transformers raises on an id past the
    # vocabulary where jnp.take would clamp it)
    ids = rng.integers(100, 700, size=(2, 12))
    mask = np.ones_like(ids)
    mask[1, :3] = 0
    return ids, mask


def _hf_logits(path, ids, mask):
    hf = Qwen2_5_VLForConditionalGeneration.from_pretrained(
        path, dtype=torch.float32, attn_implementation="eager"
    ).eval()
    with torch.no_grad():
        return hf(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask)).logits


def _adapted_at(cfg, tok, wd, step):
    model = _initial(cfg, tok)
    nnx.update(model, _params(wd, step, nnx.state(model)))
    return model


@pytest.mark.slow
def test_sft_export_equals_the_adapted_model_in_transformers(runs):
    root, cfg, tok = runs
    model = _adapted_at(cfg, tok, root / "sft", 4)
    ids, mask = _text_batch()
    ours = np.asarray(model(ids, mask))
    ref = _hf_logits(root / "sft" / "hf", ids, mask).numpy()
    diff = float(np.abs(ours - ref)[mask.astype(bool)].max())
    print(f"[lora] SFT rank-{RANK} model vs its merged HF export in transformers: {diff:.2e}")
    assert diff <= 1e-4
    # ... and the checkpoint loaded as a policy (next stage, evaluation) is the merged model.
    merged = loading.load_policy(loading.PolicySource(checkpoint=str(root / "sft"))).model
    assert not lora.is_adapted(merged)
    assert float(np.abs(np.asarray(merged(ids, mask)) - ours)[mask.astype(bool)].max()) <= 1e-4


@pytest.mark.slow
def test_grpo_from_the_lora_sft_run(runs):
    """The GRPO run starts from the SFT run's adapters merged into the base (its reference
    model), trains fresh adapters on top (see test_grpo_update_trains_only_the_adapters: this
    run's random policy earns no reward) and exports the adapted model."""
    root, sft_cfg, tok = runs
    cfg = _grpo_config(root / "sft")
    assert np.all(np.isfinite(_losses(root / "grpo")))
    start = _initial(cfg, tok)  # the SFT run's adapters merged, fresh adapters on top
    assert lora.is_adapted(start)
    sft_merged = lora.merge(_adapted_at(sft_cfg, tok, root / "sft", 4))
    _, b0 = _split(nnx.state(start))
    _, b_sft = _split(nnx.state(sft_merged))
    assert b0.keys() == b_sft.keys()
    for k in b0:
        np.testing.assert_array_equal(b0[k], b_sft[k], err_msg=k)
    _, b1 = _split(_params(root / "grpo", 1, nnx.state(start)))
    for k in b0:
        np.testing.assert_array_equal(b1[k], b0[k], err_msg=k)  # base bit-identical
    ids, mask = _text_batch(1)
    ours = np.asarray(_adapted_at(cfg, tok, root / "grpo", 1)(ids, mask))
    ref = _hf_logits(root / "grpo" / "hf", ids, mask).numpy()
    assert float(np.abs(ours - ref)[mask.astype(bool)].max()) <= 1e-4


def _grpo_inputs(cfg, g=4, t=6, seed=0):
    """Two prompts with images, G random completions each, random advantages (the update's
    inputs as the rollout hands them over)."""
    batch = tm.prompt_batch(cfg)
    rng = np.random.default_rng(seed)
    n = 2 * g
    tokens = rng.integers(*tm.TEXT_ID_RANGE, size=(n, t)).astype(np.int32)
    cmask = np.ones((n, t), bool)
    return tm.grpo_step_inputs(cfg, batch, tokens, cmask, rng.normal(size=n).astype(np.float32), g)


def test_grpo_update_trains_only_the_adapters():
    """Two GRPO updates on one rollout with non-zero advantages (the tiny run's random policy
    earns no reward to learn from): the completions' log-probabilities move with their
    advantages, every adapter moves, the base does not and has no optimizer state."""
    model = qvl.Qwen2_5_VLForConditionalGeneration(qvl.tiny(), init_std=0.08, rngs=nnx.Rngs(0))
    lora.apply_lora(model, lora.LoraSpec(rank=RANK, alpha=8.0), seed=1)
    graphdef, params = nnx.split(model)
    trainable = optim.trainable_mask(params, train_only=(lora.ADAPTER_PATTERN,))
    tx = optim.make_optimizer(1e-2, trainable=trainable)
    state = jax.tree.map(jnp.copy, optim.TrainState.create(params, tx, jax.random.key(0)))
    moments = [x for x in jax.tree.leaves(state.opt_state) if getattr(x, "ndim", 0) > 0]
    n_adapters = sum(jax.tree.leaves(trainable))
    assert n_adapters == 7 * 2 and len(moments) == 2 * n_adapters  # AdamW mu, nu
    step = jax.jit(grpo_step.make_grpo_step(
        graphdef, tx, trainable=trainable, loss=grpo.LossConfig(beta=0.0)
    ))
    logps = jax.jit(grpo_step.make_logps_fn(graphdef))
    inputs = jax.tree.map(jnp.asarray, _grpo_inputs(model.config))
    before = np.asarray(logps(params, inputs))
    new = state
    for _ in range(2):
        new, m = step(new, inputs)
        assert np.isfinite(float(m["loss"])) and float(m["grad_norm"]) > 0
    after = np.asarray(logps(new.params, inputs))
    adv = np.asarray(inputs.rows.advantages)
    gain = float(np.sum(adv[:, None] * (after - before)))
    assert gain > 0.1, gain  # sum_i A_i (log pi_new - log pi_old) over the completions' tokens
    a0, b0 = _split(params)
    a2, b2 = _split(new.params)
    for k in b0:
        np.testing.assert_array_equal(b2[k], b0[k], err_msg=k)
    for k in a0:
        assert not np.array_equal(a2[k], a0[k]), k
