"""Evaluation throughput: images/s of ``scripts/eval.py``'s scoring loop vs transformers
``generate`` on the same random model and images (greedy K = 1, sampled K = 8).

    python benchmarks/bench_eval.py                      # 16 images, batches of 8, 64 new tokens
    python benchmarks/bench_eval.py --images=32 --new_tokens=128 --repeats=5

The model is the embedded default's random Qwen2.5-VL (``qvl.preset("embedded")`` with the
embedded tokenizer's vocabulary and token ids, float32), written once as an HF directory and
loaded by both engines from it. The images are random RGB pictures (``--image_size``), scored for
IQA with the evaluation prompt. Both engines run the same scoring loop per batch of
``--batch_size`` images: the same host preprocessing and prompts
(:func:`tatar_jax.evaluation.predict.prompt_examples` / ``eval_prompts``: the HF-equal image
processor, the chat template), then generation, then decoding and strict answer parsing.

* ours: :func:`tatar_jax.evaluation.predict.make_predict_fn` (what ``eval.py`` runs): one
  prefill per image, K decode rows on its KV (``Sampler.generate_prompts``);
* transformers: ``Qwen2_5_VLForConditionalGeneration.generate`` on the same ids / pixels
  (``num_return_sequences=K``: each image is encoded and each prompt prefilled K times), sdpa
  attention, ``--torch_threads``.

Greedy: both decode the same tokens (stop at ``<|im_end|>``); K = 8: temperature 1.0, top-k 50,
independent draws, so the engines stop at different steps: the generated tokens of each are
printed beside the times. After one warm-up call of each (ours compiles there) ``--repeats``
timed passes over all images alternate between the engines (same machine load); medians and the
ratio ours / transformers (images/s) are printed.
"""

from __future__ import annotations

import os
import sys
import tempfile
import time
import types
from collections.abc import Callable

import peer
from absl import app, flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

_IMAGES = flags.DEFINE_integer("images", 16, "images scored per pass")
_BATCH = flags.DEFINE_integer("batch_size", 8, "images per generate call (eval.batch_size)")
_NEW = flags.DEFINE_integer("new_tokens", 64, "max new tokens per completion")
_SIZE = flags.DEFINE_integer("image_size", 224, "image side in pixels (random RGB)")
_SAMPLES = flags.DEFINE_list("num_samples", ["1", "8"], "K values (1 = greedy)")
flags.adopt_module_key_flags(peer)  # --repeats, --torch_threads in --help


def _records(n: int, size: int) -> list[dict]:
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    return [
        {
            "pil_image": Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)),
            "task": "iqa",
            "gt_100": float(rng.uniform(0, 100)),
            "row_id": i,
            "image": f"{i}.png",
        }
        for i in range(n)
    ]


def _ev(k: int, batch: int, new: int) -> types.SimpleNamespace:
    return types.SimpleNamespace(
        batch_size=batch, max_new_tokens=new, min_pixels=3136, max_pixels=1_572_864,
        prompt_variant="reference_eval", num_samples=k, temperature=0.0 if k == 1 else 1.0,
        top_k=0 if k == 1 else 50, top_p=1.0, constrained_answer=False,
    )  # fmt: skip


def _models(tmp: str):
    """(our model, the transformers model, tokenizer) from one HF directory."""
    import jax.numpy as jnp
    import torch
    from flax import nnx
    from transformers import Qwen2_5_VLForConditionalGeneration as HF

    from tatar_jax import loading
    from tatar_jax.data import embedded_tokenizer
    from tatar_jax.models import qwen2_5_vl as qvl

    tok = embedded_tokenizer.load()
    cfg = loading.embedded_config(tok, "embedded")
    model = qvl.Qwen2_5_VLForConditionalGeneration(cfg, rngs=nnx.Rngs(0), dtype=jnp.float32)
    qvl.save_hf_checkpoint(model, tmp, dtype=jnp.float32)
    ours = qvl.load_hf_checkpoint(tmp, dtype=jnp.float32)
    hf = HF.from_pretrained(tmp, torch_dtype=torch.float32, attn_implementation="sdpa").eval()
    return ours, hf, tok


def _hf_predict(hf, model_cfg, tok, ev):
    """transformers' scoring loop of one batch: the same prompts, ``generate``, decoding."""
    import numpy as np
    import torch

    from tatar_jax.data import examples
    from tatar_jax.evaluation import predict

    rope_cfg = examples.RopeConfig.from_tokenizer(tok, 2)
    counted = {"tokens": 0}

    def fn(records):
        exs, _ = predict.prompt_examples(records, tok, ev, rope_cfg, 2)
        batch = examples.collate(
            exs, pad_id=tok.pad_id, seq_buckets=None, padding_side="left",
            batch_size=len(exs),
        )  # fmt: skip
        n_patch = batch.num_patches
        ids = torch.from_numpy(np.asarray(batch.input_ids).astype(np.int64))
        kw = dict(do_sample=False) if ev.num_samples == 1 else dict(
            do_sample=True, temperature=ev.temperature, top_k=ev.top_k, top_p=1.0)  # fmt: skip
        with torch.no_grad():
            seq = hf.generate(
                input_ids=ids,
                attention_mask=torch.from_numpy(np.asarray(batch.attention_mask, np.int64)),
                pixel_values=torch.from_numpy(np.asarray(batch.vision.pixel_values)[:n_patch]),
                image_grid_thw=torch.from_numpy(np.asarray(batch.image_grid_thw, np.int64)),
                mm_token_type_ids=(ids == model_cfg.image_token_id).long(),
                max_new_tokens=ev.max_new_tokens, num_return_sequences=ev.num_samples,
                eos_token_id=list(tok.eos_ids), pad_token_id=tok.pad_id, **kw,
            )  # fmt: skip
        new = seq[:, ids.shape[1] :].numpy()
        keep = np.cumsum(np.isin(new, tok.eos_ids), axis=1) - np.isin(new, tok.eos_ids) == 0
        counted["tokens"] += int(keep.sum())
        return tok.decode_batch([r[m].tolist() for r, m in zip(new, keep, strict=True)])

    return fn, counted


def _ours_predict(model, tok, ev, seed):
    import numpy as np

    from tatar_jax import generate
    from tatar_jax.evaluation import predict

    sampler = generate.Sampler(model, predict.sampling_params(ev, tok))
    counted = {"tokens": 0}

    class Counting:
        params = sampler.params

        def generate_prompts(self, prompts, **kw):
            out = sampler.generate_prompts(prompts, **kw)
            counted["tokens"] += int(np.asarray(out.mask).sum())
            return out

    fn = predict.make_predict_fn(
        model, tok, ev, mesh=None, rules=None, sampler=Counting(), seed=seed
    )
    return fn, counted


def _pass(fn, records, batch: int) -> float:
    """One timed pass of the scoring loop: predict, then strict parsing of every completion."""
    from tatar_jax.evaluation import scoring

    t0 = time.perf_counter()
    for i in range(0, len(records), batch):
        for out in fn(records[i : i + batch]):
            for text in getattr(out, "texts", None) or [out]:
                scoring.score_completion(text, "iqa")
    return time.perf_counter() - t0


def _timed_pass(fn, records, batch: int) -> Callable[[int], float]:
    """One round's pass of ``fn`` over ``records`` (:func:`_pass`; the round index is unused)."""
    return lambda r: _pass(fn, records, batch)


def main(argv: list[str]) -> None:
    del argv
    import jax
    import torch

    peer.set_torch_threads()
    records = _records(_IMAGES.value, _SIZE.value)
    ks = [int(k) for k in _SAMPLES.value]
    with tempfile.TemporaryDirectory() as tmp:
        ours, hf, tok = _models(tmp)
    n_params = sum(p.numel() for p in hf.parameters())
    engines = {}
    for k in ks:
        ev = _ev(k, _BATCH.value, _NEW.value)
        engines[("ours", k)] = _ours_predict(ours, tok, ev, seed=0)
        engines[("hf", k)] = _hf_predict(hf, ours.config, tok, ev)
    print(
        f"model: the embedded preset, {n_params / 1e6:.2f}M parameters (vocab "
        f"{ours.config.text.vocab_size}), float32; {_IMAGES.value} images of {_SIZE.value}px, "
        f"batches of {_BATCH.value}, up to {_NEW.value} new tokens; jax {jax.__version__} on "
        f"{jax.devices()[0].platform}, torch threads {torch.get_num_threads()}, "
        f"{os.cpu_count()} CPUs"
    )
    t0 = time.perf_counter()
    for fn, counted in engines.values():  # warm-up (ours compiles here)
        _pass(fn, records[: _BATCH.value], _BATCH.value)
        counted["tokens"] = 0
    print(f"warm-up: {time.perf_counter() - t0:.1f}s")
    passes = {key: _timed_pass(fn, records, _BATCH.value) for key, (fn, _) in engines.items()}
    medians = peer.interleaved_medians(
        passes,
        lambda r, s: f"  repeat {r} " + " ".join(f"{e}/K={k} {t:.2f}s" for (e, k), t in s.items()),
    )
    repeats = peer.REPEATS.value
    print(f"{'':28} {'median s':>9} {'images/s':>9} {'tokens/pass':>12}")
    for k in ks:
        med = {e: medians[(e, k)] for e in ("ours", "hf")}
        for e, name in (("ours", "eval.py scoring loop"), ("hf", "transformers generate")):
            toks = engines[(e, k)][1]["tokens"] / repeats
            print(f"{name + f' K={k}':28} {med[e]:9.3f} {_IMAGES.value / med[e]:9.2f} {toks:12.0f}")
        print(
            f"ratio K={k} (ours / transformers, images/s): {med['hf'] / med['ours']:.2f}x "
            f"(medians of {repeats} interleaved repeats)"
        )


if __name__ == "__main__":
    app.run(main)
