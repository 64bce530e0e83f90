"""mRoPE positions and tables vs transformers' Qwen2.5-VL (``get_rope_index``, rotary embedding)."""

from __future__ import annotations

import numpy as np
import pytest
import tiny_models as tm
import torch
from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VLRotaryEmbedding

from tatar_jax.models.qwen2_5_vl import config as C
from tatar_jax.models.qwen2_5_vl import rope

CFG = C.tiny()


@pytest.fixture(scope="module")
def hf_model():
    return tm.tiny_hf_model()


def _hf_index(hf_model, batch, video_grid_thw=None, second_per_grid_ts=None, token_types=None):
    ids = torch.from_numpy(batch["input_ids"])
    types = batch["mm_token_type_ids"] if token_types is None else token_types
    grid = batch.get("image_grid_thw")
    pos, delta = hf_model.model.get_rope_index(
        ids,
        mm_token_type_ids=torch.from_numpy(types),
        image_grid_thw=None if grid is None else torch.from_numpy(grid),
        video_grid_thw=video_grid_thw,
        second_per_grid_ts=second_per_grid_ts,
        attention_mask=torch.from_numpy(batch["attention_mask"]),
    )
    return pos.numpy(), delta.numpy()


ROW_SETS = {
    "text_only_left_padded": [[9], [4], [1]],
    "one_image": [[3, (1, 8, 8), 5]],
    "two_images_two_rows_left_padded": [[2, (1, 4, 8), 3], [1, (1, 8, 12), 6], [5]],
    "several_images_per_row": [[2, (1, 4, 4), 1, (1, 8, 4), 3, (1, 2, 6)], [(1, 6, 2), 4]],
    "multi_frame_image": [[2, (2, 4, 6), 2]],
}


@pytest.mark.parametrize("name", sorted(ROW_SETS))
def test_get_rope_index_matches_transformers(hf_model, name):
    batch = tm.make_batch(ROW_SETS[name], seed=3)
    ref_pos, ref_delta = _hf_index(hf_model, batch)
    pos, delta = rope.get_rope_index(
        batch["input_ids"], batch.get("image_grid_thw"), batch["attention_mask"], CFG
    )
    assert pos.shape == ref_pos.shape and pos.dtype == np.int32
    np.testing.assert_array_equal(pos, ref_pos)
    np.testing.assert_array_equal(delta, ref_delta)


def test_get_rope_index_random_batches(hf_model):
    rng = np.random.default_rng(0)
    for seed in range(6):
        rows = []
        for _ in range(rng.integers(1, 4)):
            row = []
            for _ in range(rng.integers(1, 4)):
                row.append(int(rng.integers(1, 5)))
                if rng.random() < 0.6:
                    row.append((1, 2 * int(rng.integers(1, 5)), 2 * int(rng.integers(1, 5))))
            rows.append(row)
        batch = tm.make_batch(rows, seed=seed)
        ref_pos, ref_delta = _hf_index(hf_model, batch)
        pos, delta = rope.get_rope_index(
            batch["input_ids"], batch.get("image_grid_thw"), batch["attention_mask"], CFG
        )
        np.testing.assert_array_equal(pos, ref_pos, err_msg=f"rows={rows}")
        np.testing.assert_array_equal(delta, ref_delta, err_msg=f"rows={rows}")


def test_video_positions_match_transformers(hf_model):
    batch = tm.make_batch([[3, (2, 4, 4), 2]], seed=1)
    ids = batch["input_ids"].copy()
    ids[ids == tm.IMAGE_TOKEN_ID] = tm.VIDEO_TOKEN_ID
    batch = {**batch, "input_ids": ids, "mm_token_type_ids": 2 * batch["mm_token_type_ids"]}
    grid = batch.pop("image_grid_thw")
    ref_pos, ref_delta = _hf_index(
        hf_model, batch, video_grid_thw=torch.from_numpy(grid), second_per_grid_ts=[1.5]
    )
    pos, delta = rope.get_rope_index(
        ids, None, batch["attention_mask"], CFG, video_grid_thw=grid, second_per_grid_ts=[1.5]
    )
    np.testing.assert_array_equal(pos, ref_pos)
    np.testing.assert_array_equal(delta, ref_delta)
    # the two frames are tokens_per_second * 1.5 = 3 temporal positions apart
    t_video = pos[0, 0][ids[0] == tm.VIDEO_TOKEN_ID]
    assert sorted(set(t_video.tolist())) == [t_video[0], t_video[0] + 3]


def test_get_rope_index_accepts_duck_typed_config():
    class Small:  # what the data pipeline passes
        image_token_id = tm.IMAGE_TOKEN_ID
        video_token_id = tm.VIDEO_TOKEN_ID
        vision_start_token_id = tm.VISION_START_ID
        spatial_merge_size = 2
        tokens_per_second = 2

    batch = tm.make_batch([[2, (1, 4, 6), 3]], seed=0)
    a = rope.get_rope_index(batch["input_ids"], batch["image_grid_thw"], None, Small())
    b = rope.get_rope_index(batch["input_ids"], batch["image_grid_thw"], None, CFG)
    np.testing.assert_array_equal(a[0], b[0])


def test_get_rope_index_errors():
    batch = tm.make_batch([[2, (1, 4, 6), 3]], seed=0)
    with pytest.raises(ValueError, match="row 0.*does not match grid_thw"):
        rope.get_rope_index(batch["input_ids"], np.array([[1, 4, 4]]), None, CFG)
    with pytest.raises(ValueError, match="more image token runs"):
        rope.get_rope_index(batch["input_ids"], None, None, CFG)
    with pytest.raises(ValueError, match="have no image tokens"):
        rope.get_rope_index(batch["input_ids"], np.array([[1, 4, 6], [1, 2, 2]]), None, CFG)


def test_text_position_ids_equal_rope_index_on_text():
    batch = tm.make_batch([[5], [2]], seed=0)
    pos, delta = rope.get_rope_index(batch["input_ids"], None, batch["attention_mask"], CFG)
    np.testing.assert_array_equal(rope.text_position_ids(batch["attention_mask"]), pos)
    np.testing.assert_array_equal(delta, 0)


def test_decode_positions_continue_the_prompt():
    """Positions of appended text tokens, from the rope delta, equal get_rope_index on the
    extended sequence (what transformers' generate does)."""
    batch = tm.make_batch([[2, (1, 8, 8), 3], [4, (1, 4, 2), 1]], seed=5)
    ids, mask = batch["input_ids"], batch["attention_mask"]
    _, delta = rope.get_rope_index(ids, batch["image_grid_thw"], mask, CFG)
    steps = 3
    ext_ids = np.concatenate([ids, np.full((2, steps), 7)], axis=1)
    ext_mask = np.concatenate([mask, np.ones((2, steps), mask.dtype)], axis=1)
    ext_pos, _ = rope.get_rope_index(ext_ids, batch["image_grid_thw"], ext_mask, CFG)
    got = rope.decode_position_ids(mask.sum(-1), delta, steps=steps)
    np.testing.assert_array_equal(np.asarray(got), ext_pos[:, :, -steps:])


def test_mrope_cos_sin_matches_transformers():
    hf_cfg = tm.tiny_hf_config().text_config
    emb = Qwen2_5_VLRotaryEmbedding(hf_cfg)
    rng = np.random.default_rng(0)
    pos = rng.integers(0, 300, size=(3, 2, 7))
    x = torch.zeros(1, dtype=torch.float32)
    ref_cos, ref_sin = emb(x, torch.from_numpy(pos))
    t = CFG.text
    cos, sin = rope.mrope_cos_sin(pos, t.head_dim, t.rope_theta, t.mrope_section)
    assert cos.dtype == np.float32 and cos.shape == (2, 7, t.head_dim)
    np.testing.assert_allclose(np.asarray(cos), ref_cos.numpy(), atol=1e-6)
    np.testing.assert_allclose(np.asarray(sin), ref_sin.numpy(), atol=1e-6)
