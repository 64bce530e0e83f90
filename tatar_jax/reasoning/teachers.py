"""Teachers and judges: anything that turns a chat request into reply text.

* :class:`Teacher` — the protocol: ``complete(request) -> str``. Implementations must be safe to
  call from several threads at once (the builder runs rows concurrently) or be used with
  ``concurrency = 1``.
* :class:`OpenAIChatClient` — any OpenAI-compatible ``/v1/chat/completions`` endpoint (vLLM,
  SGLang, TGI, hosted APIs). Images travel as base64 ``data:`` URLs. Standard library only
  (``urllib``). Retries 429 / 5xx / 408 / connection errors / timeouts / unparseable bodies with
  capped exponential backoff and jitter (seedable), honouring ``Retry-After``. 401 / 403 / 404
  raise :class:`FatalTeacherError` (every row would fail the same way, so the run stops).
  The API key is sent only in the ``Authorization`` header; it is never part of an error message,
  ``repr`` or log line (error texts are scrubbed of it).
* :class:`JaxTeacher` — our own Qwen2.5-VL through the rollout engine
  (``tatar_jax.generate.generate``, imported lazily so nothing here needs JAX otherwise).
"""

from __future__ import annotations

import base64
import dataclasses
import http.client
import json
import mimetypes
import random
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

if TYPE_CHECKING:
    from tatar_jax.generate import GenerateOutput


class TeacherError(RuntimeError):
    """A request that failed (after retries); the row is recorded as failed and can be retried."""


class FatalTeacherError(TeacherError):
    """A failure that every request would hit (bad key, unknown model, wrong URL): stop the run."""


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.0
    top_p: float = 1.0
    max_tokens: int = 512
    stop: tuple[str, ...] = ()
    seed: int | None = None  # per-request sampling seed, sent when not None


@dataclasses.dataclass(frozen=True)
class ChatRequest:
    """One chat turn: system text, user text and optionally one image (a file path)."""

    system: str
    user: str
    image: str | None = None
    sampling: SamplingParams = SamplingParams()


@runtime_checkable
class Teacher(Protocol):
    name: str

    def complete(self, request: ChatRequest) -> str:
        """The assistant's reply text (raises :class:`TeacherError` on failure)."""
        ...


# --------------------------------------------------------------------------------------------
# Images


def _sniff_mime(data: bytes, path: str) -> str:
    if data[:3] == b"\xff\xd8\xff":
        return "image/jpeg"
    if data[:8] == b"\x89PNG\r\n\x1a\n":
        return "image/png"
    if data[:6] in (b"GIF87a", b"GIF89a"):
        return "image/gif"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "image/webp"
    if data[:2] == b"BM":
        return "image/bmp"
    guess, _ = mimetypes.guess_type(path)
    if guess and guess.startswith("image/"):
        return guess
    raise ValueError(f"{path}: not a recognised image file (JPEG/PNG/GIF/WebP/BMP)")


def image_data_url(path: str) -> str:
    """``data:<mime>;base64,<bytes>`` of an image file (the file as is, no re-encoding)."""
    with open(path, "rb") as f:
        data = f.read()
    if not data:
        raise ValueError(f"{path}: empty image file")
    return f"data:{_sniff_mime(data, path)};base64,{base64.b64encode(data).decode('ascii')}"


def openai_messages(request: ChatRequest) -> list[dict[str, Any]]:
    """OpenAI chat messages: system, then user (image first, then the text)."""
    msgs: list[dict[str, Any]] = []
    if request.system:
        msgs.append({"role": "system", "content": request.system})
    if request.image is None:
        msgs.append({"role": "user", "content": request.user})
    else:
        msgs.append(
            {
                "role": "user",
                "content": [
                    {"type": "image_url", "image_url": {"url": image_data_url(request.image)}},
                    {"type": "text", "text": request.user},
                ],
            }
        )
    return msgs


# --------------------------------------------------------------------------------------------
# HTTP client with retries


@dataclasses.dataclass(frozen=True)
class RetryPolicy:
    """``delay_k = min(backoff_max_s, backoff_base_s * 2**k) * U(1 - jitter, 1)``, k = 0, 1, ...;
    a ``Retry-After`` header (seconds) raises the delay to at least its value (still capped)."""

    max_retries: int = 5  # retries after the first attempt
    backoff_base_s: float = 1.0
    backoff_max_s: float = 60.0
    jitter: float = 0.5  # fraction of the delay drawn at random (0 = none)
    retry_statuses: tuple[int, ...] = (408, 409, 425, 429, 500, 502, 503, 504)
    fatal_statuses: tuple[int, ...] = (401, 403, 404)
    seed: int | None = None  # seeds the jitter (tests); None = OS entropy


class _Retryable(Exception):
    def __init__(self, message: str, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


def _retry_after(headers: Mapping[str, str] | None) -> float | None:
    if not headers:
        return None
    value = headers.get("Retry-After")
    try:
        return max(0.0, float(value)) if value is not None else None
    except ValueError:
        return None  # HTTP-date form: ignored, the backoff applies


URL_SCHEMES = ("http://", "https://")


class OpenAIChatClient:
    """An OpenAI-compatible chat endpoint (see the module docstring).

    ``base_url`` is the API root (``http://host:8000/v1``) or the full
    ``…/chat/completions`` URL. ``timeout_s`` bounds connecting and each socket read.
    ``extra_body`` is merged into every request body (e.g. vLLM's ``top_k``).
    """

    def __init__(
        self,
        base_url: str,
        model: str,
        api_key: str | None = None,
        *,
        timeout_s: float = 120.0,
        retry: RetryPolicy = RetryPolicy(),
        extra_body: Mapping[str, Any] | None = None,
        sleep: Callable[[float], None] = time.sleep,
        name: str | None = None,
    ) -> None:
        if not base_url:
            raise ValueError("base_url is empty (set the endpoint URL)")
        if not base_url.startswith(URL_SCHEMES):  # never file://, ftp://, ... through urllib
            raise ValueError(f"base_url must start with http:// or https://, got {base_url!r}")
        if not model:
            raise ValueError("model name is empty")
        url = base_url.rstrip("/")
        self.url = url if url.endswith("/chat/completions") else url + "/chat/completions"
        self.model = model
        self.name = name or model
        self._key = api_key or None
        self.timeout_s = float(timeout_s)
        self.retry = retry
        self.extra_body = dict(extra_body or {})
        self._sleep = sleep
        self._rng = random.Random(retry.seed)
        self._rng_lock = threading.Lock()
        # A private opener: honours proxy settings from the environment but installs nothing
        # globally.
        self._opener = urllib.request.build_opener()
        self.stats = {"requests": 0, "retries": 0}
        self._stats_lock = threading.Lock()

    def __repr__(self) -> str:  # never shows the key
        key = "set" if self._key else "none"
        return f"OpenAIChatClient(url={self.url!r}, model={self.model!r}, key={key})"

    # -- helpers --------------------------------------------------------------------------
    def _scrub(self, text: str) -> str:
        return text.replace(self._key, "***") if self._key else text

    def _delay(self, attempt: int, retry_after: float | None) -> float:
        p = self.retry
        base = min(p.backoff_max_s, p.backoff_base_s * (2.0**attempt))
        with self._rng_lock:
            u = self._rng.random()
        delay = base * (1.0 - p.jitter * u)
        if retry_after is not None:
            delay = max(delay, min(retry_after, p.backoff_max_s))
        return delay

    def body(self, request: ChatRequest) -> dict[str, Any]:
        s = request.sampling
        body: dict[str, Any] = {
            "model": self.model,
            "messages": openai_messages(request),
            "temperature": s.temperature,
            "top_p": s.top_p,
            "max_tokens": s.max_tokens,
        }
        if s.stop:
            body["stop"] = list(s.stop)
        if s.seed is not None:
            body["seed"] = int(s.seed)
        body.update(self.extra_body)
        return body

    def _post_once(self, payload: bytes) -> str:
        headers = {"Content-Type": "application/json", "Accept": "application/json"}
        if self._key:
            headers["Authorization"] = f"Bearer {self._key}"
        req = urllib.request.Request(self.url, data=payload, headers=headers, method="POST")
        try:
            with self._opener.open(req, timeout=self.timeout_s) as resp:
                raw = resp.read()
        except urllib.error.HTTPError as e:
            try:
                snippet = e.read()[:300].decode("utf-8", "replace")
            except Exception:  # noqa: BLE001 - the body is only for the message
                snippet = ""
            msg = self._scrub(f"HTTP {e.code} from {self.url}: {snippet.strip()}")
            if e.code in self.retry.fatal_statuses:
                raise FatalTeacherError(msg) from None
            if e.code in self.retry.retry_statuses:
                raise _Retryable(msg, _retry_after(e.headers)) from None
            raise TeacherError(msg) from None
        except (http.client.HTTPException, OSError) as e:
            # OSError covers URLError, ConnectionError (resets, refused) and TimeoutError.
            reason = getattr(e, "reason", e)
            msg = self._scrub(f"{type(e).__name__} talking to {self.url}: {reason}")
            raise _Retryable(msg) from None
        try:
            data = json.loads(raw)
            content = data["choices"][0]["message"].get("content")
        except (ValueError, KeyError, IndexError, TypeError, AttributeError):
            snippet = raw[:200].decode("utf-8", "replace")
            msg = self._scrub(f"unparseable response from {self.url}: {snippet!r}")
            raise _Retryable(msg) from None
        if content is None:
            content = ""
        if not isinstance(content, str):  # some servers return a list of parts
            parts = (
                [p for p in content if isinstance(p, Mapping)] if isinstance(content, list) else []
            )
            content = "".join(str(p.get("text", "")) for p in parts)
        return content

    def complete(self, request: ChatRequest) -> str:
        payload = json.dumps(self.body(request)).encode("utf-8")
        last = ""
        for attempt in range(self.retry.max_retries + 1):
            with self._stats_lock:
                self.stats["requests"] += 1
                if attempt:
                    self.stats["retries"] += 1
            try:
                return self._post_once(payload)
            except _Retryable as e:
                last = str(e)
                if attempt == self.retry.max_retries:
                    break
                self._sleep(self._delay(attempt, e.retry_after))
        raise TeacherError(f"{last} (gave up after {self.retry.max_retries + 1} attempts)")


# --------------------------------------------------------------------------------------------
# Our own JAX model as a teacher


class JaxTeacher:
    """Our Qwen2.5-VL (NNX) as a teacher, through ``tatar_jax.generate.generate``.

    The request is rendered with the Qwen2.5-VL chat template (system, user = image + text,
    generation prompt), the image is preprocessed like the data path does, and the completion is
    decoded with special tokens stripped (``generate.decode_completions``). Stop strings are
    applied to the decoded text. One row at a time (run the builder with ``concurrency = 1``).

    ``generate_fn``: None = ``tatar_jax.generate.generate``; tests pass a stand-in with its
    signature (no model needed).
    """

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        *,
        name: str = "jax",
        seed: int = 0,
        min_pixels: int = 3136,
        max_pixels: int = 1572864,
        chat_template: str | None = None,
        generate_fn: Callable[..., GenerateOutput] | None = None,
    ) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.name = name
        self.seed = int(seed)
        self.min_pixels = min_pixels
        self.max_pixels = max_pixels
        self.chat_template = chat_template
        self._generate = generate_fn
        self._calls = 0
        self._lock = threading.Lock()

    def _prompt(self, request: ChatRequest) -> tuple[Any, dict[str, Any]]:
        """(input_ids (1, L), the image's generate keywords) of a request."""
        import numpy as np

        from tatar_jax.data import image as image_mod
        from tatar_jax.data import prompts as chat

        user: list[dict[str, Any]] = []
        image_kw: dict[str, Any] = {}
        if request.image is not None:
            user.append({"type": "image"})
            pv, grid = image_mod.preprocess_image(
                image_mod.load_image(request.image), self.min_pixels, self.max_pixels
            )
            image_kw = {
                "pixel_values": np.asarray(pv),
                "image_grid_thw": np.asarray([grid], dtype=np.int32),
            }
        user.append({"type": "text", "text": request.user})
        msgs = [{"role": "system", "content": request.system}, {"role": "user", "content": user}]
        text = chat.render_chat(msgs, self.chat_template, add_generation_prompt=True)
        if image_kw:
            text = chat.expand_image_pads(text, [chat.num_image_tokens(grid)])
        return np.asarray([self.tokenizer.encode(text)], dtype=np.int32), image_kw

    def complete(self, request: ChatRequest) -> str:
        import jax
        import numpy as np

        from tatar_jax import generate

        ids, image_kw = self._prompt(request)
        gen = self._generate or generate.generate
        with self._lock:  # one generation at a time; the seed advances per call
            rng = jax.random.key(self.seed + self._calls)
            self._calls += 1
            out = gen(
                self.model, ids, np.ones_like(ids), **image_kw,
                max_new_tokens=int(request.sampling.max_tokens),
                temperature=float(request.sampling.temperature),
                top_p=float(request.sampling.top_p),
                # stop at the tokenizer's end of turn (not only the config's eos id)
                stop_token_ids=tuple(int(t) for t in self.tokenizer.eos_ids), rng=rng,
            )  # fmt: skip
        reply = generate.decode_completions(self.tokenizer, out)[0]
        return apply_stop(reply, request.sampling.stop)


def apply_stop(text: str, stop: Sequence[str]) -> str:
    """Cut ``text`` at the earliest stop string (excluded), as OpenAI servers do."""
    cut = len(text)
    for s in stop:
        if s:
            i = text.find(s)
            if i != -1:
                cut = min(cut, i)
    return text[:cut]


def load_jax_teacher(checkpoint: str, seed: int = 0, dtype: str = "bfloat16") -> JaxTeacher:
    """Our model from a Hugging Face Qwen2.5-VL directory (safetensors) + its tokenizer."""
    if not checkpoint:
        raise ValueError("teacher.kind = 'jax' needs teacher.checkpoint (a Qwen2.5-VL directory)")
    from tatar_jax import loading
    from tatar_jax.data.tokenizer import load_tokenizer

    policy = loading.load_policy(loading.PolicySource(hf_dir=checkpoint), dtype=dtype)
    tok = load_tokenizer(checkpoint)
    name = f"jax:{policy.name}"
    return JaxTeacher(policy.model, tok, name=name, seed=seed, chat_template=tok.chat_template)
