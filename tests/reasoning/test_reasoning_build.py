"""The builder end to end against local stub teacher/judge servers (127.0.0.1 only):
keep/reject/fail bookkeeping, order preservation, resume (in-process and after kill -9),
settings fingerprint, judge-only mode, IAA, API-key hygiene."""

from __future__ import annotations

import json
import os
import pathlib
import signal
import subprocess
import sys
import threading
import time

import pytest
from stub_openai_server import (
    Reply,
    Sleep,
    Status,
    StubServer,
    find_number,
    has_image,
    user_text,
)

from tatar_jax.reasoning import build, from_config, records
from tatar_jax.reasoning import prompts as P

REPO = pathlib.Path(__file__).resolve().parents[2]
KEY = "sk-stub-SECRET-kill9-abcdef"
JKEY = "sk-stub-JUDGE-SECRET-987"


def _config():
    from configs import reasoning as reasoning_config

    return reasoning_config


def make_dataset(tmp_path, n, *, base=10.0, missing=(), attributes=None, extra=None):
    from PIL import Image

    img_dir = tmp_path / "images"
    img_dir.mkdir(exist_ok=True)
    rows = []
    for i in range(n):
        name = f"img_{i:03d}.png"
        if i not in missing:
            Image.new("RGB", (8, 8), (i * 7 % 255, 40, 90)).save(img_dir / name)
        rec = {"image": name, "gt_score": base + i, "dataset": "toy"}
        if attributes is not None and attributes(i) is not None:
            rec["aesthetic_attributes"] = attributes(i)
        if extra:
            rec.update(extra(i))
        rows.append(rec)
    manifest = tmp_path / "train.jsonl"
    manifest.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(manifest), str(img_dir)


def make_cfg(tmp_path, manifest, img_dir, teacher_url, judge_url, task="iqa", **client):
    cfg = _config().get_config(task)
    cfg.input = manifest
    cfg.score_range = (0.0, 100.0)
    cfg.image_root = img_dir
    cfg.out_dir = str(tmp_path / "out")
    cfg.progress = False
    cfg.teacher.base_url = teacher_url
    cfg.teacher.model = "teacher-model"
    if judge_url:
        cfg.judge.base_url = judge_url
        cfg.judge.model = "judge-model"
    else:
        cfg.judge.enabled = False
    cfg.client.backoff_base_s = 0.001
    cfg.client.backoff_max_s = 0.01
    cfg.client.retry_seed = 0
    cfg.client.timeout_s = 5.0
    cfg.client.max_retries = 2
    for k, v in client.items():
        cfg.client[k] = v
    return cfg


def read_jsonl(path):
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def good_iqa(row):
    return (
        f"<think>Row {chr(65 + row % 26)} shows mild blur at the end of the frame. Noise is low "
        "and colours are natural. Extra sentence.</think>\n<answer>"
    )


KEEP = json.dumps(
    {"scores": {"visual_fidelity": 4, "technical_rigor": 4, "score_consistency": 4},
     "decision": "keep"}
)  # fmt: skip


def iqa_row(body):
    return int(find_number(r"Ground-truth MOS: ([0-9.]+)", user_text(body)) - 10)


def judge_row(body):
    return int(find_number(r"gt_score: ([0-9.]+)", user_text(body)) - 10)


# --------------------------------------------------------------------------------------------


def test_iqa_end_to_end_bookkeeping_and_retry_failed(tmp_path):
    manifest, img_dir = make_dataset(tmp_path, 10, missing=(7,))
    fail_row3 = threading.Event()
    fail_row3.set()
    seen_429 = set()

    def teacher(body, n):
        row = iqa_row(body)
        score = 10 + row
        if row == 1:
            return Reply(f"<think>Sharp, deserves {score}.</think><answer>{score}")
        if row == 3 and fail_row3.is_set():
            return Status(500, "boom")
        if row == 8:
            return Reply("<think>Sharp ```x``` image.</think><answer>18.0")
        if row == 9 and row not in seen_429:
            seen_429.add(row)
            return Status(429, "later")
        return Reply(good_iqa(row) + f"{float(score)}")

    def judge(body, n):
        row = judge_row(body)
        assert has_image(body) and body["temperature"] == 0.0
        if row == 4:
            return Reply('{"scores": {"visual_fidelity": 4, "score_consistency": 4}, '
                         '"decision": "reject", "major_issues": ["boilerplate"]}')  # fmt: skip
        if row == 5:
            return Reply('{"scores": {"visual_fidelity": 2, "score_consistency": 5}, '
                         '"decision": "keep"}')  # fmt: skip
        if row == 6:
            return Reply("I cannot produce JSON today.")
        if row == 0 and fail_row3.is_set():
            return Status(502, "judge down")
        return Reply(f"```json\n{KEEP}\n```")

    with StubServer(teacher) as t_srv, StubServer(judge) as j_srv:
        cfg = make_cfg(tmp_path, manifest, img_dir, t_srv.url, j_srv.url, concurrency=3)
        rows = from_config.load_rows(cfg)[0]
        summary = build.run(cfg, rows, from_config.make_teacher(cfg), from_config.make_judge(cfg))
        out = pathlib.Path(cfg.out_dir)
        kept = read_jsonl(out / "sft.jsonl")
        assert [r["source_row"] for r in kept] == [2, 9]
        failed = read_jsonl(out / "failed.jsonl")
        assert [(r["source_row"], r["stage"], r["reason"]) for r in failed] == [
            (0, "judge", "judge_error"),
            (3, "teacher", "teacher_error"),
        ]
        assert "HTTP 500" in failed[1]["detail"] and "HTTP 502" in failed[0]["detail"]
        assert summary.kept == 2 and summary.failed == {"teacher_error": 1, "judge_error": 1}
        assert summary.rejected["judge_reject"] == 1 and summary.pending == 0
        on_disk = json.loads((out / "summary.json").read_text())
        assert on_disk["num_rejected"] == 6 and on_disk["kept"] == 2
        # row 7's image is missing: the teacher was never asked about it
        assert 7 not in {iqa_row(r["body"]) for r in t_srv.requests}

        # re-run: only the failed rows are requested again and now succeed; row 0's teacher
        # reply (its judge call had failed) is reused, not asked for again
        fail_row3.clear()
        n_before = len(t_srv.requests)
        summary = build.run(cfg, rows, from_config.make_teacher(cfg), from_config.make_judge(cfg))
        assert [iqa_row(r["body"]) for r in t_srv.requests[n_before:]] == [3]
        assert summary.processed_this_run == 2 and summary.skipped_from_journal == 8
        kept = read_jsonl(out / "sft.jsonl")
        assert [r["source_row"] for r in kept] == [0, 2, 3, 9]
        assert read_jsonl(out / "failed.jsonl") == []
        r0 = kept[0]
        assert r0["target"] == (
            "<think>\nRow A shows mild blur at the end of the frame. Noise is low and colours are "
            "natural.\n</think>\n<answer>10.0</answer>"
        )
        assert r0["reversal_thinking"] == r0["target"] and r0["task"] == "iqa"
        assert (r0["image"], r0["gt_score"], r0["dataset"]) == ("img_000.png", 10.0, "toy")
        assert r0["teacher_reply"].startswith("<think>Row A") and r0["teacher"] == "teacher-model"
        assert r0["judge_verdict"]["decision"] == "keep"
        rejected = {r["source_row"]: r["reason"] for r in read_jsonl(out / "rejected.jsonl")}
        assert rejected == {
            1: "score_in_think",
            4: "judge_reject",
            5: "judge_low_score",
            6: "judge_unparseable",
            7: "image_missing",
            8: "contamination",
        }


def test_order_is_input_order_under_out_of_order_completion(tmp_path):
    n = 12
    manifest, img_dir = make_dataset(tmp_path, n)

    def teacher(body, _):
        row = iqa_row(body)
        return Sleep(0.02 * (n - row), Reply(good_iqa(row) + str(10.0 + row)))

    with StubServer(teacher) as srv:
        cfg = make_cfg(tmp_path, manifest, img_dir, srv.url, None, concurrency=6)
        cfg.teacher.extra_body = '{"top_k": 20}'
        rows = from_config.load_rows(cfg)[0]
        build.run(cfg, rows, from_config.make_teacher(cfg), None)
        assert {r["body"]["top_k"] for r in srv.requests} == {20}
        cfg.teacher.extra_body = "[1]"
        with pytest.raises(ValueError, match="must be a JSON object"):
            from_config.make_teacher(cfg)
    out = pathlib.Path(cfg.out_dir)
    completion_order = [e["row"] for e in read_jsonl(out / "journal.jsonl")]
    assert completion_order != sorted(completion_order)  # they really finished out of order
    assert [r["source_row"] for r in read_jsonl(out / "sft.jsonl")] == list(range(n))


def test_resume_after_interrupt_and_torn_journal_line(tmp_path):
    n = 10
    manifest, img_dir = make_dataset(tmp_path, n)

    def teacher(body, _):
        row = iqa_row(body)
        return Sleep(0.01, Reply(good_iqa(row) + str(10.0 + row)))

    with StubServer(teacher) as srv:
        cfg = make_cfg(tmp_path, manifest, img_dir, srv.url, None, concurrency=2)
        rows = from_config.load_rows(cfg)[0]
        count = []

        def interrupt(entry):
            count.append(entry["row"])
            if len(count) == 4:
                raise KeyboardInterrupt

        with pytest.raises(KeyboardInterrupt):
            build.run(cfg, rows, from_config.make_teacher(cfg), None, on_entry=interrupt)
        journal = pathlib.Path(cfg.out_dir) / "journal.jsonl"
        assert len(read_jsonl(journal)) == 4
        with open(journal, "a") as f:  # a torn line, as a kill during a write leaves it
            f.write('{"row": 9, "status": "ke')
        first = len(srv.requests)
        summary = build.run(cfg, rows, from_config.make_teacher(cfg), None)
        second = [iqa_row(r["body"]) for r in srv.requests[first:]]
    assert sorted(second) == sorted(set(range(n)) - set(count))  # nothing finished is redone
    assert summary.kept == n and summary.skipped_from_journal == 4
    lines = read_jsonl(journal)
    assert sorted(e["row"] for e in lines) == list(range(n))  # no duplicates, torn line gone
    assert [r["source_row"] for r in read_jsonl(pathlib.Path(cfg.out_dir) / "sft.jsonl")] == list(
        range(n)
    )

    # different output-shaping settings: refuse to mix them into the same journal
    cfg.iqa.temperature = 0.9
    with pytest.raises(ValueError, match="different settings"):
        build.run(cfg, rows, from_config.make_teacher(cfg), None)


def _kill9_script(tmp_path, manifest, img_dir, t_url, j_url):
    out = tmp_path / "out"
    cmd = [
        sys.executable,
        str(REPO / "scripts" / "build_reasoning.py"),
        f"--config={REPO / 'configs' / 'reasoning.py'}:iqa",
        f"--config.input={manifest}",
        "--config.score_range=(0.0, 100.0)",
        f"--config.image_root={img_dir}",
        f"--config.out_dir={out}",
        f"--config.teacher.base_url={t_url}",
        "--config.teacher.model=teacher-model",
        f"--config.judge.base_url={j_url}",
        "--config.judge.model=judge-model",
        "--config.client.concurrency=2",
        "--config.client.backoff_base_s=0.001",
        "--config.client.retry_seed=0",
    ]
    env = dict(os.environ, TATAR_TEACHER_API_KEY=KEY, TATAR_JUDGE_API_KEY=JKEY)
    env["NO_PROXY"] = env["no_proxy"] = "127.0.0.1,localhost"
    return cmd, env, out


def test_kill_dash_9_mid_run_then_resume_no_lost_or_duplicate_rows(tmp_path):
    n = 24
    manifest, img_dir = make_dataset(tmp_path, n)
    teacher_keys, judge_keys = set(), set()

    def teacher(body, _):
        row = iqa_row(body)
        return Sleep(0.1, Reply(good_iqa(row) + str(10.0 + row)))

    def judge(body, _):
        return Reply(KEEP)

    with StubServer(teacher) as t_srv, StubServer(judge) as j_srv:
        cmd, env, out = _kill9_script(tmp_path, manifest, img_dir, t_srv.url, j_srv.url)
        journal = out / "journal.jsonl"
        logs = []
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        deadline = time.time() + 30
        while time.time() < deadline:
            if journal.exists() and journal.read_text().count("\n") >= 5:
                break
            if proc.poll() is not None:
                break
            time.sleep(0.01)
        if proc.poll() is not None:
            raise AssertionError(f"the run ended before the kill: {proc.communicate()[1][-2000:]}")
        proc.send_signal(signal.SIGKILL)
        so, se = proc.communicate(timeout=30)
        logs += [so, se]
        assert proc.returncode == -signal.SIGKILL
        done_at_kill = {e["row"] for e in read_jsonl(journal)}
        assert 5 <= len(done_at_kill) < n
        assert not (out / "sft.jsonl").exists()  # the killed run never got to assemble
        first = len(t_srv.requests)

        res = subprocess.run(cmd, env=env, capture_output=True, timeout=60)
        logs += [res.stdout, res.stderr]
        assert res.returncode == 0, res.stderr.decode()[-2000:]
        second = [iqa_row(r["body"]) for r in t_srv.requests[first:]]
        teacher_keys = {r["headers"].get("Authorization") for r in t_srv.requests}
        judge_keys = {r["headers"].get("Authorization") for r in j_srv.requests}

    assert not set(second) & done_at_kill  # finished rows were not asked again
    assert set(second) | done_at_kill == set(range(n))
    kept = read_jsonl(out / "sft.jsonl")
    assert [r["source_row"] for r in kept] == list(range(n))  # none lost, none twice, in order
    entries = read_jsonl(out / "journal.jsonl")
    assert sorted(e["row"] for e in entries) == list(range(n))
    assert b"kept: 24" in logs[-2]
    # the keys were used ... and are nowhere in the files or the logs
    assert teacher_keys == {f"Bearer {KEY}"} and judge_keys == {f"Bearer {JKEY}"}
    for path in out.rglob("*"):
        data = path.read_bytes()
        assert KEY.encode() not in data and JKEY.encode() not in data, path
    for blob in logs:
        assert KEY.encode() not in blob and JKEY.encode() not in blob


def test_fatal_status_stops_the_run_and_the_script_says_why(tmp_path):
    manifest, img_dir = make_dataset(tmp_path, 4)
    with (
        StubServer(lambda b, n: Status(401, f"invalid key {KEY}")) as srv,
        StubServer(lambda b, n: Reply(KEEP)) as j_srv,
    ):
        cmd, env, out = _kill9_script(tmp_path, manifest, img_dir, srv.url, j_srv.url)
        res = subprocess.run(cmd, env=env, capture_output=True, timeout=60)
    assert res.returncode == 2
    assert b"HTTP 401" in res.stderr and KEY.encode() not in res.stderr + res.stdout
    assert read_jsonl(out / "sft.jsonl") == [] and read_jsonl(out / "journal.jsonl") == []
    # stopped at once: at most the rows already handed to the pool (2 x concurrency) were sent
    assert len(srv.requests) <= 4


def test_iaa_text_only_teacher_attribute_order_and_coverage(tmp_path):
    attrs = {k: f"{P.ATTRIBUTE_NAMES[k]} note." for k in P.IAA_ATTRIBUTE_ORDER}

    def attributes(i):
        return None if i == 3 else attrs

    manifest, img_dir = make_dataset(tmp_path, 5, base=5.0, attributes=attributes)
    # row 4 gets gt 0.5 (below the default [1, 100] range)
    lines = [json.loads(x) for x in pathlib.Path(manifest).read_text().splitlines()]
    lines[4]["gt_score"] = 0.5
    pathlib.Path(manifest).write_text("".join(json.dumps(x) + "\n" for x in lines))
    narrative = (
        "The palette and lighting are warm, and the layout feels balanced because the framing "
        "is tight. The theme is clear, the mood is calm, and the execution is refined, so the "
        "overall appeal is moderate."
    )
    thin = "Nice picture with pleasant colors."

    def teacher(body, _):
        assert not has_image(body)  # spec §5.2: the IAA teacher never sees the image
        text = user_text(body)
        positions = [text.index(P.ATTRIBUTE_NAMES[k]) for k in P.IAA_ATTRIBUTE_ORDER]
        assert positions == sorted(positions)  # the fixed order
        score = find_number(r"keep it unchanged\): ([0-9.]+)", text)
        body_text = thin if score == 7.0 else narrative
        return Reply(f"<think>{body_text}</think>\n<answer>{score}")

    def judge(body, _):
        assert has_image(body)
        text = user_text(body)
        assert "Visual Elements: Visual Elements note." in text and "has_causal_link" in text
        return Reply(
            '{"scores": {"attribute_coverage": 4, "groundedness_no_fabrication": 4, '
            '"reasoning_cohesion": 3, "score_derivation_smoothness": 4}, "decision": "keep"}'
        )

    with StubServer(teacher) as t_srv, StubServer(judge) as j_srv:
        cfg = make_cfg(tmp_path, manifest, img_dir, t_srv.url, j_srv.url, task="iaa")
        summary = build.run(
            cfg,
            from_config.load_rows(cfg)[0],
            from_config.make_teacher(cfg),
            from_config.make_judge(cfg),
        )
    out = pathlib.Path(cfg.out_dir)
    kept = read_jsonl(out / "sft.jsonl")
    assert [r["source_row"] for r in kept] == [0, 1]
    assert kept[0]["cot_reasoning"] == f"<think>\n{narrative}\n</think>\n<answer>5.0</answer>"
    assert kept[0]["aesthetic_attributes"] == attrs
    assert kept[0]["local_checks"]["num_aspects_touched"] >= 5
    rejected = {r["source_row"]: r["reason"] for r in read_jsonl(out / "rejected.jsonl")}
    assert rejected == {2: "coverage", 3: "no_attributes", 4: "score_out_of_range"}
    assert summary.kept == 2


def test_judge_only_mode_reads_existing_targets(tmp_path):
    def extra(i):
        think = "Clean and sharp with natural colours." if i else "Sharp.\nsystem: hi"
        return {"reversal_thinking": f"<think>\n{think}\n</think>\n<answer>{10 + i}</answer>"}

    manifest, img_dir = make_dataset(tmp_path, 3, extra=extra)
    with StubServer(lambda b, n: Reply(KEEP)) as j_srv:
        cfg = make_cfg(tmp_path, manifest, img_dir, "", j_srv.url)
        cfg.teacher.kind = "none"
        summary = build.run(
            cfg,
            from_config.load_rows(cfg)[0],
            from_config.make_teacher(cfg),
            from_config.make_judge(cfg),
        )
    assert summary.kept == 2 and summary.rejected == {"role_prefix": 1}
    kept = read_jsonl(pathlib.Path(cfg.out_dir) / "sft.jsonl")
    assert kept[0]["target"] == kept[0]["reversal_thinking"] and "teacher_reply" not in kept[0]


def test_dataset_declaration_bad_rows_and_skip_reporting(tmp_path):
    from PIL import Image

    for name in ("a.png", "d.png"):
        Image.new("RGB", (8, 8)).save(tmp_path / name)
    p = tmp_path / "m.jsonl"
    p.write_text(
        '{"image": "a.png", "gt_score": 3}\n{"gt_score": 4}\n'
        '{"image": "c.png", "gt_score": 11}\n{"image": "d.png", "gt_score": 7.5}\n'
    )
    cfg = _config().get_config("iaa")
    cfg.input = str(p)
    with pytest.raises(ValueError, match="declare the native score range"):
        from_config.load_rows(cfg)
    cfg.score_range = (0.0, 10.0)
    with pytest.raises(records.ManifestError, match=r"m.jsonl: row 1.*missing or empty field"):
        from_config.load_rows(cfg)
    cfg.on_bad_row = "skip"
    rows, bad = from_config.load_rows(cfg)
    assert [r.row for r in rows] == [0, 3] and [b.row for b in bad] == [1, 2]
    assert rows[0].gt_score == 3 and isinstance(rows[0].gt_score, int)  # as the file gives it
    assert rows[0].gt_100 == 30.0 and rows[0].image_path == str(tmp_path / "a.png")

    # skipped manifest rows are reported in rejected.jsonl, in file order, never silently lost
    cfg.iaa.require_attributes = False
    cfg.rules.min_aspects = 0
    text = "<think>Warm palette, calm mood.</think><answer>"
    with StubServer(
        lambda b, n: Reply(text + str(find_number(r"unchanged\): ([0-9.]+)", user_text(b))))
    ) as srv:
        cfg.out_dir = str(tmp_path / "out")
        cfg.progress = False
        cfg.teacher.base_url, cfg.teacher.model = srv.url, "t"
        cfg.judge.enabled = False
        summary = build.run(cfg, rows, from_config.make_teacher(cfg), None, bad_rows=bad)
    assert summary.kept == 2 and summary.rejected == {"bad_manifest_row": 2}
    rejected = read_jsonl(tmp_path / "out" / "rejected.jsonl")
    assert [(r["source_row"], r["stage"]) for r in rejected] == [(1, "manifest"), (2, "manifest")]
    assert "outside the declared range" in rejected[1]["detail"]
    kept = read_jsonl(tmp_path / "out" / "sft.jsonl")
    assert [(r["image"], r["gt_100"]) for r in kept] == [("a.png", 30.0), ("d.png", 75.0)]
    # the output is a manifest the SFT data path reads (same image root and declared range)
    from tatar_jax.data import examples
    from tatar_jax.data.manifest import DatasetSpec, load_records

    sft_spec = DatasetSpec(
        "toy-sft", "iaa", str(tmp_path / "out" / "sft.jsonl"), str(tmp_path), (0.0, 10.0),
        target_field="target",
    )  # fmt: skip
    recs = load_records(sft_spec).records
    want = [(str(tmp_path / "a.png"), 30.0), (str(tmp_path / "d.png"), 75.0)]
    assert [(r["image"], r["gt_100"]) for r in recs] == want
    assert examples.rewrite_answer(recs[0]["target"], recs[0]["gt_100"]) == (
        "<think>\nWarm palette, calm mood.\n</think>\n<answer>30.00</answer>"
    )

    # a built-in declaration supplies range and label field; its task must match
    cfg.input, cfg.score_range = "", None
    cfg.dataset, cfg.data_root = "artimuse-train", str(tmp_path)
    spec = from_config.dataset_spec(cfg)
    assert spec.score_range == (0.0, 10.0)
    assert spec.manifest == str(tmp_path / "train" / "train_iaa.json")
    cfg.task = "iqa"
    with pytest.raises(ValueError, match="is an iaa dataset"):
        from_config.dataset_spec(cfg)


def test_score_scale_100_shows_the_0_100_score(tmp_path):
    manifest, img_dir = make_dataset(tmp_path, 2, base=2.0)  # scores 2.0, 3.0 on a 1-5 range

    def teacher(body, _):
        mos = find_number(r"Ground-truth MOS: ([0-9.]+)", user_text(body))
        return Reply(f"<think>Clean and sharp.</think><answer>{mos}")

    with StubServer(teacher) as srv:
        cfg = make_cfg(tmp_path, manifest, img_dir, srv.url, None)
        cfg.score_range = (1.0, 5.0)
        cfg.score_scale = "100"
        build.run(cfg, from_config.load_rows(cfg)[0], from_config.make_teacher(cfg), None)
        shown = [find_number(r"MOS: ([0-9.]+)", user_text(r["body"])) for r in srv.requests]
    assert sorted(shown) == [25.0, 50.0]
    kept = read_jsonl(pathlib.Path(cfg.out_dir) / "sft.jsonl")
    assert [r["target"][-22:] for r in kept] == [
        "\n<answer>25.0</answer>",
        "\n<answer>50.0</answer>",
    ]
    assert [r["gt_score"] for r in kept] == [2.0, 3.0]


def test_merge_artimuse_attribute_conversations():
    rows = [records.InputRow(0, "dir/x.jpg", "/r/dir/x.jpg", 6.0, {}, {})]
    convs = [
        {
            "image": "x.jpg",
            "conversations": [
                {
                    "from": "human",
                    "value": "<image>\nEvaluate it from the aspect of Visual Elements.",
                },
                {"from": "gpt", "value": "Old text."},
                {"from": "human", "value": "Now from the aspect of Composition & Structure?"},
                {"from": "gpt", "value": "Balanced."},
            ],
        },
        {  # a later duplicate wins
            "image": "x.jpg",
            "conversations": [
                {"from": "human", "value": "From the aspect of visual elements, please."},
                {"from": "gpt", "value": "New text."},
            ],
        },
    ]
    (merged,) = records.merge_attribute_conversations(rows, convs)
    assert merged.attributes == {
        "visual_elements": "New text.",
        "composition_structure": "Balanced.",
    }


def test_output_fields_are_documented():
    for field in ("image", "gt_score", "task", "target", "teacher_reply", "source_row"):
        assert f"  {field}" in build.OUTPUT_FIELDS_DOC
