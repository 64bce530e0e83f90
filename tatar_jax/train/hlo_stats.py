"""Statistics read from compiled HLO module text (``compiled.as_text()``): what the memory
planner (:mod:`tatar_jax.train.memory_plan`) and the compile tests check in a program.

- :func:`loop_collective_bytes`: per-device bytes the collectives of one decode token step move.
- :func:`custom_call_targets`: the custom calls a program makes (splash's Mosaic
  ``tpu_custom_call``, cuDNN's ``__cudnn$fmha...``): which attention kernel really compiled.
- :func:`upcast_weight_buffers`: float32 values shaped like a program's bf16 weights (a float32
  copy of the weights, as CPU XLA makes for bf16 dots).

The text is a per-device SPMD module: shapes are shard shapes.
"""

from __future__ import annotations

import collections
import math
import re
from collections.abc import Iterable, Mapping

__all__ = ["custom_call_targets", "loop_collective_bytes", "upcast_weight_buffers"]

_COLLECTIVES = (
    "all-gather", "all-reduce", "reduce-scatter", "all-to-all", "collective-permute",
    "collective-broadcast", "ragged-all-to-all",
)  # fmt: skip
_DTYPE_BYTES = {
    "pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2, "bf16": 2, "s32": 4, "u32": 4,
    "f32": 4, "s64": 8, "u64": 8, "f64": 8, "c64": 8, "c128": 16,
    "f8e4m3fn": 1, "f8e5m2": 1, "s4": 1, "u4": 1,
}  # fmt: skip
_SHAPE = re.compile(r"\b([a-z][a-z0-9]*)\[([0-9,]*)\]")


def _hlo_computations(text: str) -> dict[str, list[str]]:
    """HLO module text -> {computation name: its instruction lines} (ENTRY under "ENTRY")."""
    comps: dict[str, list[str]] = {}
    name = None
    for line in text.splitlines():
        head = re.match(r"^(ENTRY\s+)?%?([\w.\-]+)\s.*\{\s*$", line)
        if head and not line.startswith(" "):
            name = "ENTRY" if head.group(1) else head.group(2)
            comps[name] = []
        elif name is not None and line.strip() == "}":
            name = None
        elif name is not None:
            comps[name].append(line)
    return comps


def _shape_bytes(text: str) -> int:
    """Bytes of the array shapes written in ``text`` (e.g. a tuple ``(f32[2,8], s32[])``)."""
    total = 0
    for dt, dims in _SHAPE.findall(text):
        if dt in _DTYPE_BYTES:
            total += _DTYPE_BYTES[dt] * math.prod(int(d) for d in dims.split(",") if d)
    return total


def _operand_bytes(line: str, op: str, sizes: Mapping[str, int]) -> int:
    """Bytes of the operands of the ``op(...)`` call on an HLO instruction line (compiled HLO
    text names its operands without shapes: ``sizes`` maps instruction names to bytes)."""
    args = line.split(f" {op}(", 1)[1]
    depth, end = 1, 0
    while depth and end < len(args):
        depth += {"(": 1, ")": -1}.get(args[end], 0)
        end += 1
    names = re.findall(r"%([\w.\-]+)", args[:end])
    return sum(sizes.get(n, 0) for n in names) if names else _shape_bytes(args[:end])


def _called(line: str) -> list[str]:
    """Names of the computations an HLO instruction line calls."""
    names = re.findall(r"\b(?:body|condition|calls|to_apply)=%?([\w.\-]+)", line)
    for group in re.findall(r"\bbranch_computations=\{([^}]*)\}", line):
        names += [n.strip().lstrip("%") for n in group.split(",")]
    return names


def loop_collective_bytes(hlo_text: str) -> int:
    """Per-device bytes moved by collectives in one iteration of the decode token loop.

    The token loop is the ``while`` of the ENTRY computation whose body holds the most
    instructions (nested computations included); collectives (all-gather, all-reduce,
    reduce-scatter, all-to-all, collective-permute) count their operands' bytes (shard shapes:
    the compiled module is per device), nested loops (the layer scan) times their
    ``known_trip_count``.
    """
    comps = _hlo_computations(hlo_text)
    sizes = {}  # instruction / parameter name -> bytes of its (per-device) value
    for lines in comps.values():
        for line in lines:
            m = re.match(r"\s*(?:ROOT\s+)?%([\w.\-]+)\s*=\s*(\([^=]*?\)|\S+)\s", line)
            if m:
                sizes[m.group(1)] = _shape_bytes(m.group(2))

    def callees(line: str) -> list[str]:
        return [c for c in _called(line) if c in comps]

    def cost(name: str, seen: tuple[str, ...] = ()) -> tuple[int, int]:
        """(collective bytes, instruction count) of one run of computation ``name``."""
        total = count = 0
        for line in comps.get(name, []):
            count += 1
            op = next((c for c in _COLLECTIVES if re.search(rf" {c}(-start)?\(", line)), None)
            if op is not None:
                call = op + ("-start" if f" {op}-start(" in line else "")
                total += _operand_bytes(line, call, sizes)
            trips = 1
            if re.search(r" while\(", line):
                m = re.search(r'"known_trip_count":\{"n":"(\d+)"', line)
                trips = int(m.group(1)) if m else 1
            for callee in callees(line):
                if callee not in seen:
                    sub, n = cost(callee, seen + (name,))
                    total += trips * sub
                    count += n
        return total, count

    best = (-1, 0)
    for line in comps.get("ENTRY", []):
        if re.search(r" while\(", line):
            body = re.search(r"body=%?([\w.\-]+)", line).group(1)
            sub, n = cost(body)
            best = max(best, (n, sub))
    return best[1]


def custom_call_targets(hlo_text: str) -> collections.Counter[str]:
    """``custom_call_target`` name -> number of custom-call instructions calling it."""
    return collections.Counter(re.findall(r'custom_call_target="([^"]+)"', hlo_text))


def _instruction_shapes(hlo_text: str) -> Iterable[tuple[str, str, tuple[int, ...]]]:
    """(instruction name, dtype, dims) of every array-valued instruction of the module."""
    for m in re.finditer(r"^\s*(?:ROOT\s+)?%([\w.\-]+)\s*=\s*([a-z][a-z0-9]*)\[([0-9,]*)\]",
                         hlo_text, re.M):  # fmt: skip
        yield m.group(1), m.group(2), tuple(int(d) for d in m.group(3).split(",") if d)


def upcast_weight_buffers(
    hlo_text: str, weight_shapes: Iterable[tuple[int, ...]], *, min_elements: int = 1024
) -> list[str]:
    """Instructions whose value is float32 with the shape of a weight in ``weight_shapes`` (the
    per-device shapes of a program's bf16 parameters, at least ``min_elements`` elements): the
    float32 copies of bf16 weights a bf16 program should not hold. Returns "name f32[dims]"."""
    shapes = {tuple(s) for s in weight_shapes if math.prod(s) >= min_elements}
    return [
        f"{name} f32[{','.join(map(str, dims))}]"
        for name, dt, dims in _instruction_shapes(hlo_text)
        if dt == "f32" and dims in shapes
    ]
