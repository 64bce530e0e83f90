"""The worker processes of the multi-process end-to-end runs (tests/helpers/train_runs.py
``start_workers`` / ``worker_config`` / ``finish``, used by tests/e2e/test_train_multidevice.py
and test_grpo_dynamic_sampling.py), checked in seconds: each worker gets its device count, the
group's mesh settings and its arguments, and a failing worker fails the test with its error."""

from __future__ import annotations

import json

import pytest
from train_runs import finish, start_workers

_PROBE = """
import json, sys
import train_runs
cfg = train_runs.worker_config()
import jax
m = cfg.mesh
print(json.dumps({
    "devices": jax.device_count(),
    "collectives": jax.config.jax_cpu_collectives_implementation,
    "mesh": [m.coordinator_address, m.num_processes, m.process_id, m.shape.fsdp],
    "argv": sys.argv[5:],
}))
"""


def _report(proc) -> dict:
    return json.loads(finish(proc, timeout=600).strip().splitlines()[-1])


def test_workers_get_devices_mesh_and_arguments(tmp_path):
    two = start_workers(_PROBE, 2, 3, tmp_path, "x", 7)
    (one,) = start_workers(_PROBE, 1, 4, tmp_path)
    a, b, solo = [_report(p) for p in [*two, one]]
    address = a["mesh"][0]
    assert address.startswith("localhost:") and int(address.split(":")[1]) > 0
    assert a["mesh"] == [address, 2, 0, -1] and b["mesh"] == [address, 2, 1, -1]
    assert a["devices"] == b["devices"] == 3  # jax.distributed is joined by trainer.run only
    assert a["collectives"] == b["collectives"] == "gloo"
    assert a["argv"] == b["argv"] == [str(tmp_path), "x", "7"]
    assert solo["mesh"] == [None, None, None, -1] and solo["devices"] == 4
    assert solo["argv"] == [str(tmp_path)]


def test_a_failing_worker_fails_with_its_traceback(tmp_path):
    (proc,) = start_workers("import train_runs\nraise ValueError('boom')", 1, 1, tmp_path)
    with pytest.raises(AssertionError, match="ValueError: boom"):
        finish(proc, timeout=300)
