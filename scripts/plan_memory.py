r"""AOT memory plan: per-device bytes of the GRPO update and rollout programs, no weights needed.

Lowers and compiles the trainer's programs (``tatar_jax.train.memory_plan``) with abstract
shapes only on a virtual mesh of host CPU devices, and prints per-device arguments / outputs /
temporaries / total from the compiled memory analysis, against the HBM of v5e (16 GiB), v5p
(95 GiB), H100 (80 GiB) and H200 (141 GiB).

    python scripts/plan_memory.py --model=7b --mesh=fsdp=8
    python scripts/plan_memory.py --model=7b --mesh=fsdp=8 --json          # one JSON per program
    python scripts/plan_memory.py --model=32b --mesh=fsdp=16,tensor=2 --num_micro=4
    python scripts/plan_memory.py --model=7b,32b --mesh=fsdp=8 --mesh=fsdp=4,tensor=2
    python scripts/plan_memory.py --model=7b --mesh=fsdp=8 --programs=decode --json \
        --dump_hlo=/tmp/hlo   # decode: kv_cache_bytes, collective_bytes_per_step, HLO text

``--model`` and ``--mesh`` accept several values: every combination is planned. The virtual
device count is the largest mesh (``--xla_force_host_platform_device_count``, set before jax is
imported). Compiling a 7B step takes a few minutes on two CPU cores.
"""

from __future__ import annotations

import json
import math
import os
import sys

from absl import flags

_MODEL = flags.DEFINE_list("model", ["7b"], "Presets to plan: 3b, 7b, 32b, 72b (or tiny).")
_MESH = flags.DEFINE_multi_string(
    "mesh", ["fsdp=8"], "Mesh shape(s) as axis=size,... over data/fsdp/tensor (repeatable)."
)
_RULES = flags.DEFINE_enum(
    "rules", "default", ["default", "fsdp", "tensor", "replicated"], "Logical-axis rules table."
)
_PROMPTS = flags.DEFINE_integer("prompts", 16, "Prompts (images) per step.")
_G = flags.DEFINE_integer("num_generations", 8, "Completions per prompt (G).")
_PROMPT_LEN = flags.DEFINE_integer("prompt_len", 2048, "Padded prompt length (tokens).")
_COMPLETION_LEN = flags.DEFINE_integer("completion_len", 256, "Completion length (tokens).")
_IMAGE_TOKENS = flags.DEFINE_integer(
    "image_tokens", 1024, "Merged image tokens per prompt (4x as many vision patches)."
)
_REMAT = flags.DEFINE_string("remat", "full", "Decoder remat policy ('' / none = off).")
_VISION_REMAT = flags.DEFINE_string("vision_remat", "full", "Vision remat policy ('' = off).")
_DTYPE = flags.DEFINE_enum("dtype", "bfloat16", ["bfloat16", "float32"], "Compute dtype.")
_PARAM_DTYPE = flags.DEFINE_enum(
    "param_dtype", "float32", ["bfloat16", "float32"], "Parameter / optimizer-state dtype."
)
_REF_DTYPE = flags.DEFINE_enum(
    "ref_param_dtype", "compute", ["compute", "float32"],
    "Reference-model parameters (config.grpo.ref_param_dtype): --dtype or float32.",
)  # fmt: skip
_NUM_MICRO = flags.DEFINE_integer("num_micro", 1, "Micro-batches per update (accumulated).")
_CHUNK = flags.DEFINE_integer("chunk_size", 1024, "Tokens per lm_head log-softmax chunk.")
_BETA = flags.DEFINE_float("beta", 0.001, "KL coefficient; 0 drops the reference model.")
_FREEZE_VISION = flags.DEFINE_bool("freeze_vision", False, "No updates / moments for vision.")
_LORA_RANK = flags.DEFINE_integer(
    "lora_rank", 0, "LoRA rank on the decoder projections (0 = full fine-tuning)."
)
_PROGRAMS = flags.DEFINE_list(
    "programs", ["update", "ref_logps", "prefill", "decode"], "Programs to compile."
)
_JSON = flags.DEFINE_bool("json", False, "Print one JSON object per planned program.")
_ATTENTION = flags.DEFINE_enum(
    "attention_impl", "chunked", ["chunked", "xla"],
    "Attention implementation compiled on the CPU stand-in devices: chunked (memory-efficient, "
    "the stand-in for cuDNN / splash flash kernels) or xla (O(L^2) float32 scores).",
)  # fmt: skip
_DUMP_HLO = flags.DEFINE_string(
    "dump_hlo",
    None,
    "Directory for each compiled program's HLO (<model>_<mesh>_<program>.hlo.txt).",
)
_ROLLOUT_MESH = flags.DEFINE_string(
    "rollout_mesh", "auto", "Rollout weights' mesh: auto | train | axis=size,... (configs/grpo.py)."
)
_ROLLOUT_RULES = flags.DEFINE_string(
    "rollout_rules", "auto", "Rollout weights' rules: auto | default | fsdp | tensor | replicated."
)


# PlanSpec field -> the flag that sets it as given (the others are converted in main).
_SPEC_FLAGS = {
    "rules": _RULES, "prompts": _PROMPTS, "num_generations": _G, "prompt_len": _PROMPT_LEN,
    "completion_len": _COMPLETION_LEN, "image_tokens": _IMAGE_TOKENS, "dtype": _DTYPE,
    "param_dtype": _PARAM_DTYPE, "ref_param_dtype": _REF_DTYPE, "num_micro": _NUM_MICRO,
    "chunk_size": _CHUNK, "beta": _BETA, "freeze_vision": _FREEZE_VISION,
    "attention_impl": _ATTENTION,
    "lora_rank": _LORA_RANK,
    "rollout_mesh": _ROLLOUT_MESH, "rollout_rules": _ROLLOUT_RULES,
}  # fmt: skip


_AXES = ("data", "fsdp", "tensor")


def _mesh_size(text: str) -> int:
    """Device count of ``axis=size,...`` (parsed here: jax must not be imported yet); 1 for a
    malformed value (main reports it as a usage error)."""
    try:
        return math.prod(s for _, s in _check_mesh(text))
    except ValueError:
        return 1


def _check_mesh(text: str) -> list[tuple[str, int]]:
    """``axis=size,...`` over data/fsdp/tensor with positive sizes; ValueError saying what is
    wrong."""
    out = []
    for part in text.replace("x", ",").split(","):
        if not part.strip():
            continue
        name, sep, size = part.partition("=")
        if not sep or name.strip() not in _AXES:
            raise ValueError(f"entry {part.strip()!r} is not {'|'.join(_AXES)}=SIZE")
        if not size.strip().isdigit() or int(size) < 1:
            raise ValueError(f"entry {part.strip()!r}: the size must be a positive integer")
        out.append((name.strip(), int(size)))
    if not out:
        raise ValueError(f"empty mesh {text!r}")
    return out


def _check_usage() -> None:
    """--model and --mesh checked before jax compiles anything (one line, exit status 2)."""
    from tatar_jax import cli_errors
    from tatar_jax.models import qwen2_5_vl as qvl

    for model in _MODEL.value:
        if model not in qvl.config.PRESETS:
            raise cli_errors.UsageError(
                f"--model: unknown preset {model!r}; choose from {', '.join(qvl.config.PRESETS)}"
            )
    for text in _MESH.value:
        try:
            _check_mesh(text)
        except ValueError as err:
            raise cli_errors.UsageError(f"--mesh={text}: {err}") from None


def _set_device_count(argv: list[str]) -> None:
    """--xla_force_host_platform_device_count for the largest requested mesh, before jax loads."""
    # argv is scanned by hand: parsing FLAGS here would make app.run append --mesh values twice.
    meshes = [a.split("=", 1)[1] for a in argv[1:] if a.startswith("--mesh=")]
    meshes += [v for a, v in zip(argv[1:], argv[2:], strict=False) if a == "--mesh"]
    n = max(_mesh_size(m) for m in meshes or _MESH.default)
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    xla = os.environ.get("XLA_FLAGS", "")
    if "xla_force_host_platform_device_count" not in xla:
        os.environ["XLA_FLAGS"] = f"{xla} --xla_force_host_platform_device_count={n}".strip()


def main(argv: list[str]) -> None:
    from tatar_jax import cli_errors

    if len(argv) > 1:
        raise cli_errors.UsageError(f"unexpected arguments: {argv[1:]}")
    _check_usage()
    import jax

    from tatar_jax.train import memory_plan as mp

    none = ("", "none", "None")
    for model in _MODEL.value:
        for mesh_text in _MESH.value:
            mesh = mp.parse_mesh(mesh_text)
            size = math.prod(s for _, s in mesh)
            if size > jax.device_count():
                raise cli_errors.UsageError(f"mesh {mesh_text} needs {size} devices")
            spec = mp.PlanSpec(
                model=model, mesh=mesh, programs=tuple(_PROGRAMS.value),
                remat=None if _REMAT.value in none else _REMAT.value,
                vision_remat=None if _VISION_REMAT.value in none else _VISION_REMAT.value,
                **{field: flag.value for field, flag in _SPEC_FLAGS.items()},
            )  # fmt: skip
            results = mp.plan(spec, devices=jax.devices()[:size], dump_hlo=_DUMP_HLO.value)
            if _JSON.value:
                for r in results:
                    print(json.dumps(r), flush=True)
            else:
                print(mp.format_table(results), flush=True)


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    _set_device_count(sys.argv)
    from tatar_jax import cli_errors

    cli_errors.run_script(main)
