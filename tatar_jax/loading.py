"""Where a policy's weights come from: the one loader for training, evaluation, scoring, teachers
and memory plans.

    from tatar_jax import loading
    policy = loading.load_policy(loading.PolicySource(hf_dir="/ckpt/Qwen2.5-VL-7B-Instruct"),
                                 dtype="bfloat16", mesh=mesh, rules=rules)
    policy.model, policy.config, policy.name, policy.step

Sources (:class:`PolicySource`), first match wins:

- ``checkpoint`` = an orbax export (a folder with ``config.json`` and ``params/``, written by
  ``qvl.save_orbax`` / ``scripts/convert_checkpoint.py``);
- ``checkpoint`` = a training run (a ``scripts/train.py`` workdir, its ``checkpoints/`` folder or
  one step folder; ``step`` -1 = the latest): the architecture is the ``config.json`` found in
  that folder or up to three levels above it (every run writes one), else ``hf_dir``'s; never
  guessed (no architecture is an error);
- ``hf_dir`` = a Hugging Face Qwen2.5-VL folder (safetensors + ``config.json``);
- neither: the embedded random model (``preset`` sizes with the vocabulary and special-token
  ids of ``tokenizer``: the embedded tokenizer, :mod:`tatar_jax.data.embedded_tokenizer`, or the
  full Qwen2.5 one), initialised from ``seed``.

The tokenizer that goes with a source: :func:`tokenizer_dir`.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from tatar_jax import sharding
from tatar_jax.models import lora
from tatar_jax.models import qwen2_5_vl as qvl

DTYPES: dict[str, Any] = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}
EMBEDDED_VOCAB = 151_936  # Qwen2.5-VL-3B's padded vocabulary (>= the tokenizer's 151,665)
QWEN_TOKENIZER_SIZE = 151_665  # the Qwen2.5-VL tokenizer's ids, added tokens included
VOCAB_MULTIPLE = 64  # a smaller tokenizer's vocabulary is padded to a multiple of this


def to_dtype(name: str) -> Any:
    """The jnp dtype named ``name`` (one of :data:`DTYPES`)."""
    if name not in DTYPES:
        raise ValueError(f"unknown dtype {name!r}; choose one of {', '.join(DTYPES)}")
    return DTYPES[name]


@dataclasses.dataclass(frozen=True)
class PolicySource:
    """Where the weights come from (see the module docstring)."""

    hf_dir: str = ""
    checkpoint: str = ""
    step: int = -1  # training checkpoints: -1 = the latest step
    preset: str = "tiny"  # the embedded model's size when neither is given


@dataclasses.dataclass
class Policy:
    """A loaded policy: the model, its architecture, a short name for reports, the training
    step it came from (None for HF / orbax exports / the embedded model)."""

    model: nnx.Module
    config: qvl.Qwen2_5_VLConfig
    name: str
    step: int | None = None


def embedded_vocab_size(num_tokens: int) -> int:
    """The embedded model's vocabulary for a tokenizer of ``num_tokens`` ids: Qwen2.5-VL-3B's
    padded 151,936 for the full Qwen2.5 tokenizer, else ``num_tokens`` rounded up to a multiple
    of :data:`VOCAB_MULTIPLE` (the embedded tokenizer's 741 ids: 768)."""
    if num_tokens >= QWEN_TOKENIZER_SIZE:
        return max(EMBEDDED_VOCAB, num_tokens)
    return -(-num_tokens // VOCAB_MULTIPLE) * VOCAB_MULTIPLE


def embedded_config(tok: Any, preset: str = "tiny") -> qvl.Qwen2_5_VLConfig:
    """The embedded random model: ``qvl.preset(preset)`` sizes with the vocabulary and
    special-token ids of ``tok`` (so its prompts and parser work), tied embeddings."""
    base = qvl.preset(preset)
    text = dataclasses.replace(
        base.text, vocab_size=embedded_vocab_size(len(tok)), tie_word_embeddings=True
    )
    return dataclasses.replace(
        base,
        text=text,
        image_token_id=tok.image_pad_id,
        video_token_id=tok.video_pad_id,
        vision_start_token_id=tok.vision_start_id,
        vision_end_token_id=tok.vision_end_id,
        bos_token_id=tok.pad_id,
        eos_token_id=tok.im_end_id,
        pad_token_id=tok.pad_id,
    )


def is_orbax_export(path: str | os.PathLike) -> bool:
    """A folder written by ``qvl.save_orbax``: ``config.json`` + ``params/``."""
    p = pathlib.Path(path)
    return (p / "config.json").is_file() and (p / qvl.orbax_checkpoint.ORBAX_PARAMS).exists()


def _run_file(checkpoint: str, name: str) -> pathlib.Path | None:
    """``name`` in the checkpoint folder or up to three levels above it (a workdir, its
    ``checkpoints/`` folder or one step folder all find the run's files)."""
    start = pathlib.Path(checkpoint)
    for p in (start, *start.parents[:3]):
        if (p / name).is_file():
            return p / name
    return None


def run_config(checkpoint: str) -> dict[str, Any] | None:
    """The training config (``run_config.json``) of the run ``checkpoint`` belongs to; None for
    an orbax export or a folder that is no training run."""
    path = _run_file(checkpoint, "run_config.json")
    if path is None:
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: not a readable run config ({e})") from e


def _embedded_tokenizer_dir() -> str:
    from tatar_jax.data import embedded_tokenizer  # lazy: builds on first use

    return embedded_tokenizer.tokenizer_dir()


def _unrecorded_tokenizer(checkpoint: str) -> str | None:
    """A run that recorded no tokenizer folder used the embedded model's tokenizer when its
    architecture has that vocabulary, else the offline Qwen2.5 rebuild (None)."""
    found = _run_file(checkpoint, "config.json")
    if found is None:
        return None
    vocab = qvl.load_config_json(str(found.parent)).text.vocab_size
    if vocab >= QWEN_TOKENIZER_SIZE:
        return None
    from tatar_jax.data import tokenizer as tok_mod

    tok_dir = _embedded_tokenizer_dir()
    n = len(tok_mod.load_tokenizer(tok_dir))
    if embedded_vocab_size(n) != vocab:
        raise ValueError(
            f"{found}: vocabulary of {vocab} tokens, but no tokenizer folder was recorded and the "
            f"embedded tokenizer ({tok_dir}) has {n} ids; give the run's tokenizer folder with "
            "--hf_dir"
        )
    return tok_dir


def tokenizer_dir(source: PolicySource) -> str | None:
    """The tokenizer folder that goes with ``source`` (None = the offline Qwen2.5 rebuild).

    ``hf_dir`` when given; else a checkpoint folder that holds its own ``tokenizer.json`` (a
    complete export); else the tokenizer the training run used (its ``run_config.json``:
    ``data.tokenizer_dir``, else ``model.hf_dir``, as :func:`tatar_jax.train.sources.tokenizer_dir`
    chose it at training time; neither: the embedded tokenizer when the run's ``config.json`` has
    its vocabulary); no weights at all (the embedded random model): the embedded tokenizer. A
    recorded folder that is gone is an error naming it.
    """
    if source.hf_dir:
        return source.hf_dir
    if not source.checkpoint:
        return _embedded_tokenizer_dir() if source.preset else None
    if (pathlib.Path(source.checkpoint) / "tokenizer.json").is_file():
        return source.checkpoint
    cfg = run_config(source.checkpoint)
    recorded = None
    if cfg is not None:
        recorded = cfg.get("data", {}).get("tokenizer_dir") or cfg.get("model", {}).get("hf_dir")
    if not recorded:
        return _unrecorded_tokenizer(source.checkpoint)
    if not (pathlib.Path(recorded) / "tokenizer.json").is_file():
        raise FileNotFoundError(
            f"{source.checkpoint}: the run's tokenizer folder {recorded} (run_config.json) has no "
            "tokenizer.json any more; give the folder with --hf_dir"
        )
    return recorded


def architecture(source: PolicySource, tokenizer: Any = None) -> qvl.Qwen2_5_VLConfig:
    """The architecture of ``source`` without loading weights."""
    if source.checkpoint:
        found = _run_file(source.checkpoint, "config.json")
        if found is not None:
            return qvl.load_config_json(str(found.parent))
    if source.hf_dir:
        return qvl.load_config_json(source.hf_dir)
    if source.checkpoint:  # never guess the architecture of stored weights
        raise FileNotFoundError(
            f"{source.checkpoint}: no config.json in the run directory or above it "
            "(the architecture); give the HF directory it was trained from"
        )
    if not source.preset:
        raise ValueError(
            "no weights: give an HF directory (model.hf_dir) or a checkpoint "
            "(model.init_checkpoint), or an embedded model preset (model.preset)"
        )
    if tokenizer is None:
        raise ValueError("the embedded model needs the tokenizer (its vocabulary and ids)")
    return embedded_config(tokenizer, source.preset)


def build_model(
    config: qvl.Qwen2_5_VLConfig,
    *,
    dtype: Any = jnp.float32,
    param_dtype: Any = None,
    remat: str | None = None,
    vision_remat: str | None = None,
    init_std: float = 0.02,
    seed: int = 0,
    abstract: bool = False,
    attention_impl: str | None = None,
) -> nnx.Module:
    """A randomly initialised model of ``config`` (``abstract``: shapes only, nothing computed).
    ``attention_impl`` (a name of ``qvl.Qwen2_5_VLConfig.attention_impl``) overrides the
    config's."""
    if attention_impl is not None:
        config = config.replace(attention_impl=attention_impl)

    def make() -> nnx.Module:
        return qvl.Qwen2_5_VLForConditionalGeneration(
            config, dtype=dtype, param_dtype=dtype if param_dtype is None else param_dtype,
            remat=remat, vision_remat=vision_remat, init_std=float(init_std),
            rngs=nnx.Rngs(seed),
        )  # fmt: skip

    return nnx.eval_shape(make) if abstract else make()


def _basename(path: str) -> str:
    return os.path.basename(os.path.normpath(path))


def load_policy(
    source: PolicySource,
    *,
    tokenizer: Any = None,
    dtype: str = "float32",
    param_dtype: str | None = None,
    remat: str | None = None,
    vision_remat: str | None = None,
    init_std: float = 0.02,
    seed: int = 0,
    mesh: Any = None,
    rules: Any = None,
    attention_impl: str | None = None,
) -> Policy:
    """The policy of ``source``, parameters placed on ``mesh`` by the logical ``rules`` (None:
    the default device). ``dtype``: activations; ``param_dtype``: parameters (default ``dtype``).
    ``attention_impl``: how the model runs attention (config ``model.attention_impl``; None:
    the architecture's default, ``"auto"``).
    """
    from tatar_jax.train import checkpointing  # lazy: orbax

    dt = to_dtype(dtype)
    pdt = dt if param_dtype is None else to_dtype(param_dtype)
    if source.checkpoint and is_orbax_export(source.checkpoint):
        model = qvl.load_orbax(
            source.checkpoint, dt, pdt, mesh=mesh, rules=rules, attention_impl=attention_impl
        )
        return Policy(model, model.config, _basename(source.checkpoint))
    if source.hf_dir and not source.checkpoint:
        model = qvl.load_hf_checkpoint(
            source.hf_dir, dt, pdt, mesh=mesh, rules=rules, remat=remat,
            vision_remat=vision_remat, attention_impl=attention_impl,
        )  # fmt: skip
        return Policy(model, model.config, _basename(source.hf_dir))
    config = architecture(source, tokenizer)
    if attention_impl is not None:
        config = config.replace(attention_impl=attention_impl)
    kw = dict(dtype=dt, param_dtype=pdt, remat=remat, vision_remat=vision_remat, seed=seed)
    if not source.checkpoint:
        model = build_model(config, init_std=init_std, **kw)
        if mesh is not None:
            state = nnx.state(model)
            nnx.update(model, jax.device_put(state, sharding.state_shardings(state, mesh, rules)))
        return Policy(model, config, f"embedded:{source.preset}")
    model = build_model(config, abstract=True, **kw)
    target = nnx.state(model, nnx.Param)
    if mesh is not None:
        target = sharding.abstract_with_shardings(
            target, sharding.state_shardings(target, mesh, rules)
        )
    params, step = checkpointing.load_params(source.checkpoint, target, step=int(source.step))
    nnx.update(model, params)
    stored = lora.stored_spec(checkpointing.param_shapes(source.checkpoint, step))
    if stored is not None:  # a LoRA run: its adapters, merged into the weights
        lora.apply_lora(model, stored, mesh=mesh, rules=rules)
        adapters, _ = checkpointing.load_params(
            source.checkpoint, lora.adapter_state(model), step=step
        )
        nnx.update(model, adapters)
        model = lora.merge(model)
    return Policy(model, config, f"{_basename(source.checkpoint)}@{step}", step)
