"""Plug-in rewards named in a rewards config (``config.extra.<name>``, "package.module:function"):
loading, calling with checks, and validation on a probe batch at start.

Kinds (:data:`~tatar_jax.rewards.names.EXTRA_KINDS`): ``"features"`` (a pure ``jnp`` function of
the built-ins' feature arrays, run inside the rewards' jitted program) and ``"host"`` (plain
Python on the decoded texts and per-completion records, called outside jit).
"""

from __future__ import annotations

import dataclasses
import importlib
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from tatar_jax.data.batch import RowMeta
from tatar_jax.rewards import names
from tatar_jax.rewards.features import completion_records

_EXTRA_FIELDS = ("function", "kind", "scale", "kwargs")


def config_field(config: Any, *path: str) -> Any:
    """``config[path[0]][path[1]]…`` of a ConfigDict or nested mapping; a missing field is an
    error that names its dotted path."""
    node = config
    for i, key in enumerate(path):
        if key not in node:
            raise KeyError(f"rewards config has no field {'.'.join(path[: i + 1])!r}")
        node = node[key]
    return node


def _import(spec: str) -> Callable[..., Any]:
    module, sep, attr = spec.partition(":")
    if not sep or not module or not attr:
        raise ValueError(f"reward function {spec!r} is not 'package.module:function'")
    try:
        fn = importlib.import_module(module)
        for part in attr.split("."):
            fn = getattr(fn, part)
    except (ImportError, AttributeError) as e:
        raise ValueError(f"reward function {spec!r} cannot be imported: {e}") from e
    if not callable(fn):
        raise ValueError(f"reward function {spec!r} is not callable")
    return fn


@dataclasses.dataclass(frozen=True)
class ExtraReward:
    """A reward function named in ``config.extra.<name>`` (see :func:`extra_rewards`)."""

    name: str
    spec: str  # "package.module:function"
    kind: str  # "features" | "host"
    scale: float
    kwargs: Mapping[str, Any]

    def where(self) -> str:
        return f"reward {self.name!r} ({self.spec}, kind {self.kind!r})"

    def __call__(
        self,
        features: Mapping[str, Any],
        *,
        texts: Sequence[str] | None = None,
        records: Sequence[Mapping[str, Any]] | None = None,
    ) -> jax.Array:
        """``scale x fn(...)``, (N,) float; a wrong shape, a non-number or (outside jit) a
        non-finite value is a ValueError naming the reward."""
        fn = _import(self.spec)
        n = int(np.shape(features["is_iaa"])[0])
        if self.kind == "host":
            if texts is None or records is None:
                raise ValueError(f"{self.where()}: a host reward needs texts and records")
            if len(texts) != n or len(records) != n:
                raise ValueError(f"{self.where()}: {len(texts)} texts for {n} completions")
            r = fn(list(texts), list(records), **self.kwargs)
        else:
            r = fn(**features, **self.kwargs)
        return self.scale * self._checked(r, n)

    def _checked(self, r: Any, n: int) -> jax.Array:
        if not isinstance(r, jax.core.Tracer):
            try:
                r = np.asarray(r)
            except Exception as e:  # noqa: BLE001 - any conversion failure is the reward's
                raise ValueError(f"{self.where()} returned a {type(r).__name__}: {e}") from e
            if not (np.issubdtype(r.dtype, np.number) or r.dtype == bool):
                raise ValueError(f"{self.where()} returned dtype {r.dtype}, not numbers")
        if tuple(r.shape) != (n,):
            raise ValueError(f"{self.where()} returned shape {tuple(r.shape)}, want ({n},)")
        if not isinstance(r, jax.core.Tracer):
            bad = np.flatnonzero(~np.isfinite(r.astype(np.float64)))
            if bad.size:
                raise ValueError(
                    f"{self.where()} returned {bad.size} non-finite values (the first at "
                    f"completion {bad[0]}: {r[bad[0]]})"
                )
        r = jnp.asarray(r)
        return r if jnp.issubdtype(r.dtype, jnp.floating) else r.astype(jnp.float32)


def extra_rewards(config: Any) -> dict[str, ExtraReward]:
    """The reward functions named in ``config.extra`` (name -> block; absent or empty = none).

    Each block holds ``function`` (``"package.module:function"``), ``kind``, ``scale`` and
    ``kwargs`` (constants passed as keyword arguments); the reward's weights are
    ``weights.iqa.<name>`` and ``weights.iaa.<name>``. Kinds:

    * ``"features"``: a pure ``jnp`` function of the completion-feature arrays, the inputs of
      the built-ins: ``fn(pred, gt, parsed, num_words, is_iaa, group_ids, **kwargs) -> (N,)``;
      ``pred`` (N,) float, the parsed answer clipped to [0, 100] (any value, even NaN, where not
      ``parsed``), ``gt`` (N,) float 0-100, ``parsed`` and ``is_iaa`` (N,) bool, ``num_words``
      (N,) int (whitespace words of the completion), ``group_ids`` (N,) int32 (the prompt; its
      G completions are consecutive). It must trace under ``jax.jit``.
    * ``"host"``: plain Python, ``fn(texts, records, **kwargs) -> (N,)`` array-like, with the
      decoded completions (special tokens stripped) and :func:`completion_records`.
    """
    if "extra" not in config:
        return {}
    out = {}
    for name in config["extra"].keys():
        block = config["extra"][name]
        unknown = sorted(set(block.keys()) - set(_EXTRA_FIELDS))
        missing = [k for k in ("function", "kind") if k not in block]
        if unknown or missing:
            raise ValueError(
                f"rewards config block extra.{name}: unknown fields {unknown}, missing {missing}"
            )
        if name in names.BUILT_INS:
            raise ValueError(f"rewards config extra.{name}: the name of a built-in reward")
        kind = str(block["kind"])
        if kind not in names.EXTRA_KINDS:
            raise ValueError(
                f"rewards config extra.{name}.kind {kind!r} not in {names.EXTRA_KINDS}"
            )
        kwargs = dict(block["kwargs"]) if "kwargs" in block else {}
        scale = float(block["scale"]) if "scale" in block else 1.0
        out[name] = ExtraReward(name, str(block["function"]), kind, scale, kwargs)
    return out


def _probe_batch(group_size: int) -> tuple[dict[str, np.ndarray], list[str], list[dict]]:
    """Two IQA and two IAA prompts x ``group_size``: parsed and unparsed, short and long."""
    n = 4 * group_size
    rng = np.random.default_rng(0)
    is_iaa = np.repeat(np.array([False, False, True, True]), group_size)
    parsed = np.tile(np.arange(group_size) % 3 != 2, 4)
    pred = np.where(parsed, rng.uniform(0, 100, n), 0.0).astype(np.float32)
    gt = np.repeat(rng.uniform(0, 100, 4), group_size).astype(np.float32)
    words = rng.integers(5, 200, n).astype(np.int32)
    texts = [
        f"<think>{'word ' * int(w)}</think> <answer>{p:.2f}</answer>" if ok else "no answer"
        for w, p, ok in zip(words, pred, parsed, strict=True)
    ]
    words = np.array([len(t.split()) for t in texts], np.int32)
    meta = RowMeta(
        task_id=is_iaa[::group_size].astype(np.int32), gt_100=gt[::group_size],
        row_id=np.full(4, -1, np.int64), valid=np.ones(4, bool), epoch=np.zeros(4, np.int32),
    )  # fmt: skip
    feats = dict(pred=pred, gt=gt, parsed=parsed, num_words=words, is_iaa=is_iaa,
                 group_ids=np.repeat(np.arange(4, dtype=np.int32), group_size))  # fmt: skip
    return feats, texts, completion_records(meta, group_size)


def validate_extra_rewards(config: Any, group_size: int = 4) -> None:
    """Imports every extra reward of ``config`` and calls it once on a probe batch (two IQA and
    two IAA prompts x ``group_size`` completions): it must return (N,) finite numbers, a
    ``features`` one also under ``jax.jit``, and its two weights must exist. Run it at start;
    a failure is a ValueError that names the reward."""
    extras = extra_rewards(config)
    if not extras:
        return
    feats, texts, records = _probe_batch(group_size)
    for name, extra in extras.items():
        for task in ("iqa", "iaa"):
            if name not in config_field(config, "weights", task):
                raise ValueError(f"{extra.where()} has no weight rewards.weights.{task}.{name}")
        try:
            extra(feats, texts=texts, records=records)
            if extra.kind == "features":
                jax.jit(lambda f, e=extra: e(f))(feats)
        except ValueError as e:
            if extra.where() in str(e):
                raise
            raise ValueError(f"{extra.where()} failed on the probe batch: {e}") from e
        except Exception as e:  # noqa: BLE001 - whatever the user's function raises
            raise ValueError(
                f"{extra.where()} failed on the probe batch: {type(e).__name__}: {e}"
            ) from e
