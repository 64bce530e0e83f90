"""Throughput of the GRPO input pipeline (examples/s), grain workers vs in-process.

    python benchmarks/bench_data.py --workers=2 --batches=30

Reads the embedded synthetic set (``tatar_jax.data.synthetic``; built on first use under
``--root``), runs the GRPO pipeline (image decode + resize/patchify, prompt tokens, mRoPE, bucketed
collation) for ``--batches`` batches after one warm-up batch, with ``--workers`` worker processes
and with 0 (in-process threads), alternating ``--repeats`` times, and prints examples/s of each
run, the medians and their ratio. Numbers depend on the host's free cores: the peer is the same
pipeline without worker processes, in the same run.
"""

from __future__ import annotations

import os
import statistics
import tempfile
import time

from absl import app, flags

_WORKERS = flags.DEFINE_integer("workers", 2, "grain worker processes for the measured run")
_BATCHES = flags.DEFINE_integer("batches", 30, "timed batches per run (after 1 warm-up batch)")
_BATCH = flags.DEFINE_integer("batch_size", 16, "prompts per batch (reference: 16 per step)")
_ROOT = flags.DEFINE_string("root", "", "synthetic data folder (default: a temp dir)")
_MAX_PIXELS = flags.DEFINE_integer("max_pixels", 1572864, "image budget (spec §3)")
_THREADS = flags.DEFINE_integer("read_threads", 2, "map threads per process")
_IMAGE_SIZE = flags.DEFINE_integer("image_size", 128, "long side of the synthetic images")
_REPEATS = flags.DEFINE_integer("repeats", 3, "alternating runs of each setting; medians shown")


def _sources(root: str):
    from tatar_jax.data import pipeline as pl
    from tatar_jax.data import synthetic

    specs = synthetic.ensure_synthetic(root, image_size=_IMAGE_SIZE.value)
    return pl.sources_from_synthetic(specs, split="train")


def _run(sources, workers: int) -> tuple[float, int, int]:
    from tatar_jax.data import pipeline as pl

    opts = pl.PipelineOptions(
        stage="grpo",
        batch_size=_BATCH.value,
        seq_buckets=(512, 1024, 2048, 4096),
        num_epochs=None,
        worker_count=workers,
        read_threads=_THREADS.value,
        max_pixels=_MAX_PIXELS.value,
        process_index=0,
        process_count=1,
    )
    it = iter(pl.make_dataset(sources, opts))
    next(it)  # warm-up: worker start, tokenizer load
    t0 = time.perf_counter()
    n = 0
    tokens = 0
    for _ in range(_BATCHES.value):
        b = next(it)
        n += int(b["valid"].sum())
        tokens += int(b["attention_mask"].sum())
    dt = time.perf_counter() - t0
    if hasattr(it, "close"):
        it.close()
    return n / dt, n, tokens


def main(argv):
    del argv
    root = _ROOT.value or os.path.join(
        tempfile.gettempdir(), f"tatar_jax_synthetic_{_IMAGE_SIZE.value}"
    )
    sources = _sources(root)
    print(
        f"synthetic set at {root}: "
        + ", ".join(f"{s.name} ({s.task}) {len(s.records)} records" for s in sources)
    )
    print(
        f"host CPUs: {os.cpu_count()}, batch {_BATCH.value}, {_BATCHES.value} timed batches, "
        f"images {_IMAGE_SIZE.value}px long side"
    )
    ours, peer = [], []
    for r in range(_REPEATS.value):  # alternate, so load drift hits both settings alike
        order = [(_WORKERS.value, ours), (0, peer)]
        for workers, out in order if r % 2 == 0 else order[::-1]:
            rate, n, _ = _run(sources, workers)
            out.append(rate)
            print(f"  run {r}: {workers} workers {rate:8.1f} examples/s ({n} examples)")
    ours_m, peer_m = statistics.median(ours), statistics.median(peer)
    print(f"GRPO pipeline, {_WORKERS.value} workers: {ours_m:8.1f} examples/s (median)")
    print(f"GRPO pipeline, 0 workers: {peer_m:8.1f} examples/s (median)")
    print(f"ratio ({_WORKERS.value} workers / 0 workers): {ours_m / peer_m:.2f}x")


if __name__ == "__main__":
    app.run(main)
