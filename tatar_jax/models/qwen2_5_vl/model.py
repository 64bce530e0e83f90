"""The Qwen2.5-VL model (Flax NNX): vision tower + image-token merge + decoder + lm_head.

Equal to transformers' ``Qwen2_5_VLForConditionalGeneration`` (images; videos are not ported).

Two ways to call it:

- eager convenience, HF-style inputs: ``model(input_ids, attention_mask, pixel_values,
  image_grid_thw)``; the mRoPE positions (:func:`rope.get_rope_index`) and the vision layout
  (:func:`vision.vision_layout`) are computed on the host from the concrete arrays.
- jittable: pass ``position_ids`` (3, B, L) and, with images, ``vision_layout`` (a
  :class:`VisionLayout` of arrays) with ``pixel_values`` padded to its patch budget
  (``layout.patch_index.shape[0]`` rows). ``image_grid_thw`` is then unused. This is how the data
  pipeline, training and rollout call it: all shapes are static.

Image features replace the embeddings of the ``image_token_id`` tokens in row-major order over
the batch (HF ``masked_scatter``): token ``n`` (counting image tokens over the flattened batch)
takes vision output row ``n`` — a cumulative-count gather, no dynamic-shape scatter. Under jit
the number of image tokens must equal the number of real merged vision tokens (the eager path
checks it).

Parameters: ``visual`` (:class:`vision.VisionTransformer`), ``language_model``
(:class:`language.TextModel`) and, when embeddings are not tied, ``lm_head`` (kernel (D, V),
logical names (embed, vocab)). See those modules for the logical axis names of every parameter.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from tatar_jax.models.qwen2_5_vl import rope
from tatar_jax.models.qwen2_5_vl.config import Qwen2_5_VLConfig
from tatar_jax.models.qwen2_5_vl.language import KVCache, TextModel
from tatar_jax.models.qwen2_5_vl.vision import VisionTransformer, vision_layout
from tatar_jax.models.qwen2_5_vl.vision_layout import VisionLayout

__all__ = ["Qwen2_5_VLForConditionalGeneration", "merge_image_features"]


def merge_image_features(
    embeds: jax.Array,
    input_ids: jax.Array,
    features: jax.Array,
    image_token_id: int,
    feat_index: jax.Array | None = None,
) -> jax.Array:
    """embeds (B, L, D); features (M, D) in HF order → embeds with image tokens replaced.

    ``feat_index`` None (HF ``masked_scatter``): the n-th image token of the flattened batch takes
    ``features[n]`` (indices past M clamp; the caller guarantees counts match).
    ``feat_index`` (B, L) int: the feature row each token takes, -1 where none. Training and the
    sampler build it on the host so that rows can be sliced into micro-batches or repeated per
    sample (the index is a gather into the step's shared features), and so that a completion
    that *samples* the image-token id stays text, as in HF ``generate``.
    """
    is_img = input_ids == image_token_id
    if feat_index is None:
        idx = jnp.cumsum(is_img.reshape(-1).astype(jnp.int32)) - 1
        idx = jnp.clip(idx, 0, features.shape[0] - 1).reshape(is_img.shape)
    else:
        is_img = is_img & (feat_index >= 0)
        idx = jnp.maximum(feat_index, 0)
    gathered = features[idx].astype(embeds.dtype)
    return jnp.where(is_img[..., None], gathered, embeds)


class Qwen2_5_VLForConditionalGeneration(nnx.Module):
    """Qwen2.5-VL. ``config`` is a :class:`Qwen2_5_VLConfig`.

    Args:
      dtype / param_dtype: activation and parameter dtypes (float32, bfloat16, ...).
      remat: per-layer rematerialisation of the decoder (None, "full", "dots_saveable", ...).
      vision_remat: the same for the vision tower (None, "full", "dots", "dots_no_batch").
      init_std: std of the random initialiser (checkpoints overwrite it).
    """

    def __init__(
        self,
        config: Qwen2_5_VLConfig,
        *,
        dtype: Any = jnp.float32,
        param_dtype: Any = jnp.float32,
        remat: str | None = None,
        vision_remat: str | None = None,
        init_std: float = 0.02,
        rngs: nnx.Rngs,
    ) -> None:
        self.config = config
        self.dtype = dtype
        self.visual = VisionTransformer(
            config.vision,
            dtype=dtype,
            param_dtype=param_dtype,
            remat=vision_remat,
            attention_impl=config.attention_impl,
            rngs=rngs,
        )
        self.language_model = TextModel(
            config.text,
            dtype=dtype,
            param_dtype=param_dtype,
            remat=remat,
            init_std=init_std,
            attention_impl=config.attention_impl,
            rngs=rngs,
        )
        if config.text.tie_word_embeddings:
            self.lm_head = None
        else:
            with nnx.use_eager_sharding(False):
                self.lm_head = nnx.Linear(
                    config.text.hidden_size,
                    config.text.vocab_size,
                    use_bias=False,
                    dtype=dtype,
                    param_dtype=param_dtype,
                    kernel_init=nnx.initializers.normal(init_std),
                    kernel_metadata={"out_sharding": ("embed", "vocab")},
                    rngs=rngs,
                )

    # --- pieces ---------------------------------------------------------------------------------
    def lm_head_weight(self) -> tuple[jax.Array, str]:
        """(weight, layout): the (D, V) lm_head kernel and ``"dv"``, or with tied embeddings the
        (V, D) embedding table and ``"vd"`` — the arguments of :func:`tatar_jax.logprobs`."""
        if self.lm_head is None:
            return self.language_model.embed_tokens.embedding[...], "vd"
        return self.lm_head.kernel[...], "dv"

    def logits_from_hidden(self, hidden: jax.Array) -> jax.Array:
        """(..., D) → (..., V) in the activation dtype."""
        w, layout = self.lm_head_weight()
        w = w.astype(self.dtype)
        return hidden @ w if layout == "dv" else hidden @ w.T

    def image_features(self, pixel_values: jax.Array, layout: VisionLayout) -> jax.Array:
        """pixel_values (P, patch_dim) padded to the layout budget → (M, D) in HF order."""
        tokens, _ = self.visual(pixel_values, layout)
        return tokens

    def input_embeddings(
        self,
        input_ids: jax.Array,
        pixel_values: jax.Array | None = None,
        layout: VisionLayout | None = None,
        feat_index: jax.Array | None = None,
        image_features: jax.Array | None = None,
    ) -> jax.Array:
        """(B, L) ids → (B, L, D), image features merged at the image-pad tokens
        (``feat_index``: see :func:`merge_image_features`). ``image_features`` (M, D): the
        vision tower's output computed beforehand (:meth:`image_features`), used instead of
        running the tower on ``pixel_values``."""
        embeds = self.language_model.embed(input_ids)
        if image_features is None:
            if pixel_values is None:
                return embeds
            image_features = self.image_features(pixel_values, layout)
        return merge_image_features(
            embeds, input_ids, image_features, self.config.image_token_id, feat_index
        )

    def _prepare(
        self,
        input_ids: Any,
        attention_mask: Any,
        pixel_values: Any,
        image_grid_thw: Any,
        position_ids: Any,
        vision_layout_: VisionLayout | None,
    ) -> tuple[jax.Array, jax.Array, jax.Array | None, VisionLayout | None]:
        """Fills in host-computed positions / layout when not given (eager convenience)."""
        needs_host = position_ids is None or (pixel_values is not None and vision_layout_ is None)
        if needs_host and self._traced(input_ids, attention_mask, pixel_values):
            raise ValueError(
                "under jax transforms pass position_ids (and vision_layout with pixel_values): "
                "they are computed on the host from concrete arrays"
            )
        if attention_mask is None:
            attention_mask = jnp.ones(jnp.shape(input_ids), jnp.int32)
        if pixel_values is not None and vision_layout_ is None:
            if image_grid_thw is None:
                raise ValueError("pixel_values needs image_grid_thw (or vision_layout)")
            grid = np.asarray(image_grid_thw)
            vision_layout_ = vision_layout(grid, self.config.vision)
            n = int(np.prod(grid, axis=-1).sum())
            pv = np.asarray(pixel_values)
            if pv.shape[0] != n:
                raise ValueError(f"pixel_values has {pv.shape[0]} rows, image_grid_thw needs {n}")
            n_tok = int((np.asarray(input_ids) == self.config.image_token_id).sum())
            m2 = self.config.vision.spatial_merge_size**2
            if n_tok != n // m2:
                raise ValueError(
                    f"input_ids hold {n_tok} image tokens but image_grid_thw gives {n // m2} "
                    "image features"
                )
            pad = vision_layout_.patch_index.shape[0] - n
            pixel_values = jnp.pad(jnp.asarray(pv), ((0, pad), (0, 0)))
        if position_ids is None:
            if image_grid_thw is None:
                position_ids = rope.text_position_ids(np.asarray(attention_mask))
            else:
                position_ids, _ = rope.get_rope_index(
                    np.asarray(input_ids),
                    np.asarray(image_grid_thw),
                    np.asarray(attention_mask),
                    self.config,
                )
        return (
            jnp.asarray(attention_mask),
            jnp.asarray(position_ids),
            None if pixel_values is None else jnp.asarray(pixel_values),
            vision_layout_,
        )

    def _hidden(
        self,
        input_ids: jax.Array,
        mask: jax.Array,
        pos: jax.Array,
        pv: jax.Array | None,
        layout: VisionLayout | None,
        cache: KVCache | None,
        cache_attention_mask: jax.Array | None,
        feat_index: jax.Array | None,
        image_features: jax.Array | None = None,
    ) -> tuple[jax.Array, KVCache | None]:
        embeds = self.input_embeddings(input_ids, pv, layout, feat_index, image_features)
        t = self.config.text
        cos, sin = rope.mrope_cos_sin(pos, t.head_dim, t.rope_theta, t.mrope_section)
        kv_mask = mask if cache is None else cache_attention_mask
        return self.language_model(embeds, cos, sin, kv_mask, cache)

    def _traced(self, *arrays: Any) -> bool:
        params = (self.language_model.norm.scale.get_raw_value(),)
        leaves = jax.tree.leaves((arrays, params))
        return any(isinstance(x, jax.core.Tracer) for x in leaves)

    def hidden_states(
        self,
        input_ids: jax.Array,
        attention_mask: jax.Array | None = None,
        pixel_values: jax.Array | None = None,
        image_grid_thw: Any = None,
        *,
        position_ids: jax.Array | None = None,
        vision_layout: VisionLayout | None = None,
        cache: KVCache | None = None,
        cache_attention_mask: jax.Array | None = None,
        feat_index: jax.Array | None = None,
        image_features: jax.Array | None = None,
    ) -> tuple[jax.Array, KVCache | None]:
        """Final-normed hidden states (B, L, D) (before the lm_head) and the updated cache.

        The one forward of the model: inference, the sampler (prefill and decode), the SFT and
        GRPO updates and the reference log-probs all call it. ``feat_index`` (B, L): the image
        feature row of each token (see :func:`merge_image_features`); None = HF order.
        ``image_features`` (M, D): the step's vision-tower output computed once beforehand
        (the GRPO update shares it across micro-batches); then ``pixel_values`` is not used.

        With ``cache`` (see :meth:`init_cache`), the tokens are written at ``cache.index``;
        ``position_ids`` (3, B, L) must then be given and ``cache_attention_mask`` (B, T) marks the
        valid cache slots including the new tokens. Called outside a jax transform, the forward
        runs through a cached ``nnx.jit`` (one compilation per input shape).
        """
        if cache is not None and cache_attention_mask is None:
            raise ValueError("with a cache, pass cache_attention_mask (B, cache_length)")
        if pixel_values is not None and position_ids is None and image_grid_thw is None:
            raise ValueError("pixel_values needs image_grid_thw, or position_ids + vision_layout")
        args = (
            jnp.asarray(input_ids),
            *self._prepare(
                input_ids, attention_mask, pixel_values, image_grid_thw, position_ids, vision_layout
            ),
            cache,
            cache_attention_mask,
            None if feat_index is None else jnp.asarray(feat_index),
            image_features,
        )
        if self._traced(*args):
            return self._hidden(*args)
        return _jit_hidden(self, *args)

    def __call__(
        self,
        input_ids: jax.Array,
        attention_mask: jax.Array | None = None,
        pixel_values: jax.Array | None = None,
        image_grid_thw: Any = None,
        **forward: Any,
    ) -> jax.Array:
        """Logits (B, L, V) in the activation dtype. Shapes as in transformers: input_ids (B, L),
        attention_mask (B, L), pixel_values (N, patch_dim), image_grid_thw (num_images, 3);
        ``forward``: the keyword arguments of :meth:`hidden_states` (``position_ids``,
        ``vision_layout``, ``feat_index``) for jitted callers."""
        h, _ = self.hidden_states(
            input_ids, attention_mask, pixel_values, image_grid_thw, **forward
        )
        if self._traced(h):
            return self.logits_from_hidden(h)
        return _jit_logits(self, h)

    # --- decoding -------------------------------------------------------------------------------
    def init_cache(self, batch: int, max_len: int, dtype: Any = None) -> KVCache:
        """Empty :class:`KVCache` (layers, batch, max_len, kv_heads, head_dim)."""
        t = self.config.text
        return KVCache.init(
            t.num_hidden_layers,
            batch,
            max_len,
            t.num_key_value_heads,
            t.head_dim,
            dtype or self.dtype,
        )

    def forward_with_cache(
        self,
        input_ids: jax.Array,
        position_ids: jax.Array,
        cache: KVCache,
        cache_attention_mask: jax.Array,
        pixel_values: jax.Array | None = None,
        vision_layout: VisionLayout | None = None,
    ) -> tuple[jax.Array, KVCache]:
        """Prefill (L = prompt length) or decode (L = 1) step: logits (B, L, V), new cache."""
        h, cache = self.hidden_states(
            input_ids,
            jnp.ones(jnp.shape(input_ids), jnp.int32),
            pixel_values,
            position_ids=position_ids,
            vision_layout=vision_layout,
            cache=cache,
            cache_attention_mask=cache_attention_mask,
        )
        return self.logits_from_hidden(h), cache


@nnx.jit
def _jit_hidden(model, *args):
    return model._hidden(*args)


@nnx.jit
def _jit_logits(model, hidden):
    return model.logits_from_hidden(hidden)
