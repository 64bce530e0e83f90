"""Qwen2.5-VL in Flax NNX: config, vision tower, decoder, HF checkpoint load/save.

```python
from tatar_jax.models import qwen2_5_vl as qvl
model = qvl.load_hf_checkpoint(hf_dir, dtype=jnp.float32)   # nnx.Module, config at model.config
logits = model(input_ids, attention_mask=mask, pixel_values=pv, image_grid_thw=thw)  # (B, L, V)
qvl.save_hf_checkpoint(model, out_dir)
```
"""

from tatar_jax.models.qwen2_5_vl.config import (
    PRESETS,
    Qwen2_5_VLConfig,
    TextConfig,
    VisionConfig,
    load_config_json,
    preset,
    tiny,
)
from tatar_jax.models.qwen2_5_vl.hf_checkpoint import (
    CheckpointError,
    hf_rules,
    load_hf_checkpoint,
    save_hf_checkpoint,
)
from tatar_jax.models.qwen2_5_vl.hf_export import export_hf
from tatar_jax.models.qwen2_5_vl.language import KVCache
from tatar_jax.models.qwen2_5_vl.model import Qwen2_5_VLForConditionalGeneration
from tatar_jax.models.qwen2_5_vl.orbax_checkpoint import load_orbax, save_orbax
from tatar_jax.models.qwen2_5_vl.rope import (
    decode_position_ids,
    get_rope_index,
    mrope_cos_sin,
    text_position_ids,
)
from tatar_jax.models.qwen2_5_vl.vision_layout import VisionLayout, vision_bucket, vision_layout

__all__ = [
    "PRESETS",
    "CheckpointError",
    "KVCache",
    "Qwen2_5_VLConfig",
    "Qwen2_5_VLForConditionalGeneration",
    "TextConfig",
    "VisionConfig",
    "VisionLayout",
    "decode_position_ids",
    "export_hf",
    "get_rope_index",
    "hf_rules",
    "load_config_json",
    "load_hf_checkpoint",
    "load_orbax",
    "mrope_cos_sin",
    "preset",
    "save_hf_checkpoint",
    "save_orbax",
    "text_position_ids",
    "tiny",
    "vision_bucket",
    "vision_layout",
]
