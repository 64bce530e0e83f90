"""The sampler and the learner see the same policy: log-probs of sampled completions, as the
sampler reports them, equal the GRPO update's log-probs of the same rows (``_expand_prompts``).

If positions, image-feature indices, padding or row order differed between the rollout and the
update, the policy gradient would be taken at the wrong contexts and GRPO would silently fail to
learn; this pins them together (tiny random model, CPU, float32).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import test_train_step as tts
from flax import nnx

from tatar_jax import generate, grpo_step, rollout, sft_step


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_sampler_logps_equal_update_logps(temperature):
    model = tts._model(seed=1)
    cfg = model.config
    batch, pv_real = tts._prompt_batch(cfg)
    g, t = 3, 8
    ids = np.asarray(batch["input_ids"])
    # Stop on a token id that is likely to be sampled, so some completions end early.
    params = generate.SamplingParams(
        max_new_tokens=t, num_samples=g, temperature=temperature, stop_token_ids=(7, 11),
        pad_token_id=0, logprobs="tempered",
    )  # fmt: skip
    sampler = generate.Sampler(model, params, prompt_buckets=(ids.shape[1],))
    out = sampler.generate(
        ids, batch["attention_mask"], pv_real, batch["image_grid_thw"], rng=jax.random.key(5)
    )
    tokens, cmask, lps = (np.asarray(x) for x in out)
    assert tokens.shape == (2 * g, t)
    assert cmask.any(axis=1).all()

    rows = rollout._expand_prompts(batch, tokens, cmask, g, cfg.image_token_id)
    rows["completion_mask"] = cmask.astype(np.float32)
    shared = sft_step.shared_vision(batch, cfg.vision)
    graphdef, state = nnx.split(model)
    fn = jax.jit(grpo_step.make_logps_fn(graphdef, temperature=temperature, chunk_size=5))
    upd = np.asarray(fn(state, {"rows": rows, "shared": shared}))

    m = cmask.astype(bool)
    assert np.isfinite(lps[m]).all() and (lps[m] < 0).all()
    np.testing.assert_allclose(upd[m], lps[m], atol=2e-5, rtol=0)
    assert (upd[~m] == 0).all()
    # A row order mix-up would show: pair every row with every other row's log-probs.
    sums = np.where(m, upd, 0).sum(1)
    assert np.abs(sums - np.where(m, lps, 0).sum(1)).max() < 1e-4
    assert jnp.all(jnp.diff(jnp.sort(jnp.asarray(sums))) > 0)
