"""Convert Qwen2.5-VL checkpoints between Hugging Face (safetensors) and orbax.

    # HF directory (e.g. a downloaded Qwen/Qwen2.5-VL-7B-Instruct) -> orbax
    python scripts/convert_checkpoint.py --hf_dir=/ckpt/Qwen2.5-VL-7B-Instruct \
        --orbax_out=/ckpt/qwen7b_orbax [--dtype=bfloat16]
    # orbax -> HF directory that transformers' from_pretrained loads
    python scripts/convert_checkpoint.py --orbax_dir=/ckpt/qwen7b_orbax --hf_out=/ckpt/qwen7b_hf \
        [--dtype=bfloat16] [--max_shard_size=5GB]
    # a training run (scripts/train.py --workdir) -> HF directory of its policy parameters
    python scripts/convert_checkpoint.py --workdir=/runs/grpo [--step=N] --hf_out=/ckpt/grpo_hf

The orbax directory holds ``params/`` (the parameter tree, our layer-stacked names) and
``config.json`` (HF nested layout). Tokenizer / processor files are not model weights: copy them
from the HF directory if you need them (``--copy_extra`` does it for HF -> orbax -> HF).
Exit status 2 on a usage error.
"""

from __future__ import annotations

import json
import pathlib
import shutil
import sys
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import jax.numpy as jnp  # noqa: E402
from absl import app, flags  # noqa: E402

from tatar_jax import loading  # noqa: E402
from tatar_jax.models import qwen2_5_vl as qvl  # noqa: E402

_WRITTEN = ("float32", "bfloat16")  # --dtype choices; "keep" reads any other dtype as float32

_HF_DIR = flags.DEFINE_string("hf_dir", None, "Input HF directory (config.json + safetensors).")
_ORBAX_OUT = flags.DEFINE_string("orbax_out", None, "Output orbax directory (HF -> orbax).")
_ORBAX_DIR = flags.DEFINE_string("orbax_dir", None, "Input orbax directory (orbax -> HF).")
_HF_OUT = flags.DEFINE_string("hf_out", None, "Output HF directory (orbax -> HF).")
_WORKDIR = flags.DEFINE_string(
    "workdir", None, "A training run directory (scripts/train.py --workdir) -> HF (--hf_out)."
)
_STEP = flags.DEFINE_integer("step", -1, "Training checkpoint step with --workdir (-1 = latest).")
_DTYPE = flags.DEFINE_enum(
    "dtype", "keep", ["keep", *_WRITTEN], "Parameter dtype written (keep = as read)."
)
_SHARD = flags.DEFINE_string("max_shard_size", "5GB", "Largest safetensors shard (orbax -> HF).")
_EXTRA = flags.DEFINE_multi_string(
    "copy_extra", [], "Extra files copied from the input directory (e.g. tokenizer.json)."
)


def _read_dtype(path: pathlib.Path) -> object:
    """The dtype recorded in the input's config.json when --dtype=keep."""
    cfg = json.loads((path / "config.json").read_text())
    name = cfg.get("dtype") or cfg.get("torch_dtype") or "float32"
    return loading.to_dtype(name if name in _WRITTEN else "float32")


def _workdir_to_hf(workdir: pathlib.Path, out: pathlib.Path, dtype_name: str) -> None:
    """The ``params`` of a training checkpoint (architecture from the run's config.json)."""
    if not (workdir / "config.json").is_file():
        raise app.UsageError(f"{workdir} has no config.json (not a scripts/train.py run directory)")
    policy = loading.load_policy(loading.PolicySource(checkpoint=str(workdir), step=_STEP.value))
    dtype = None if dtype_name == "keep" else loading.to_dtype(dtype_name)
    qvl.save_hf_checkpoint(policy.model, out, max_shard_size=_SHARD.value, dtype=dtype)
    print(f"wrote {out} from {workdir} step {policy.step}")


def main(argv: list[str]) -> int:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if _WORKDIR.value:
        if not _HF_OUT.value or _HF_DIR.value or _ORBAX_DIR.value or _ORBAX_OUT.value:
            raise app.UsageError("--workdir needs --hf_out (and no other input/output)")
        _workdir_to_hf(pathlib.Path(_WORKDIR.value), pathlib.Path(_HF_OUT.value), _DTYPE.value)
        return 0
    hf_to_orbax = bool(_HF_DIR.value or _ORBAX_OUT.value)
    orbax_to_hf = bool(_ORBAX_DIR.value or _HF_OUT.value)
    if hf_to_orbax == orbax_to_hf:
        raise app.UsageError("give either --hf_dir and --orbax_out, or --orbax_dir and --hf_out")
    src = pathlib.Path(_HF_DIR.value or _ORBAX_DIR.value or "")
    dst = pathlib.Path(_ORBAX_OUT.value or _HF_OUT.value or "")
    if not src.name or not dst.name:
        raise app.UsageError("both an input and an output directory are required")
    if not (src / "config.json").is_file():
        raise app.UsageError(f"{src} has no config.json")
    dtype = loading.to_dtype(_DTYPE.value) if _DTYPE.value != "keep" else _read_dtype(src)
    start = time.time()
    if hf_to_orbax:
        model = qvl.load_hf_checkpoint(src, dtype=dtype)
        qvl.save_orbax(model, dst)
    else:
        model = qvl.load_orbax(src, dtype=dtype)
        qvl.save_hf_checkpoint(model, dst, max_shard_size=_SHARD.value)
    for name in _EXTRA.value:
        shutil.copy2(src / name, dst / name)
    print(f"wrote {dst} ({jnp.dtype(dtype).name}) in {time.time() - start:.1f}s")
    return 0


if __name__ == "__main__":
    app.run(main)
