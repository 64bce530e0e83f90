"""K samples per image (``--num_samples``): the runner's rows, the metrics recomputed from
predictions.jsonl with scipy, score.py's ``mean ± std (parsed)`` line, the decoding flags' usage
errors and the resume check of the decoding settings.

The model is replaced by ``SampledPredictor``, a deterministic test double returning
:class:`~tatar_jax.evaluation.scoring.Samples` (K answers scattered around the ground truth, some
unparsable, some outside 0-100); the real K-sample predict function is tested in
test_evaluation_predict.py.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image
from scipy import stats

from tatar_jax.data import manifest
from tatar_jax.evaluation import cli, outputs, runner, scoring

K = 5


class SampledPredictor:
    """Sample j of row r answers gt + ((r * 7 + j * 3) % 9 - 4) * 1.5; sample 1 of every third
    row is words (unparsed), sample 2 of every fourth row 130 (outside 0-100); row 5 never
    parses. ``forced`` marks sample 0 of even rows (as a constrained decoder would)."""

    def __init__(self, with_forced=False):
        self.with_forced = with_forced

    def __call__(self, records):
        out = []
        for rec in records:
            r, texts = rec["row_id"], []
            for j in range(K):
                v = rec["gt_100"] + ((r * 7 + j * 3) % 9 - 4) * 1.5
                ans = f"{v:.2f}"
                if (j == 1 and r % 3 == 0) or r == 5:
                    ans = "about fifty"
                elif j == 2 and r % 4 == 0:
                    ans = "130"
                texts.append(f"<think>{'w ' * (j + 1)}</think><answer>{ans}</answer>")
            forced = tuple(j == 0 and r % 2 == 0 for j in range(K)) if self.with_forced else None
            out.append(scoring.Samples(tuple(texts), forced))
        return out


def _dataset(tmp_path, n=14):
    rng = np.random.default_rng(0)
    rows = []
    for i in range(n):
        Image.fromarray(np.full((6, 8, 3), 9 * i, np.uint8)).save(tmp_path / f"{i}.png")
        rows.append({"image": f"{i}.png", "gt_score": round(float(rng.uniform(1, 5)), 3)})
    (tmp_path / "m.json").write_text(json.dumps(rows))
    return manifest.DatasetSpec("m", "iqa", str(tmp_path / "m.json"), score_range=(1.0, 5.0))


@pytest.mark.parametrize("aggregate", ["mean", "median"])
def test_sampled_rows_recompute_to_the_metrics(tmp_path, aggregate):
    spec = _dataset(tmp_path)
    opts = runner.EvalOptions(batch_size=4, progress=False, plots=False, aggregate=aggregate)
    res = runner.run_eval([spec], SampledPredictor(True), tmp_path / "out", opts)["m"]
    rows = outputs.read_jsonl(str(tmp_path / "out" / "m" / "predictions.jsonl"))
    assert len(rows) == 14
    agg = np.mean if aggregate == "mean" else np.median
    for row in rows:
        assert row["n_samples"] == K and len(row["samples"]) == K and len(row["answers"]) == K
        assert row["completion"] == row["samples"][0]
        good = [a for a in row["answers"] if a is not None]
        assert row["n_parsed"] == len(good)
        want = [
            None if a is None else min(max(a, 0.0), 100.0)
            for a in (scoring.score_completion(t, "iqa")["answer"] for t in row["samples"])
        ]
        assert row["answers"] == want  # clipped like a single prediction
        if good:
            assert row["prediction"] == pytest.approx(float(agg(good)))
            assert row["pred_std"] == pytest.approx(float(np.std(good)))
        else:
            assert row["prediction"] is None and row["pred_std"] is None and row["row_id"] == 5
    gt = np.array([r["gt_100"] for r in rows])
    pred = np.array([np.nan if r["prediction"] is None else r["prediction"] for r in rows])
    ok = ~np.isnan(pred)
    assert res["n_pairs"] == int(ok.sum()) == 13 and res["n_unparsed"] == 1
    assert res["srcc"] == pytest.approx(stats.spearmanr(gt[ok], pred[ok]).statistic)
    assert res["plcc"] == pytest.approx(stats.pearsonr(gt[ok], pred[ok]).statistic)
    assert res["num_samples"] == K
    stds = [r["pred_std"] for r in rows if r["pred_std"] is not None]
    assert res["mean_pred_std"] == pytest.approx(np.mean(stds))
    n_bad = sum(K - r["n_parsed"] for r in rows)
    assert res["n_samples_unparsed"] == n_bad and res["frac_samples_unparsed"] == n_bad / (14 * K)
    single = []
    for j in range(K):
        pj = np.array([np.nan if r["answers"][j] is None else r["answers"][j] for r in rows])
        okj = ~np.isnan(pj)
        single.append(stats.spearmanr(gt[okj], pj[okj]).statistic)
    assert res["srcc_single"] == pytest.approx(np.mean(single))
    outside = sum(1 for r in rows for a in r["raw_answers"] if a is not None and not 0 <= a <= 100)
    assert res["n_out_of_range"] == sum(r["out_of_range"] for r in rows) == outside >= 4
    assert res["n_would_be_unparsed"] == 7  # sample 0 of the even rows
    summary = (tmp_path / "out" / "summary.md").read_text()
    assert "## Sampled decoding" in summary
    assert f"| m | {K} | {res['srcc']:.4f} | {res['plcc']:.4f} |" in summary


def test_resumed_sampled_run_is_identical_and_decoding_is_checked(tmp_path):
    spec = _dataset(tmp_path, n=6)
    info = {"decoding": {"num_samples": K, "temperature": 1.0, "constrained": False}}
    opts = runner.EvalOptions(batch_size=4, progress=False, plots=False, run_info=info)
    first = runner.run_eval([spec], SampledPredictor(), tmp_path / "out", opts)
    again = runner.run_eval([spec], SampledPredictor(), tmp_path / "out", opts)
    assert first == again and "n_would_be_unparsed" not in first["m"]
    other = {"decoding": {"num_samples": 1, "temperature": 0.0, "constrained": False}}
    opts2 = runner.EvalOptions(batch_size=4, progress=False, plots=False, run_info=other)
    with pytest.raises(outputs.ResumeMismatchError, match="decoding"):
        runner.run_eval([spec], SampledPredictor(), tmp_path / "out", opts2)


def test_greedy_out_dir_from_before_refuses_sampling(tmp_path):
    from tatar_jax.evaluation import shards

    path = tmp_path / "run_info.json"
    path.write_text(json.dumps({"model": "m", "max_new_tokens": 8}))  # no "decoding" key
    greedy = dict(shards.GREEDY_DECODING)
    shards.check_run_info(str(path), {"model": "m", "decoding": greedy})
    with pytest.raises(outputs.ResumeMismatchError, match="decoding"):
        shards.check_run_info(str(path), {"model": "m", "decoding": {**greedy, "num_samples": 8}})


def test_score_line_mean_std_and_parsed_count(tmp_path):
    img = tmp_path / "a.png"
    Image.fromarray(np.full((6, 8, 3), 100, np.uint8)).save(img)

    def predict_fn(records):
        answers = ["73", "70", "75", "76", "73", "71.5", "75.5", "70"]
        return [
            scoring.Samples(tuple(f"<think>t{j}</think><answer>{a}</answer>"
                                  for j, a in enumerate(answers)))
            for _ in records
        ]  # fmt: skip

    res = cli.score_images([str(img)], ["iqa"], predict_fn, batch_size=2)
    (r,) = res
    vals = [73, 70, 75, 76, 73, 71.5, 75.5, 70]
    assert r["score"] == pytest.approx(np.mean(vals)) and r["std"] == pytest.approx(np.std(vals))
    text = cli.format_results(res, as_json=False)
    assert f"score: {np.mean(vals):.1f} ± {np.std(vals):.1f} (8/8 parsed)" in text
    assert "score: 73.0 ± 2.2 (8/8 parsed)" in text  # mean 73.0, population std 2.18
    assert json.loads(cli.format_results(res, as_json=True))["answers"] == vals

    def with_bad(records):
        t = [
            "<answer>60</answer>",
            "<answer>x</answer>",
            "<answer>140</answer>",
            "<answer>62</answer>",
        ]
        return [scoring.Samples(tuple(t), (False, True, False, False)) for _ in records]

    (r,) = cli.score_images([str(img)], ["iqa"], with_bad, batch_size=1, aggregate="median")
    assert r["score"] == 61.0 and r["n_parsed"] == 2 and r["out_of_range"] == 1
    line = cli.format_results([r], as_json=False)
    assert "61.0 ± 1.0 (2/4 parsed, 1 outside 0-100, 1 forced by the answer constraint)" in line


@pytest.mark.parametrize(
    "flag,value,match",
    [
        ("num_samples", 0, "--num_samples"),
        ("temperature", -1.0, "--temperature"),
        ("top_k", -2, "--top_k"),
        ("top_p", 0.0, "--top_p"),
        ("aggregate", "mode", "--aggregate"),
    ],
)
def test_decoding_flags_usage_errors(flag, value, match):
    from configs import eval as eval_configs

    cfg = eval_configs.get_config()
    cfg.eval[flag] = value
    with pytest.raises(ValueError, match=match):
        cli.check_eval_numbers(cfg.eval)


def test_k_greedy_samples_are_refused_and_flags_reach_the_config(capsys):
    from configs import eval as eval_configs

    cfg = eval_configs.get_config()
    cfg.eval.num_samples = 8  # --config.eval.num_samples: no defaults applied
    with pytest.raises(ValueError, match="--num_samples=8 needs --temperature > 0"):
        cli.check_eval_numbers(cfg.eval)
    cfg = eval_configs.get_config()
    cli.apply_overrides(cfg, {"num_samples": 8, "seed": 3, "aggregate": "median"})
    assert cfg.eval.num_samples == 8 and cfg.seed == 3 and cfg.eval.aggregate == "median"
    assert (cfg.eval.temperature, cfg.eval.top_k) == (1.0, 50)  # the demos' sampling, said
    assert "--temperature=1 --top_k=50" in capsys.readouterr().err
    cli.check_eval_numbers(cfg.eval)
    cfg = eval_configs.get_config()
    cli.apply_overrides(cfg, {"num_samples": 4, "temperature": 0.7, "top_p": 0.9})
    assert (cfg.eval.temperature, cfg.eval.top_k, cfg.eval.top_p) == (0.7, 0, 0.9)
    cli.check_eval_numbers(cfg.eval)
