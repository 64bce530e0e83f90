"""The tests' end-to-end runs with the embedded model's own vocabulary vs the full Qwen2.5 one.

The embedded random model's vocabulary follows its tokenizer
(``tatar_jax.loading.embedded_config``): the embedded tokenizer (741 ids, a 768-row lm_head) by
default, Qwen2.5's 151,936 rows when ``--config.data.tokenizer_dir`` names a folder holding the
full Qwen2.5 tokenizer (this script writes one, rebuilt offline). Each timed call is what the
end-to-end tests start as subprocesses: the ``tiny`` SFT run and the ``tiny`` GRPO run
(``configs/sft.py:tiny``, ``configs/grpo.py:tiny``), each in a fresh workdir, start-up and
compilation included. The two vocabularies alternate within every round; prints each round, the
medians and the ratio.

    python benchmarks/bench_embedded_vocab.py --repeats=3
"""

from __future__ import annotations

import os
import pathlib
import shutil
import subprocess
import sys
import tempfile
import time

import peer
from absl import app, flags

_KEEP = flags.DEFINE_bool("keep", False, "keep the run folders (printed) instead of deleting them")

ROOT = pathlib.Path(__file__).resolve().parent.parent
RUNS = (("sft", "configs/sft.py:tiny"), ("grpo", "configs/grpo.py:tiny"))


def write_qwen_tokenizer(folder: pathlib.Path) -> pathlib.Path:
    """``folder`` holding the offline Qwen2.5 rebuild (tokenizer.json, tokenizer_config.json)."""
    from tatar_jax.data import embedded_tokenizer
    from tatar_jax.data import tokenizer as tok_mod

    folder.mkdir(parents=True, exist_ok=True)
    tok_mod.save_tokenizer_folder(
        tok_mod.default_tokenizer_json(), folder, embedded_tokenizer.MODEL_MAX_LENGTH
    )
    return folder


def run_pair(workdir: pathlib.Path, tokenizer_dir: str | None) -> float:
    """Seconds of the tiny SFT run then the tiny GRPO run, each a fresh ``scripts/train.py``."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    t0 = time.perf_counter()
    for stage, config in RUNS:
        cmd = [sys.executable, "scripts/train.py", f"--config={config}",
               f"--workdir={workdir / stage}", "--config.logging.progress=False"]  # fmt: skip
        if tokenizer_dir:
            cmd.append(f"--config.data.tokenizer_dir={tokenizer_dir}")
        done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
        if done.returncode:
            raise SystemExit(f"{' '.join(cmd)} failed ({done.returncode}):\n{done.stderr[-2000:]}")
    return time.perf_counter() - t0


def main(argv: list[str]) -> None:
    del argv
    tmp = pathlib.Path(tempfile.mkdtemp(prefix="bench_vocab_"))
    qwen = str(write_qwen_tokenizer(tmp / "qwen_tokenizer"))
    arms = {"qwen2.5 vocabulary (151,936)": qwen, "embedded vocabulary (768)": None}
    calls = {
        name: (lambda r, name=name, tok=tok: run_pair(tmp / f"{r}_{name.split()[0]}", tok))
        for name, tok in arms.items()
    }
    run_pair(tmp / "warmup", None)  # the synthetic set and tokenizer caches, once
    med = peer.interleaved_medians(
        calls,
        lambda r, t: f"round {r}: " + ", ".join(f"{k} {v:.1f} s" for k, v in t.items()),
    )
    (full, full_s), (small, small_s) = med.items()
    print(f"median: {full} {full_s:.1f} s, {small} {small_s:.1f} s; ratio {full_s / small_s:.2f}x")
    if _KEEP.value:
        print(f"runs kept in {tmp}")
    else:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    app.run(main)
