"""OpenAI-compatible client against a local stub server: request format, retries, timeouts,
fatal statuses, key hygiene. All traffic goes to 127.0.0.1."""

from __future__ import annotations

import base64

import pytest
from stub_openai_server import Drop, Raw, Reply, Sleep, Status, StubServer, has_image

from tatar_jax.reasoning.teachers import (
    ChatRequest,
    FatalTeacherError,
    OpenAIChatClient,
    RetryPolicy,
    SamplingParams,
    TeacherError,
    apply_stop,
    image_data_url,
)

KEY = "sk-stub-SECRET-0123456789"
FAST = RetryPolicy(max_retries=3, backoff_base_s=0.001, backoff_max_s=0.01, seed=0)


@pytest.fixture()
def png(tmp_path):
    from PIL import Image

    p = tmp_path / "img.png"
    Image.new("RGB", (8, 8), (200, 10, 10)).save(p)
    return str(p)


def _client(server, **kw):
    kw.setdefault("retry", FAST)
    kw.setdefault("timeout_s", 5.0)
    return OpenAIChatClient(server.url, "stub-model", kw.pop("api_key", KEY), **kw)


def _req(image=None):
    return ChatRequest(
        "sys", "hello", image, SamplingParams(0.3, 0.8, 140, ("</answer>", "<|endoftext|>"))
    )


def test_request_body_and_headers(png):
    with StubServer(lambda body, n: Reply("<think>x</think>")) as server:
        out = _client(server).complete(_req(png))
    assert out == "<think>x</think>"
    (req,) = server.requests
    assert req["path"] == "/v1/chat/completions"
    assert req["headers"]["Authorization"] == f"Bearer {KEY}"
    body = req["body"]
    assert body["model"] == "stub-model"
    assert (body["temperature"], body["top_p"], body["max_tokens"]) == (0.3, 0.8, 140)
    assert body["stop"] == ["</answer>", "<|endoftext|>"]
    assert "tools" not in body and "tool_choice" not in body
    sys_msg, user = body["messages"]
    assert sys_msg == {"role": "system", "content": "sys"}
    image_part, text_part = user["content"]
    assert text_part == {"type": "text", "text": "hello"}
    url = image_part["image_url"]["url"]
    assert url.startswith("data:image/png;base64,")
    with open(png, "rb") as f:
        assert base64.b64decode(url.split(",", 1)[1]) == f.read()


def test_text_only_request_and_no_key_header():
    with StubServer(lambda body, n: Reply("ok")) as server:
        _client(server, api_key=None).complete(_req())
    (req,) = server.requests
    assert "Authorization" not in req["headers"]
    assert not has_image(req["body"]) and req["body"]["messages"][1]["content"] == "hello"


def test_retries_429_5xx_drops_malformed_then_succeeds():
    script = [
        Status(429, "slow down", {"Retry-After": "0"}),
        Status(503, "busy"),
        Drop(),
        Raw(b"{not json"),
        Raw(b'{"choices": []}'),
    ]
    sleeps = []

    def behaviour(body, n):
        return script[n] if n < len(script) else Reply("finally")

    with StubServer(behaviour) as server:
        client = _client(server, retry=RetryPolicy(6, 0.001, 0.01, seed=0), sleep=sleeps.append)
        assert client.complete(_req()) == "finally"
    assert len(server.requests) == 6
    assert client.stats == {"requests": 6, "retries": 5}
    assert len(sleeps) == 5


def test_backoff_is_exponential_capped_and_seeded():
    def delays(seed):
        sleeps = []
        with StubServer(lambda body, n: Status(500, "x")) as server:
            policy = RetryPolicy(4, backoff_base_s=1.0, backoff_max_s=5.0, jitter=0.5, seed=seed)
            client = _client(server, retry=policy, sleep=sleeps.append)
            with pytest.raises(TeacherError, match="gave up after 5 attempts"):
                client.complete(_req())
        return sleeps

    a, b = delays(7), delays(7)
    assert a == b  # seeded jitter: reproducible
    caps = [1.0, 2.0, 4.0, 5.0]
    assert all(0.5 * c <= d <= c for d, c in zip(a, caps, strict=True))
    assert delays(8) != a


def test_retry_after_header_raises_the_delay():
    sleeps = []
    script = [Status(429, "", {"Retry-After": "3"})]
    with StubServer(lambda b, n: script[n] if n < 1 else Reply("ok")) as server:
        policy = RetryPolicy(2, backoff_base_s=0.01, backoff_max_s=10.0, seed=0)
        _client(server, retry=policy, sleep=sleeps.append).complete(_req())
    assert sleeps == [3.0]


def test_slow_answer_times_out_then_retries():
    def behaviour(body, n):
        return Sleep(1.0, Reply("late")) if n == 0 else Reply("fast")

    with StubServer(behaviour) as server:
        client = _client(server, timeout_s=0.2)
        assert client.complete(_req()) == "fast"
    assert client.stats["retries"] == 1


def test_fatal_and_non_retryable_statuses_do_not_retry():
    with StubServer(lambda b, n: Status(401, f"bad key {KEY}")) as server:
        with pytest.raises(FatalTeacherError) as info:
            _client(server).complete(_req())
        assert len(server.requests) == 1
    assert KEY not in str(info.value) and "***" in str(info.value)  # scrubbed even if echoed
    with StubServer(lambda b, n: Status(400, "context too long")) as server:
        with pytest.raises(TeacherError, match="HTTP 400") as info:
            _client(server).complete(_req())
        assert len(server.requests) == 1
        assert not isinstance(info.value, FatalTeacherError)


def test_connection_refused_is_retried_then_fails():
    with StubServer(lambda b, n: Reply("x")) as server:
        url = server.url
    client = OpenAIChatClient(url, "m", KEY, retry=FAST, timeout_s=1.0)  # server is gone
    with pytest.raises(TeacherError, match="gave up after 4 attempts") as info:
        client.complete(_req())
    assert KEY not in str(info.value) and KEY not in repr(client)


def test_image_data_url_rejects_non_images(tmp_path):
    p = tmp_path / "x.bin"
    p.write_bytes(b"hello")
    with pytest.raises(ValueError, match="not a recognised image"):
        image_data_url(str(p))


def test_apply_stop():
    assert apply_stop("a</answer>b<|endoftext|>", ("<|endoftext|>", "</answer>")) == "a"
    assert apply_stop("abc", ()) == "abc"
