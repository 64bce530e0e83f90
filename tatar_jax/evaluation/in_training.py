"""Held-out evaluation during training (the trainer's periodic eval): greedy decoding, SRCC/PLCC
per data set. Each pipeline batch carries its layout (positions, rope deltas, patch bucket);
:func:`tatar_jax.generate.prompt_batch` hands it to the sampler as it is, the path of the GRPO
rollout and of :mod:`tatar_jax.evaluation.predict`."""

from __future__ import annotations

import pathlib
from collections.abc import Sequence
from typing import Any

import numpy as np
from flax import nnx

from tatar_jax import generate
from tatar_jax.data import pipeline
from tatar_jax.train import sources

PyTree = Any
REPORTED = ("srcc", "plcc", "frac_unparsed", "mean_think_tokens")


def subsample(records: Sequence[Any], n: int) -> list[Any]:
    """Evenly spaced ``n`` records (eval sets are ordered by photo: a prefix would be biased)."""
    if n <= 0 or n >= len(records):
        return list(records)
    idx = np.linspace(0, len(records) - 1, n).round().astype(int)
    return [records[i] for i in idx]


class Evaluator:
    """Greedy decoding of the configured held-out sets (``config.eval``); ``evaluator(params)``
    returns ``{"eval/<set>/<metric>": value}`` for the metrics in ``REPORTED`` and ``n``.

    ``mesh``: only for a mesh spanning several processes (the weights are global arrays): every
    process then reads every held-out row and decodes the same whole batches over the mesh (the
    sampler's multi-process mode); otherwise the sampler runs unsharded.
    """

    def __init__(
        self,
        cfg: Any,
        model: nnx.Module,
        tok: Any,
        workdir: pathlib.Path,
        *,
        mesh: Any = None,
        rules: Any = None,
    ) -> None:
        self.tok = tok
        ev = cfg.eval
        per = int(ev.max_examples)
        self.sources = []
        for s in sources.sources(cfg, list(ev.datasets), workdir, split="test"):
            recs = subsample(s.records, per // 2 if per > 0 else -1)
            self.sources.append(pipeline.Source(s.name, s.task, recs))
        # Training patch buckets are sized for the training batch: eval's batches take the
        # default patch buckets; the sampler consumes each batch's layout as it is.
        self.opts = pipeline.options_from_config(
            cfg.data, "eval", int(ev.batch_size), tokenizer_dir=sources.tokenizer_dir(cfg),
            num_epochs=1, patch_buckets=None, vision=model.config.vision,
            **({"process_index": 0, "process_count": 1} if mesh is not None else {}),
        )  # fmt: skip
        params = generate.SamplingParams(
            max_new_tokens=int(ev.max_new_tokens),
            temperature=0.0,
            stop_token_ids=tuple(tok.eos_ids),
            pad_token_id=int(tok.pad_id),
        )
        self.sampler = generate.Sampler(model, params, mesh=mesh, rules=rules)
        self.model_config = model.config

    def __call__(self, params: PyTree) -> dict[str, float]:
        from tatar_jax.evaluation import metrics_from_completions

        out: dict[str, float] = {}
        for src in self.sources:
            recs, comps = [], []
            for batch in pipeline.make_dataset([src], self.opts):
                prompts = generate.prompt_batch(batch, self.model_config)
                gen = self.sampler.generate_prompts(prompts, state=params)
                texts = generate.decode_completions(self.tok, gen)
                for k in np.nonzero(batch.meta.valid)[0]:
                    recs.append({"gt_100": float(batch.meta.gt_100[k]), "task": src.task})
                    comps.append(texts[k])
            m = metrics_from_completions(
                recs, comps, count_tokens=lambda s: len(self.tok.encode(s)), name=src.name
            )
            for k in REPORTED:
                v = m.get(k)
                out[f"eval/{src.name}/{k}"] = float("nan") if v is None else float(v)
            out[f"eval/{src.name}/n"] = float(len(recs))
        return out
