"""Run records across restarts: the stored run config (refuse / record a change), the merged
summary, metrics.jsonl without a step twice, the compact console line."""

from __future__ import annotations

import json

import ml_collections
import pytest

from tatar_jax.train import metric_writers, run_records


def _cfg(**kw):
    c = ml_collections.ConfigDict(
        {
            "allow_config_change": False,
            "total_steps": 10,
            "optimizer": {"learning_rate": 1e-3},
            "logging": {"every_steps": 1},
            "data": {"sources": {"a": {"image_root": "/x"}}, "seq_buckets": (256, 512)},
        }
    )
    for k, v in kw.items():
        node = c
        *head, last = k.split(".")
        for h in head:
            node = node[h]
        node[last] = v
    return c


def test_resume_with_changed_hyperparameters_is_refused_then_recorded(tmp_path):
    run_records.check_run_config(_cfg(), tmp_path, None)  # a fresh run writes it
    stored = (tmp_path / "run_config.json").read_text()
    # How the run is logged, or where the images now live, may change on resume.
    run_records.check_run_config(
        _cfg(**{"logging.every_steps": 5, "data.sources.a.image_root": "/y"}), tmp_path, 4
    )
    changes = [json.loads(x) for x in (tmp_path / "config_changes.jsonl").read_text().splitlines()]
    assert changes[0]["resume_step"] == 4
    assert changes[0]["changes"] == {
        "data.sources.a.image_root": ["/x", "/y"],
        "logging.every_steps": [1, 5],
    }
    new = _cfg(**{"optimizer.learning_rate": 2e-3, "total_steps": 20, "data.seq_buckets": (256,)})
    with pytest.raises(run_records.ConfigChangeError) as err:
        run_records.check_run_config(new, tmp_path, 4)
    msg = str(err.value)
    assert f"{tmp_path} resumes from step 4 with a config that differs from its run_config" in msg
    assert "data.seq_buckets: [256, 512] -> [256]" in msg
    assert "optimizer.learning_rate: 0.001 -> 0.002; total_steps: 10 -> 20" in msg
    assert "--allow_config_change" in msg and "logging" not in msg
    assert len((tmp_path / "config_changes.jsonl").read_text().splitlines()) == 1
    new.allow_config_change = True
    run_records.check_run_config(new, tmp_path, 4)
    last = json.loads((tmp_path / "config_changes.jsonl").read_text().splitlines()[-1])
    assert last["changes"]["total_steps"] == [10, 20]
    assert last["changes"]["allow_config_change"] == [False, True]
    assert json.loads((tmp_path / "run_config.json").read_text())["total_steps"] == 20
    assert stored != (tmp_path / "run_config.json").read_text()
    # Without a checkpoint (nothing to resume) the config is simply the new one.
    run_records.check_run_config(_cfg(total_steps=3), tmp_path, None)
    assert json.loads((tmp_path / "run_config.json").read_text())["total_steps"] == 3


def test_a_field_added_since_the_run_started_resumes_only_at_its_old_behaviour(tmp_path):
    run_records.check_run_config(_cfg(), tmp_path, None)  # written before mu_dtype existed
    run_records.check_run_config(_cfg(**{"optimizer.mu_dtype": "params"}), tmp_path, 4)
    changes = [json.loads(x) for x in (tmp_path / "config_changes.jsonl").read_text().splitlines()]
    assert changes[0]["changes"] == {"optimizer.mu_dtype": [None, "params"]}
    (tmp_path / "run_config.json").write_text(json.dumps(_cfg().to_dict()))
    with pytest.raises(
        run_records.ConfigChangeError, match=r"optimizer.mu_dtype: None -> 'bfloat16'"
    ):
        run_records.check_run_config(_cfg(**{"optimizer.mu_dtype": "bfloat16"}), tmp_path, 4)
    # A stored run that had the field is compared as usual.
    run_records.check_run_config(_cfg(**{"optimizer.mu_dtype": "float32"}), tmp_path, None)
    with pytest.raises(run_records.ConfigChangeError, match=r"'float32' -> 'params'"):
        run_records.check_run_config(_cfg(**{"optimizer.mu_dtype": "params"}), tmp_path, 4)


def test_summary_of_a_stage_that_ran_nothing_stays(tmp_path):
    first = {"sft": {"step": 4, "eval_first": {"e": 1.0}, "eval_last": {"e": 2.0}}}
    run_records.merge_summary(first, {"sft": True}, tmp_path)
    empty = {"sft": {"step": 4, "eval_first": {}, "eval_last": {}}}
    run_records.merge_summary(empty, {"sft": False}, tmp_path)
    assert json.loads((tmp_path / "summary.json").read_text()) == first
    resumed = {"sft": {"step": 6, "eval_first": {}, "eval_last": {"e": 3.0}}}
    out = run_records.merge_summary(resumed, {"sft": True}, tmp_path)
    assert out["sft"] == {"step": 6, "eval_first": {"e": 1.0}, "eval_last": {"e": 3.0}}


def test_writer_drops_rows_logged_after_the_restored_step(tmp_path):
    path = tmp_path / "metrics.jsonl"
    rows = [{"step": s, "loss": float(s)} for s in (0, 1, 2, 3, 4)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"step": 5, "lo')  # torn
    w = metric_writers.MetricsWriter(tmp_path, tensorboard=False, console=False, resume_step=2,
                              process_index=0)  # fmt: skip
    assert w.dropped == 3
    w.write(3, {"loss": 30.0})
    w.close()
    got = [json.loads(x) for x in path.read_text().splitlines()]
    assert [r["step"] for r in got] == [0, 1, 2, 3] and got[-1]["loss"] == 30.0


def test_console_line_is_compact():
    values = {
        "loss": 1.23456, "reward_total/iqa": 0.512, "reward_total/iaa": 0.3, "kl": 0.00123,
        "parsed_frac/all": 0.9375, "time/step": 1.234, "grad_norm": 3.0, "clip_frac": 0.1,
        "reward/gauss/iqa": 0.5, "data/skipped_total": 2.0, "update_skipped": 0.0,
    }  # fmt: skip
    line = metric_writers.console_line(12, values, total=200, eta_s=231.7)
    assert line == (
        "step 12/200 | loss 1.235 | reward iqa 0.512 | reward iaa 0.300 | kl 0.00123 | "
        "parsed 94% | 1.23s/step | skipped 2 | ETA 3m52s"
    )
    ev = {"eval/a/srcc": 0.5, "eval/a/plcc": 0.25, "eval/a/n": 8.0, "eval/b/srcc": float("nan")}
    assert metric_writers.console_line(20, ev) == "step 20 eval | a srcc 0.5 plcc 0.25 | b srcc nan"
