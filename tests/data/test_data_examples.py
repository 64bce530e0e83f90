"""Examples and collation: token ids vs transformers' processor path, mRoPE positions vs
transformers' get_rope_index (torch), SFT label spans on left/right padding, thought dropout."""

from __future__ import annotations

import re
import types

import numpy as np
import pytest

from tatar_jax.data import examples as ex
from tatar_jax.data import prompts
from tatar_jax.data import tokenizer as tk

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from test_data_prompts import QWEN2_VL_TEMPLATE  # noqa: E402


@pytest.fixture(scope="module")
def tok():
    return tk.load_tokenizer()


@pytest.fixture(scope="module")
def hf_tok(tok):
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok.tok)


@pytest.fixture(scope="module")
def hf_image_processor():
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import (
        Qwen2VLImageProcessorPil,
    )

    return Qwen2VLImageProcessorPil(min_pixels=3136, max_pixels=1572864)


def _torch_rope_index(input_ids, grid_thw, attention_mask, cfg):
    """transformers' Qwen2_5_VLModel.get_rope_index on a stub holding only the config it reads."""
    from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VLModel

    stub = types.SimpleNamespace(
        config=types.SimpleNamespace(
            vision_config=types.SimpleNamespace(
                spatial_merge_size=cfg.spatial_merge_size, tokens_per_second=2
            )
        )
    )
    stub.get_vision_position_ids = types.MethodType(Qwen2_5_VLModel.get_vision_position_ids, stub)
    ids = torch.as_tensor(np.asarray(input_ids), dtype=torch.long)
    mm = (ids == cfg.image_token_id).to(torch.int32)
    pos, delta = Qwen2_5_VLModel.get_rope_index(
        stub,
        ids,
        mm,
        image_grid_thw=torch.as_tensor(np.asarray(grid_thw), dtype=torch.long),
        attention_mask=torch.as_tensor(np.asarray(attention_mask), dtype=torch.long),
    )
    return pos.numpy(), delta.numpy()


def _rope_fn():
    """Our numpy get_rope_index (the one the data path uses)."""
    from tatar_jax.models.qwen2_5_vl.rope import get_rope_index

    return get_rope_index


def _image(rng, h, w):
    from PIL import Image

    return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))


def _pv(proc, img):
    out = proc(images=[img], return_tensors="np")
    return out["pixel_values"].astype(np.float32), out["image_grid_thw"][0]


SIZES = [(60, 90), (28, 28), (120, 50)]


def test_prompt_ids_equal_transformers_processor_path(tok, hf_tok, hf_image_processor):
    rng = np.random.default_rng(0)
    for (h, w), task in zip(SIZES, ["iqa", "iaa", "iqa"], strict=True):
        pv, thw = _pv(hf_image_processor, _image(rng, h, w))
        e = ex.make_prompt_example(tok, pv, thw, task, gt_100=50.0, rope_index_fn=_torch_rope_index)
        # What Qwen2_5_VLProcessor does: template text, each <|image_pad|> -> grid.prod()//4 copies.
        text = hf_tok.apply_chat_template(
            prompts.build_messages(task),
            chat_template=QWEN2_VL_TEMPLATE,
            add_generation_prompt=True,
            tokenize=False,
        )
        text = text.replace("<|image_pad|>", "<|image_pad|>" * (int(np.prod(thw)) // 4))
        ref = hf_tok(text, add_special_tokens=False)["input_ids"]
        np.testing.assert_array_equal(e["input_ids"], ref)
        assert e["input_ids"].dtype == np.int32 and e["pixel_values"].shape == (np.prod(thw), 1176)
        # Same ids through a checkpoint-supplied template.
        e2 = ex.make_prompt_example(
            tok, pv, thw, task, chat_template=QWEN2_VL_TEMPLATE, rope_index_fn=_torch_rope_index
        )
        np.testing.assert_array_equal(e2["input_ids"], ref)


def _examples(tok, proc, sft: bool, rope_fn):
    rng = np.random.default_rng(1)
    out = []
    targets = [
        "<think>\nA little blur on the left.\n</think>\n<answer>3.1</answer>",
        "<think>\nGood composition, warm light, a calm mood. The horizon is level.\n</think>",
        "<think>\nNoisy.\n</think>\n<answer>1</answer> and <ANSWER>2</ANSWER>",
    ]
    for i, ((h, w), task) in enumerate(zip(SIZES, ["iqa", "iaa", "iqa"], strict=True)):
        pv, thw = _pv(proc, _image(rng, h, w))
        kw = dict(gt_100=10.0 * (i + 1), dataset="d", image_path=f"img{i}.png", row_id=i)
        if sft:
            out.append(
                ex.make_sft_example(tok, pv, thw, task, targets[i], rope_index_fn=rope_fn, **kw)
            )
        else:
            out.append(ex.make_prompt_example(tok, pv, thw, task, rope_index_fn=rope_fn, **kw))
    return out


@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("sft", [False, True])
def test_positions_equal_get_rope_index_on_padded_batch(tok, hf_image_processor, side, sft):
    exs = _examples(tok, hf_image_processor, sft, _rope_fn())
    batch = ex.collate(exs, pad_id=tok.pad_id, seq_buckets=(512, 1024), padding_side=side)
    cfg = ex.RopeConfig.from_tokenizer(tok)
    ref_pos, ref_delta = _torch_rope_index(
        batch.input_ids, batch.image_grid_thw, batch.attention_mask, cfg
    )
    np.testing.assert_array_equal(batch.position_ids, ref_pos)
    np.testing.assert_array_equal(batch.rope_deltas, ref_delta)
    assert batch.input_ids.shape == (3, 512) and batch.position_ids.shape == (3, 3, 512)
    n_patch = int(sum(np.prod(e["grid_thw"]) for e in exs))
    assert batch.vision.pixel_values.shape[0] >= n_patch and batch.num_patches == n_patch


@pytest.mark.parametrize("side", ["left", "right"])
def test_sft_label_spans_on_padded_batch(tok, hf_image_processor, side):
    exs = _examples(tok, hf_image_processor, True, _rope_fn())
    batch = ex.collate(exs, pad_id=tok.pad_id, seq_buckets=(512,), padding_side=side)
    expected = [
        "<think>\nA little blur on the left.\n</think>\n<answer>10.00</answer><|im_end|>",
        "<think>\nGood composition, warm light, a calm mood. The horizon is level.\n</think>"
        "\n<answer>20.00</answer><|im_end|>",
        "<think>\nNoisy.\n</think>\n<answer>30.00</answer> and <answer>30.00</answer><|im_end|>",
    ]
    for r in range(3):
        m = batch.label_mask[r] == 1
        # Labelled tokens are contiguous, decode to exactly target + <|im_end|>, and are the tail
        # of the real tokens (nothing after <|im_end|> but the template's newline).
        idx = np.nonzero(m)[0]
        assert np.all(np.diff(idx) == 1)
        got = tok.decode(batch.input_ids[r][m], skip_special_tokens=False)
        assert got == expected[r]
        real = np.nonzero(batch.attention_mask[r])[0]
        assert idx[-1] == real[-2] and batch.input_ids[r, real[-1]] == tok.encode("\n")[0]
        # No prompt, image or padding token is trained (B3).
        assert not np.any(m & (batch.attention_mask[r] == 0))
        assert not np.any(m & (batch.input_ids[r] == tok.image_pad_id))
        np.testing.assert_array_equal(batch.labels[r], np.where(m, batch.input_ids[r], -100))
    # The prompt part of an SFT example is exactly the GRPO prompt example.
    pe = _examples(tok, hf_image_processor, False, _rope_fn())
    for s, p in zip(exs, pe, strict=True):
        n = len(p["input_ids"])
        np.testing.assert_array_equal(s["input_ids"][:n], p["input_ids"])
        assert s["label_mask"][:n].sum() == 0 and s["label_mask"][n] == 1


def test_label_count_independent_of_padding_side(tok, hf_image_processor):
    exs = _examples(tok, hf_image_processor, True, _rope_fn())
    lft = ex.collate(exs, pad_id=tok.pad_id, seq_buckets=(512,), padding_side="left")
    rgt = ex.collate(exs, pad_id=tok.pad_id, seq_buckets=(512,), padding_side="right")
    for r in range(3):
        a = lft.input_ids[r][lft.label_mask[r] == 1]
        b = rgt.input_ids[r][rgt.label_mask[r] == 1]
        np.testing.assert_array_equal(a, b)


def test_rewrite_answer():
    assert ex.rewrite_answer("<think>x</think>\n<answer>4</answer>", 75.0) == (
        "<think>x</think>\n<answer>75.00</answer>"
    )
    assert ex.rewrite_answer("<think>x</think>", 7.125) == "<think>x</think>\n<answer>7.12</answer>"
    two = ex.rewrite_answer("<answer>1</answer> <Answer>\n2\n</Answer>", 99.999)
    assert two == "<answer>100.00</answer> <answer>100.00</answer>"


def test_thought_dropout_rate_within_binomial_bound():
    n = 4000
    for p in (0.1, 0.5, 0.9):
        k = sum(ex.drop_think_draw(42, 0, row, "iqa", p) for row in range(n))
        sd = np.sqrt(n * p * (1 - p))
        assert abs(k - n * p) <= 4.5 * sd, (p, k)
    assert not any(ex.drop_think_draw(42, 0, r, "iaa", 0.0) for r in range(100))
    assert all(ex.drop_think_draw(42, 0, r, "iaa", 1.0) for r in range(100))
    # Reproducible per (seed, epoch, row); epochs and tasks draw independently.
    a = [ex.drop_think_draw(1, 0, r, "iqa", 0.5) for r in range(200)]
    assert a == [ex.drop_think_draw(1, 0, r, "iqa", 0.5) for r in range(200)]
    assert a != [ex.drop_think_draw(1, 1, r, "iqa", 0.5) for r in range(200)]
    assert a != [ex.drop_think_draw(1, 0, r, "iaa", 0.5) for r in range(200)]
    assert a != [ex.drop_think_draw(1, 0, r, "iqa", 0.5, dataset="other") for r in range(200)]
    assert a != [ex.drop_think_draw(1, 0, r, "iqa", 0.5, visit=1) for r in range(200)]
    # Joint rate over (epoch, row) pairs also binomial.
    k = sum(ex.drop_think_draw(7, e, r, "iaa", 0.3) for e in range(4) for r in range(1000))
    assert abs(k - 1200) <= 4.5 * np.sqrt(4000 * 0.21)


def test_sft_asymmetric_dropout(tok, hf_image_processor):
    rng = np.random.default_rng(3)
    pv, thw = _pv(hf_image_processor, _image(rng, 28, 56))
    target = "<think>\nSome long thought.\n</think>\n<answer>2</answer>"
    rates = {"iqa": 1.0, "iaa": 0.0}
    for task, dropped in (("iqa", True), ("iaa", False)):
        e = ex.make_sft_example(
            tok, pv, thw, task, target, gt_100=5.0, p_drop_think=rates, row_id=0,
            rope_index_fn=_rope_fn(),
        )  # fmt: skip
        text = tok.decode(e["input_ids"][e["label_mask"] == 1], skip_special_tokens=False)
        assert bool(e["think_dropped"]) is dropped
        want = "<think>\n\n</think>" if dropped else "<think>\nSome long thought.\n</think>"
        assert text == want + "\n<answer>5.00</answer><|im_end|>"


def test_bad_inputs_name_the_record(tok):
    pv = np.zeros((16, 1176), np.float32)
    with pytest.raises(ex.ExampleError, match=re.escape("koniq:17 (a/b.jpg)")):
        ex.make_prompt_example(
            tok, pv, (1, 4, 2), "iqa", dataset="koniq", row_id=17, image_path="a/b.jpg",
            rope_index_fn=_torch_rope_index,
        )  # fmt: skip
    pv = np.zeros((8, 1176), np.float32)
    with pytest.raises(ex.ExampleError, match="koniq:3"):
        ex.make_sft_example(
            tok, pv, (1, 4, 2), "iqa", "", gt_100=1.0, dataset="koniq", row_id=3,
            rope_index_fn=_torch_rope_index,
        )  # fmt: skip
    with pytest.raises(ex.ExampleError, match="gt_100"):
        ex.make_sft_example(
            tok, pv, (1, 4, 2), "iqa", "<answer>1</answer>", gt_100=float("nan"), dataset="k",
            row_id=3, rope_index_fn=_torch_rope_index,
        )  # fmt: skip
    # A template that drops the assistant's end-of-turn cannot give an explicit span.
    bad = QWEN2_VL_TEMPLATE.replace(
        "{{ message['content'] }}<|im_end|>", "{{ message['content'] }}"
    )
    with pytest.raises(ex.ExampleError, match="contiguously"):
        ex.make_sft_example(
            tok, pv, (1, 4, 2), "iqa", "<answer>1</answer>", gt_100=1.0, chat_template=bad,
            rope_index_fn=_torch_rope_index,
        )  # fmt: skip


def test_buckets_and_batch_padding(tok, hf_image_processor):
    assert ex.bucket_size(100, (128, 256), "x") == 128
    assert ex.bucket_size(256, (128, 256), "x") == 256
    with pytest.raises(ex.ExampleError, match="sequence length 300 exceeds"):
        ex.bucket_size(300, (128, 256), "sequence length")
    for n in [1, 63, 64, 65, 100, 1000, 4097, 123456]:
        b = ex.default_patch_buckets(n)
        assert b >= n and (b <= 1.25 * n or b == 64)
    # 4 shapes per octave: 64..4095 spans 6 octaves, plus 4096 itself.
    assert len({ex.default_patch_buckets(n) for n in range(64, 4096)}) == 25
    exs = _examples(tok, hf_image_processor, False, _rope_fn())[:2]
    b = ex.collate(exs, pad_id=tok.pad_id, seq_buckets=(512,), batch_size=4)
    assert b.meta.valid.tolist() == [True, True, False, False]
    assert b.input_ids.shape == (4, 512) and b.meta.task_id.tolist() == [0, 1, 1, 1]
    assert b.meta.image_path == ("img0.png", "img1.png", "img1.png", "img1.png")


@pytest.mark.parametrize("side", ["left", "right"])
def test_numpy_rope_index_equals_transformers(tok, hf_image_processor, side):
    exs = _examples(tok, hf_image_processor, False, _torch_rope_index)
    batch = ex.collate(exs, pad_id=tok.pad_id, seq_buckets=(512,), padding_side=side)
    cfg = ex.RopeConfig.from_tokenizer(tok)
    args = (batch.input_ids, batch.image_grid_thw, batch.attention_mask, cfg)
    ref_pos, ref_delta = _torch_rope_index(*args)
    pos, delta = _rope_fn()(*args)
    np.testing.assert_array_equal(pos, ref_pos)
    np.testing.assert_array_equal(delta, ref_delta)
