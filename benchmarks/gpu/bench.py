"""One-shot accelerator benchmark (≤ 8 minutes on one H200): attention kernels, the 3B GRPO
update, rollout decode bandwidth and compile times. Random weights (no checkpoint needed).

    benchmarks/gpu/run.sh [--out=gpu_bench.json] [--sections=attention,update,rollout]
    benchmarks/gpu/run.sh --dry_run   # the same code on CPU with tiny shapes (a test runs it)

The JSON file is rewritten after every section (``sections.<name>``; a failing section records
its ``error`` and the run goes on), so a run cut short still leaves what it measured:

- ``attention``: per shape (decoder 3B / 7B at L = T = 2,304, B = 4 and 16, bf16, causal with
  left padding; vision full-attention frames and windows, right-padded groups) and per
  implementation this backend runs (``xla`` = reference, ``chunked``, ``cudnn`` on NVIDIA GPUs):
  median forward and forward+backward seconds (interleaved repeats), their ratio to ``xla``, the
  compiled temporary bytes (``memory_analysis``), the max |difference| to ``xla`` of the output
  and of the gradients on the queries that see a key.
- ``update``: the 3B GRPO update (16 rows = 2 prompts x 8, 2,048-token prompt with 1,024 image
  tokens, 256 completion tokens, bf16 compute, f32 parameters, AdamW): median step seconds,
  tokens/s, MFU from the analytic FLOP count (``flop_model.flops_per_token``) and from XLA's
  ``cost_analysis`` of the compiled step, measured peak device memory against the compiled
  program's memory analysis (the figure ``scripts/plan_memory.py`` reports).
- ``rollout``: 3B and 7B bf16 sampling on one device: decode tokens/s and achieved HBM GB/s
  (weights + KV cache read per decode step) against the 4.8 TB/s of an H200.
- ``compile``: every compile time above, in one place.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import pathlib
import statistics
import sys
import time
import traceback
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

H200_HBM_BYTES_PER_S = 4.8e12
SECTIONS = ("attention", "update", "rollout")


# --- shapes ---------------------------------------------------------------------------------------


def attention_shapes(dry: bool) -> list[dict[str, Any]]:
    """Decoder (causal, GQA, left padding) and vision (groups, right padding) shapes."""
    if dry:
        return [
            dict(name="decoder_tiny", b=2, length=64, heads=4, kv=2, hd=16, causal=True),
            dict(name="vision_tiny", b=4, length=32, heads=2, kv=2, hd=16, causal=False),
        ]
    out = []
    for model, heads, kv in (("3b", 16, 2), ("7b", 28, 4)):
        for b in (4, 16):
            out.append(
                dict(name=f"decoder_{model}_b{b}", b=b, length=2304, heads=heads, kv=kv, hd=128,
                     causal=True)
            )  # fmt: skip
    # 16 images of 1,024 merged tokens = 4,096 patches: frames (full attention) and 8x8 windows.
    out.append(dict(name="vision_full", b=16, length=4096, heads=16, kv=16, hd=80, causal=False))
    out.append(dict(name="vision_window", b=1024, length=64, heads=16, kv=16, hd=80, causal=False))
    return out


def _attention_inputs(s: dict[str, Any], dtype: Any) -> tuple[Any, ...]:
    rng = np.random.default_rng(0)
    b, n = s["b"], s["length"]
    q = jnp.asarray(rng.normal(size=(b, n, s["heads"], s["hd"])), dtype)
    k = jnp.asarray(rng.normal(size=(b, n, s["kv"], s["hd"])), dtype)
    v = jnp.asarray(rng.normal(size=(b, n, s["kv"], s["hd"])), dtype)
    lengths = rng.integers(n // 2, n + 1, size=b)
    slots = np.arange(n)[None]
    if s["causal"]:  # left-padded prompts followed by right-padded completions
        start = rng.integers(0, n - lengths + 1)
        valid = (slots >= start[:, None]) & (slots < (start + lengths)[:, None])
    else:  # vision groups: real patches first
        valid = slots < lengths[:, None]
    return q, k, v, jnp.asarray(valid)


# --- timing ---------------------------------------------------------------------------------------


def _compile(fn: Callable, *args: Any) -> tuple[Any, float]:
    t0 = time.perf_counter()
    compiled = jax.jit(fn).lower(*args).compile()
    return compiled, time.perf_counter() - t0


def _interleaved(fns: dict[str, Callable[[], Any]], repeats: int) -> dict[str, float]:
    """Median seconds of each thunk, run in interleaved rounds (after one warm-up each)."""
    for f in fns.values():
        jax.block_until_ready(f())
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(repeats):
        for k, f in fns.items():
            t0 = time.perf_counter()
            jax.block_until_ready(f())
            times[k].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in times.items()}


def _temp_bytes(compiled: Any) -> int | None:
    m = compiled.memory_analysis()
    return None if m is None else int(m.temp_size_in_bytes)


def _backend_impls() -> list[str]:
    from tatar_jax.models import layers

    out = ["xla", "chunked"]
    try:
        layers.resolve_attention_impl("cudnn", jnp.bfloat16)
        out.append("cudnn")
    except ValueError:
        pass
    return out


# --- sections -------------------------------------------------------------------------------------


def _attend(q, k, v, valid, pos, impl, right_padded):
    from tatar_jax.models import layers

    return layers.attention(q, k, v, valid, q_positions=pos, impl=impl, right_padded=right_padded)


def _attend_grads(q, k, v, valid, pos, impl, right_padded, w):
    def loss(q, k, v):
        return (_attend(q, k, v, valid, pos, impl, right_padded).astype(jnp.float32) * w).sum()

    return jax.grad(loss, (0, 1, 2))(q, k, v)


def _attention_shape(s, impls, dtype, repeats, compile_log):
    """Every implementation on one shape: compile, interleaved timing, differences to xla."""
    q, k, v, valid = _attention_inputs(s, dtype)
    pos = jnp.arange(s["length"]) if s["causal"] else None
    seen = valid if s["causal"] else jnp.ones_like(valid)  # queries with a visible key
    w = jnp.where(seen[:, :, None, None], 1.0, 0.0).astype(jnp.float32)
    row: dict[str, Any] = {"shape": s, "impls": {}}
    fwd, bwd, outs = {}, {}, {}
    for impl in impls:
        kw = dict(valid=valid, pos=pos, impl=impl, right_padded=not s["causal"])
        cf, tf = _compile(functools.partial(_attend, **kw), q, k, v)
        cg, tg = _compile(functools.partial(_attend_grads, w=w, **kw), q, k, v)
        compile_log[f"attention/{s['name']}/{impl}/fwd"] = round(tf, 2)
        compile_log[f"attention/{s['name']}/{impl}/fwd_bwd"] = round(tg, 2)
        fwd[impl] = functools.partial(cf, q, k, v)
        bwd[impl] = functools.partial(cg, q, k, v)
        outs[impl] = (fwd[impl](), bwd[impl]())
        row["impls"][impl] = {
            "temp_bytes_fwd": _temp_bytes(cf),
            "temp_bytes_fwd_bwd": _temp_bytes(cg),
        }
    t_f, t_b = _interleaved(fwd, repeats), _interleaved(bwd, repeats)
    ref_o, ref_g = outs["xla"]
    for impl in impls:
        o, grads = outs[impl]
        d_out = jnp.abs((o - ref_o).astype(jnp.float32)) * seen[:, :, None, None]
        d_grad = max(
            float(jnp.abs((a - b).astype(jnp.float32)).max())
            for a, b in zip(grads, ref_g, strict=True)
        )
        row["impls"][impl].update(
            fwd_s=t_f[impl], fwd_bwd_s=t_b[impl],
            fwd_speedup_vs_xla=t_f["xla"] / t_f[impl],
            fwd_bwd_speedup_vs_xla=t_b["xla"] / t_b[impl],
            max_abs_diff_out=float(d_out.max()), max_abs_diff_grad=d_grad,
        )  # fmt: skip
    return row


def bench_attention(dry: bool, compile_log: dict[str, float]) -> dict[str, Any]:
    dtype = jnp.float32 if dry else jnp.bfloat16
    repeats = 2 if dry else 5
    impls = _backend_impls()
    results = [
        _attention_shape(s, impls, dtype, repeats, compile_log) for s in attention_shapes(dry)
    ]
    return {"dtype": jnp.dtype(dtype).name, "impls": impls, "repeats": repeats, "results": results}


def _random_model(config: Any, dtype: Any, param_dtype: Any, seed: int = 0, **kw: Any) -> Any:
    """A model of ``config`` with random N(0, 0.02) weights made on device in one jitted call
    (norm scales 1): eager per-layer initialisation of billions of parameters is slow."""
    from flax import nnx

    from tatar_jax import loading

    if jax.default_backend() == "cpu":  # --dry_run: a tiny model initialises eagerly in no time
        return loading.build_model(config, dtype=dtype, param_dtype=param_dtype, seed=seed, **kw)
    model = loading.build_model(config, dtype=dtype, param_dtype=param_dtype, abstract=True, **kw)
    graphdef, state = nnx.split(model)
    leaves, treedef = jax.tree.flatten(state)

    @jax.jit
    def init(key):
        keys = jax.random.split(key, len(leaves))
        return [
            jnp.ones(x.shape, x.dtype) if len(x.shape) == 1 and "scale" in p else
            (0.02 * jax.random.normal(k, x.shape, jnp.float32)).astype(x.dtype)
            for x, k, p in zip(leaves, keys, _leaf_paths(state), strict=True)
        ]  # fmt: skip

    return nnx.merge(graphdef, jax.tree.unflatten(treedef, init(jax.random.key(seed))))


def _leaf_paths(state: Any) -> list[str]:
    return ["/".join(str(getattr(k, "key", k)) for k in p) for p, _ in
            jax.tree_util.tree_flatten_with_path(state)[0]]  # fmt: skip


def _prompts(cfg: Any, prompts: int, prompt_len: int, image_tokens: int, seed: int = 0):
    """Left-padded prompts (one image each) with HF positions and pixel values."""
    from tatar_jax.models import qwen2_5_vl as qvl

    rng = np.random.default_rng(seed)
    m = cfg.vision.spatial_merge_size
    side = int(np.sqrt(image_tokens))
    grid = np.asarray([[1, side * m, image_tokens // side * m]] * prompts, np.int64)
    ids = np.zeros((prompts, prompt_len), np.int32)
    mask = np.zeros((prompts, prompt_len), np.int32)
    for i in range(prompts):
        text = prompt_len - image_tokens - 2 - 16 * i  # different lengths: left padding
        row = [*rng.integers(3, 200, text // 2), cfg.vision_start_token_id,
               *[cfg.image_token_id] * image_tokens, cfg.vision_end_token_id,
               *rng.integers(3, 200, text - text // 2)]  # fmt: skip
        ids[i, prompt_len - len(row) :], mask[i, prompt_len - len(row) :] = row, 1
    pos, deltas = qvl.get_rope_index(ids, grid, mask, cfg)
    patches = int(grid.prod(-1).sum())
    pv = rng.standard_normal((patches, 3 * 2 * 14 * 14)).astype(np.float32)
    return {"input_ids": ids, "attention_mask": mask, "position_ids": np.asarray(pos, np.int32),
            "rope_deltas": np.asarray(deltas, np.int32).reshape(-1, 1), "pixel_values": pv,
            "image_grid_thw": grid}  # fmt: skip


def _update_setup(dry: bool) -> tuple[Any, dict[str, Any], dict[str, int]]:
    from tatar_jax.models import qwen2_5_vl as qvl

    if dry:
        return qvl.tiny(), dict(prompts=2, g=2, prompt_len=48, image_tokens=16, new=16), {}
    return qvl.preset("3b"), dict(prompts=2, g=8, prompt_len=2048, image_tokens=1024, new=256), {}


def bench_update(dry: bool, compile_log: dict[str, float]) -> dict[str, Any]:
    import optax

    from tatar_jax.train import flop_model, grpo_step, optim
    from tatar_jax.train import inputs as step_inputs

    cfg, s, _ = _update_setup(dry)
    dtype = jnp.float32 if dry else jnp.bfloat16
    model = _random_model(cfg, dtype, jnp.float32, remat=None if dry else "full",
                          vision_remat=None if dry else "full")  # fmt: skip
    batch = _prompts(cfg, s["prompts"], s["prompt_len"], s["image_tokens"])
    n = s["prompts"] * s["g"]
    rng = np.random.default_rng(1)
    tokens = rng.integers(3, 200, size=(n, s["new"])).astype(np.int32)
    cmask = np.arange(s["new"])[None] < rng.integers(s["new"] // 2, s["new"] + 1, size=(n, 1))
    from tatar_jax import generate, grpo
    from tatar_jax.data.batch import vision_inputs

    # The raw prompts' layout, as a pipeline batch carries it.
    prompts = generate.PromptBatch(
        batch["input_ids"], batch["attention_mask"], batch["position_ids"], batch["rope_deltas"],
        vision_inputs(batch["pixel_values"], batch["image_grid_thw"], cfg.vision),
    )  # fmt: skip
    inputs = step_inputs.grpo_batch(
        prompts, np.zeros(s["prompts"], np.int32), tokens, cmask,
        cmask.astype(np.float32), rng.standard_normal(n).astype(np.float32), cfg.image_token_id,
    )  # fmt: skip
    ref = rng.normal(-11.0, 0.5, size=(n, s["new"])).astype(np.float32)
    inputs = jax.tree.map(jnp.asarray, inputs.replace(rows=inputs.rows.replace(ref_logps=ref)))
    from flax import nnx

    graphdef, params = nnx.split(model)
    tx = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(1e-6, weight_decay=0.0))
    state = optim.TrainState.create(params, tx, jax.random.key(0))
    step = jax.jit(
        grpo_step.make_grpo_step(graphdef, tx, loss=grpo.LossConfig(beta=0.04), chunk_size=1024),
        donate_argnums=(0,),
    )
    t0 = time.perf_counter()
    compiled = step.lower(state, inputs).compile()
    compile_log["update/3b" if not dry else "update/tiny"] = round(time.perf_counter() - t0, 2)
    mem = compiled.memory_analysis()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    times = []
    for _ in range(2 if dry else 4):  # the first call is a warm-up
        t0 = time.perf_counter()
        state, m = compiled(state, inputs)
        jax.block_until_ready(m)
        times.append(time.perf_counter() - t0)
    sec = statistics.median(times[1:])
    seq = s["prompt_len"] + s["new"]
    tokens_per_step = n * seq
    fpt = flop_model.flops_per_token(
        _asdict(cfg.text), _asdict(cfg.vision), seq,
        patches_per_seq=4 * s["image_tokens"] // s["g"],  # one image per G rows
    )  # fmt: skip
    peak = flop_model.peak_flops()
    xla_flops = float(cost.get("flops", 0.0)) if cost else 0.0
    planned = (mem.argument_size_in_bytes + mem.output_size_in_bytes - mem.alias_size_in_bytes
               + mem.temp_size_in_bytes) if mem is not None else None  # fmt: skip
    stats = jax.devices()[0].memory_stats() or {}
    return {
        "model": "tiny" if dry else "3b", **s, "rows": n, "dtype": jnp.dtype(dtype).name,
        "step_s": sec, "tokens_per_s": tokens_per_step / sec, "loss": float(m["loss"]),
        "analytic_flops_per_step": fpt * tokens_per_step, "xla_cost_analysis_flops": xla_flops,
        "mfu_analytic": None if peak is None else fpt * tokens_per_step / sec / peak,
        "mfu_xla_cost_analysis": None if peak is None else xla_flops / sec / peak,
        "peak_flops": peak, "planned_bytes": planned,
        "measured_peak_bytes": stats.get("peak_bytes_in_use"),
    }  # fmt: skip


def _asdict(x: Any) -> dict[str, Any]:
    import dataclasses

    return dataclasses.asdict(x)


def bench_rollout(dry: bool, compile_log: dict[str, float]) -> dict[str, Any]:
    from tatar_jax import generate
    from tatar_jax.models import qwen2_5_vl as qvl

    models = [("tiny", qvl.tiny())] if dry else [("3b", qvl.preset("3b")), ("7b", qvl.preset("7b"))]
    dtype = jnp.float32 if dry else jnp.bfloat16
    prompts, g, plen, img, new = (1, 2, 32, 16, 4) if dry else (4, 8, 2048, 1024, 256)
    out = []
    for name, cfg in models:
        model = _random_model(cfg, dtype, dtype)
        batch = _prompts(cfg, prompts, plen, img)
        args = (batch["input_ids"], batch["attention_mask"], batch["pixel_values"],
                batch["image_grid_thw"])  # fmt: skip
        secs = {}
        for steps in (1, new):
            sp = generate.SamplingParams(
                max_new_tokens=steps, num_samples=g, temperature=1.0, stop_token_ids=()
            )
            sampler = generate.Sampler(model, sp)
            t0 = time.perf_counter()
            jax.block_until_ready(sampler(*args, rng=jax.random.key(0)))
            compile_log[f"rollout/{name}/new{steps}_first_call"] = round(
                time.perf_counter() - t0, 2
            )
            runs = []
            for r in range(2 if dry else 3):
                t0 = time.perf_counter()
                jax.block_until_ready(sampler(*args, rng=jax.random.key(r + 1)))
                runs.append(time.perf_counter() - t0)
            secs[steps] = statistics.median(runs)
        rows = prompts * g
        per_step = (secs[new] - secs[1]) / (new - 1)
        weights = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(model))
        t = cfg.text
        kv_per_slot = (
            2 * t.num_hidden_layers * t.num_key_value_heads * t.head_dim * jnp.dtype(dtype).itemsize
        )
        # a decode step reads the weights once and the KV cache (on average half-way filled)
        read = weights + rows * kv_per_slot * (plen + new / 2)
        out.append({
            "model": name, "rows": rows, "prompt_len": plen, "new_tokens": new,
            "call_s": secs[new], "prefill_plus_one_s": secs[1], "decode_step_s": per_step,
            "decode_tokens_per_s": rows / per_step, "weights_bytes": weights,
            "bytes_read_per_step": read, "achieved_bytes_per_s": read / per_step,
            "fraction_of_4.8TB_s": read / per_step / H200_HBM_BYTES_PER_S,
        })  # fmt: skip
    return {"dtype": jnp.dtype(dtype).name, "results": out}


# --- driver ---------------------------------------------------------------------------------------


def _write(path: pathlib.Path, report: dict[str, Any]) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(report, indent=1, default=str) + "\n")
    os.replace(tmp, path)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=os.path.join(os.environ.get("OUT", "."), "gpu_bench.json"))
    p.add_argument("--sections", default=",".join(SECTIONS))
    p.add_argument("--dry_run", action="store_true", help="CPU, tiny shapes: checks the code")
    a = p.parse_args(argv)
    sections = [x for x in a.sections.split(",") if x]
    bad = sorted(set(sections) - set(SECTIONS))
    if bad:
        print(f"--sections: unknown {bad}; choose from {list(SECTIONS)}", file=sys.stderr)
        return 2
    if a.dry_run:
        jax.config.update("jax_platforms", "cpu")
    out = pathlib.Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    dev = jax.devices()[0]
    compile_log: dict[str, float] = {}
    report: dict[str, Any] = {
        "dry_run": a.dry_run, "jax": jax.__version__, "backend": jax.default_backend(),
        "device_kind": dev.device_kind,
        "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "sections": {}, "compile": compile_log,
    }  # fmt: skip
    fns = {"attention": bench_attention, "update": bench_update, "rollout": bench_rollout}
    t_all = time.perf_counter()
    for name in sections:
        t0 = time.perf_counter()
        try:
            result = fns[name](a.dry_run, compile_log)
        except Exception as err:  # noqa: BLE001 - one failing section must not lose the others
            result = {"error": f"{type(err).__name__}: {err}", "traceback": traceback.format_exc()}
        result["section_s"] = round(time.perf_counter() - t0, 2)
        report["sections"][name] = result
        report["total_s"] = round(time.perf_counter() - t_all, 2)
        _write(out, report)
        print(f"[gpu-bench] {name}: {result['section_s']} s"
              + (f" ERROR {result['error']}" if "error" in result else ""), flush=True)  # fmt: skip
    print(f"[gpu-bench] wrote {out}", flush=True)
    return 1 if any("error" in r for r in report["sections"].values()) else 0


if __name__ == "__main__":
    sys.exit(main())
