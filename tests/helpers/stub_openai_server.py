"""A local OpenAI-compatible chat server for tests (127.0.0.1, ephemeral port, in a thread).

The test supplies ``behaviour(body, n) -> action``: ``body`` is the parsed request JSON, ``n`` the
0-based number of the request. Actions:

* ``Reply(content)``              200 with a chat completion whose message content is ``content``
* ``Status(code, body, headers)`` that HTTP status
* ``Raw(data)``                   200 with ``data`` as the body (malformed JSON etc.)
* ``Drop()``                      close the connection without answering
* ``Sleep(seconds, then)``        wait, then do ``then`` (slow answers / timeouts)

Every request is recorded (path, headers, body) in ``server.requests``.
"""

from __future__ import annotations

import dataclasses
import http.server
import json
import re
import socket
import threading
import time
from collections.abc import Callable
from typing import Any


@dataclasses.dataclass
class Reply:
    content: str
    finish_reason: str = "stop"


@dataclasses.dataclass
class Status:
    code: int
    body: str = ""
    headers: dict[str, str] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass
class Raw:
    data: bytes


@dataclasses.dataclass
class Drop:
    pass


@dataclasses.dataclass
class Sleep:
    seconds: float
    then: Any


Behaviour = Callable[[dict[str, Any], int], Any]


def completion(content: str, model: str = "stub", finish_reason: str = "stop") -> dict[str, Any]:
    return {
        "id": "chatcmpl-stub",
        "object": "chat.completion",
        "created": 0,
        "model": model,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": content},
                "finish_reason": finish_reason,
            }
        ],
        "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
    }


def user_text(body: dict[str, Any]) -> str:
    """The text of the last user message of a request body."""
    for m in reversed(body.get("messages", [])):
        if m.get("role") == "user":
            c = m.get("content")
            if isinstance(c, str):
                return c
            return "".join(p.get("text", "") for p in c if p.get("type") == "text")
    return ""


def has_image(body: dict[str, Any]) -> bool:
    for m in body.get("messages", []):
        c = m.get("content")
        if isinstance(c, list) and any(p.get("type") == "image_url" for p in c):
            return True
    return False


def find_number(pattern: str, text: str) -> float | None:
    m = re.search(pattern, text)
    return float(m.group(1)) if m else None


class StubServer:
    def __init__(self, behaviour: Behaviour) -> None:
        self.behaviour = behaviour
        self.requests: list[dict[str, Any]] = []
        self._lock = threading.Lock()
        stub = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.0"

            def log_message(self, *args: Any) -> None:  # keep test output clean
                pass

            def do_POST(self) -> None:  # noqa: N802 - http.server naming
                length = int(self.headers.get("Content-Length", "0"))
                raw = self.rfile.read(length)
                try:
                    body = json.loads(raw)
                except ValueError:
                    body = {}
                with stub._lock:
                    n = len(stub.requests)
                    stub.requests.append(
                        {"path": self.path, "headers": dict(self.headers), "body": body}
                    )
                action = stub.behaviour(body, n)
                self._act(action, body)

            def _act(self, action: Any, body: dict[str, Any]) -> None:
                while isinstance(action, Sleep):
                    time.sleep(action.seconds)
                    action = action.then
                try:
                    if isinstance(action, Reply):
                        data = json.dumps(
                            completion(
                                action.content, body.get("model", "stub"), action.finish_reason
                            )
                        ).encode()
                        self._send(200, data, {"Content-Type": "application/json"})
                    elif isinstance(action, Status):
                        self._send(action.code, action.body.encode(), action.headers)
                    elif isinstance(action, Raw):
                        self._send(200, action.data, {"Content-Type": "application/json"})
                    elif isinstance(action, Drop):
                        self.close_connection = True
                        try:
                            self.connection.shutdown(socket.SHUT_RDWR)
                        except OSError:
                            pass
                    else:
                        raise TypeError(f"unknown stub action {action!r}")
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client gave up (timeout test)

            def _send(self, code: int, data: bytes, headers: dict[str, str]) -> None:
                self.send_response(code)
                for k, v in headers.items():
                    self.send_header(k, v)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self._server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True
        )

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}/v1"

    def start(self) -> StubServer:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def __enter__(self) -> StubServer:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()
