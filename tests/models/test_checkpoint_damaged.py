"""Damaged HF directories: every load error names the file (and tensor) and what is wrong."""

from __future__ import annotations

import os

import numpy as np
import pytest
import tiny_models as tm
from safetensors.numpy import load_file, save_file

from tatar_jax.models import qwen2_5_vl as qvl


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    _, path = tm.tiny_hf_dir(tmp_path_factory.mktemp("hf") / "m", seed=0)
    return path


def _copy(src, dst):
    os.makedirs(dst)
    for f in os.listdir(src):
        with open(os.path.join(src, f), "rb") as a, open(os.path.join(dst, f), "wb") as b:
            b.write(a.read())
    return dst


def test_truncated_safetensors_names_the_file_and_tensor(hf_dir, tmp_path):
    path = _copy(hf_dir, tmp_path / "t")
    st = os.path.join(path, "model.safetensors")
    data = open(st, "rb").read()
    with open(st, "wb") as f:
        f.write(data[: len(data) // 2])
    with pytest.raises(qvl.CheckpointError, match=r"model\.safetensors is truncated: tensor \S+ "
                       r"needs bytes \d+-\d+ of the data section, which has \d+"):  # fmt: skip
        qvl.load_hf_checkpoint(path)
    with open(st, "wb") as f:
        f.write(data[:100])  # cut inside the JSON header
    want = r"model\.safetensors is truncated or not a safetensors file: its header claims \d+ "
    with pytest.raises(qvl.CheckpointError, match=want + "bytes, the file has 100"):
        qvl.load_hf_checkpoint(path)


def test_corrupt_config_json_names_the_path(hf_dir, tmp_path):
    path = _copy(hf_dir, tmp_path / "c")
    with open(os.path.join(path, "config.json"), "w") as f:
        f.write('{"model_type": "qwen2_5_vl",')
    with pytest.raises(ValueError, match=r"/c/config\.json is not valid JSON: Expecting"):
        qvl.load_hf_checkpoint(path)
    with open(os.path.join(path, "model.safetensors.index.json"), "w") as f:
        f.write("{oops")
    with pytest.raises(qvl.CheckpointError, match=r"index\.json: not a safetensors index"):
        qvl.load_hf_checkpoint(path, config=qvl.load_config_json(hf_dir))


def test_integer_tensor_is_refused_not_cast(hf_dir, tmp_path):
    path = _copy(hf_dir, tmp_path / "i")
    st = os.path.join(path, "model.safetensors")
    tensors = load_file(st)
    name = "visual.merger.mlp.0.bias"
    tensors[name] = np.arange(tensors[name].size, dtype=np.int32).reshape(tensors[name].shape)
    save_file(tensors, st)
    with pytest.raises(qvl.CheckpointError, match=rf"not floating-point \(1\): {name}: I32"):
        qvl.load_hf_checkpoint(path)
