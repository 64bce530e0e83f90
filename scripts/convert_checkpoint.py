"""Convert Qwen2.5-VL checkpoints between Hugging Face (safetensors) and orbax.

    # HF directory (e.g. a downloaded Qwen/Qwen2.5-VL-7B-Instruct) -> orbax
    python scripts/convert_checkpoint.py --hf_dir=/ckpt/Qwen2.5-VL-7B-Instruct \
        --orbax_out=/ckpt/qwen7b_orbax [--dtype=bfloat16]
    # orbax -> HF directory that transformers' from_pretrained loads
    python scripts/convert_checkpoint.py --orbax_dir=/ckpt/qwen7b_orbax --hf_out=/ckpt/qwen7b_hf \
        [--dtype=bfloat16] [--max_shard_size=5GB]
    # a training run (scripts/train.py --workdir) -> HF directory of its policy parameters
    python scripts/convert_checkpoint.py --workdir=/runs/grpo [--step=N] --hf_out=/ckpt/grpo_hf

The orbax directory holds ``params/`` (the parameter tree, our layer-stacked names),
``config.json`` (HF nested layout) and the input's tokenizer files. Every HF directory written is
complete (``qvl.export_hf``): weights, ``config.json``, ``generation_config.json``, the
tokenizer with its chat template and ``preprocessor_config.json``, so ``scripts/eval.py
--hf_dir`` / ``scripts/score.py --hf_dir`` and transformers' ``from_pretrained`` load it as it is.
The tokenizer: ``--tokenizer_dir`` if given, else the input's own (an orbax directory's copy, a
training run's recorded ``data.tokenizer_dir`` / ``model.hf_dir``), else the offline Qwen2.5
rebuild (what the embedded model trains with).
Exit status 2 on a usage error (one line naming the flag), 1 when the conversion fails or an
input is damaged (one line naming the file: a config.json that is not JSON, weights holding
NaN/Inf values are never converted).
"""

from __future__ import annotations

import pathlib
import re
import shutil
import sys
import time

import jax
import jax.numpy as jnp
from absl import app, flags

from tatar_jax import cli_errors, loading
from tatar_jax.models import qwen2_5_vl as qvl

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
_TOKENIZER = flags.DEFINE_string(
    "tokenizer_dir", None, "Tokenizer folder (tokenizer.json ...) written with an HF output."
)
_EXTRA = flags.DEFINE_multi_string(
    "copy_extra", [], "Extra files copied from the input directory (e.g. tokenizer.json)."
)


_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(KB|MB|GB|KIB|MIB|GIB)?\s*$", re.IGNORECASE)


def _shard_size_ok(text: str) -> bool:
    """A positive size as ``export_hf`` reads it: bytes, or a number with KB/MB/GB/KiB/MiB/GiB."""
    m = _SIZE.match(text)
    return bool(m) and float(m.group(1)) > 0


def _check_finite(model: object, src: pathlib.Path) -> None:
    """ValueError naming the first parameter with NaN / Inf values: such weights are never
    converted (they would only show up later as a NaN loss or empty answers)."""
    from flax import nnx

    for path, leaf in jax.tree_util.tree_leaves_with_path(nnx.state(model, nnx.Param)):
        bad = int(jnp.size(leaf) - jnp.sum(jnp.isfinite(leaf)))
        if bad:
            keys = [str(getattr(k, "key", getattr(k, "name", k))) for k in path]
            name = "/".join(k for k in keys if k not in ("value", ".value"))
            raise ValueError(f"{src}: parameter {name} holds {bad} non-finite values (NaN/Inf); "
                             "nothing was written")  # fmt: skip


def _read_dtype(path: pathlib.Path) -> object:
    """The dtype recorded in the input's config.json when --dtype=keep."""
    cfg = cli_errors.read_json(path / "config.json")
    if not isinstance(cfg, dict):
        raise cli_errors.DamagedInputError(path / "config.json", "not a JSON object")
    name = cfg.get("dtype") or cfg.get("torch_dtype") or "float32"
    return loading.to_dtype(name if name in _WRITTEN else "float32")


def _tokenizer_for(source: loading.PolicySource) -> str | None:
    """--tokenizer_dir, else the input's own (loading.tokenizer_dir), else the offline rebuild."""
    if _TOKENIZER.value:
        return _TOKENIZER.value
    return loading.tokenizer_dir(source)


def _export(model: object, out: pathlib.Path, tok_dir: str | None, dtype: object) -> None:
    qvl.export_hf(
        model, out, tokenizer_dir=tok_dir, max_shard_size=_SHARD.value, dtype=dtype
    )
    print(f"tokenizer: {tok_dir or 'the offline Qwen2.5 rebuild (tatar_jax.data.tokenizer)'}")


def _workdir_to_hf(workdir: pathlib.Path, out: pathlib.Path, dtype_name: str) -> None:
    """The ``params`` of a training checkpoint (architecture from the run's config.json)."""
    if not (workdir / "config.json").is_file():
        raise app.UsageError(f"{workdir} has no config.json (not a scripts/train.py run directory)")
    source = loading.PolicySource(checkpoint=str(workdir), step=_STEP.value)
    tok_dir = _tokenizer_for(source)
    policy = loading.load_policy(source)
    _check_finite(policy.model, workdir)
    dtype = None if dtype_name == "keep" else loading.to_dtype(dtype_name)
    _export(policy.model, out, tok_dir, dtype)
    print(f"wrote {out} from {workdir} step {policy.step}")


def _check_usage() -> None:
    """Every flag checked before anything is read (app.UsageError: one line, exit 2)."""
    if not _shard_size_ok(_SHARD.value):
        raise app.UsageError(
            f"--max_shard_size: {_SHARD.value!r} is not a size (e.g. 5GB, 500MB or bytes)"
        )
    for flag in (_HF_DIR, _ORBAX_DIR, _WORKDIR, _TOKENIZER):
        if flag.value and not pathlib.Path(flag.value).is_dir():
            raise app.UsageError(f"--{flag.name}: no such directory: {flag.value}")
    if _TOKENIZER.value and not (pathlib.Path(_TOKENIZER.value) / "tokenizer.json").is_file():
        raise app.UsageError(f"--tokenizer_dir: {_TOKENIZER.value} has no tokenizer.json")
    if _WORKDIR.value:
        if not _HF_OUT.value or _HF_DIR.value or _ORBAX_DIR.value or _ORBAX_OUT.value:
            raise app.UsageError("--workdir needs --hf_out (and no other input/output)")
        return
    hf_to_orbax = bool(_HF_DIR.value or _ORBAX_OUT.value)
    orbax_to_hf = bool(_ORBAX_DIR.value or _HF_OUT.value)
    if hf_to_orbax == orbax_to_hf:
        raise app.UsageError(
            "give either --hf_dir and --orbax_out, or --orbax_dir and --hf_out, or --workdir "
            "and --hf_out"
        )
    for given, needed, what in (
        (_HF_DIR, _ORBAX_OUT, "--orbax_out"),
        (_ORBAX_DIR, _HF_OUT, "--hf_out"),
        (_ORBAX_OUT, _HF_DIR, "--hf_dir"),
        (_HF_OUT, _ORBAX_DIR, "--orbax_dir or --workdir"),
    ):
        if given.value and not needed.value:
            raise app.UsageError(f"--{given.name} needs {what}")
    src = pathlib.Path(_HF_DIR.value or _ORBAX_DIR.value)
    if not (src / "config.json").is_file():
        raise app.UsageError(
            f"--{'hf_dir' if _HF_DIR.value else 'orbax_dir'}: {src} has no config.json"
        )
    for name in _EXTRA.value:
        if not (src / name).is_file():
            raise app.UsageError(f"--copy_extra: {src / name} does not exist")
    cli_errors.read_json(src / "config.json")  # a damaged one: one line naming it, exit 1


def main(argv: list[str]) -> int:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    _check_usage()
    try:
        return _convert()
    except (OSError, ValueError) as err:  # a damaged or mismatched input: one line, exit 1
        print(f"error: {err}", file=sys.stderr)
        return 1


def _convert() -> int:
    if _WORKDIR.value:
        _workdir_to_hf(pathlib.Path(_WORKDIR.value), pathlib.Path(_HF_OUT.value), _DTYPE.value)
        return 0
    src = pathlib.Path(_HF_DIR.value or _ORBAX_DIR.value)
    dst = pathlib.Path(_ORBAX_OUT.value or _HF_OUT.value)
    dtype = loading.to_dtype(_DTYPE.value) if _DTYPE.value != "keep" else _read_dtype(src)
    start = time.time()
    if _HF_DIR.value:
        model = qvl.load_hf_checkpoint(src, dtype=dtype)
        _check_finite(model, src)
        qvl.save_orbax(model, dst)
        for name in qvl.hf_export.TOKENIZER_FILES:  # eval --checkpoint finds them here
            if (src / name).is_file():
                shutil.copy2(src / name, dst / name)
    else:
        model = qvl.load_orbax(src, dtype=dtype)
        _check_finite(model, src)
        _export(model, dst, _tokenizer_for(loading.PolicySource(checkpoint=str(src))), None)
    for name in _EXTRA.value:
        shutil.copy2(src / name, dst / name)
    print(f"wrote {dst} ({jnp.dtype(dtype).name}) in {time.time() - start:.1f}s")
    return 0


if __name__ == "__main__":
    cli_errors.run_script(main)
