"""Model config: both HF config.json layouts, the dict transformers loads, presets."""

from __future__ import annotations

import dataclasses
import json

import pytest
import tiny_models as tm
import transformers

from tatar_jax.models.qwen2_5_vl import config as C


def test_nested_and_flat_layouts_give_the_tiny_preset():
    hf_cfg = tm.tiny_hf_config()
    nested = C.Qwen2_5_VLConfig.from_hf_dict(hf_cfg.to_dict())
    flat = C.Qwen2_5_VLConfig.from_hf_dict(tm.legacy_config_dict(hf_cfg))
    assert nested == flat == C.tiny()


def test_tied_flag_from_either_level():
    hf_cfg = tm.tiny_hf_config(tie_word_embeddings=True)
    assert C.Qwen2_5_VLConfig.from_hf_dict(hf_cfg.to_dict()).tie_word_embeddings
    assert C.Qwen2_5_VLConfig.from_hf_dict(tm.legacy_config_dict(hf_cfg)).tie_word_embeddings
    d = hf_cfg.to_dict()
    d.pop("tie_word_embeddings")
    d["text_config"]["tie_word_embeddings"] = True
    assert C.Qwen2_5_VLConfig.from_hf_dict(d).tie_word_embeddings


def test_transformers_defaults_round_trip():
    """transformers' default config (72B-like text, mrope_section defaulted) reads as
    transformers interprets it (its default vision out_hidden_size does not fit: set it)."""
    hf_cfg = transformers.Qwen2_5_VLConfig(vision_config={"out_hidden_size": 8192})
    ours = C.Qwen2_5_VLConfig.from_hf_dict(hf_cfg.to_dict())
    t = hf_cfg.text_config
    assert ours.text.hidden_size == t.hidden_size
    assert ours.text.num_key_value_heads == t.num_key_value_heads
    assert ours.text.rope_theta == t.rope_parameters["rope_theta"]
    assert ours.text.mrope_section == (16, 24, 24)
    assert ours.vision.fullatt_block_indexes == tuple(hf_cfg.vision_config.fullatt_block_indexes)


@pytest.mark.parametrize("name", sorted(C.PRESETS))
def test_to_hf_dict_loads_in_transformers(tmp_path, name):
    ours = C.preset(name)
    path = tmp_path / "config.json"
    ours.to_json_file(path)
    hf_cfg = transformers.AutoConfig.from_pretrained(tmp_path)
    assert isinstance(hf_cfg, transformers.Qwen2_5_VLConfig)
    t, v = hf_cfg.text_config, hf_cfg.vision_config
    for f in dataclasses.fields(C.TextConfig):
        if f.name in ("rope_theta", "mrope_section", "tie_word_embeddings"):
            continue
        assert getattr(t, f.name) == getattr(ours.text, f.name), f.name
    assert t.rope_parameters["rope_theta"] == ours.text.rope_theta
    assert tuple(t.rope_parameters["mrope_section"]) == ours.text.mrope_section
    assert hf_cfg.tie_word_embeddings == ours.text.tie_word_embeddings
    for f in dataclasses.fields(C.VisionConfig):
        got = getattr(v, f.name)
        assert (tuple(got) if isinstance(got, list) else got) == getattr(ours.vision, f.name)
    assert hf_cfg.image_token_id == ours.image_token_id
    # and back
    assert C.Qwen2_5_VLConfig.from_hf_dict(json.loads(path.read_text())) == ours


def test_published_presets():
    """The numbers of the released Qwen2.5-VL-*-Instruct config.json files."""
    expect = {  # hidden, layers, heads, kv heads, intermediate, vocab, tied, vision intermediate
        "3b": (2048, 36, 16, 2, 11008, 151936, True, 3420),
        "7b": (3584, 28, 28, 4, 18944, 152064, False, 3420),
        "32b": (5120, 64, 40, 8, 27648, 152064, False, 3456),
        "72b": (8192, 80, 64, 8, 29568, 152064, False, 3456),
    }
    for name, (d, n, h, kv, f, vocab, tied, vf) in expect.items():
        c = C.preset(name)
        t = c.text
        got = (t.hidden_size, t.num_hidden_layers, t.num_attention_heads, t.num_key_value_heads)
        assert got == (d, n, h, kv), name
        assert (t.intermediate_size, t.vocab_size, t.tie_word_embeddings) == (f, vocab, tied)
        assert t.head_dim == 128 and t.mrope_section == (16, 24, 24) and t.rope_theta == 1e6
        assert c.vision.intermediate_size == vf and c.vision.out_hidden_size == d
        assert c.vision.hidden_size == 1280 and c.vision.depth == 32
        assert c.image_token_id == 151655 and c.vision_start_token_id == 151652
    assert C.preset("Qwen2.5-VL-7B-Instruct") == C.preset("7b")


def test_clear_errors(tmp_path):
    with pytest.raises(ValueError, match="model_type is 'llama'"):
        C.Qwen2_5_VLConfig.from_hf_dict({"model_type": "llama"})
    with pytest.raises(ValueError, match="mrope_section"):
        C.TextConfig(hidden_size=64, num_attention_heads=4, mrope_section=(16, 24, 24))
    with pytest.raises(ValueError, match="unknown preset"):
        C.preset("13b")
    with pytest.raises(FileNotFoundError, match="no config.json"):
        C.load_config_json(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        C.load_config_json(tmp_path)
