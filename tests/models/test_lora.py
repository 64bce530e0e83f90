"""LoRA (tatar_jax.models.lora) against PEFT's LoRA on the transformers model (the reference we
did not write: same A, B, alpha, rank), and the merged HF export reloaded by transformers."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
import tiny_models as tm
import torch
from flax import nnx
from transformers import Qwen2_5_VLForConditionalGeneration

from tatar_jax import sharding
from tatar_jax.models import lora
from tatar_jax.models import qwen2_5_vl as qvl

TOL = 1e-4
RANK, ALPHA = 4, 12.0
BATCH_ROWS = [[2, (1, 4, 8), 3], [1, (1, 8, 12), 5], [4]]
# Decoder projections plus the vision blocks' fused qkv (both towers are intercepted).
TARGETS = lora.DEFAULT_TARGETS + (r"visual/blocks/attn/qkv",)
# The same layers in PEFT's module names (its regex is matched against the full module name).
PEFT_TARGETS = r".*(layers\.\d+\.(self_attn|mlp)\.\w+_proj|blocks\.\d+\.attn\.qkv)"


@pytest.fixture(scope="module")
def hf():
    return tm.tiny_hf_model(seed=0)


@pytest.fixture(scope="module")
def hf_dir(hf, tmp_path_factory):
    return tm.save_hf_dir(hf, tmp_path_factory.mktemp("lora") / "base")


@pytest.fixture(scope="module")
def batch():
    return tm.make_batch(BATCH_ROWS, seed=11, length=40)


_logits, _diff = tm.jax_logits, tm.masked_max_diff


def _randomise(model, seed=5, std=0.2):
    """Non-zero A and B (B starts at zero: a fresh adapter changes nothing)."""
    state = lora.adapter_state(model)
    flat = nnx.to_flat_state(state)
    keys = jax.random.split(jax.random.key(seed), len(flat))
    for k, (_, v) in zip(keys, flat, strict=True):
        if isinstance(v, nnx.LoRAParam):
            v.set_value(std * jax.random.normal(k, v.shape, jnp.float32))
    nnx.update(model, state)


@pytest.fixture(scope="module")
def adapted(hf_dir):
    model = qvl.load_hf_checkpoint(hf_dir)
    lora.apply_lora(model, lora.LoraSpec(rank=RANK, alpha=ALPHA, targets=TARGETS), seed=1)
    _randomise(model)
    return model


def _peft_model(hf, model):
    """PEFT LoRA on a copy of the transformers model with our adapters' values."""
    import copy

    peft = pytest.importorskip("peft")  # test requirement (requirements-test.txt)
    cfg = peft.LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=PEFT_TARGETS, lora_dropout=0.0)
    pm = peft.get_peft_model(copy.deepcopy(hf), cfg).eval()
    ours = {"/".join(map(str, p)): m for p, m in nnx.iter_modules(model)}
    n = 0
    for name, mod in pm.named_modules():
        if not hasattr(mod, "lora_A") or "default" not in mod.lora_A:
            continue
        parts = name.split(".")
        if "visual" in parts:
            i = parts.index("blocks")
            path = "visual/blocks/" + "/".join(parts[i + 2 :])
        else:
            i = parts.index("layers")
            path = "language_model/layers/" + "/".join(parts[i + 2 :])
        layer = int(parts[i + 1])
        ours_mod = ours[path]
        a = np.asarray(ours_mod.kernel_lora_a[...])[layer]  # (d_in, r)
        b = np.asarray(ours_mod.kernel_lora_b[...])[layer]  # (r, d_out)
        with torch.no_grad():
            mod.lora_A["default"].weight.copy_(torch.from_numpy(a.T.copy()))
            mod.lora_B["default"].weight.copy_(torch.from_numpy(b.T.copy()))
        n += 1
    assert n == 2 * 7 + 3  # 2 decoder layers x 7 projections + 3 vision blocks
    return pm


def test_fresh_adapters_change_nothing_and_keep_the_base(hf_dir, batch):
    model = qvl.load_hf_checkpoint(hf_dir)
    base = _logits(model, batch)
    before = jax.tree.leaves(nnx.state(model, nnx.Param))
    lora.apply_lora(model, lora.LoraSpec(rank=RANK, alpha=ALPHA, targets=TARGETS), seed=1)
    assert lora.is_adapted(model)
    after = jax.tree.leaves(nnx.state(model, nnx.Not(nnx.Any(nnx.LoRAParam, lora.LoraScale))))
    assert len(before) == len(after)
    for x, y in zip(before, after, strict=True):
        assert x is y  # the very same base arrays
    np.testing.assert_array_equal(_logits(model, batch), base)
    shapes = {
        "/".join(map(str, k)): v.shape for k, v in nnx.to_flat_state(lora.adapter_state(model))
    }
    assert shapes["language_model/layers/self_attn/k_proj/kernel_lora_a"] == (2, 64, RANK)
    assert shapes["language_model/layers/self_attn/k_proj/kernel_lora_b"] == (2, RANK, 32)
    assert shapes["visual/blocks/attn/qkv/kernel_lora_b"] == (3, RANK, 96)
    assert shapes["lora_scale"] == ()
    assert float(model.lora_scale[...]) == ALPHA / RANK


def test_forward_equals_peft(hf, adapted, batch):
    ours = _logits(adapted, batch)
    ref = tm.hf_logits(_peft_model(hf, adapted), batch)
    base = tm.hf_logits(hf, batch)
    diff = _diff(ours, ref, batch)
    print(f"[lora] ours vs PEFT LoRA (rank {RANK}, alpha {ALPHA}): {diff:.2e}")
    assert diff <= TOL
    assert _diff(base, ref, batch) > 100 * TOL  # the adapters do change the output


def test_merged_export_reloads_in_transformers(adapted, batch, tmp_path):
    ours = _logits(adapted, batch)
    merged = lora.merge(adapted)
    assert not lora.is_adapted(merged) and lora.is_adapted(adapted)
    assert not nnx.state(merged, nnx.LoRAParam)
    assert type(merged.language_model) is qvl.language.TextModel
    assert _diff(_logits(merged, batch), ours, batch) <= TOL
    qvl.save_hf_checkpoint(adapted, tmp_path / "hf")  # the export merges by itself
    reloaded, info = Qwen2_5_VLForConditionalGeneration.from_pretrained(
        tmp_path / "hf", output_loading_info=True, dtype=torch.float32, attn_implementation="eager"
    )
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    diff = _diff(tm.hf_logits(reloaded.eval(), batch), ours, batch)
    print(f"[lora] adapted model vs its merged HF export in transformers: {diff:.2e}")
    assert diff <= TOL


def test_bfloat16_model_keeps_its_dtype(hf_dir, batch):
    model = qvl.load_hf_checkpoint(hf_dir, jnp.bfloat16, jnp.float32)
    lora.apply_lora(model, lora.LoraSpec(rank=RANK, alpha=ALPHA), seed=1)
    _randomise(model)
    assert lora.adapter_state(model).language_model.layers.mlp.up_proj.kernel_lora_a.dtype == (
        jnp.float32
    )
    assert _logits(model, batch).dtype == jnp.bfloat16


def test_spec_and_target_errors(hf_dir):
    block = ml_collections.ConfigDict({"rank": 0, "alpha": 16.0, "targets": lora.DEFAULT_TARGETS})
    assert lora.spec_from_config(block) is None
    block.rank = 8
    block.targets = ("language_model/layers/mlp/up_proj",)
    spec = lora.spec_from_config(block)
    assert spec == lora.LoraSpec(8, 16.0, ("language_model/layers/mlp/up_proj",))
    assert spec.scale == 2.0
    with pytest.raises(ValueError, match="rank must be > 0"):
        lora.LoraSpec(rank=-1, alpha=1.0)
    with pytest.raises(ValueError, match="not a regular expression"):
        lora.LoraSpec(rank=1, alpha=1.0, targets=("q_proj(",))
    model = qvl.load_hf_checkpoint(hf_dir)
    with pytest.raises(ValueError, match=r"'q_proj' matches no linear layer"):
        lora.target_paths(model, ("q_proj",))
    with pytest.raises(ValueError, match=r"\['lm_head'\] are outside the towers"):
        lora.target_paths(model, ("lm_head",))
    assert lora.target_paths(model, (r".*self_attn/[qk]_proj",)) == [
        "language_model/layers/self_attn/k_proj",
        "language_model/layers/self_attn/q_proj",
    ]
    lora.apply_lora(model, lora.LoraSpec(rank=1, alpha=1.0))
    with pytest.raises(ValueError, match="already has LoRA adapters"):
        lora.apply_lora(model, lora.LoraSpec(rank=1, alpha=1.0))


def test_adapters_are_placed_like_their_kernels():
    if jax.device_count() < 8:
        pytest.skip("needs 8 (virtual) devices")
    mesh = sharding.make_mesh({"fsdp": 4, "tensor": 2})
    rules = sharding.DEFAULT_RULES
    model = qvl.Qwen2_5_VLForConditionalGeneration(qvl.tiny(), rngs=nnx.Rngs(0))
    sharding.shard_module(model, mesh, rules)
    lora.apply_lora(model, lora.LoraSpec(rank=RANK, alpha=ALPHA), mesh=mesh, rules=rules)
    up = model.language_model.layers.mlp.up_proj
    kernel, a, b = up.kernel[...], up.kernel_lora_a[...], up.kernel_lora_b[...]
    assert tuple(kernel.sharding.spec) == (None, "fsdp", "tensor")
    assert tuple(a.sharding.spec) == (None, "fsdp", None)  # d_in split as the kernel's, rank whole
    assert tuple(b.sharding.spec) == (None, None, "tensor")  # d_out split as the kernel's
