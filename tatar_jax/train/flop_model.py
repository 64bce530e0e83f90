"""The model's FLOP count and MFU estimate.

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
transformers model (eager attention), forward and forward+backward (tests/train/test_flop_model.py).
Per-token numbers average the vision cost over the sequence's tokens.

A training step counts what its compiled program runs (``inputs.step_flops``): the lm_head only
on the scored positions (``lm_head_tokens``: GRPO's completion tokens, SFT's targets) and the
vision tower once per *image* (the G completions of a prompt share it: ``patches_per_seq`` =
the step's patches / rows). This equals XLA's ``cost_analysis()`` of the compiled GRPO update
and reference pass within a few percent (the rest: elementwise ops, the log-softmax backward's
recomputed logits; tests/train/test_flop_model.py).
MFU = achieved FLOP/s / (n_devices x peak FLOP/s); None where the peak is unknown (CPU). GRPO
reports ``mfu/update`` (the policy updates over their own time) and ``mfu/ref_logps`` (the
forward-only reference pass) separately (``stages.GrpoStage``).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any


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
