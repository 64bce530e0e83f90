"""HF checkpoint load/save (torch-free) and orbax conversion, checked against transformers."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
import tiny_models as tm
import torch
from flax import nnx
from safetensors.numpy import save_file
from transformers import Qwen2_5_VLForConditionalGeneration

from tatar_jax import sharding
from tatar_jax.models import qwen2_5_vl as qvl
from tatar_jax.models.qwen2_5_vl.hf_checkpoint import SafetensorsReader

TOL = 1e-4
BATCH_ROWS = [[2, (1, 4, 8), 3], [1, (1, 8, 12), 5], [4]]  # shapes as in the parity tests


@pytest.fixture(scope="module")
def hf():
    return tm.tiny_hf_model(seed=0)


@pytest.fixture(scope="module")
def batch():
    return tm.make_batch(BATCH_ROWS, seed=11, length=40)


@pytest.fixture(scope="module")
def ref_logits(hf, batch):
    return tm.hf_logits(hf, batch)


_logits, _diff = tm.jax_logits, tm.masked_max_diff


@pytest.mark.parametrize(
    "names,config_layout,shards",
    [("legacy", "flat", 1), ("v5", "nested", 1), ("legacy", "nested", 3), ("v5", "flat", 2)],
)
def test_load_layouts(tmp_path, hf, batch, ref_logits, names, config_layout, shards):
    path = tm.save_hf_dir(
        hf, tmp_path / "m", names=names, config_layout=config_layout, shards=shards
    )
    model = qvl.load_hf_checkpoint(path)
    diff = _diff(ref_logits, _logits(model, batch), batch)
    print(
        f"[checkpoint] load {names} names / {config_layout} config / {shards} shard(s): {diff:.2e}"
    )
    assert diff <= TOL


def test_round_trip_through_transformers(tmp_path, hf, batch, ref_logits):
    model = qvl.load_hf_checkpoint(tm.save_hf_dir(hf, tmp_path / "in"))
    out = tmp_path / "out"
    files = qvl.save_hf_checkpoint(model, out, max_shard_size="100KB")
    assert len(files) > 1 and (out / "model.safetensors.index.json").exists()
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == set(files)
    reloaded, info = Qwen2_5_VLForConditionalGeneration.from_pretrained(
        out, output_loading_info=True, dtype=torch.float32, attn_implementation="eager"
    )
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    diff = _diff(ref_logits, tm.hf_logits(reloaded.eval(), batch), batch)
    print(f"[checkpoint] ours -> save_hf_checkpoint -> transformers: {diff:.2e}")
    assert diff <= TOL
    # ... and the saved tensors are bit-identical to the original ones
    reader = SafetensorsReader(out)
    state = {tm._legacy_name(k): v.numpy() for k, v in hf.state_dict().items()}
    assert set(reader.keys()) == set(state)
    for name in reader.keys():
        np.testing.assert_array_equal(reader[name], state[name], err_msg=name)


def test_tied_round_trip(tmp_path, batch):
    hf = tm.tiny_hf_model(tm.tiny_hf_config(tie_word_embeddings=True), seed=3)
    model = qvl.load_hf_checkpoint(tm.save_hf_dir(hf, tmp_path / "in"))
    qvl.save_hf_checkpoint(model, tmp_path / "out")
    assert "lm_head.weight" not in SafetensorsReader(tmp_path / "out").keys()
    reloaded = Qwen2_5_VLForConditionalGeneration.from_pretrained(
        tmp_path / "out", dtype=torch.float32, attn_implementation="eager"
    ).eval()
    assert reloaded.config.tie_word_embeddings
    diff = _diff(tm.hf_logits(hf, batch), tm.hf_logits(reloaded, batch), batch)
    assert diff <= TOL


def test_bf16_save_and_load(tmp_path, hf, batch):
    src = tm.save_hf_dir(hf, tmp_path / "in")
    model = qvl.load_hf_checkpoint(src, dtype=jnp.bfloat16)
    qvl.save_hf_checkpoint(model, tmp_path / "bf16")
    reader = SafetensorsReader(tmp_path / "bf16")
    w = reader["model.layers.0.mlp.up_proj.weight"]
    assert w.dtype == ml_dtypes.bfloat16
    ref = hf.state_dict()["model.language_model.layers.0.mlp.up_proj.weight"]
    np.testing.assert_array_equal(
        w.view(np.uint16), ref.bfloat16().view(torch.int16).numpy().view(np.uint16)
    )
    assert json.loads((tmp_path / "bf16" / "config.json").read_text())["dtype"] == "bfloat16"
    # transformers reads our bf16 file; our reader gives the same bits back
    reloaded = Qwen2_5_VLForConditionalGeneration.from_pretrained(tmp_path / "bf16")
    assert reloaded.dtype == torch.bfloat16
    again = qvl.load_hf_checkpoint(tmp_path / "bf16", dtype=jnp.bfloat16)
    for a, b in zip(
        jax.tree.leaves(nnx.state(model, nnx.Param)),
        jax.tree.leaves(nnx.state(again, nnx.Param)),
        strict=True,
    ):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def _rewrite(path, edit):
    fname = os.path.join(path, "model.safetensors")
    reader = SafetensorsReader(path)
    tensors = {k: np.array(reader[k]) for k in reader.keys()}
    del reader
    edit(tensors)
    save_file(tensors, fname)


def test_clear_errors(tmp_path, hf):
    path = tm.save_hf_dir(hf, tmp_path / "m")
    _rewrite(path, lambda t: t.pop("model.layers.1.self_attn.k_proj.bias"))
    with pytest.raises(
        qvl.CheckpointError, match=r"missing \(1\): model.layers.1.self_attn.k_proj.bias"
    ):
        qvl.load_hf_checkpoint(path)

    path = tm.save_hf_dir(hf, tmp_path / "u")
    _rewrite(path, lambda t: t.update({"model.layers.7.extra.weight": np.zeros(3, np.float32)}))
    with pytest.raises(qvl.CheckpointError, match=r"unexpected \(1\): model.layers.7.extra.weight"):
        qvl.load_hf_checkpoint(path)

    path = tm.save_hf_dir(hf, tmp_path / "s")
    _rewrite(
        path,
        lambda t: t.update({"visual.merger.mlp.0.bias": np.zeros(5, np.float32)}),
    )
    with pytest.raises(
        qvl.CheckpointError, match=r"mis-shaped \(1\): visual.merger.mlp.0.bias: \(5,\)"
    ):
        qvl.load_hf_checkpoint(path)

    with pytest.raises(FileNotFoundError, match="no config.json"):
        qvl.load_hf_checkpoint(tmp_path)


def test_load_onto_a_mesh(tmp_path, hf, batch, ref_logits):
    if jax.device_count() < 2:
        pytest.skip("needs several devices (tests/conftest.py forces 8 CPU devices)")
    mesh = sharding.make_mesh({"fsdp": 2, "tensor": -1})
    model = qvl.load_hf_checkpoint(tm.save_hf_dir(hf, tmp_path / "m"), mesh=mesh)
    up = model.language_model.layers.mlp.up_proj.kernel[...]
    assert up.sharding.spec == jax.sharding.PartitionSpec(None, "fsdp", "tensor")
    diff = _diff(ref_logits, _logits(model, batch), batch)
    assert diff <= TOL


def test_convert_script_both_directions(tmp_path, hf, batch, ref_logits):
    src = tm.save_hf_dir(hf, tmp_path / "hf")
    script = os.path.join(os.path.dirname(__file__), "..", "..", "scripts", "convert_checkpoint.py")
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="")
    orbax_dir, hf_out = tmp_path / "orbax", tmp_path / "hf_out"
    # The random model has no tokenizer of its own (and its 256-token vocabulary is no shipped
    # tokenizer's), so an HF output is given one explicitly: the conversion refuses to guess.
    from tatar_jax.data import embedded_tokenizer

    tok = embedded_tokenizer.tokenizer_dir()
    for args in (
        [f"--hf_dir={src}", f"--orbax_out={orbax_dir}"],
        [f"--orbax_dir={orbax_dir}", f"--hf_out={hf_out}", "--max_shard_size=150KB",
         f"--tokenizer_dir={tok}"],
    ):  # fmt: skip
        r = subprocess.run([sys.executable, script, *args], env=env, capture_output=True, text=True)
        assert r.returncode == 0, r.stderr[-2000:]
    assert (orbax_dir / "config.json").exists() and (
        hf_out / "model.safetensors.index.json"
    ).exists()
    from_orbax = qvl.load_orbax(orbax_dir)
    assert _diff(ref_logits, _logits(from_orbax, batch), batch) <= TOL
    reloaded = Qwen2_5_VLForConditionalGeneration.from_pretrained(
        hf_out, dtype=torch.float32, attn_implementation="eager"
    ).eval()
    diff = _diff(ref_logits, tm.hf_logits(reloaded, batch), batch)
    print(f"[checkpoint] HF -> orbax -> HF (script) -> transformers: {diff:.2e}")
    assert diff <= TOL
    r = subprocess.run(
        [sys.executable, script, f"--hf_dir={src}"], env=env, capture_output=True, text=True
    )
    assert (r.returncode, r.stderr) == (2, "error: --hf_dir needs --orbax_out\n")  # usage error
