r"""AOT memory plan: per-device bytes, verdict and roofline of the GRPO programs, no weights needed.

Lowers and compiles the trainer's four programs (``tatar_jax.train.memory_plan``: the GRPO
update, reference log-probs, rollout prefill and decode) with abstract shapes only, for the
hardware ``--target`` names, by that hardware's own compiler without the hardware (deviceless
AOT), and prints per-device arguments / outputs / temporaries / peak against the target's
memory, the verdict (10% headroom), and on TPU the compiler's FLOPs / bytes with the roofline
lower bound of each program and of one GRPO step.

    python scripts/plan_memory.py --model=7b --mesh=fsdp=8 --target=gpu:h100x8
    python scripts/plan_memory.py --model=7b --mesh=fsdp=8 --target=tpu:v5p-8 --json
    python scripts/plan_memory.py --model=7b --mesh=fsdp=16 --target=tpu:v5e-16 --fit
    python scripts/plan_memory.py --model=72b --mesh=fsdp=64 --target=tpu:v5p-64
    python scripts/plan_memory.py --model=7b --mesh=fsdp=8 --dcn=data=2 --target=tpu:v5e-8 \
        --num_slices=2                                       # two slices over the DCN
    python scripts/plan_memory.py --model=7b --mesh=fsdp=1 --target=gpu:h100x1 \
        --target_config=my_h100.txtpb                        # another GpuTargetConfig
    python scripts/plan_memory.py --model=7b --mesh=fsdp=8   # --target=cpu: virtual CPU devices

Targets (``tatar_jax/train/compile_targets.py``): ``cpu`` (virtual host devices; CPU XLA
upcasts bf16 dots, so it overstates bf16 programs), ``tpu:<v5e|v5p|v6e>-<chips>`` (the number
counts chips; needs the ``libtpu`` wheel), ``gpu:<h100|h200|a100-80|l40s>x<count>`` (needs the
jax-cuda plugin wheels and cuDNN: ``pip install -r requirements-aot.txt``). ``--model`` and
``--mesh`` accept several values: every combination is planned. ``--fit`` searches the smallest
``--num_micro`` (then rollout layout) for which every program fits with 10% headroom.
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
_MU_DTYPE = flags.DEFINE_enum(
    "mu_dtype", "params", ["params", "float32", "bfloat16"],
    "config.optimizer.mu_dtype: AdamW's first moment in the parameters' dtype or its own.",
)  # fmt: skip
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
_OFFLOAD = flags.DEFINE_enum(
    "offload", "never", ["never", "rollout", "always"],
    "config.offload.mode: the --offload_parts in host memory outside the programs that read "
    "them (rollout: outside the update stage; always: outside the program that reads them).",
)  # fmt: skip
_OFFLOAD_PARTS = flags.DEFINE_list(
    "offload_parts", ["opt_state"],
    "config.offload.parts: opt_state, reference, params (the float32 master weights).",
)
_PROGRAMS = flags.DEFINE_list(
    "programs", ["update", "ref_logps", "prefill", "decode"], "Programs to compile."
)
_JSON = flags.DEFINE_bool("json", False, "Print one JSON object per planned program.")
_ATTENTION = flags.DEFINE_enum(
    "attention_impl", "auto", ["auto", "chunked", "xla", "cudnn", "splash"],
    "Attention implementation: auto = what the trainer picks on the target (splash on TPU, "
    "cuDNN on NVIDIA for bf16, chunked on cpu).",
)  # fmt: skip
_TARGET = flags.DEFINE_list(
    "target", ["cpu"], "Hardware to compile for: cpu | tpu:<gen>-<chips> | gpu:<model>x<count>."
)
_TARGET_CONFIG = flags.DEFINE_string(
    "target_config", None, "A GpuTargetConfig text-proto file for a gpu:<name>x<count> target."
)
_NUM_SLICES = flags.DEFINE_integer("num_slices", 1, "TPU slices (GPU groups) joined by the DCN.")
_DCN = flags.DEFINE_string(
    "dcn", None, "Mesh factors over the DCN (axis=size,...; default data=<num_slices>)."
)
_FIT = flags.DEFINE_bool(
    "fit", False, "Search the smallest num_micro (then rollout layout) that fits with 10% headroom."
)
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
    "param_dtype": _PARAM_DTYPE, "mu_dtype": _MU_DTYPE, "ref_param_dtype": _REF_DTYPE,
    "num_micro": _NUM_MICRO,
    "chunk_size": _CHUNK, "beta": _BETA, "freeze_vision": _FREEZE_VISION,
    "attention_impl": _ATTENTION,
    "lora_rank": _LORA_RANK, "offload": _OFFLOAD,
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
    """The host platform, and --xla_force_host_platform_device_count for the largest requested
    mesh (a ``cpu`` target's virtual devices), before jax loads."""
    # argv is scanned by hand: parsing FLAGS here would make app.run append --mesh values twice.
    meshes = [a.split("=", 1)[1] for a in argv[1:] if a.startswith("--mesh=")]
    meshes += [v for a, v in zip(argv[1:], argv[2:], strict=False) if a == "--mesh"]
    n = max(_mesh_size(m) for m in meshes or _MESH.default)
    # the programs run nowhere: the host compiles (TPU / GPU targets: compile-only devices)
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    xla = os.environ.get("XLA_FLAGS", "")
    if "xla_force_host_platform_device_count" not in xla:
        os.environ["XLA_FLAGS"] = f"{xla} --xla_force_host_platform_device_count={n}".strip()


def _usage(message: str) -> Exception:
    """A usage error: the one-line message and exit status 2."""
    from tatar_jax import cli_errors

    return cli_errors.UsageError(message)


def _spec(model: str, mesh_text: str, dcn: tuple[tuple[str, int], ...]) -> object:
    from tatar_jax.train import memory_plan as mp

    none = ("", "none", "None")
    spec = mp.PlanSpec(
        model=model, mesh=mp.parse_mesh(mesh_text), dcn=dcn, programs=tuple(_PROGRAMS.value),
        remat=None if _REMAT.value in none else _REMAT.value,
        vision_remat=None if _VISION_REMAT.value in none else _VISION_REMAT.value,
        offload_parts=tuple(_OFFLOAD_PARTS.value),
        **{field: flag.value for field, flag in _SPEC_FLAGS.items()},
    )  # fmt: skip
    mp.check_offload(spec)
    return spec


def _print(results: list[dict], bound: dict | None) -> None:
    from tatar_jax.train import memory_plan as mp

    if _JSON.value:
        for r in results:
            print(json.dumps(r), flush=True)
        if bound is not None:
            print(json.dumps({"step_bound": bound}), flush=True)
        return
    print(mp.format_table(results), flush=True)
    if bound is not None and bound["seconds"] == bound["seconds"]:
        parts = ", ".join(f"{k} {v * 1e3:.0f} ms" for k, v in bound["per_program_seconds"].items())
        print(f"one GRPO step >= {bound['seconds']:.2f} s ({bound['label']}; {parts})", flush=True)


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise _usage(f"unexpected arguments: {argv[1:]}")
    _check_usage()
    import jax

    from tatar_jax.train import compile_targets as ct
    from tatar_jax.train import memory_plan as mp

    try:
        dcn = mp.parse_mesh(_DCN.value) if _DCN.value else ()
        if _NUM_SLICES.value > 1 and not dcn:
            dcn = (("data", _NUM_SLICES.value),)
        targets = [
            ct.parse_target(
                t,
                num_devices=jax.device_count(),
                num_slices=_NUM_SLICES.value,
                target_config=_TARGET_CONFIG.value,
            )  # fmt: skip
            for t in _TARGET.value
        ]
        specs = [_spec(m, mesh, dcn) for m in _MODEL.value for mesh in _MESH.value]
    except ValueError as e:
        raise _usage(str(e)) from e
    for target in targets:
        reason = ct.unavailable_reason(target.platform)
        if reason:
            raise _usage(f"--target={target.name}: {reason}")
        for spec in specs:
            size = math.prod(s for _, s in spec.mesh) * math.prod(s for _, s in spec.dcn)
            if size > target.num_devices:
                raise _usage(
                    f"--mesh={mp.mesh_text(spec)} needs {size} devices; --target={target.name} "
                    f"has {target.num_devices}"
                )
            if _FIT.value:
                if target.memory_bytes is None:
                    raise _usage("--fit needs a tpu: or gpu: target (a known memory)")
                found = mp.fit(spec, target)
                if not found["fits"]:
                    print(f"{spec.model} on {target.name}: nothing fits: {found['reason']}")
                    continue
                print(
                    f"{spec.model} on {target.name} ({mp.mesh_text(spec)}): fits with "
                    f"num_micro={found['num_micro']}, rollout_mesh={found['rollout_mesh']}",
                    flush=True,
                )
                _print(found["results"], None)
                continue
            results = mp.plan(spec, target=target, dump_hlo=_DUMP_HLO.value)
            _print(results, mp.step_bound(results) if target.platform != "cpu" else None)


if __name__ == "__main__":
    _set_device_count(sys.argv)
    from tatar_jax import cli_errors

    cli_errors.run_script(main)
