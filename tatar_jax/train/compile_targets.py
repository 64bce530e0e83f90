"""The hardware an ahead-of-time plan compiles for, without that hardware ("deviceless" AOT).

A :class:`Target` names the devices (``cpu``, a TPU slice, a group of NVIDIA GPUs), their memory
and published peaks, and makes compile-only devices for them:

- ``cpu``: this host's (virtual) CPU devices (``--xla_force_host_platform_device_count``). CPU
  XLA upcasts bf16 dots to float32 and fuses differently: a CPU plan overstates a bf16 program.
- ``tpu:<gen>-<chips>`` (``v5e``, ``v5p``, ``v6e``; ``tpu:v5p-64``) or ``tpu:<gen>:<AxBxC>``: a
  TPU slice from the ``libtpu`` wheel (``jax.experimental.topologies.get_topology_desc``); the
  number is always **chips** (one JAX device each; Cloud names v5p slices by TensorCores, so
  Cloud's ``v5p-16`` is ``tpu:v5p-8`` here). ``num_slices`` > 1: a multi-slice (DCN) system.
- ``gpu:<model>x<count>`` (``h100``, ``h200``, ``a100-80``, ``l40s``; any count, 8 per host
  beyond 8): NVIDIA GPUs from the jax-cuda plugin wheels and a GpuTargetConfig text proto
  (``gpu_specs/<model>.txtpb``, shipped here; ``target_config`` takes another file).

Peaks are per device, dense bf16, as published by the vendor: what the roofline lower bound of
a program's time (:func:`roofline_seconds`) divides by.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
from pathlib import Path

import jax

__all__ = [
    "GPU_MODELS",
    "SPECS_DIR",
    "TPU_CHIPS",
    "Target",
    "parse_target",
    "roofline_seconds",
    "unavailable_reason",
]

GIB = 1024**3
SPECS_DIR = Path(__file__).with_name("gpu_specs")


@dataclasses.dataclass(frozen=True)
class _Chip:
    memory_bytes: int  # per device
    peak_flops: float  # dense bf16 FLOP/s per device
    hbm_bytes_per_s: float
    dims: int = 2  # torus dimensions of the TPU topology name


# Published per-chip figures (Cloud TPU system architecture pages).
TPU_CHIPS: dict[str, _Chip] = {
    "v5e": _Chip(16 * GIB, 197e12, 819e9, 2),
    "v5p": _Chip(95 * GIB, 459e12, 2765e9, 3),
    "v6e": _Chip(32 * GIB, 918e12, 1640e9, 2),
}
# NVIDIA data sheets: dense bf16 tensor-core FLOP/s, HBM bandwidth (the memory size is the
# spec file's device_memory_size, what the driver reports).
GPU_MODELS: dict[str, tuple[float, float]] = {
    "h100": (989e12, 3.35e12),
    "h200": (989e12, 4.8e12),
    "a100-80": (312e12, 2.039e12),
    "l40s": (362e12, 0.864e12),
    "l4": (121e12, 0.3e12),  # dense bf16 tensor peak; the 24 GB card of the one-GPU LoRA presets
}
_GPUS_PER_HOST = 8


@dataclasses.dataclass(frozen=True)
class Target:
    """Devices to compile for. ``platform``: "cpu" | "tpu" | "cuda"; ``num_devices`` over all
    slices; ``memory_bytes`` / ``peak_flops`` / ``hbm_bytes_per_s`` per device (None: unknown,
    as for host CPU devices); ``topology``: the TPU topology name or the GPU ``slices x hosts x
    devices-per-host`` string; ``config_text``: the GPU target description."""

    name: str
    platform: str
    num_devices: int
    memory_bytes: int | None = None
    peak_flops: float | None = None
    hbm_bytes_per_s: float | None = None
    topology: str = ""
    num_slices: int = 1
    config_text: str | None = None

    def devices(self) -> list[jax.Device]:
        """Compile-only devices of the target (host CPU devices for ``cpu``)."""
        if self.platform == "cpu":
            return jax.devices("cpu")[: self.num_devices]
        reason = unavailable_reason(self.platform)
        if reason:
            raise RuntimeError(f"--target={self.name}: {reason}")
        from jax.experimental import topologies

        if self.platform == "tpu":
            # no metadata-server lookups (nothing here runs on a TPU VM), and no lock on the
            # TPU devices: a compile-only client uses none, and other processes compile too
            os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")
            os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
            desc = topologies.get_topology_desc(
                platform="tpu", topology_name=self.topology, num_slices=self.num_slices
            )
        else:
            desc = topologies.get_topology_desc(
                platform="cuda", target_config=self.config_text, topology=self.topology
            )
        return list(desc.devices)

    def describe(self) -> dict[str, object]:
        return {
            "name": self.name,
            "platform": self.platform,
            "devices": self.num_devices,
            "topology": self.topology,
            "num_slices": self.num_slices,
            "memory_gib": None if self.memory_bytes is None else round(self.memory_bytes / GIB, 2),
            "peak_tflops": None if self.peak_flops is None else self.peak_flops / 1e12,
            "hbm_gb_per_s": None if self.hbm_bytes_per_s is None else self.hbm_bytes_per_s / 1e9,
        }


def unavailable_reason(platform: str) -> str | None:
    """Why compile-only devices of ``platform`` cannot be made here (a missing wheel), or None."""
    import importlib.util

    if platform == "tpu" and importlib.util.find_spec("libtpu") is None:
        return "the TPU compiler needs the libtpu wheel (pip install -r requirements-aot.txt)"
    if platform == "cuda":
        if importlib.util.find_spec("jax_plugins.xla_cuda13") is None and (
            importlib.util.find_spec("jax_plugins.xla_cuda12") is None
        ):
            return (
                "the NVIDIA GPU compiler needs the jax-cuda plugin wheels "
                "(pip install -r requirements-aot.txt)"
            )
    return None


def _tpu_topology(gen: str, chips: int) -> str:
    """Chip count -> the TPU topology name (``v5p``, 8 -> ``v5p:2x2x2``; ``v5e``, 8 -> ``2x4``)."""
    k = int(math.log2(chips)) if chips > 0 else -1
    if chips <= 0 or 2**k != chips:
        raise ValueError(f"tpu:{gen}-{chips}: the chip count must be a power of two")
    if TPU_CHIPS[gen].dims == 2:
        return f"{gen}:{2 ** (k // 2)}x{2 ** (k - k // 2)}"
    if k < 2:
        raise ValueError(f"tpu:{gen}-{chips}: the smallest {gen} slice has 4 chips (2x2x1)")
    if k == 2:
        return f"{gen}:2x2x1"
    exps = sorted(k // 3 + (1 if i < k % 3 else 0) for i in range(3))
    return f"{gen}:" + "x".join(str(2**e) for e in exps)


def _parse_tpu(text: str, num_slices: int) -> Target:
    m = re.fullmatch(r"tpu:(v\w+?)(?:-(\d+)|:(\d+(?:x\d+)+))", text)
    if not m or m.group(1) not in TPU_CHIPS:
        raise ValueError(
            f"--target={text}: expected tpu:<gen>-<chips> or tpu:<gen>:<AxB[xC]> with gen one "
            f"of {sorted(TPU_CHIPS)} (e.g. tpu:v5p-8, tpu:v5e:4x4)"
        )
    gen = m.group(1)
    if m.group(2):
        topology = _tpu_topology(gen, int(m.group(2)))
    else:
        topology = f"{gen}:{m.group(3)}"
    chips = math.prod(int(d) for d in topology.split(":")[1].split("x"))
    chip = TPU_CHIPS[gen]
    return Target(
        name=text, platform="tpu", num_devices=chips * num_slices,
        memory_bytes=chip.memory_bytes, peak_flops=chip.peak_flops,
        hbm_bytes_per_s=chip.hbm_bytes_per_s, topology=topology, num_slices=num_slices,
    )  # fmt: skip


def _parse_gpu(text: str, num_slices: int, target_config: str | None) -> Target:
    m = re.fullmatch(r"gpu:([a-z0-9][a-z0-9\-]*?)x(\d+)", text)
    if not m or int(m.group(2)) < 1:
        raise ValueError(f"--target={text}: expected gpu:<model>x<count> (e.g. gpu:h100x8)")
    model, count = m.group(1), int(m.group(2))
    if target_config is None:
        path = SPECS_DIR / f"{model}.txtpb"
        if model not in GPU_MODELS or not path.exists():
            raise ValueError(
                f"--target={text}: no GPU description {model!r}; shipped: {sorted(GPU_MODELS)} "
                "(or pass --target_config=FILE, a GpuTargetConfig text proto)"
            )
    else:
        path = Path(target_config)
        if not path.is_file():
            raise ValueError(f"--target_config={target_config}: no such file")
    config = path.read_text()
    mem = re.search(r"\bdevice_memory_size:\s*(\d+)", config)
    if mem is None:
        raise ValueError(f"{path}: no gpu_device_info.device_memory_size in the target description")
    per_host = min(count, _GPUS_PER_HOST)
    if count % per_host:
        raise ValueError(f"--target={text}: more than {per_host} GPUs come {per_host} per host")
    peak, bw = GPU_MODELS.get(model, (None, None))
    if bw is None:
        found = re.search(r"\bmemory_bandwidth:\s*(\d+)", config)
        bw = float(found.group(1)) if found else None
    return Target(
        name=text, platform="cuda", num_devices=count * num_slices,
        memory_bytes=int(mem.group(1)), peak_flops=peak, hbm_bytes_per_s=bw,
        topology=f"{num_slices}x{count // per_host}x{per_host}", num_slices=num_slices,
        config_text=config,
    )  # fmt: skip


def parse_target(
    text: str, *, num_devices: int = 1, num_slices: int = 1, target_config: str | None = None
) -> Target:
    """``--target`` text -> :class:`Target`. ``num_devices``: how many host devices ``cpu``
    offers; ``num_slices``: TPU slices / GPU groups joined over the data-center network;
    ``target_config``: a GpuTargetConfig text-proto file for ``gpu:<name>x<count>``."""
    text = text.strip().lower()
    if num_slices < 1:
        raise ValueError(f"--num_slices={num_slices}: must be >= 1")
    if target_config is not None and not text.startswith("gpu:"):
        raise ValueError(f"--target_config describes a GPU; --target={text} is not gpu:...")
    if text == "cpu":
        if num_slices != 1:
            raise ValueError("--num_slices applies to tpu:/gpu: targets, not cpu")
        return Target(name="cpu", platform="cpu", num_devices=num_devices)
    if text.startswith("tpu:"):
        return _parse_tpu(text, num_slices)
    if text.startswith("gpu:"):
        return _parse_gpu(text, num_slices, target_config)
    raise ValueError(f"--target={text}: expected cpu, tpu:<gen>-<chips> or gpu:<model>x<count>")


def roofline_seconds(target: Target, flops: float | None, bytes_accessed: float | None) -> float:
    """Lower bound of a program's time on one device of ``target``: the larger of its FLOPs at
    the chip's peak and its memory traffic at the peak bandwidth (NaN where either is unknown)."""
    if not (target.peak_flops and target.hbm_bytes_per_s) or flops is None:
        return float("nan")
    return max(flops / target.peak_flops, (bytes_accessed or 0.0) / target.hbm_bytes_per_s)
