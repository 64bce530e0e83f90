"""Build (or reuse) the embedded synthetic IQA + IAA dataset and print its declarations.

    python scripts/make_synthetic.py --out=/tmp/tatar_synthetic [--image_size=128]

Deterministic and idempotent: rerunning with the same parameters reuses the existing build.
Every record is marked ``"synthetic": true`` (see tatar_jax/data/synthetic.py for the labels).
"""

from __future__ import annotations

import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from absl import app, flags  # noqa: E402

from tatar_jax.data import manifest, synthetic  # noqa: E402

_OUT = flags.DEFINE_string("out", None, "Output folder.", required=True)
_SIZE = flags.DEFINE_integer("image_size", 128, "Long side of the images in pixels.")


def main(argv):
    del argv
    specs = synthetic.ensure_synthetic(_OUT.value, image_size=_SIZE.value)
    for name, spec in specs.items():
        n = len(manifest.read_rows(spec.manifest))
        lo, hi = spec.score_range
        print(f"{name}: {n} records, task={spec.task}, range=({lo:g}, {hi:g}), {spec.manifest}")


if __name__ == "__main__":
    app.run(main)
