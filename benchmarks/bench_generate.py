"""Rollout speed: tatar_jax.generate vs transformers ``generate`` (CPU, same random model).

    python benchmarks/bench_generate.py --prompts=4 --num_samples=8 --new_tokens=64 \
        --hidden=64 --layers=2 --vocab=4096                           # ~5M params, small vocab
    python benchmarks/bench_generate.py --prompts=4 --num_samples=8 --new_tokens=64 \
        --hidden=64 --layers=2 --vocab=151936                         # Qwen2.5-VL's vocabulary

A small random Qwen2.5-VL (any ``--vocab`` >= 16, any ``--hidden`` multiple of 16; default ~40M
parameters: 6 decoder layers of width 512, vocab 16384, a 4-block vision tower), fp32, built with
transformers and loaded into ours from the same safetensors directory. Each prompt holds one image
(``--image_grid`` patches) and some text; both engines draw ``--num_samples`` completions per
prompt with temperature 1 and top-k 50 and no reachable stop token (ours: no stop ids;
transformers: ``eos_token_id=None``), so both generate exactly ``prompts * num_samples *
new_tokens`` tokens. transformers runs ``generate(num_return_sequences=G, do_sample=True)``
(which repeats each prompt G times, so it encodes each image and prefills each prompt G times);
ours encodes/prefills once and decodes the G samples against one shared prompt KV.

Besides the whole rollout each engine also runs with one new token (= its prefill); the decode
step is ``(rollout - prefill) / (new_tokens - 1)``. After one warm-up call each (ours compiles
there), ``--repeats`` timed calls of both engines alternate; medians and ratios are printed.
"""

from __future__ import annotations

import os
import tempfile
import time
from typing import Any

import peer
from absl import app, flags

_PROMPTS = flags.DEFINE_integer("prompts", 2, "prompts per call (one image each)")
_G = flags.DEFINE_integer("num_samples", 8, "completions per prompt (spec: G = 8)")
_NEW = flags.DEFINE_integer("new_tokens", 128, "new tokens per completion")
_GRID = flags.DEFINE_list("image_grid", ["16", "16"], "image patch grid h,w (multiples of 2)")
_TEXT = flags.DEFINE_integer("text_tokens", 24, "text tokens per prompt besides the image")
_LAYERS = flags.DEFINE_integer("layers", 6, "decoder layers")
_WIDTH = flags.DEFINE_integer("hidden", 512, "decoder width")
_VOCAB = flags.DEFINE_integer("vocab", 16384, "vocabulary size")
flags.adopt_module_key_flags(peer)  # --repeats, --torch_threads in --help


def _heads(hidden: int) -> tuple[int, int, int]:
    """(head_dim, attention heads, kv heads) for any width: head_dim 64 (16 below 128)."""
    head_dim = 64 if hidden >= 128 else 16
    if hidden % head_dim:
        raise app.UsageError(f"--hidden={hidden} must be a multiple of {head_dim}")
    heads = hidden // head_dim
    return head_dim, heads, 2 if heads % 2 == 0 else 1


def _config(vocab: int, hidden: int, layers: int):
    """The benchmark's random model (a :class:`Qwen2_5_VLConfig`; transformers' is written from
    it): SwiGLU 3 x hidden, a 4-block 256-wide vision tower with full attention in blocks 1, 3;
    the image / video / vision start / vision end token ids at the top of any vocabulary."""
    from tatar_jax.models.qwen2_5_vl import config as qcfg

    if vocab < 16:
        raise app.UsageError(f"--vocab={vocab}: need at least 16 tokens")
    head_dim, heads, kv = _heads(hidden)
    half = head_dim // 2  # mRoPE sections (t, h, w) cover head_dim / 2 frequencies
    text = qcfg.TextConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=3 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv,
        mrope_section=(half - 2 * (3 * half // 8), 3 * half // 8, 3 * half // 8),
        max_position_embeddings=4096,
    )
    vision = qcfg.VisionConfig(
        depth=4,
        hidden_size=256,
        intermediate_size=512,
        num_heads=4,
        fullatt_block_indexes=(1, 3),
        out_hidden_size=hidden,
    )
    return qcfg.Qwen2_5_VLConfig(
        text=text,
        vision=vision,
        image_token_id=vocab - 1,
        video_token_id=vocab - 2,
        vision_start_token_id=vocab - 4,
        vision_end_token_id=vocab - 3,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )


def _hf_model(config):
    import torch
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    cfg = Qwen2_5_VLConfig(**config.to_hf_dict())
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


def _batch(prompts: int, grid: tuple[int, int], text: int, config):
    """Left-padded prompts of random text around one image each (``config``'s token ids)."""
    import numpy as np

    image = config.image_token_id
    v_start, v_end = config.vision_start_token_id, config.vision_end_token_id
    rng = np.random.default_rng(0)
    n_img = grid[0] * grid[1] // 4
    rows = []
    for i in range(prompts):
        t = text + 3 * i  # different lengths: left padding is exercised
        rows.append(
            rng.integers(3, v_start, t // 2).tolist()
            + [v_start]
            + [image] * n_img
            + [v_end]
            + rng.integers(3, v_start, t - t // 2).tolist()
        )
    length = max(map(len, rows))
    ids = np.zeros((prompts, length), np.int64)
    mask = np.zeros((prompts, length), np.int64)
    for i, r in enumerate(rows):
        ids[i, length - len(r) :], mask[i, length - len(r) :] = r, 1
    thw = np.asarray([[1, *grid]] * prompts, np.int64)
    pv = rng.standard_normal((prompts * grid[0] * grid[1], 3 * 2 * 14 * 14)).astype(np.float32)
    return ids, mask, pv, thw


def _ours_from_hf(hf: Any) -> Any:
    """Our model from transformers' weights, through a safetensors directory with the hub's
    tensor names (the path a user's checkpoint takes)."""
    import jax.numpy as jnp
    from safetensors.torch import save_file

    from tatar_jax.models import qwen2_5_vl as qvl

    with tempfile.TemporaryDirectory() as d:
        state = {}
        for k, v in hf.state_dict().items():  # hub tensor names
            k = k.replace("model.language_model.", "model.").replace("model.visual.", "visual.")
            state[k] = v.contiguous()
        save_file(state, os.path.join(d, "model.safetensors"), metadata={"format": "pt"})
        hf.config.save_pretrained(d)
        return qvl.load_hf_checkpoint(d, dtype=jnp.float32)


def _report(med: dict[str, float], total: int, new: int) -> None:
    """The table and ratios from the medians (s) of ``ours``/``hf`` (``new`` tokens) and
    ``ours_1``/``hf_1`` (the prefill alone)."""
    # decode step: (rollout - prefill) / (new - 1), per engine, from the medians
    step = {e: (med[e] - med[e + "_1"]) / max(new - 1, 1) for e in ("ours", "hf")}
    print(f"{'':20} {'rollout s':>10} {'tokens/s':>10} {'prefill s':>10} {'decode step ms':>15}")
    for e, name in (("ours", "tatar_jax.generate"), ("hf", "transformers")):
        print(
            f"{name:20} {med[e]:10.3f} {total / med[e]:10.1f} {med[e + '_1']:10.3f} "
            f"{1e3 * step[e]:15.2f}"
        )
    print(
        f"ratio (transformers / ours): rollout {med['hf'] / med['ours']:.2f}x, prefill "
        f"{med['hf_1'] / med['ours_1']:.2f}x, decode step {step['hf'] / step['ours']:.2f}x "
        f"(medians of {peer.REPEATS.value} interleaved repeats)"
    )


def main(argv: list[str]) -> None:
    del argv
    import jax
    import numpy as np
    import torch

    from tatar_jax import generate

    peer.set_torch_threads()
    config = _config(_VOCAB.value, _WIDTH.value, _LAYERS.value)
    hf = _hf_model(config)
    n_params = sum(p.numel() for p in hf.parameters())
    ours = _ours_from_hf(hf)
    grid = (int(_GRID.value[0]), int(_GRID.value[1]))
    vocab = _VOCAB.value
    ids, mask, pv, thw = _batch(_PROMPTS.value, grid, _TEXT.value, config)
    g, new = _G.value, _NEW.value
    rows = _PROMPTS.value * g
    total = rows * new

    def sampler_for(n: int) -> generate.Sampler:
        p = generate.SamplingParams(
            max_new_tokens=n, num_samples=g, temperature=1.0, top_k=50, stop_token_ids=()
        )
        return generate.Sampler(ours, p)

    samplers = {new: sampler_for(new), 1: sampler_for(1)}  # 1 new token: the prefill alone

    def run_ours(n: int, seed: int) -> float:
        t0 = time.perf_counter()
        out = samplers[n](ids, mask, pv, thw, rng=jax.random.key(seed))
        jax.block_until_ready(out)
        dt = time.perf_counter() - t0
        assert out.tokens.shape == (rows, n) and bool(np.asarray(out.mask).all())
        return dt

    hf_inputs = dict(
        input_ids=torch.from_numpy(ids),
        attention_mask=torch.from_numpy(mask),
        pixel_values=torch.from_numpy(pv),
        image_grid_thw=torch.from_numpy(thw),
        mm_token_type_ids=torch.from_numpy((ids == config.image_token_id).astype(np.int64)),
    )

    def run_hf(n: int, seed: int) -> float:
        torch.manual_seed(seed)
        t0 = time.perf_counter()
        with torch.no_grad():
            seq = hf.generate(
                **hf_inputs,
                do_sample=True,
                num_return_sequences=g,
                max_new_tokens=n,
                temperature=1.0,
                top_k=50,
                top_p=1.0,
                eos_token_id=None,
                pad_token_id=0,
            )
        dt = time.perf_counter() - t0
        assert seq.shape == (rows, ids.shape[1] + n), seq.shape
        return dt

    print(
        f"model: {n_params / 1e6:.1f}M parameters (vocab {vocab}, width {_WIDTH.value}, "
        f"{_LAYERS.value} layers), {_PROMPTS.value} prompts x {g} samples x {new} new tokens = "
        f"{total} tokens/call, prompt length {ids.shape[1]} ({grid[0] * grid[1] // 4} image "
        f"tokens), jax {jax.__version__} on {jax.devices()[0].platform}, torch threads "
        f"{torch.get_num_threads()}"
    )
    t0 = time.perf_counter()
    run_ours(new, 0), run_ours(1, 0)
    print(f"ours warm-up (compile + run): {time.perf_counter() - t0:.1f}s")
    run_hf(new, 0), run_hf(1, 0)
    calls = {  # round r draws with seed r + 1 (the warm-up used 0)
        "ours": lambda r: run_ours(new, r + 1),
        "hf": lambda r: run_hf(new, r + 1),
        "ours_1": lambda r: run_ours(1, r + 1),
        "hf_1": lambda r: run_hf(1, r + 1),
    }
    med = peer.interleaved_medians(
        calls,
        lambda r, s: (
            f"  repeat {r}: ours {s['ours']:.3f}s (prefill {s['ours_1']:.3f}s), "
            f"transformers {s['hf']:.3f}s (prefill {s['hf_1']:.3f}s)"
        ),
    )
    _report(med, total, new)


if __name__ == "__main__":
    app.run(main)
