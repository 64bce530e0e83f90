"""The one loader: every source kind gives the weights that were stored, named and placed."""

from __future__ import annotations

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tiny_models as tm
from flax import nnx

from tatar_jax import loading
from tatar_jax.models import qwen2_5_vl as qvl
from tatar_jax.train import checkpointing, optim


def _params(model) -> dict[str, np.ndarray]:
    flat = jax.tree_util.tree_leaves_with_path(nnx.state(model, nnx.Param))
    return {jax.tree_util.keystr(p): np.asarray(v) for p, v in flat}


def _assert_same(a, b) -> None:
    pa, pb = _params(a), _params(b)
    assert pa.keys() == pb.keys()
    for k in pa:
        np.testing.assert_array_equal(pa[k], pb[k], err_msg=k)


def test_dtype_table():
    assert loading.to_dtype("bfloat16") == jnp.bfloat16
    with pytest.raises(ValueError, match="unknown dtype 'fp32'; choose one of float32, bfloat16"):
        loading.to_dtype("fp32")


def test_embedded_model_uses_the_tokenizer_vocabulary_and_seed():
    from tatar_jax.data import tokenizer

    tok = tokenizer.load_tokenizer(None)
    src = loading.PolicySource(preset="tiny")
    a = loading.load_policy(src, tokenizer=tok, seed=3)
    b = loading.load_policy(src, tokenizer=tok, seed=3)
    assert a.name == "embedded:tiny" and a.step is None
    assert a.config.text.vocab_size == loading.EMBEDDED_VOCAB and a.config.text.tie_word_embeddings
    assert (a.config.image_token_id, a.config.eos_token_id) == (tok.image_pad_id, tok.im_end_id)
    _assert_same(a.model, b.model)
    c = loading.load_policy(src, tokenizer=tok, seed=4)
    pa, pc = _params(a.model), _params(c.model)
    assert any(not np.array_equal(pa[k], pc[k]) for k in pa)  # the seed is used
    with pytest.raises(ValueError, match="needs the tokenizer"):
        loading.load_policy(src)
    with pytest.raises(ValueError, match="no weights: give an HF directory"):
        loading.load_policy(loading.PolicySource(preset=""), tokenizer=tok)


def test_hf_dir_orbax_export_and_training_run(tmp_path):
    hf = tm.tiny_hf_model(seed=0)
    hf_dir = tm.save_hf_dir(hf, tmp_path / "hf_tiny")
    ref = qvl.load_hf_checkpoint(hf_dir, jnp.float32)

    got = loading.load_policy(loading.PolicySource(hf_dir=hf_dir))
    assert got.name == "hf_tiny" and got.step is None
    _assert_same(got.model, ref)

    qvl.save_orbax(ref, tmp_path / "export")
    assert loading.is_orbax_export(tmp_path / "export")
    exp = loading.load_policy(loading.PolicySource(checkpoint=str(tmp_path / "export")))
    assert exp.name == "export"
    _assert_same(exp.model, ref)

    # A training run: config.json in the workdir, params in checkpoints/<step>/.
    wd = tmp_path / "run"
    wd.mkdir()
    ref.config.to_json_file(str(wd / "config.json"))
    tx = optim.make_optimizer(1e-3)
    ckpt = checkpointing.Checkpointer(wd, every_steps=1, async_save=False, with_data=False)
    state = optim.TrainState.create(nnx.state(ref), tx, jax.random.key(0))
    ckpt.save(7, state)
    ckpt.close()
    assert not loading.is_orbax_export(wd)
    for path in (wd, wd / "checkpoints", wd / "checkpoints" / "7"):
        run = loading.load_policy(loading.PolicySource(checkpoint=str(path)))
        assert run.step == 7 and run.name.endswith("@7")
        _assert_same(run.model, ref)
    bf = loading.load_policy(loading.PolicySource(checkpoint=str(wd)), dtype="bfloat16")
    assert {v.dtype for v in _params(bf.model).values()} == {jnp.dtype(jnp.bfloat16)}


def test_training_run_without_architecture_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="no config.json in the run directory"):
        loading.load_policy(loading.PolicySource(checkpoint=str(tmp_path / "nothing")))
    with pytest.raises(FileNotFoundError, match="no config.json in the run directory"):
        # a tokenizer (the embedded model's ingredients) does not make the loader guess
        loading.load_policy(
            loading.PolicySource(checkpoint=str(tmp_path / "nothing")), tokenizer=object()
        )


def test_placed_on_a_mesh_by_the_rules(tmp_path):
    """Embedded and training-run weights land on the mesh per the logical rules, unchanged."""
    from tatar_jax import sharding
    from tatar_jax.data import tokenizer

    tok = tokenizer.load_tokenizer(None)
    mesh = sharding.make_mesh({"fsdp": 2}, devices=jax.devices()[:2])
    rules = sharding.DEFAULT_RULES
    src = loading.PolicySource(preset="tiny")
    plain = loading.load_policy(src, tokenizer=tok, seed=1)

    wd = tmp_path / "run"
    wd.mkdir()
    plain.config.to_json_file(str(wd / "config.json"))
    ckpt = checkpointing.Checkpointer(wd, every_steps=1, async_save=False, with_data=False)
    state = optim.TrainState.create(
        nnx.state(plain.model), optim.make_optimizer(1e-3), jax.random.key(0)
    )
    ckpt.save(2, state)
    ckpt.close()

    for source in (src, loading.PolicySource(checkpoint=str(wd))):
        placed = loading.load_policy(source, tokenizer=tok, seed=1, mesh=mesh, rules=rules)
        _assert_same(plain.model, placed.model)
        params = nnx.state(placed.model, nnx.Param)
        want = sharding.state_shardings(params, mesh, rules)
        got = jax.tree.map(lambda x: x.sharding, params)
        assert jax.tree.leaves(got) == jax.tree.leaves(want)
        assert any(not s.is_fully_replicated for s in jax.tree.leaves(got))  # really sharded


def test_abstract_model_computes_nothing():
    config = qvl.preset("7b")
    model = loading.build_model(config, dtype=jnp.bfloat16, abstract=True)
    leaves = jax.tree.leaves(nnx.state(model, nnx.Param))
    assert leaves and all(isinstance(x, jax.ShapeDtypeStruct) for x in leaves)
    assert {x.dtype for x in leaves} == {jnp.dtype(jnp.bfloat16)}


def test_tokenizer_dir_of_each_source(tmp_path):
    hf = tmp_path / "hf"
    hf.mkdir()
    (hf / "tokenizer.json").write_text("{}")
    # No weights: the embedded random model, with the embedded tokenizer's vocabulary.
    from tatar_jax.data import embedded_tokenizer

    assert loading.tokenizer_dir(loading.PolicySource()) == embedded_tokenizer.tokenizer_dir()
    assert loading.tokenizer_dir(loading.PolicySource(preset="")) is None  # the offline rebuild
    assert loading.tokenizer_dir(loading.PolicySource(hf_dir=str(hf))) == str(hf)
    # A complete export carries its own.
    assert loading.tokenizer_dir(loading.PolicySource(checkpoint=str(hf))) == str(hf)

    # A GRPO main job: the run at the top, the warm-up in sft/, step folders below each.
    wd = tmp_path / "run"
    (wd / "sft" / "checkpoints" / "3").mkdir(parents=True)
    (wd / "checkpoints" / "5").mkdir(parents=True)
    (wd / "run_config.json").write_text('{"data": {"tokenizer_dir": ""}, "model": {"hf_dir": ""}}')
    (wd / "sft" / "run_config.json").write_text(
        json.dumps({"data": {"tokenizer_dir": ""}, "model": {"hf_dir": str(hf)}})
    )
    for ckpt in (wd, wd / "checkpoints" / "5"):
        assert loading.tokenizer_dir(loading.PolicySource(checkpoint=str(ckpt))) is None
    for ckpt in (wd / "sft", wd / "sft" / "checkpoints" / "3"):
        assert loading.tokenizer_dir(loading.PolicySource(checkpoint=str(ckpt))) == str(hf)
    # data.tokenizer_dir wins over model.hf_dir, as at training time; a folder gone is named.
    (wd / "run_config.json").write_text(
        json.dumps({"data": {"tokenizer_dir": str(tmp_path / "gone")}, "model": {"hf_dir": ""}})
    )
    with pytest.raises(FileNotFoundError, match=r"tokenizer folder .*gone \(run_config.json\)"):
        loading.tokenizer_dir(loading.PolicySource(checkpoint=str(wd)))
    (wd / "run_config.json").write_text("{broken")
    with pytest.raises(ValueError, match=r"run_config.json: not a readable run config"):
        loading.tokenizer_dir(loading.PolicySource(checkpoint=str(wd)))


def test_an_unrecorded_tokenizer_follows_the_runs_vocabulary(tmp_path):
    """A run that recorded no tokenizer folder: the embedded tokenizer when its config.json has
    that vocabulary, the Qwen2.5 rebuild for a 152k one, an error naming the file otherwise."""
    from tatar_jax.data import embedded_tokenizer, tokenizer

    small = tokenizer.load_tokenizer(embedded_tokenizer.tokenizer_dir())
    (tmp_path / "run_config.json").write_text('{"data": {}, "model": {"hf_dir": ""}}')
    src = loading.PolicySource(checkpoint=str(tmp_path))
    assert loading.tokenizer_dir(src) is None  # no config.json: nothing says otherwise
    loading.embedded_config(small, "tiny").to_json_file(str(tmp_path / "config.json"))
    assert loading.tokenizer_dir(src) == embedded_tokenizer.tokenizer_dir()
    big = loading.embedded_config(tokenizer.load_tokenizer(None), "tiny")
    assert big.text.vocab_size == 151_936
    big.to_json_file(str(tmp_path / "config.json"))
    assert loading.tokenizer_dir(src) is None
    odd = big.replace(text=dataclasses.replace(big.text, vocab_size=512))
    odd.to_json_file(str(tmp_path / "config.json"))
    with pytest.raises(ValueError, match=r"config.json: vocabulary of 512 tokens, but no"):
        loading.tokenizer_dir(src)


def test_embedded_vocab_size():
    assert loading.embedded_vocab_size(151_665) == 151_936  # the full Qwen2.5 tokenizer
    assert loading.embedded_vocab_size(741) == 768
    assert loading.embedded_vocab_size(768) == 768
