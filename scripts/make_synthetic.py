"""Build (or reuse) the embedded synthetic IQA + IAA dataset and print its declarations.

    python scripts/make_synthetic.py --out=/tmp/tatar_synthetic [--image_size=128]

Deterministic and idempotent: rerunning with the same parameters reuses the existing build.
Every record is marked ``"synthetic": true`` (see tatar_jax/data/synthetic.py for the labels).
``--out`` is replaced only when it is empty or an unchanged earlier build of this tool (its
``meta.json`` names the tool and lists the sha256 of every file it wrote); any other folder or
file is refused with one line, exit status 2, and left as it is.
"""

from __future__ import annotations

from absl import flags

from tatar_jax import cli_errors
from tatar_jax.data import manifest, synthetic

_OUT = flags.DEFINE_string("out", None, "Output folder.", required=True)
_SIZE = flags.DEFINE_integer("image_size", 128, "Long side of the images in pixels.")


def main(argv: list[str]) -> int:
    if len(argv) > 1:
        raise cli_errors.UsageError(f"unexpected arguments: {argv[1:]}")
    if _SIZE.value < 8:
        raise cli_errors.UsageError(f"--image_size: must be >= 8, got {_SIZE.value}")
    try:
        specs = synthetic.ensure_synthetic(_OUT.value, image_size=_SIZE.value)
    except FileExistsError as err:
        raise cli_errors.UsageError(f"--out: {err}") from None
    for name, spec in specs.items():
        n = len(manifest.read_rows(spec.manifest))
        lo, hi = spec.score_range
        print(f"{name}: {n} records, task={spec.task}, range=({lo:g}, {hi:g}), {spec.manifest}")
    return 0


if __name__ == "__main__":
    cli_errors.run_script(main)
