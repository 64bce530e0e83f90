"""Stage 0: building the SFT reasoning data (spec §5).

A teacher model is asked to *explain a known score*: two short technical sentences for IQA (fast
track, spec §5.1), a ~100-word narrative through the eight ArtiMuse attributes for IAA (slow
track, spec §5.2). Replies are post-processed into the exact SFT target form
``<think>\\n…\\n</think>\\n<answer>SCORE</answer>``, checked by hard rules and an LLM judge
(spec §5.3), and written, in input order, to a JSONL the SFT data path reads.

Modules (one job each):

* :mod:`~tatar_jax.reasoning.prompts`     teacher and judge prompt texts (our wording, spec intent)
* :mod:`~tatar_jax.reasoning.postprocess` reply -> target text (pure string functions)
* :mod:`~tatar_jax.reasoning.judge`       hard rules, keyword coverage, judge JSON + keep rules
* :mod:`~tatar_jax.reasoning.teachers`    the ``Teacher`` protocol, OpenAI-compatible HTTP client
                                          with retries, our own JAX model as a teacher
* :mod:`~tatar_jax.reasoning.records`     input manifest reading (+ ArtiMuse attribute merge)
* :mod:`~tatar_jax.reasoning.build`       the resumable, ordered, concurrent driver

Nothing here imports JAX unless the JAX teacher is used.
"""
