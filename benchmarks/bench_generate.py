"""Rollout throughput: tatar_jax.generate vs transformers ``generate`` (CPU, same random model).

    python benchmarks/bench_generate.py --prompts=2 --num_samples=8 --new_tokens=128

One small random Qwen2.5-VL (~40M parameters by default: 6 decoder layers of width 512, vocab
16384, a 4-block vision tower), fp32, built with transformers and loaded into ours from the same
safetensors directory. Each prompt holds one image (``--image_grid`` patches) and some text; both
engines draw ``--num_samples`` completions per prompt with temperature 1 and top-k 50 and no
reachable stop token (ours: no stop ids; transformers: ``eos_token_id=None``), so both generate
exactly ``prompts * num_samples * new_tokens`` tokens. transformers runs ``generate(
num_return_sequences=G, do_sample=True)`` (which repeats each prompt G times, so it encodes each
image and prefills each prompt G times); ours encodes/prefills once and decodes the G samples from
copies of the cache. After one warm-up call each (ours compiles there), ``--repeats`` timed calls
alternate; the medians and the ratio are printed.
"""

from __future__ import annotations

import os
import statistics
import sys
import tempfile
import time

from absl import app, flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

_PROMPTS = flags.DEFINE_integer("prompts", 2, "prompts per call (one image each)")
_G = flags.DEFINE_integer("num_samples", 8, "completions per prompt (spec: G = 8)")
_NEW = flags.DEFINE_integer("new_tokens", 128, "new tokens per completion")
_REPEATS = flags.DEFINE_integer("repeats", 2, "timed calls per engine (after one warm-up)")
_GRID = flags.DEFINE_list("image_grid", ["16", "16"], "image patch grid h,w (multiples of 2)")
_TEXT = flags.DEFINE_integer("text_tokens", 24, "text tokens per prompt besides the image")
_LAYERS = flags.DEFINE_integer("layers", 6, "decoder layers")
_WIDTH = flags.DEFINE_integer("hidden", 512, "decoder width")
_VOCAB = flags.DEFINE_integer("vocab", 16384, "vocabulary size")
_THREADS = flags.DEFINE_integer("torch_threads", 0, "torch intra-op threads (0 = default)")

IMAGE, VIDEO, V_START, V_END = 16000, 16001, 15998, 15999


def _hf_model(vocab: int, hidden: int, layers: int):
    import torch
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    heads, kv = hidden // 64, 2
    cfg = Qwen2_5_VLConfig(
        text_config=dict(
            vocab_size=vocab,
            hidden_size=hidden,
            intermediate_size=3 * hidden,
            num_hidden_layers=layers,
            num_attention_heads=heads,
            num_key_value_heads=kv,
            rms_norm_eps=1e-6,
            max_position_embeddings=4096,
            hidden_act="silu",
            rope_parameters={
                "rope_type": "default",
                "rope_theta": 1e6,
                "mrope_section": [8, 12, 12],
            },
            bos_token_id=1,
            eos_token_id=2,
            pad_token_id=0,
        ),
        vision_config=dict(
            depth=4,
            hidden_size=256,
            intermediate_size=512,
            num_heads=4,
            in_channels=3,
            patch_size=14,
            spatial_merge_size=2,
            temporal_patch_size=2,
            window_size=112,
            fullatt_block_indexes=[1, 3],
            out_hidden_size=hidden,
            hidden_act="silu",
        ),
        image_token_id=IMAGE,
        video_token_id=VIDEO,
        vision_start_token_id=V_START,
        vision_end_token_id=V_END,
        tie_word_embeddings=False,
    )
    for c in (cfg, cfg.text_config, cfg.vision_config):
        c._attn_implementation = "sdpa"
    torch.manual_seed(0)
    model = Qwen2_5_VLForConditionalGeneration(cfg).eval().float()
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or "ln_q" in name:
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=gen))
            else:
                p.copy_(0.05 * torch.randn(p.shape, generator=gen))
    return model


def _batch(prompts: int, grid: tuple[int, int], text: int):
    import numpy as np

    rng = np.random.default_rng(0)
    n_img = grid[0] * grid[1] // 4
    rows = []
    for i in range(prompts):
        t = text + 3 * i  # different lengths: left padding is exercised
        rows.append(
            rng.integers(3, 15000, t // 2).tolist()
            + [V_START]
            + [IMAGE] * n_img
            + [V_END]
            + rng.integers(3, 15000, t - t // 2).tolist()
        )
    length = max(map(len, rows))
    ids = np.zeros((prompts, length), np.int64)
    mask = np.zeros((prompts, length), np.int64)
    for i, r in enumerate(rows):
        ids[i, length - len(r) :], mask[i, length - len(r) :] = r, 1
    thw = np.asarray([[1, *grid]] * prompts, np.int64)
    pv = rng.standard_normal((prompts * grid[0] * grid[1], 3 * 2 * 14 * 14)).astype(np.float32)
    return ids, mask, pv, thw


def main(argv: list[str]) -> None:
    del argv
    import jax
    import jax.numpy as jnp
    import numpy as np
    import torch
    from safetensors.torch import save_file

    from tatar_jax import generate
    from tatar_jax.models import qwen2_5_vl as qvl

    if _THREADS.value:
        torch.set_num_threads(_THREADS.value)
    hf = _hf_model(_VOCAB.value, _WIDTH.value, _LAYERS.value)
    n_params = sum(p.numel() for p in hf.parameters())
    with tempfile.TemporaryDirectory() as d:
        state = {}
        for k, v in hf.state_dict().items():  # hub tensor names
            k = k.replace("model.language_model.", "model.").replace("model.visual.", "visual.")
            state[k] = v.contiguous()
        save_file(state, os.path.join(d, "model.safetensors"), metadata={"format": "pt"})
        hf.config.save_pretrained(d)
        ours = qvl.load_hf_checkpoint(d, dtype=jnp.float32)
    grid = (int(_GRID.value[0]), int(_GRID.value[1]))
    ids, mask, pv, thw = _batch(_PROMPTS.value, grid, _TEXT.value)
    g, new = _G.value, _NEW.value
    total = _PROMPTS.value * g * new
    sampler = generate.Sampler(
        ours,
        generate.SamplingParams(
            max_new_tokens=new, num_samples=g, temperature=1.0, top_k=50, stop_token_ids=()
        ),
    )

    def run_ours(seed: int) -> float:
        t0 = time.perf_counter()
        out = sampler(ids, mask, pv, thw, rng=jax.random.key(seed))
        jax.block_until_ready(out)
        assert out.tokens.shape == (_PROMPTS.value * g, new) and bool(np.asarray(out.mask).all())
        return time.perf_counter() - t0

    hf_inputs = dict(
        input_ids=torch.from_numpy(ids),
        attention_mask=torch.from_numpy(mask),
        pixel_values=torch.from_numpy(pv),
        image_grid_thw=torch.from_numpy(thw),
        mm_token_type_ids=torch.from_numpy((ids == IMAGE).astype(np.int64)),
    )

    def run_hf(seed: int) -> float:
        torch.manual_seed(seed)
        t0 = time.perf_counter()
        with torch.no_grad():
            seq = hf.generate(
                **hf_inputs,
                do_sample=True,
                num_return_sequences=g,
                max_new_tokens=new,
                temperature=1.0,
                top_k=50,
                top_p=1.0,
                eos_token_id=None,
                pad_token_id=0,
            )
        dt = time.perf_counter() - t0
        assert seq.shape == (_PROMPTS.value * g, ids.shape[1] + new), seq.shape
        return dt

    print(
        f"model: {n_params / 1e6:.1f}M parameters, {_PROMPTS.value} prompts x {g} samples x "
        f"{new} new tokens = {total} tokens/call, prompt length {ids.shape[1]} "
        f"({grid[0] * grid[1] // 4} image tokens), jax {jax.__version__} on "
        f"{jax.devices()[0].platform}, torch threads {torch.get_num_threads()}"
    )
    t0 = time.perf_counter()
    run_ours(0)
    print(f"ours warm-up (compile + run): {time.perf_counter() - t0:.1f}s")
    run_hf(0)
    ours_t, hf_t = [], []
    for r in range(_REPEATS.value):
        ours_t.append(run_ours(r + 1))
        hf_t.append(run_hf(r + 1))
        print(f"  repeat {r}: ours {ours_t[-1]:.2f}s, transformers {hf_t[-1]:.2f}s")
    ours_tps = total / statistics.median(ours_t)
    hf_tps = total / statistics.median(hf_t)
    print(f"tatar_jax.generate : {ours_tps:8.1f} generated tokens/s")
    print(f"transformers       : {hf_tps:8.1f} generated tokens/s")
    print(f"ratio (ours / transformers): {ours_tps / hf_tps:.2f}x")


if __name__ == "__main__":
    app.run(main)
