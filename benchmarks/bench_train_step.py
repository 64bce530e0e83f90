"""GRPO update step (forward + backward + loss + AdamW): tatar-jax (jitted) vs transformers + torch.

Same random Qwen2.5-VL config (tens of millions of parameters, the real 151,936-token vocabulary),
same weights (written by transformers, read by ``load_hf_checkpoint``), same batch (N completions =
prompts x G, each prompt with one image), same loss (spec §7.3: token log-probs of the completion,
k3 KL to fixed reference log-probs, beta = 0.04, mu = 1, per-sequence token mean then batch mean),
float32 on CPU. One run, both sides in the same process, their repeats interleaved; prints the
median tokens/s of each and the ratio.

    python benchmarks/bench_train_step.py [--hidden=256 --layers=4 --prompts=2 --group=4 \\
        --completion=64 --steps=3]

torch runs the vision tower on every completion row (that is what an HF model does with G copies
of a prompt); ours runs it once per image per step and gathers the features
(``inputs.accumulate_with_features``), and scores only the completion tokens with the lm_head.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

import numpy as np

VOCAB = 151_936
IMAGE_ID, VSTART, VEND, PAD = 151_655, 151_652, 151_653, 151_643
PAUSE_S = 1.0


def hf_config(a):
    from transformers import Qwen2_5_VLConfig

    text = dict(
        vocab_size=VOCAB, hidden_size=a.hidden, intermediate_size=a.hidden * 11 // 4,
        num_hidden_layers=a.layers, num_attention_heads=a.hidden // 64,
        num_key_value_heads=max(1, a.hidden // 256), rms_norm_eps=1e-6,
        max_position_embeddings=4096, hidden_act="silu",
        rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": [8, 12, 12]},
        bos_token_id=PAD, eos_token_id=151_645, pad_token_id=PAD,
    )  # fmt: skip
    vision = dict(
        depth=4, hidden_size=128, intermediate_size=256, num_heads=2, in_channels=3,
        patch_size=14, spatial_merge_size=2, temporal_patch_size=2, window_size=112,
        fullatt_block_indexes=[1, 3], out_hidden_size=a.hidden, hidden_act="silu",
        tokens_per_second=2,
    )  # fmt: skip
    cfg = Qwen2_5_VLConfig(
        text_config=text, vision_config=vision, image_token_id=IMAGE_ID, video_token_id=151_656,
        vision_start_token_id=VSTART, vision_end_token_id=VEND, tie_word_embeddings=True,
    )  # fmt: skip
    for c in (cfg, cfg.text_config, cfg.vision_config):
        c._attn_implementation = "sdpa"
    return cfg


def make_batch(a, rng):
    """Prompts (B, Lp) left-padded with one image each, completions (N, T), masks, advantages."""
    grid = np.array([1, a.image_patches, a.image_patches])
    n_img = int(grid.prod()) // 4
    prompts = []
    for b in range(a.prompts):
        pre = rng.integers(100, 50_000, size=8 + 3 * b).tolist()
        post = rng.integers(100, 50_000, size=12).tolist()
        prompts.append(pre + [VSTART] + [IMAGE_ID] * n_img + [VEND] + post)
    lp = max(len(p) for p in prompts)
    ids = np.full((a.prompts, lp), PAD, np.int32)
    mask = np.zeros((a.prompts, lp), np.int32)
    for b, p in enumerate(prompts):
        ids[b, lp - len(p) :] = p
        mask[b, lp - len(p) :] = 1
    n = a.prompts * a.group
    tokens = rng.integers(100, 50_000, size=(n, a.completion)).astype(np.int32)
    lengths = rng.integers(a.completion // 2, a.completion + 1, size=n)
    cmask = np.arange(a.completion)[None] < lengths[:, None]
    pv = rng.normal(size=(a.prompts * int(grid.prod()), 1176)).astype(np.float32)
    grids = np.tile(grid, (a.prompts, 1)).astype(np.int32)
    adv = rng.normal(size=n).astype(np.float32)
    ref = rng.normal(-11.0, 0.5, size=(n, a.completion)).astype(np.float32)
    return ids, mask, tokens, cmask, pv, grids, adv, ref


def torch_step(hf, a, batch):
    import torch

    ids, mask, tokens, cmask, pv, grids, adv, ref = batch
    g, t = a.group, a.completion
    full_ids = torch.from_numpy(np.concatenate([np.repeat(ids, g, 0), tokens], 1)).long()
    full_mask = torch.from_numpy(
        np.concatenate([np.repeat(mask, g, 0), cmask.astype(np.int32)], 1)
    ).long()
    per_img = pv.shape[0] // a.prompts
    pv_rows = torch.from_numpy(
        np.concatenate(
            [np.tile(pv[b * per_img : (b + 1) * per_img], (g, 1)) for b in range(a.prompts)]
        )
    )
    grid_rows = torch.from_numpy(np.repeat(grids, g, 0)).long()
    cm = torch.from_numpy(cmask.astype(np.float32))
    tgt = torch.from_numpy(tokens).long()
    adv_t = torch.from_numpy(adv)[:, None]
    ref_t = torch.from_numpy(ref)
    opt = torch.optim.AdamW(hf.parameters(), lr=1e-6, weight_decay=0.0)

    def step():
        opt.zero_grad(set_to_none=True)
        out = hf(input_ids=full_ids, attention_mask=full_mask, pixel_values=pv_rows,
                 image_grid_thw=grid_rows, logits_to_keep=t + 1)  # fmt: skip
        logits = out.logits[:, :-1].float()  # positions predicting the T completion tokens
        logp = torch.log_softmax(logits, -1).gather(-1, tgt[..., None])[..., 0]
        ratio = torch.exp(logp - logp.detach())
        d = ref_t - logp
        per_tok = -ratio * adv_t + a.beta * (torch.exp(d) - d - 1)
        loss = ((per_tok * cm).sum(1) / cm.sum(1).clamp(min=1)).mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(hf.parameters(), 1.0)
        opt.step()
        return float(loss)

    return step


def jax_step(hf_dir, a, batch):
    import jax
    import jax.numpy as jnp
    import optax
    from flax import nnx

    from tatar_jax import generate, grpo
    from tatar_jax.data.batch import vision_inputs
    from tatar_jax.models import qwen2_5_vl as qvl
    from tatar_jax.train import grpo_step, optim
    from tatar_jax.train import inputs as step_inputs

    ids, mask, tokens, cmask, pv, grids, adv, ref = batch
    model = qvl.load_hf_checkpoint(hf_dir, jnp.float32, attention_impl=a.attention_impl)
    cfg = model.config
    pos, deltas = qvl.get_rope_index(ids, grids, mask, cfg)
    prompts = generate.PromptBatch(
        ids, mask, np.asarray(pos, np.int32), np.asarray(deltas, np.int32).reshape(-1, 1),
        vision_inputs(np.asarray(pv, np.float32), grids, cfg.vision),
    )  # fmt: skip
    task_id = np.zeros(len(ids), np.int32)
    inputs = step_inputs.grpo_batch(
        prompts, task_id, tokens, cmask, cmask.astype(np.float32), adv, cfg.image_token_id
    )
    inputs = jax.tree.map(jnp.asarray, inputs.replace(rows=inputs.rows.replace(ref_logps=ref)))
    graphdef, params = nnx.split(model)
    tx = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(1e-6, weight_decay=0.0))
    state = jax.tree.map(jnp.copy, optim.TrainState.create(params, tx, jax.random.key(0)))
    fn = jax.jit(
        grpo_step.make_grpo_step(
            graphdef, tx, loss=grpo.LossConfig(beta=a.beta), chunk_size=1024
        ),
        donate_argnums=(0,),
    )
    holder = {"state": state}

    def step():
        holder["state"], m = fn(holder["state"], inputs)
        return float(m["loss"])

    return step, sum(x.size for x in jax.tree.leaves(params))


def timed(steps, n):
    """Median seconds per step of each of ``steps`` (name -> fn), their repeats interleaved so
    that both sides see the same machine load; and each side's last loss."""
    for step in steps.values():
        step()  # compile / warm-up
    times, losses = {k: [] for k in steps}, {}
    for _ in range(n):
        for name, step in steps.items():
            # Let the other runtime's idle worker threads stop spinning first (OpenMP and
            # Eigen spin-wait after a parallel region): they would otherwise steal this step's
            # cores and bill one side for the other's threads.
            time.sleep(PAUSE_S)
            t0 = time.perf_counter()
            losses[name] = step()
            times[name].append(time.perf_counter() - t0)
    return {k: (float(np.median(v)), losses[k]) for k, v in times.items()}


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--prompts", type=int, default=2)
    p.add_argument("--group", type=int, default=4)
    p.add_argument("--completion", type=int, default=64)
    p.add_argument("--image_patches", type=int, default=8)
    p.add_argument("--beta", type=float, default=0.04)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--attention_impl", default="auto", help="ours: xla | chunked | auto")
    a = p.parse_args()

    import torch

    torch.manual_seed(0)
    from transformers import Qwen2_5_VLForConditionalGeneration

    hf = Qwen2_5_VLForConditionalGeneration(hf_config(a)).float().train()
    batch = make_batch(a, np.random.default_rng(0))
    with tempfile.TemporaryDirectory() as d:
        hf.save_pretrained(d)
        ours, n_params = jax_step(d, a, batch)
    theirs = torch_step(hf, a, batch)

    n_tok = a.prompts * a.group * (batch[0].shape[1] + a.completion)
    res = timed({"ours": ours, "torch": theirs}, a.steps)
    (t_ours, l_ours), (t_torch, l_torch) = res["ours"], res["torch"]
    print(
        f"config: hidden {a.hidden}, {a.layers} layers, vocab {VOCAB}, "
        f"{n_params / 1e6:.1f}M params;"
        f" batch {a.prompts} prompts x G={a.group}, {n_tok} tokens/step; "
        f"torch threads {torch.get_num_threads()}, cpus {os.cpu_count()}"
    )
    print(f"loss at update {a.steps + 1}: ours {l_ours:.6f}  torch {l_torch:.6f}")
    print(f"median of {a.steps} interleaved repeats after one warm-up step each")
    print(f"tatar-jax : {t_ours * 1e3:8.1f} ms/step  {n_tok / t_ours:9.1f} tokens/s")
    print(f"torch     : {t_torch * 1e3:8.1f} ms/step  {n_tok / t_torch:9.1f} tokens/s")
    print(f"ratio (ours / torch tokens/s): {t_torch / t_ours:.2f}x")


if __name__ == "__main__":
    main()
