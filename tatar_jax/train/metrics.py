"""Training metrics: writers (console / JSONL / TensorBoard), progress bar, timers, GRPO summaries,
and a FLOP-count based MFU estimate.

Writers run on process 0 only. Everything here is host-side (numpy); jitted steps return arrays and
the loop hands them over with ``writer.write(step, metrics)`` every ``every_steps`` steps.

FLOP count (``flops_per_token``), the PaLM / MaxText convention (model FLOPs, not hardware FLOPs:
rematerialisation is not counted, so MFU does not reward recomputation):

    forward FLOPs per text token = 2 * N_matmul + 4 * L * (H * d_head) * T_ctx
    training = 3 x forward (backward = 2 x forward);   inference = 1 x forward

``N_matmul`` = weights applied to every token: per decoder layer q, k, v, o and the gated MLP
(3 * D * I), plus the lm_head (D * V, also when tied: it is a matmul either way); embedding lookups,
norms and biases are not counted. ``T_ctx`` = attended positions (the sequence length; halved with
``causal_discount=True``). The vision tower adds, per pre-merge patch, ``2 * N_vis_matmul`` plus
``4 * L_vis * D_vis * ctx`` (ctx = the window's patches, (window_size / patch_size)^2, or all the
image's patches in the ``fullatt_block_indexes`` layers) and the merger per merged token; x3 when
the vision tower trains (x2 for the patch embedding, whose input needs no gradient), x1 when frozen
(no backward through it). These numbers equal ``torch.utils.flop_counter.FlopCounterMode`` on the
transformers model (eager attention), forward and forward+backward (tests/train/test_metrics.py).
Per-token numbers average the vision cost over the sequence's tokens.

A training step counts what its compiled program runs (``inputs.step_flops``): the lm_head only
on the scored positions (``lm_head_tokens``: GRPO's completion tokens, SFT's targets) and the
vision tower once per *image* (the G completions of a prompt share it: ``patches_per_seq`` =
the step's patches / rows). This equals XLA's ``cost_analysis()`` of the compiled GRPO update
and reference pass within a few percent (the rest: elementwise ops, the log-softmax backward's
recomputed logits; tests/train/test_metrics.py).
MFU = achieved FLOP/s / (n_devices x peak FLOP/s); None where the peak is unknown (CPU). GRPO
reports ``mfu/update`` (the policy updates over their own time) and ``mfu/ref_logps`` (the
forward-only reference pass) separately (``stages.GrpoStage``).
"""

from __future__ import annotations

import json
import math
import os
import pathlib
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

import numpy as np

# --- writers ---------------------------------------------------------------------------------


def _to_float(v: Any) -> float:
    a = np.asarray(v)
    if a.size != 1:
        raise ValueError(f"metric must be a scalar, got shape {a.shape}")
    return float(a.reshape(()))


class MetricsWriter:
    """Every ``every_steps`` steps: one compact console line, one JSONL record with every
    metric, TensorBoard scalars.

    Files: ``<workdir>/metrics.jsonl`` (``{"step": s, "wall_time": t, name: value, ...}``;
    non-finite values as JSON NaN/Infinity) and ``<workdir>/tensorboard/``.

    ``resume_step``: the step the run restarts from. Rows of later steps (logged after that
    checkpoint by a run that was then killed; the resumed run logs them again) are removed
    from ``metrics.jsonl`` and TensorBoard discards its events from the step after, so no step
    is recorded twice. ``total``: the run's last step, for the console's ETA.
    """

    def __init__(
        self,
        workdir: str | os.PathLike,
        *,
        every_steps: int = 1,
        tensorboard: bool = True,
        jsonl: bool = True,
        console: bool = True,
        process_index: int | None = None,
        resume_step: int | None = None,
        total: int | None = None,
    ):
        if process_index is None:
            import jax

            process_index = jax.process_index()
        self.enabled = process_index == 0
        self.every_steps = max(1, int(every_steps))
        self.console = console
        self.workdir = pathlib.Path(workdir)
        self.total = total
        self.dropped = 0  # rows of steps after resume_step removed from metrics.jsonl
        self._jsonl = None
        self._tb = None
        self._rate = _Rate()
        if not self.enabled:
            return
        self.workdir.mkdir(parents=True, exist_ok=True)
        if jsonl:
            path = self.workdir / "metrics.jsonl"
            if resume_step is not None:
                self.dropped = truncate_after(path, resume_step)
            self._jsonl = open(path, "a", buffering=1)  # noqa: SIM115
        if tensorboard:
            from tensorboardX import SummaryWriter

            purge = None if resume_step is None else int(resume_step) + 1
            self._tb = SummaryWriter(str(self.workdir / "tensorboard"), purge_step=purge)

    def should_write(self, step: int) -> bool:
        return self.enabled and step % self.every_steps == 0

    def write(self, step: int, metrics: Mapping[str, Any], *, force: bool = False) -> bool:
        """Writes if ``step`` is a logging step (or ``force``); returns whether it wrote."""
        if not self.enabled or not (force or step % self.every_steps == 0):
            return False
        values = {k: _to_float(v) for k, v in metrics.items()}
        if self._jsonl is not None:
            record = {"step": int(step), "wall_time": time.time(), **values}
            self._jsonl.write(json.dumps(record) + "\n")
        if self._tb is not None:
            for k, v in values.items():
                self._tb.add_scalar(k, v, int(step))
            self._tb.flush()
        if self.console:
            eta = self._rate.eta(step, self.total) if "loss" in values else None
            _console(console_line(step, values, total=self.total, eta_s=eta))
        return True

    def write_text(self, step: int, name: str, text: str) -> None:
        """Sample completions etc. (TensorBoard text + console)."""
        if not self.enabled:
            return
        if self._tb is not None:
            self._tb.add_text(name, text, int(step))
        if self.console:
            _console(f"step {step} {name}: {text}")

    def close(self) -> None:
        if self._jsonl is not None:
            self._jsonl.close()
            self._jsonl = None
        if self._tb is not None:
            self._tb.close()
            self._tb = None


def truncate_after(path: pathlib.Path, step: int) -> int:
    """Removes the rows of ``metrics.jsonl`` with ``step > step`` (and a torn last line);
    returns how many were removed. Atomic: a new file replaces the old one."""
    if not path.exists():
        return 0
    keep, dropped = [], 0
    for line in path.read_text().splitlines():
        try:
            ok = int(json.loads(line)["step"]) <= step
        except (ValueError, KeyError, TypeError):
            ok = False  # a row torn by kill -9
        if ok:
            keep.append(line + "\n")
        else:
            dropped += bool(line.strip())
    if dropped:
        tmp = path.with_suffix(".jsonl.tmp")
        tmp.write_text("".join(keep))
        os.replace(tmp, path)
    return dropped


class _Rate:
    """Wall-clock seconds per step between logged training rows (checkpoints and periodic
    evaluations included, so the ETA covers them)."""

    def __init__(self) -> None:
        self._first: tuple[int, float] | None = None

    def eta(self, step: int, total: int | None) -> float | None:
        now = time.perf_counter()
        if self._first is None:
            self._first = (step, now)
            return None
        s0, t0 = self._first
        if total is None or step <= s0:
            return None
        return (now - t0) / (step - s0) * max(total - step, 0)


# Console: (key, label, format) of a training row, shown when present.
_CONSOLE = (
    ("loss", "loss", "{:.4g}"),
    ("reward_total/iqa", "reward iqa", "{:.3f}"),
    ("reward_total/iaa", "reward iaa", "{:.3f}"),
    ("kl", "kl", "{:.3g}"),
    ("parsed_frac/all", "parsed", "{:.0%}"),
    ("token_accuracy", "acc", "{:.3f}"),
    ("time/step", "", "{:.2f}s/step"),
)


def _duration(sec: float) -> str:
    sec = int(round(sec))
    h, rem = divmod(sec, 3600)
    return f"{h}h{rem // 60:02d}m" if h else f"{rem // 60}m{rem % 60:02d}s"


def console_line(
    step: int, values: Mapping[str, float], *, total: int | None = None, eta_s: float | None = None
) -> str:
    """One short line of a logged row: training (step, loss, reward per task, KL, parsed %,
    step time, ETA; skipped records and non-finite updates when there are any) or evaluation
    (per dataset SRCC / PLCC). Every metric is in the JSONL and TensorBoard."""
    head = f"step {step}/{total}" if total else f"step {step}"
    if "loss" not in values:
        evals: dict[str, list[str]] = {}
        for k, v in values.items():
            parts = k.split("/")
            if len(parts) == 3 and parts[0] == "eval" and parts[2] in ("srcc", "plcc"):
                evals.setdefault(parts[1], []).append(f"{parts[2]} {_fmt(v)}")
        if evals:
            return " | ".join([f"{head} eval", *(f"{d} {' '.join(x)}" for d, x in evals.items())])
        return f"{head}: " + " ".join(f"{k}={_fmt(v)}" for k, v in list(values.items())[:8])
    parts = [head]
    for key, label, fmt in _CONSOLE:
        if key in values and math.isfinite(values[key]):
            parts.append(f"{label} {fmt.format(values[key])}".strip())
        elif key in values:
            parts.append(f"{label} {values[key]}".strip())
    if values.get("update_skipped"):
        parts.append(f"non-finite {values['update_skipped']:.0%}")
    if values.get("data/skipped_total"):
        parts.append(f"skipped {int(values['data/skipped_total'])}")
    if eta_s is not None:
        parts.append(f"ETA {_duration(eta_s)}")
    return " | ".join(parts)


def _fmt(v: float) -> str:
    return f"{v:.4g}" if math.isfinite(v) else str(v)


def _console(line: str) -> None:
    from tqdm import tqdm

    tqdm.write(line)  # keeps an active progress bar intact


class WindowMean:
    """Per-key means of the step metrics since the last logged step.

    GRPO rewards of one step are a handful of prompts: the logged value is the mean over the
    logging window (as TRL logs), not whichever step happened to land on the logging step. A key
    absent from some steps (e.g. IAA rewards in a step without IAA prompts) is averaged over the
    steps that have it. ``LAST`` keys are states, not rates: their latest value is kept.
    """

    LAST = ("lr", "nonfinite_count", "nonfinite_total")
    LAST_PREFIXES = ("data/skipped",)  # running counts

    def __init__(self) -> None:
        self._sum: dict[str, float] = {}
        self._n: dict[str, int] = {}
        self._last: dict[str, float] = {}

    def add(self, metrics: Mapping[str, Any]) -> None:
        for k, v in metrics.items():
            x = _to_float(v)
            if k in self.LAST or k.startswith(self.LAST_PREFIXES):
                self._last[k] = x
                continue
            self._sum[k] = self._sum.get(k, 0.0) + x
            self._n[k] = self._n.get(k, 0) + 1

    def pop(self) -> dict[str, float]:
        out = {k: self._sum[k] / self._n[k] for k in self._sum}
        out.update(self._last)
        self.__init__()
        return out


class Progress:
    """tqdm bar over optimizer steps with rate and ETA; ``initial`` = resumed step."""

    def __init__(self, total: int, *, initial: int = 0, enabled: bool = True, desc: str = "train"):
        from tqdm import tqdm

        self._bar = tqdm(
            total=total,
            initial=initial,
            desc=desc,
            unit="step",
            disable=not enabled,
            dynamic_ncols=True,
        )

    def update(self, n: int = 1, **postfix: Any) -> None:
        if postfix:
            self._bar.set_postfix({k: _fmt(_to_float(v)) for k, v in postfix.items()})
        self._bar.update(n)

    def close(self) -> None:
        self._bar.close()


class StepTimer:
    """Wall-clock split of a step: ``with timer("rollout"): ...``; ``metrics()`` -> time/<name>.

    Block on device results inside a section (``jax.block_until_ready``) or the time lands in the
    next section that waits.
    """

    def __init__(self) -> None:
        self._t: dict[str, float] = {}

    @contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self._t[name] = self._t.get(name, 0.0) + time.perf_counter() - t0

    def metrics(self, reset: bool = True) -> dict[str, float]:
        out = {f"time/{k}": v for k, v in self._t.items()}
        out["time/step"] = sum(self._t.values())
        if reset:
            self._t = {}
        return out


# --- GRPO summaries ----------------------------------------------------------------------------


def grpo_reward_metrics(
    rewards: Mapping[str, Any],
    tasks: Sequence[str],
    *,
    group_size: int,
    completion_lengths: Any = None,
    parsed: Any = None,
    weights: Mapping[str, Mapping[str, float]] | None = None,
) -> dict[str, float]:
    """Reward statistics of one GRPO step's completions.

    Args:
      rewards: function name -> (N,) rewards, N = prompts x group_size, group-major (the G
        completions of a prompt are consecutive).
      tasks: (N,) task name of each completion ("iqa" / "iaa").
      completion_lengths: (N,) completion tokens (incl. EOS). parsed: (N,) bool, answer parsed.
      weights: task -> function -> weight of the total reward (None: unweighted sum).
    Returns (per task t and for "all"):
      reward/<fn>/<t> mean; reward_total/<t> mean of the weighted sum; reward_std/<t> std (ddof 0)
      of the totals; reward_group_std/<t> mean within-group std (ddof 1, as in the advantages);
      zero_std_groups/<t> fraction of groups with identical totals (no learning signal);
      completion_len/<t>; parsed_frac/<t>.
    """
    tasks = np.asarray(tasks)
    n = tasks.shape[0]
    if n % group_size:
        raise ValueError(f"{n} completions are not a multiple of group size {group_size}")
    r = {k: np.asarray(v, np.float64).reshape(-1) for k, v in rewards.items()}
    for k, v in r.items():
        if v.shape[0] != n:
            raise ValueError(f"reward {k!r} has {v.shape[0]} values for {n} completions")
    total = np.zeros(n)
    for k, v in r.items():
        w = np.array([(weights or {}).get(t, {}).get(k, 1.0) if weights else 1.0 for t in tasks])
        total += w * v
    groups_task = tasks.reshape(-1, group_size)[:, 0]
    if np.any(tasks.reshape(-1, group_size) != groups_task[:, None]):
        raise ValueError("a group mixes tasks: completions must be group-major, G per prompt")
    g_total = total.reshape(-1, group_size)
    g_std = g_total.std(axis=1, ddof=1) if group_size > 1 else np.zeros(len(g_total))
    # Identical totals exactly (a rounded std need not be 0): their advantages are all 0.
    g_same = np.ptp(g_total, axis=1) == 0
    out: dict[str, float] = {}
    for t in [*sorted(set(tasks.tolist())), "all"]:
        sel = np.ones(n, bool) if t == "all" else tasks == t
        gsel = np.ones(len(groups_task), bool) if t == "all" else groups_task == t
        for k, v in r.items():
            out[f"reward/{k}/{t}"] = float(v[sel].mean())
        out[f"reward_total/{t}"] = float(total[sel].mean())
        out[f"reward_std/{t}"] = float(total[sel].std())
        out[f"reward_group_std/{t}"] = float(g_std[gsel].mean())
        out[f"zero_std_groups/{t}"] = float(np.mean(g_same[gsel]))
        if completion_lengths is not None:
            out[f"completion_len/{t}"] = float(np.asarray(completion_lengths)[sel].mean())
        if parsed is not None:
            out[f"parsed_frac/{t}"] = float(np.asarray(parsed, bool)[sel].mean())
    return out


# --- FLOPs, parameters, MFU --------------------------------------------------------------------


def _get(cfg: Any, name: str) -> Any:
    """Field ``name`` of a model config (a Mapping or an object); a missing field is an error."""
    if isinstance(cfg, Mapping):
        if name in cfg:
            return cfg[name]
    elif hasattr(cfg, name):
        return getattr(cfg, name)
    raise KeyError(f"model config has no field {name!r}")


def _head_dim(c: Any, d: int, h: int) -> int:
    # Optional by HF's own rule: Qwen2 text configs carry no head_dim (attention uses
    # hidden_size // heads); ours is a property, which dataclasses.asdict leaves out.
    value = c.get("head_dim") if isinstance(c, Mapping) else getattr(c, "head_dim", None)
    return int(value or d // h)


def _text_dims(c: Any) -> dict[str, int]:
    d = int(_get(c, "hidden_size"))
    h = int(_get(c, "num_attention_heads"))
    return {
        "d": d,
        "h": h,
        "kv": int(_get(c, "num_key_value_heads")),
        "hd": _head_dim(c, d, h),
        "i": int(_get(c, "intermediate_size")),
        "l": int(_get(c, "num_hidden_layers")),
        "v": int(_get(c, "vocab_size")),
    }


def _vision_dims(c: Any) -> dict[str, Any]:
    def first(x):
        return int(x[0] if isinstance(x, list | tuple) else x)

    return {
        "d": int(_get(c, "hidden_size")),
        "i": int(_get(c, "intermediate_size")),
        "l": int(_get(c, "depth")),
        "h": int(_get(c, "num_heads")),
        "p": first(_get(c, "patch_size")),
        "tp": first(_get(c, "temporal_patch_size")),
        "c": int(_get(c, "in_channels")),
        "m": int(_get(c, "spatial_merge_size")),
        "out": int(_get(c, "out_hidden_size")),
        "win": int(_get(c, "window_size")),
        "full": tuple(_get(c, "fullatt_block_indexes")),
    }


def _vision_matmuls(v: Mapping[str, Any]) -> tuple[int, int]:
    """(weights applied to every patch, merger weights applied to every merged token)."""
    dv, mh = v["d"], v["d"] * v["m"] ** 2
    patch = v["c"] * v["tp"] * v["p"] ** 2 * dv
    return patch + v["l"] * (4 * dv * dv + 3 * dv * v["i"]), mh * mh + mh * v["out"]


def param_counts(
    text_cfg: Any, vision_cfg: Any = None, *, tie_word_embeddings: bool | None = None
) -> dict[str, int]:
    """Parameter counts of Qwen2.5-VL from config numbers (HF field names; dicts or objects).

    ``tie_word_embeddings``: None = read from ``text_cfg`` (transformers >= 5 keeps it on the
    top-level config only: pass ``hf_config.tie_word_embeddings``).

    Keys: embedding, text_layers, lm_head (0 when tied), text (all of the language model),
    vision, total, text_matmul / vision_matmul (weights used in per-token matmuls, for FLOPs).
    """
    t = _text_dims(text_cfg)
    if tie_word_embeddings is None:
        tie_word_embeddings = _get(text_cfg, "tie_word_embeddings")
    d, hd = t["d"], t["hd"]
    q, kv = t["h"] * hd, t["kv"] * hd
    attn = d * q + q + 2 * (d * kv + kv) + q * d  # q/k/v with bias, o without
    mlp = 3 * d * t["i"]
    layer = attn + mlp + 2 * d  # + 2 RMSNorms
    layers = t["l"] * layer
    embedding = t["v"] * d
    lm_head = 0 if tie_word_embeddings else d * t["v"]
    text = embedding + layers + d + lm_head  # + final norm
    text_matmul = t["l"] * (d * q + 2 * d * kv + q * d + mlp) + d * t["v"]
    out = {
        "embedding": embedding,
        "text_layers": layers,
        "lm_head": lm_head,
        "text": text,
        "text_matmul": text_matmul,
        "vision": 0,
        "vision_matmul": 0,
    }
    if vision_cfg is not None:
        v = _vision_dims(vision_cfg)
        dv, iv = v["d"], v["i"]
        patch = v["c"] * v["tp"] * v["p"] ** 2 * dv  # Conv3d, no bias
        block = 2 * dv + (dv * 3 * dv + 3 * dv) + (dv * dv + dv) + 2 * (dv * iv + iv) + iv * dv + dv
        mh = dv * v["m"] ** 2
        merger = dv + (mh * mh + mh) + (mh * v["out"] + v["out"])
        out["vision"] = patch + v["l"] * block + merger
        out["vision_matmul"], out["merger_matmul"] = _vision_matmuls(v)
    out["total"] = out["text"] + out["vision"]
    return out


def flops_per_token(
    text_cfg: Any,
    vision_cfg: Any = None,
    seq_len: int = 1,
    *,
    training: bool = True,
    patches_per_seq: float = 0,
    patches_per_image: int | None = None,
    train_vision: bool = True,
    causal_discount: bool = False,
    lm_head_tokens: float | None = None,
) -> float:
    """Model FLOPs per sequence token (see the module docstring for the formula).

    Args:
      seq_len: tokens per sequence (attention context; image placeholder tokens included).
      training: 3x forward (fwd + bwd) if True, else forward only (rollout / evaluation).
      patches_per_seq: pre-merge vision patches per sequence; 0 = text only. The vision tower
        runs once per *image*: rows that share an image (GRPO's G completions) share its cost,
        so pass the step's patches / rows.
      patches_per_image: context of the full-attention vision layers (default patches_per_seq).
      train_vision: False when the vision tower is frozen (forward only, no backward).
      causal_discount: count T/2 attended positions instead of T.
      lm_head_tokens: positions per sequence that go through the lm_head (None: all
        ``seq_len``, a plain forward; the GRPO update scores only the completion tokens, SFT
        only the target tokens).
    """
    t = _text_dims(text_cfg)
    # The lm_head matmul runs whether or not its weights are tied: FLOPs do not depend on tying.
    n = param_counts(text_cfg, vision_cfg, tie_word_embeddings=False)
    ctx = seq_len / 2 if causal_discount else seq_len
    head = t["d"] * t["v"]
    heads = seq_len if lm_head_tokens is None else lm_head_tokens
    fwd_text = (2 * (n["text_matmul"] - head) + 4 * t["l"] * t["h"] * t["hd"] * ctx) * seq_len
    fwd_text += 2 * head * heads
    total = (3 if training else 1) * fwd_text
    if vision_cfg is not None and patches_per_seq:
        total += vision_flops(
            vision_cfg, patches_per_seq, patches_per_image or patches_per_seq,
            training=training and train_vision,
        )  # fmt: skip
    return total / seq_len


def vision_flops(
    vision_cfg: Any, patches: float, patches_per_image: float, *, training: bool = True
) -> float:
    """Model FLOPs of the vision tower on ``patches`` pre-merge patches (full-attention layers
    attend over ``patches_per_image``, window layers over a window); ``training``: forward +
    backward (the patch embedding without an input gradient), else forward only."""
    v = _vision_dims(vision_cfg)
    matmul, merger = _vision_matmuls(v)
    win_ctx = min((v["win"] // v["p"]) ** 2, patches_per_image) if v["win"] else patches_per_image
    n_full = sum(1 for i in v["full"] if 0 <= i < v["l"])
    attn = 4 * v["d"] * ((v["l"] - n_full) * win_ctx + n_full * patches_per_image)
    patch_embed = 2 * v["c"] * v["tp"] * v["p"] ** 2 * v["d"]
    rest = 2 * matmul - patch_embed + attn + 2 * merger / v["m"] ** 2
    # The patch embedding needs no input gradient (pixels): forward + weight grad only.
    per_patch = 3 * rest + 2 * patch_embed if training else rest + patch_embed
    return per_patch * patches


# Dense bf16 peak FLOP/s per chip (vendor data sheets). Matched on jax's ``device_kind``.
_PEAK_BF16 = (
    ("tpu v6", 918e12),  # v6e / Trillium ("TPU v6 lite")
    ("tpu v5 lite", 197e12),  # v5e
    ("tpu v5e", 197e12),
    ("tpu v5p", 459e12),
    ("tpu v5", 459e12),  # v5p reports "TPU v5"
    ("tpu v4", 275e12),
    ("h200", 989e12),  # SXM, dense
    ("h100 pcie", 756e12),
    ("h100", 989e12),  # SXM, dense
    ("a100", 312e12),
)


def peak_flops(device: Any = None) -> float | None:
    """Dense bf16 peak FLOP/s of one device (a jax Device or its ``device_kind`` string).

    None when unknown (e.g. CPU), so no MFU is reported rather than a made-up one.
    """
    if device is None:
        import jax

        device = jax.devices()[0]
    kind = (device if isinstance(device, str) else getattr(device, "device_kind", "")).lower()
    for key, value in _PEAK_BF16:
        if key in kind:
            return value
    return None


def mfu(
    tokens_per_second: float, flops_per_tok: float, n_devices: int, device: Any = None
) -> float | None:
    """Model FLOPs utilisation in [0, 1], or None when the device's peak is unknown (CPU) or
    the FLOP count is (``flops_per_tok <= 0``): no made-up MFU is ever logged."""
    peak = peak_flops(device)
    if peak is None or n_devices <= 0 or flops_per_tok <= 0:
        return None
    return tokens_per_second * flops_per_tok / (n_devices * peak)
