"""Our own model as the teacher (spec §5, issue 9 (b)).

* The JaxTeacher plumbing (chat rendering with the image expanded to its tokens, pixel inputs,
  decoding, end-of-turn and stop strings) with a recording stand-in for the rollout engine and the
  real Qwen tokenizer, then a whole builder run through it.
* With the rollout engine (``tatar_jax.generate``) present: a tiny random NNX Qwen2.5-VL as the
  teacher end to end (nonsense text; the format and bookkeeping are what is checked).
"""

from __future__ import annotations

import json
import pathlib

import numpy as np
import pytest

from tatar_jax.reasoning import build, from_config
from tatar_jax.reasoning.teachers import ChatRequest, JaxTeacher, SamplingParams

REPO = pathlib.Path(__file__).resolve().parents[2]


def _config():
    from configs import reasoning as reasoning_config

    return reasoning_config


@pytest.fixture(scope="module")
def qwen_tok():
    from tatar_jax.data.tokenizer import load_tokenizer

    return load_tokenizer(None)


def _dataset(tmp_path, n):
    from PIL import Image

    for i in range(n):
        Image.new("RGB", (40, 30), (10 * i, 90, 30)).save(tmp_path / f"{i}.png")
    p = tmp_path / "m.jsonl"
    p.write_text(
        "".join(json.dumps({"image": f"{i}.png", "gt_score": 20.0 + i}) + "\n" for i in range(n))
    )
    return str(p)


class RecordingGenerate:
    """Stands in for tatar_jax.generate.generate: checks its inputs, returns canned tokens."""

    def __init__(self, tok, reply: str):
        self.tok, self.reply, self.calls = tok, reply, []

    def __call__(self, model, input_ids, attention_mask, **kw):
        from tatar_jax import generate

        self.calls.append((input_ids, attention_mask, kw))
        out = self.tok.encode(self.reply + "<|im_end|>ignored after end of turn")
        tokens = np.asarray([out[: kw["max_new_tokens"]]], dtype=np.int32)
        # generate's mask: up to and including the first stop token
        stop = np.isin(tokens[0], kw["stop_token_ids"])
        end = int(np.argmax(stop)) + 1 if stop.any() else tokens.shape[1]
        mask = np.arange(tokens.shape[1])[None] < end
        return generate.GenerateOutput(tokens, mask, np.zeros(tokens.shape, np.float32))


def test_jax_teacher_plumbing(tmp_path, qwen_tok):
    from tatar_jax.data import prompts as chat

    _dataset(tmp_path, 1)
    reply = "<think>Flat grey patch, no detail.</think>\n<answer>20.0</answer> trailing"
    gen = RecordingGenerate(qwen_tok, reply)
    teacher = JaxTeacher(object(), qwen_tok, name="tiny", seed=3, generate_fn=gen)
    req = ChatRequest(
        "SYS", "USER TEXT", str(tmp_path / "0.png"), SamplingParams(0.3, 0.8, 140, ("</answer>",))
    )
    out = teacher.complete(req)
    assert out == "<think>Flat grey patch, no detail.</think>\n<answer>20.0"  # cut at the stop
    (ids, mask, kw) = gen.calls[0]
    grid = kw["image_grid_thw"][0]
    n_img = chat.num_image_tokens(grid)
    assert (ids == qwen_tok.image_pad_id).sum() == n_img
    assert kw["pixel_values"].shape == (int(np.prod(grid)), 1176)
    text = qwen_tok.decode(ids[0].tolist(), skip_special_tokens=False)
    assert text.startswith("<|im_start|>system\nSYS<|im_end|>\n<|im_start|>user\n<|vision_start|>")
    assert text.endswith("USER TEXT<|im_end|>\n<|im_start|>assistant\n")
    assert mask.shape == ids.shape and mask.all()
    assert (kw["max_new_tokens"], kw["temperature"], kw["top_p"]) == (140, 0.3, 0.8)
    assert kw["stop_token_ids"] == (qwen_tok.im_end_id, qwen_tok.pad_id)
    # text-only request: no pixels
    teacher.complete(ChatRequest("S", "U", None, SamplingParams(max_tokens=64)))
    assert "pixel_values" not in gen.calls[1][2]


def test_builder_with_jax_teacher_writes_well_formed_file(tmp_path, qwen_tok):
    manifest = _dataset(tmp_path, 3)
    gen = RecordingGenerate(
        qwen_tok, "<think>Soft edges and visible noise. Dull colours. Third.</think><answer>"
    )
    teacher = JaxTeacher(object(), qwen_tok, name="tiny", generate_fn=gen)
    cfg = _config().get_config("iqa")
    cfg.input, cfg.score_range, cfg.out_dir = manifest, (0.0, 100.0), str(tmp_path / "out")
    cfg.progress, cfg.judge.enabled, cfg.client.concurrency = False, False, 1
    summary = build.run(cfg, from_config.load_rows(cfg)[0], teacher, None)
    assert summary.kept == 3
    rows = [json.loads(x) for x in (tmp_path / "out" / "sft.jsonl").read_text().splitlines()]
    think = "<think>\nSoft edges and visible noise. Dull colours.\n</think>\n"
    assert [r["target"] for r in rows] == [f"{think}<answer>{20.0 + i}</answer>" for i in range(3)]
    assert {r["teacher"] for r in rows} == {"tiny"}


class ByteTokenizer:
    """A tokenizer for the tiny test model (vocab 256): text bytes -> ids 3..247, specials ->
    the tiny config's ids."""

    SPECIAL = {"<|vision_start|>": 248, "<|vision_end|>": 249, "<|image_pad|>": 250,
               "<|im_start|>": 252, "<|im_end|>": 253, "<|endoftext|>": 2}  # fmt: skip
    eos_ids = (253, 2)
    chat_template = None

    def encode(self, text):
        ids, i = [], 0
        while i < len(text):
            for s, t in self.SPECIAL.items():
                if text.startswith(s, i):
                    ids.append(t)
                    i += len(s)
                    break
            else:
                ids.append(3 + ord(text[i]) % 245)
                i += 1
        return ids

    def decode(self, ids, skip_special_tokens=True):
        return "".join(chr(32 + (i - 3) % 95) for i in ids if 3 <= i < 248)


@pytest.mark.slow
def test_tiny_random_model_as_teacher_end_to_end(tmp_path):
    from flax import nnx

    from tatar_jax.models.qwen2_5_vl.config import tiny
    from tatar_jax.models.qwen2_5_vl.model import Qwen2_5_VLForConditionalGeneration

    model = Qwen2_5_VLForConditionalGeneration(tiny(), rngs=nnx.Rngs(0))
    manifest = _dataset(tmp_path, 1)
    cfg = _config().get_config("iqa")
    cfg.input, cfg.score_range, cfg.out_dir = manifest, (0.0, 100.0), str(tmp_path / "out")
    cfg.progress, cfg.judge.enabled, cfg.client.concurrency = False, False, 1
    cfg.iqa.max_tokens = 12
    cfg.iqa.reject_score_in_think = False  # random text may contain any digits
    teacher = JaxTeacher(model, ByteTokenizer(), name="tiny-random", seed=0)
    summary = build.run(cfg, from_config.load_rows(cfg)[0], teacher, None)
    assert summary.total == 1 and summary.failed == {} and summary.pending == 0
    out = tmp_path / "out"
    kept = [json.loads(x) for x in (out / "sft.jsonl").read_text().splitlines()]
    rejected = [json.loads(x) for x in (out / "rejected.jsonl").read_text().splitlines()]
    assert [r["source_row"] for r in kept + rejected] == [0]
    for r in kept:
        think = r["think"]
        assert r["target"] == f"<think>\n{think}\n</think>\n<answer>{r['gt_score']}</answer>"
        assert 0 < len(think.split()) <= 50
