"""The judge's transport (sonar_llm.eval.judge.ChatClient) against a scripted stub server on 127.0.0.1: a reply
that is not JSON, a JSON reply without `choices`, a non-text message, HTTP 429 (retried) vs 400 (not), and
the exponential backoff capped at max_backoff. The server answers from a fixed script (one reply per request,
then 503), so every test is bounded; the client's sleeps are recorded, not slept."""
from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from sonar_llm.eval import judge as J

OK = (200, json.dumps({"choices": [{"message": {"role": "assistant", "content": "Grammar: 8/10"}}]}).encode())
MESSAGES = [{"role": "user", "content": "Rate this story."}]


@pytest.fixture
def stub():
    """`stub.script` is the list of (status, body bytes) replies, served in order; `stub.count` the requests."""
    state = {"script": [], "count": 0, "lock": threading.Lock()}

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):
            self.rfile.read(int(self.headers["Content-Length"]))
            with state["lock"]:
                i = state["count"]
                state["count"] += 1
            code, body = state["script"][i] if i < len(state["script"]) else (503, b"{}")
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    httpd.daemon_threads = True
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    state["url"] = f"http://127.0.0.1:{httpd.server_address[1]}/v1"
    yield state
    httpd.shutdown()
    httpd.server_close()
    thread.join(timeout=5)


def _client(stub, script, **kw):
    stub["script"] = script
    delays = []
    kw = {"timeout": 5.0, "retries": 3, "backoff": 0.5, **kw}
    cfg = J.JudgeConfig(url=stub["url"], model="judge-test", **kw)
    return J.ChatClient(cfg, sleep=delays.append), delays


@pytest.mark.parametrize("bad, kind", [
    (b"<html>502 Bad Gateway</html>", "JSONDecodeError"),  # not JSON at all
    (json.dumps({"id": "x", "object": "chat.completion"}).encode(), "KeyError"),  # JSON without `choices`
    (json.dumps({"choices": []}).encode(), "IndexError"),
])
def test_a_reply_that_is_not_a_chat_completion_is_retried_then_reported(stub, bad, kind):
    client, delays = _client(stub, [(200, bad), OK])
    assert client.complete(MESSAGES) == ("Grammar: 8/10", 2) and delays == [0.5]
    client, delays = _client(stub, [(200, bad)] * 4)
    stub["count"] = 0
    with pytest.raises(J.JudgeError, match=f"gave up after 4 attempts; .*not a chat completion \\({kind}\\)"):
        client.complete(MESSAGES)
    assert stub["count"] == 4 and delays == [0.5, 1.0, 2.0]


def test_message_content_that_is_not_text_is_retried(stub):
    null = (200, json.dumps({"choices": [{"message": {"role": "assistant", "content": None}}]}).encode())
    client, delays = _client(stub, [null, OK])
    assert client.complete(MESSAGES) == ("Grammar: 8/10", 2)


def test_429_is_retried_with_backoff_and_400_is_not(stub):
    client, delays = _client(stub, [(429, b'{"error": "rate limited"}'), (429, b"{}"), OK])
    assert client.complete(MESSAGES) == ("Grammar: 8/10", 3) and delays == [0.5, 1.0]
    client, delays = _client(stub, [(400, b'{"error": "bad request"}'), OK])
    stub["count"] = 0
    with pytest.raises(J.JudgeError, match="HTTP 400"):
        client.complete(MESSAGES)
    assert stub["count"] == 1 and delays == []  # the control: a client error is final


def test_backoff_doubles_and_is_capped(stub):
    client, delays = _client(stub, [], retries=6, backoff=1.0, max_backoff=5.0)  # every request: 503
    with pytest.raises(J.JudgeError, match=r"gave up after 7 attempts; last error: HTTP 503"):
        client.complete(MESSAGES)
    assert delays == [1.0, 2.0, 4.0, 5.0, 5.0, 5.0] and stub["count"] == 7
