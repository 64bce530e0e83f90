"""Vision tower parity against transformers' Qwen2.5-VL (torch, fp32, tiny random config).

Stages are tested separately (window index / rotary positions, then the full tower) so that a
failure points at its stage.
"""

from __future__ import annotations

import dataclasses
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from transformers import Qwen2_5_VLVisionConfig
from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import (
    Qwen2_5_VisionTransformerPretrainedModel,
)
from transformers.vision_utils import get_vision_position_ids, get_vision_window_index

from tatar_jax.models.qwen2_5_vl import vision as V
from tatar_jax.models.qwen2_5_vl.config import tiny

VISION_KEYS = (
    "depth",
    "hidden_size",
    "intermediate_size",
    "num_heads",
    "in_channels",
    "patch_size",
    "spatial_merge_size",
    "temporal_patch_size",
    "window_size",
    "fullatt_block_indexes",
    "out_hidden_size",
    "hidden_act",
)

# The tiny preset's vision tower with a fourth block, full attention in blocks 1 and 3 (window,
# full, window, full), merged tokens of width 32. window_size 56 / patch 14 / merge 2 → windows of
# 2x2 merge units (16 patches): windows are much smaller than the images below, so window
# attention really restricts attention.
VISION = dataclasses.replace(
    tiny().vision, depth=4, fullatt_block_indexes=(1, 3), out_hidden_size=32
)
HF_KW = dataclasses.asdict(VISION)
TOL = 1e-4


def _cfg(hc: Qwen2_5_VLVisionConfig) -> types.SimpleNamespace:
    return types.SimpleNamespace(
        **{k: getattr(hc, k) for k in VISION_KEYS}, rope_parameters=hc.rope_parameters
    )


@pytest.fixture(scope="module")
def hf_pair():
    hc = Qwen2_5_VLVisionConfig(**HF_KW)
    hc._attn_implementation = "eager"
    torch.manual_seed(0)
    hf = Qwen2_5_VisionTransformerPretrainedModel(hc).eval()
    with torch.no_grad():
        # HF init leaves norms at 1 and biases at 0; random values test every parameter's mapping.
        for p in hf.parameters():
            p.normal_(0.0, 0.1)
        for name, p in hf.named_parameters():
            if name.endswith("norm1.weight") or name.endswith("norm2.weight") or "ln_q" in name:
                p.add_(1.0)
    cfg = _cfg(hc)
    ours = V.VisionTransformer(cfg, rngs=nnx.Rngs(0))
    state = {k: v.numpy() for k, v in hf.state_dict().items()}
    V.load_hf_vision_weights(ours, state, prefix="")
    return hf, ours, cfg, state


def _pixels(grid: np.ndarray, seed: int = 0) -> np.ndarray:
    n = int(grid.prod(axis=1).sum())
    return np.random.RandomState(seed).randn(n, 3 * 2 * 14 * 14).astype(np.float32)


def _hf_out(hf, pv: np.ndarray, grid: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        out = hf(torch.from_numpy(pv), grid_thw=torch.from_numpy(grid))
    return out.pooler_output.numpy()


GRIDS = [
    [[1, 8, 12]],
    [[1, 8, 8]],  # divides the window grid evenly (HF pads a whole window, then drops it)
    [[1, 8, 12], [1, 6, 4]],
    [[1, 6, 10], [2, 4, 6], [1, 2, 2]],  # a 2-frame video entry and a one-unit image
]


@pytest.mark.parametrize("grid", GRIDS)
def test_layout_matches_hf_indices(grid):
    cfg = types.SimpleNamespace(**HF_KW)
    g = np.asarray(grid)
    tg = torch.tensor(grid)
    ref_idx, ref_cu = get_vision_window_index(tg, 2, 56, 14)
    idx, cu = V.hf_window_index(g, cfg)
    np.testing.assert_array_equal(idx, ref_idx.numpy())
    np.testing.assert_array_equal(cu, ref_cu.numpy())

    n = int(g.prod(axis=1).sum())
    bucket = V.vision_bucket(g, cfg, n + 8, num_windows_padded=32, num_segments_padded=8)
    lay = V.vision_layout(g, cfg, bucket)
    ref_pos = get_vision_position_ids(tg, 2).numpy()
    # HF permutes the rotary inputs by the window index at merge-unit granularity.
    ref_perm = ref_pos.reshape(-1, 4, 2)[ref_idx.numpy()].reshape(-1, 2)
    np.testing.assert_array_equal(lay.pos_ids[:n], ref_perm)
    np.testing.assert_array_equal(lay.pos_ids[n:], 0)
    np.testing.assert_array_equal(lay.merged_index[: n // 4], np.argsort(ref_idx.numpy()))
    assert lay.merged_valid.sum() == n // 4

    # every real row sits in exactly one window and one segment, at the slot that names it
    for rows, valid, slot in (
        (lay.window_rows, lay.window_valid, lay.window_slot),
        (lay.segment_rows, lay.segment_valid, lay.segment_slot),
    ):
        real = np.sort(rows[valid])
        np.testing.assert_array_equal(real, np.arange(n))
        np.testing.assert_array_equal(rows.reshape(-1)[slot[:n]], np.arange(n))
        assert (slot[n:] == rows.size).all()
    # windows are exactly HF's cu_window_seqlens runs, segments one per frame
    np.testing.assert_array_equal(lay.window_valid.sum(1)[: len(cu) - 1], np.diff(cu))
    frames = [h * w for t, h, w in grid for _ in range(t)]
    np.testing.assert_array_equal(lay.segment_valid.sum(1)[: len(frames)], frames)


def test_layout_matches_hf_on_random_grids():
    cfg = types.SimpleNamespace(**HF_KW)
    rng = np.random.RandomState(0)
    for _ in range(20):
        k = rng.randint(1, 4)
        grid = np.stack(
            [rng.randint(1, 3, k), 2 * rng.randint(1, 9, k), 2 * rng.randint(1, 9, k)], axis=1
        )
        ref_idx, ref_cu = get_vision_window_index(torch.from_numpy(grid), 2, 56, 14)
        idx, cu = V.hf_window_index(grid, cfg)
        np.testing.assert_array_equal(idx, ref_idx.numpy())
        np.testing.assert_array_equal(cu, ref_cu.numpy())
        lay = V.vision_layout(grid, cfg)
        n = int(grid.prod(axis=1).sum())
        ref_pos = get_vision_position_ids(torch.from_numpy(grid), 2).numpy()
        np.testing.assert_array_equal(lay.pos_ids, ref_pos[lay.patch_index])
        assert lay.patch_index.shape == (n,)


def test_layout_rejects_bad_input():
    cfg = types.SimpleNamespace(**HF_KW)
    with pytest.raises(ValueError, match="row 0"):
        V.vision_layout(np.array([[1, 5, 4]]), cfg)
    with pytest.raises(ValueError, match="num_patches_padded"):
        V.vision_layout(np.array([[1, 4, 4]]), cfg, V.vision_bucket(np.array([[1, 4, 4]]), cfg, 8))
    with pytest.raises(ValueError, match="num_patches_padded"):
        V.vision_layout(np.array([[1, 4, 4]]), cfg, V.vision_bucket(np.array([[1, 4, 4]]), cfg, 18))
    g = np.array([[1, 8, 12]])
    with pytest.raises(ValueError, match="windows do not fit"):
        V.vision_layout(g, cfg, V.vision_bucket(g, cfg, num_windows_padded=2))
    with pytest.raises(ValueError, match="segment"):
        V.vision_layout(g, cfg, V.vision_bucket(g, cfg, segment_len_padded=64))
    with pytest.raises(ValueError, match="shape"):
        V.vision_layout(np.array([1, 8, 12]), cfg)


def test_hf_rules_cover_checkpoint(hf_pair):
    _, ours, cfg, state = hf_pair
    names = set()
    for template, path, transform in V.hf_vision_rules():
        for i in range(cfg.depth) if "{i}" in template else [None]:
            name = template.format(i=i)
            names.add(name)
            hf_value = state[name]
            value = V.hf_to_param(transform, hf_value)
            np.testing.assert_array_equal(V.param_to_hf(transform, value, cfg), hf_value)
        var = ours
        for part in path:
            var = getattr(var, part)
        stacked = (cfg.depth,) if "{i}" in template else ()
        assert var.shape == stacked + value.shape, (template, var.shape, value.shape)
    assert names == set(state), sorted(names ^ set(state))


def test_parameters_carry_logical_axes(hf_pair):
    _, ours, _, _ = hf_pair
    seen = 0
    for path, var in nnx.iter_graph(ours):
        if isinstance(var, nnx.Param):
            names = var.get_metadata().get("out_sharding")
            assert names is not None and len(names) == var.ndim, (path, names)
            assert (names[0] == "layers") == (path[0] == "blocks"), (path, names)
            seen += 1
    assert seen == len(V.hf_vision_rules()) == 18


def test_patch_embed_and_rotary_match_hf(hf_pair):
    hf, ours, cfg, _ = hf_pair
    grid = np.array([[1, 8, 12], [1, 6, 4]])
    pv = _pixels(grid)
    with torch.no_grad():
        ref = hf.patch_embed(torch.from_numpy(pv)).numpy()
        pos = get_vision_position_ids(torch.from_numpy(grid), 2)
        ref_cos, ref_sin = hf.rotary_pos_emb(torch.zeros(1), pos)
    out = np.asarray(ours.patch_embed.proj(jnp.asarray(pv)))
    assert np.abs(out - ref).max() <= TOL
    cos, sin = V.rotary_cos_sin(jnp.asarray(pos.numpy()), cfg.hidden_size // cfg.num_heads, 1e4)
    assert cos.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(cos), ref_cos.numpy(), atol=1e-6, rtol=0)
    np.testing.assert_allclose(np.asarray(sin), ref_sin.numpy(), atol=1e-6, rtol=0)


def test_single_image_matches_hf(hf_pair):
    hf, ours, _, _ = hf_pair
    grid = np.array([[1, 8, 12]])
    pv = _pixels(grid)
    ref = _hf_out(hf, pv, grid)
    out = np.asarray(ours.embed_images(pv, grid))
    assert out.shape == ref.shape == (24, 32)
    err = np.abs(out - ref).max()
    print(f"single image fp32 max|d|={err:.3g}")
    assert err <= TOL


def test_several_images_padded_budget_matches_hf(hf_pair):
    hf, ours, cfg, _ = hf_pair
    grid = np.array([[1, 8, 12], [1, 6, 4], [2, 4, 6]])
    pv = _pixels(grid, seed=1)
    ref = _hf_out(hf, pv, grid)
    n = pv.shape[0]
    bucket = V.VisionBucket(num_patches=n + 40, num_windows=16, num_segments=6, segment_len=128)
    lay = V.vision_layout(grid, cfg, bucket)
    # padding rows hold large garbage: it must not reach any real token
    pad = 50.0 * np.random.RandomState(2).randn(40, pv.shape[1]).astype(np.float32)
    tokens, valid = ours(jnp.asarray(np.concatenate([pv, pad])), lay)
    tokens, valid = np.asarray(tokens), np.asarray(valid)
    m = n // 4
    assert tokens.shape == (lay.merged_index.shape[0], 32)
    assert valid[:m].all() and not valid[m:].any()
    assert np.isfinite(tokens).all() and (tokens[m:] == 0).all()
    err = np.abs(tokens[:m] - ref).max()
    print(f"three entries, padded budget fp32 max|d|={err:.3g}")
    assert err <= TOL
    # each image alone gives the same tokens as in the batch (nothing leaks between images)
    alone = np.asarray(ours.embed_images(pv[: 8 * 12], grid[:1]))
    np.testing.assert_allclose(alone, tokens[:24], atol=TOL, rtol=0)


def test_jit_reuses_compilation_across_grids(hf_pair):
    hf, ours, cfg, _ = hf_pair
    graphdef, state = nnx.split(ours)
    traces = []

    @jax.jit
    def forward(state, pv, layout):
        traces.append(1)
        return nnx.merge(graphdef, state)(pv, layout)

    budget = 160
    # Different images, same rounded sizes: 8 windows, 2 segments of <= 96 patches.
    for seed, grid in enumerate(([[1, 8, 12], [1, 6, 4]], [[1, 12, 8], [1, 4, 4]])):
        grid = np.asarray(grid)
        pv = _pixels(grid, seed=seed)
        bucket = V.vision_bucket(grid, cfg, budget)
        assert bucket == V.VisionBucket(160, 8, 2, 96)
        lay = V.vision_layout(grid, cfg, bucket)
        tokens, _ = forward(state, jnp.pad(pv, ((0, budget - pv.shape[0]), (0, 0))), lay)
        ref = _hf_out(hf, pv, grid)
        assert np.abs(np.asarray(tokens)[: ref.shape[0]] - ref).max() <= TOL
    assert len(traces) == 1


@pytest.mark.parametrize("param_dtype", [jnp.bfloat16, jnp.float32])
def test_bf16_close_to_fp32(hf_pair, param_dtype):
    _, ours, cfg, state = hf_pair
    bf = V.VisionTransformer(cfg, dtype=jnp.bfloat16, param_dtype=param_dtype, rngs=nnx.Rngs(0))
    V.load_hf_vision_weights(bf, state, prefix="")
    assert bf.blocks.attn.qkv.kernel.dtype == param_dtype
    grid = np.array([[1, 8, 12], [1, 6, 4]])
    pv = _pixels(grid, seed=3)
    ref = np.asarray(ours.embed_images(pv, grid))
    out = bf.embed_images(pv, grid)
    assert out.dtype == jnp.bfloat16
    err = np.abs(np.asarray(out, np.float32) - ref).max()
    scale = np.abs(ref).max()
    name = jnp.dtype(param_dtype).name
    print(f"bf16 compute, {name} params vs fp32: max|d|={err:.3g} (max|ref|={scale:.3g})")
    assert err <= 0.05 * scale


def test_remat_and_gradients(hf_pair):
    _, ours, cfg, state = hf_pair
    grid = np.array([[1, 8, 12], [1, 4, 4]])
    n = int(grid.prod(axis=1).sum())
    lay = V.vision_layout(grid, cfg, V.vision_bucket(grid, cfg, n + 16))
    pv = jnp.pad(jnp.asarray(_pixels(grid, seed=4)), ((0, 16), (0, 0)))

    def loss(model):
        tokens, valid = model(pv, lay)
        return jnp.sum(jnp.where(valid[:, None], tokens, 0.0) ** 2)

    rm = V.VisionTransformer(cfg, remat="full", attn_q_chunk=40, rngs=nnx.Rngs(1))
    V.load_hf_vision_weights(rm, state, prefix="")
    g_plain = nnx.grad(loss)(ours)
    g_remat = nnx.grad(loss)(rm)
    flat_plain = jax.tree.leaves(g_plain)
    flat_remat = jax.tree.leaves(g_remat)
    assert all(bool(jnp.isfinite(x).all()) for x in flat_plain)
    worst = 0.0
    for a, b in zip(flat_plain, flat_remat, strict=True):
        a, b = np.asarray(a), np.asarray(b)
        worst = max(worst, float(np.abs(a - b).max() / np.abs(a).max()))
    print(f"remat+chunked vs plain gradients: max |d| / max |g| = {worst:.3g}")
    assert worst <= 1e-4
    assert float(jnp.abs(g_plain["blocks"]["attn"]["qkv"]["kernel"][...]).max()) > 0


def test_query_chunked_full_attention_matches_hf(hf_pair):
    hf, _, cfg, state = hf_pair
    # 40 does not divide the 96- and 48-patch frames: exercises the padded last chunk.
    chunked = V.VisionTransformer(cfg, attn_q_chunk=40, rngs=nnx.Rngs(2))
    V.load_hf_vision_weights(chunked, state, prefix="")
    grid = np.array([[1, 8, 12], [2, 4, 6]])
    pv = _pixels(grid, seed=5)
    ref = _hf_out(hf, pv, grid)
    err = np.abs(
        np.asarray(chunked.embed_images(pv, grid, V.vision_bucket(grid, cfg, pv.shape[0] + 8)))
        - ref
    ).max()
    print(f"query-chunked fp32 max|d|={err:.3g}")
    assert err <= TOL


def test_fixed_bucket_fits_every_admissible_grid():
    cfg = types.SimpleNamespace(**HF_KW)
    bucket = V.fixed_bucket(cfg, num_patches=512, max_frames=4, max_patches_per_frame=200)
    assert bucket.num_segments == 4 and bucket.segment_len == 208
    rng = np.random.RandomState(1)
    hardest = 0
    for _ in range(300):
        rows, total, frames = [], 0, 0
        for _ in range(rng.randint(1, 5)):
            # thin images (1-unit-wide strips) are the worst case for the window count
            h = 2 * rng.randint(1, 101)
            w = 2 * rng.randint(1, max(2, 200 // (2 * h) + 1))
            t = rng.randint(1, 3)
            if h * w > 200 or total + t * h * w > 512 or frames + t > 4:
                continue
            rows.append([t, h, w])
            total += t * h * w
            frames += t
        if not rows:
            continue
        grid = np.asarray(rows)
        _, cu = V.hf_window_index(grid, cfg)
        hardest = max(hardest, len(cu) - 1)
        lay = V.vision_layout(grid, cfg, bucket)  # raises if anything does not fit
        assert lay.window_rows.shape == (bucket.num_windows, V.window_len(cfg))
    print(f"fixed bucket {bucket}: most windows seen {hardest}")
    assert bucket.num_windows // 2 < hardest <= bucket.num_windows
    with pytest.raises(ValueError, match="either a VisionBucket"):
        V.vision_bucket(np.array([[1, 4, 4]]), cfg, bucket, num_windows_padded=8)
