"""The FLOP model: parameter / FLOP counts vs the transformers model (numel, torch
FlopCounterMode), a hand count, the peak-FLOPs table and MFU, the step's FLOPs vs XLA's cost
analysis of the compiled GRPO update."""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tiny_models as tm
import torch
from torch.utils.flop_counter import FlopCounterMode
from transformers import Qwen2_5_VLForConditionalGeneration

from tatar_jax.models.qwen2_5_vl.config import tiny
from tatar_jax.train import flop_model

T, PATCHES = 40, 64  # sequence tokens; one 8x8-patch image = 16 image tokens


def _hf_model(tie: bool):
    # The tiny preset: vision window 56 = 4x4-patch windows on the 8x8 grid (layers 0 and 2
    # windowed, layer 1 full); eager attention, so FlopCounterMode counts explicit matmuls.
    cfg = tm.tiny_hf_config(tie_word_embeddings=tie)
    torch.manual_seed(0)
    return cfg, Qwen2_5_VLForConditionalGeneration(cfg)


@pytest.fixture(scope="module")
def hf():
    return _hf_model(tie=False)


def _inputs(with_image: bool):
    lo, hi = tm.TEXT_ID_RANGE
    ids = torch.randint(lo, hi, (1, T), generator=torch.Generator().manual_seed(0))
    if not with_image:
        return {"input_ids": ids}
    ids[0, 5:21] = tm.IMAGE_TOKEN_ID
    return {
        "input_ids": ids,
        "pixel_values": torch.randn(PATCHES, 3 * 2 * 14 * 14),
        "image_grid_thw": torch.tensor([[1, 8, 8]]),
    }


@pytest.mark.parametrize("tie", [False, True])
def test_param_counts_match_hf_numel(tie):
    cfg, model = _hf_model(tie)
    pc = flop_model.param_counts(
        cfg.text_config, cfg.vision_config, tie_word_embeddings=cfg.tie_word_embeddings
    )
    # The actual parameter tree: transformers' state dict shapes (tied weights appear once).
    assert pc["total"] == sum(p.numel() for p in model.parameters())
    assert pc["vision"] == sum(p.numel() for p in model.model.visual.parameters())
    t = cfg.text_config
    assert pc["lm_head"] == (0 if tie else t.hidden_size * t.vocab_size)
    # Works from plain dicts too (a params-shape dict / config.json contents).
    as_dict = flop_model.param_counts(
        {**cfg.text_config.to_dict(), "tie_word_embeddings": tie}, cfg.vision_config.to_dict()
    )
    assert as_dict == pc


def test_param_counts_of_our_config_dataclass():
    cfgmod = pytest.importorskip("tatar_jax.models.qwen2_5_vl.config")
    c = cfgmod.qwen2_5_vl_7b()
    pc = flop_model.param_counts(c.text, c.vision)
    assert 8.2e9 < pc["total"] < 8.4e9  # Qwen2.5-VL-7B-Instruct: 8.29B parameters


@pytest.mark.parametrize("with_image", [False, True])
@pytest.mark.parametrize("training", [False, True])
def test_flops_match_torch_flop_counter(hf, with_image, training):
    cfg, model = hf
    inputs = _inputs(with_image)
    model.zero_grad()
    with FlopCounterMode(display=False) as fc:
        if training:
            model.train()
            model(**inputs, labels=inputs["input_ids"]).loss.backward()
        else:
            model.eval()
            with torch.no_grad():
                model(**inputs)
    ours = flop_model.flops_per_token(
        cfg.text_config,
        cfg.vision_config,
        T,
        training=training,
        patches_per_seq=PATCHES if with_image else 0,
    )
    assert ours * T == fc.get_total_flops()


def test_flops_hand_count_and_options():
    # The tiny preset's decoder as a plain mapping with no head_dim (hidden_size // heads): the
    # sizes the count below is made of.
    text = dataclasses.asdict(tiny().text)
    sizes = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers")
    sizes += ("num_attention_heads", "num_key_value_heads")
    assert [text[k] for k in sizes] == [256, 64, 128, 2, 4, 2] and "head_dim" not in text
    # Per token and layer: q 64x64, k 64x32, v 64x32 (2 KV heads of 16), o 64x64, gate/up/down
    # 3x64x128; 2 layers, then lm_head 64x256 -> 2 FLOPs per MAC.
    macs = 2 * (4096 + 2048 + 2048 + 4096 + 3 * 64 * 128) + 64 * 256
    attn = 4 * 2 * 4 * 16 * 8  # 4 * layers * heads * head_dim * context (QK^T and AV)
    assert flop_model.flops_per_token(text, None, 8, training=False) == 2 * macs + attn
    assert flop_model.flops_per_token(text, None, 8) == 3 * (2 * macs + attn)
    assert flop_model.flops_per_token(text, None, 8, training=False, causal_discount=True) == (
        2 * macs + attn / 2
    )


def test_missing_model_config_field_is_an_error_naming_it():
    missing = ("num_key_value_heads", "tie_word_embeddings")
    text = {k: v for k, v in dataclasses.asdict(tiny().text).items() if k not in missing}
    with pytest.raises(KeyError, match="num_key_value_heads"):
        flop_model.flops_per_token(text, None, 8)
    with pytest.raises(KeyError, match="tie_word_embeddings"):
        flop_model.param_counts({**text, "num_key_value_heads": 1})


def test_frozen_vision_counts_forward_only(hf):
    cfg, _ = hf
    args = (cfg.text_config, cfg.vision_config, T)
    full = flop_model.flops_per_token(*args, patches_per_seq=PATCHES)
    frozen = flop_model.flops_per_token(*args, patches_per_seq=PATCHES, train_vision=False)
    text_only = flop_model.flops_per_token(*args)
    vis_fwd = flop_model.flops_per_token(*args, training=False, patches_per_seq=PATCHES) - (
        flop_model.flops_per_token(*args, training=False)
    )
    assert frozen == pytest.approx(text_only + vis_fwd)
    assert full > frozen


def test_peak_flops_table():
    assert flop_model.peak_flops("TPU v4") == 275e12
    assert flop_model.peak_flops("TPU v5 lite") == 197e12
    assert flop_model.peak_flops("TPU v5") == 459e12
    assert flop_model.peak_flops("TPU v5p") == 459e12
    assert flop_model.peak_flops("TPU v6 lite") == 918e12
    assert flop_model.peak_flops("NVIDIA H100 80GB HBM3") == 989e12
    assert flop_model.peak_flops("NVIDIA H100 PCIe") == 756e12
    assert flop_model.peak_flops("NVIDIA H200") == 989e12
    assert flop_model.peak_flops("NVIDIA A100-SXM4-80GB") == 312e12
    assert flop_model.peak_flops("cpu") is None
    assert flop_model.peak_flops() is None  # tests run on CPU
    assert flop_model.mfu(1000.0, 1e9, 1) is None
    assert flop_model.mfu(1000.0, 1e9, 4, "TPU v4") == pytest.approx(1e12 / (4 * 275e12))


# --- FLOPs of the compiled GRPO update vs XLA's cost analysis ---------------------------------


def _small_config(tie: bool, d: int, heads: int, inter: int, vocab: int):
    from tatar_jax.models import qwen2_5_vl as qvl

    base = qvl.tiny(tie_word_embeddings=tie)
    hd = d // heads
    text = dataclasses.replace(
        base.text, hidden_size=d, num_attention_heads=heads, num_key_value_heads=heads // 2,
        intermediate_size=inter, vocab_size=vocab,
        mrope_section=(hd // 8, 3 * hd // 16, 3 * hd // 16),
    )  # fmt: skip
    vision = dataclasses.replace(
        base.vision, hidden_size=64, intermediate_size=128, depth=2, out_hidden_size=d
    )
    return dataclasses.replace(base, text=text, vision=vision)


def _grpo_flop_inputs(cfg, packed: bool):
    from tatar_jax import generate
    from tatar_jax.models import qwen2_5_vl as qvl
    from tatar_jax.train import inputs as step_inputs

    batch = tm.prompt_batch(cfg, [[3, (1, 8, 8), 5], [2, (1, 8, 8), 6]])
    pixel_values, grid = batch.vision.pixel_values, batch.image_grid_thw
    g, t = 2, 8
    rng = np.random.default_rng(0)
    tokens = rng.integers(*tm.TEXT_ID_RANGE, size=(2 * g, t)).astype(np.int32)
    cmask = np.arange(t)[None, :] < np.array([8, 3, 5, 2])[:, None]
    prompts = generate.PromptBatch(
        batch.input_ids, batch.attention_mask, batch.position_ids, batch.rope_deltas
    )
    seq = step_inputs.expand_prompts(prompts, tokens, cmask, g, cfg.image_token_id)
    rows = step_inputs.GrpoRows(
        **seq, completion_mask=cmask.astype(np.float32),
        advantages=rng.normal(size=2 * g).astype(np.float32),
        task_id=np.zeros(2 * g, np.int32),
    )  # fmt: skip
    # The exact vision bucket (no padded windows / segments): every attention slot is real.
    vision = step_inputs.Vision(pixel_values, qvl.vision_layout(grid, cfg.vision))
    size = step_inputs.pack_size(cmask, 1, 4) if packed else 0
    assert size > 0 or not packed
    return step_inputs.GrpoBatch(rows, vision, size)


def _xla_flops(fn, *args):
    cost = jax.jit(fn).lower(*args).compile().cost_analysis()
    return float((cost[0] if isinstance(cost, list | tuple) else cost)["flops"])


@pytest.mark.parametrize(
    ("tie", "d", "heads", "inter", "vocab", "train_vision", "packed"),
    [(False, 128, 4, 384, 512, True, False), (True, 96, 2, 256, 1024, False, True)],
)
def test_step_flops_equal_xla_cost_of_the_compiled_update(
    monkeypatch, tie, d, heads, inter, vocab, train_vision, packed
):
    import optax
    from flax import nnx

    from tatar_jax import grpo
    from tatar_jax.models import qwen2_5_vl as qvl
    from tatar_jax.train import grpo_step, optim
    from tatar_jax.train import inputs as step_inputs

    # Scans (decoder layers, vision blocks, lm_head chunks) unrolled: XLA's cost analysis
    # counts a while loop's body once.
    monkeypatch.setattr(jax.lax, "scan", functools.partial(jax.lax.scan, unroll=True))
    cfg = _small_config(tie, d, heads, inter, vocab)
    model = qvl.Qwen2_5_VLForConditionalGeneration(cfg, rngs=nnx.Rngs(0))
    graphdef, params = nnx.split(model)
    inputs = jax.tree.map(jnp.asarray, _grpo_flop_inputs(cfg, packed))
    trainable = optim.trainable_mask(params, freeze_vision=not train_vision)
    tx = optax.sgd(0.1)
    state = optim.TrainState.create(params, tx, jax.random.key(0))
    step = grpo_step.make_grpo_step(
        graphdef, tx, trainable=trainable, loss=grpo.LossConfig(beta=0.0), chunk_size=64
    )
    xla = _xla_flops(step, state, inputs)
    ours = step_inputs.step_flops(cfg, inputs, train_vision=train_vision)
    print(f"update: ours {ours:.4g}, XLA {xla:.4g}, ratio {ours / xla:.3f}")
    assert abs(ours / xla - 1) < 0.10
    if not packed:
        return
    # The forward-only reference pass.
    xla_ref = _xla_flops(grpo_step.make_logps_fn(graphdef, chunk_size=64), params, inputs)
    ours_ref = step_inputs.step_flops(cfg, inputs, training=False)
    print(f"reference: ours {ours_ref:.4g}, XLA {xla_ref:.4g}, ratio {ours_ref / xla_ref:.3f}")
    assert abs(ours_ref / xla_ref - 1) < 0.10
    # The old count (vision per row, lm_head on every position) is far off.
    n, length = inputs.rows.input_ids.shape
    old = flop_model.flops_per_token(cfg.text, cfg.vision, length, patches_per_seq=64) * n * length
    assert old / xla > 1.2
