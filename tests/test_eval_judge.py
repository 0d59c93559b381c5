"""LLM judge (sonar_llm.eval.judge) against a local OpenAI-compatible stub server on 127.0.0.1: the two-turn
conversation, marks parsed as the public gpt_eval.py, concurrency limit, timeouts, retries with exponential
backoff on 5xx, unparsable answers recorded (never 0), non-retryable errors, the CLI."""
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from sonar_llm.eval import judge as J

GOOD = "Grammar: 8/10\nCreativity: 7/10\nConsistency: 6/10\nPlot: 5/10\nAge group: E (10-12)"


class Stub:
    """Behaviour per story, keyed by a word in the continuation: SLOW (first request sleeps past the client
    timeout), FAIL (two 503s, then fine), MALFORMED (marks answer without readable marks), BROKEN (always 500),
    DENIED (HTTP 401), DROP (the first marks request gets no response at all), else good. Records every
    request body and the peak number of requests in flight (a request the client gave up on is not counted)."""

    def __init__(self):
        self.lock = threading.Lock()
        self.requests = []
        self.in_flight = 0
        self.peak = 0
        self.seen = {}

    def handle(self, handler):
        body = json.loads(handler.rfile.read(int(handler.headers["Content-Length"])))
        with self.lock:
            self.requests.append({"body": body, "auth": handler.headers.get("Authorization"),
                                  "path": handler.path})
            self.in_flight += 1
            self.peak = max(self.peak, self.in_flight)
        counted = True
        try:
            user1 = body["messages"][1]["content"]
            turn = 1 if len(body["messages"]) == 2 else 2
            key = next((w for w in ("SLOW", "FAIL", "MALFORMED", "BROKEN", "DENIED", "DROP") if w in user1), "OK")
            with self.lock:
                n = self.seen[(user1, turn)] = self.seen.get((user1, turn), 0) + 1
            time.sleep(0.05)  # long enough for concurrent requests to overlap
            if key == "SLOW" and n == 1:
                with self.lock:  # the client gives up on this one: it no longer counts as in flight
                    self.in_flight -= 1
                    counted = False
                time.sleep(1.0)
            if key == "DROP" and turn == 2 and n == 1:
                return None  # the connection closes without a response
            if key == "FAIL" and turn == 1 and n <= 2:
                return self.reply(handler, 503, {"error": "overloaded"})
            if key == "BROKEN":
                return self.reply(handler, 500, {"error": "down"})
            if key == "DENIED":
                return self.reply(handler, 401, {"error": "bad key"})
            if turn == 1:
                content = f"A fine review of story {user1.split('***')[1][:20]!r}."
            elif key == "MALFORMED":
                content = "Grammar: good\nCreativity: 11/10\nI would rather not grade the plot."
            else:
                content = GOOD
            return self.reply(handler, 200, {"choices": [{"message": {"role": "assistant", "content": content}}]})
        finally:
            if counted:
                with self.lock:
                    self.in_flight -= 1

    @staticmethod
    def reply(handler, code, obj):
        data = json.dumps(obj).encode()
        try:
            handler.send_response(code)
            handler.send_header("Content-Type", "application/json")
            handler.send_header("Content-Length", str(len(data)))
            handler.end_headers()
            handler.wfile.write(data)
        except (BrokenPipeError, ConnectionResetError):  # the client timed out and left
            pass


@pytest.fixture
def server():
    stub = Stub()

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):
            stub.handle(self)

        def log_message(self, *args):
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    httpd.daemon_threads = True
    t = threading.Thread(target=httpd.serve_forever, daemon=True)
    t.start()
    stub.url = f"http://127.0.0.1:{httpd.server_address[1]}/v1"
    yield stub
    httpd.shutdown()
    httpd.server_close()


def _cfg(url, **kw):
    kw.setdefault("timeout", 0.5)
    kw.setdefault("backoff", 0.01)
    kw.setdefault("retries", 3)
    return J.JudgeConfig(url=url, model="judge-test", **kw)


def test_parse_marks_like_the_public_script():
    assert J.parse_marks(GOOD) == ({"grammar": 8.0, "creativity": 7.0, "consistency": 6.0, "plot": 5.0}, {})
    marks, problems = J.parse_marks("grammar - 9/10, plot 3/10\nCONSISTENCY: 4.0/10 (weak)\nCreativity: 10/10")
    # a line counts for the first aspect it names (grammar here), as the public elif chain does
    assert marks == {"grammar": 9.0, "creativity": 10.0} and set(problems) == {"consistency", "plot"}
    marks, problems = J.parse_marks("Grammar: 0/10\nPlot: /10\nCreativity: 7/10")
    assert marks == {"creativity": 7.0}
    assert "outside 1-10" in problems["grammar"] and "no 'x/10'" in problems["plot"]
    assert problems["consistency"] == "no line names it"


def test_prompt_file_is_the_public_conversation():
    p = J.load_prompt()
    assert p.system.startswith("Please act as an impartial judge")
    msgs = p.first_turn("Once {generation} upon.", " The end {story_prompt}.")
    assert msgs[1]["content"].count("***") == 4  # the separator + three mentions in the instructions
    assert "Once {generation} upon.*** The end {story_prompt}." in msgs[1]["content"]  # values are not re-read
    two = p.second_turn(msgs, "review")
    assert [m["role"] for m in two] == ["system", "user", "assistant", "user"]
    assert two[3]["content"].endswith("It should not be any extra explanation included.")


def test_bad_prompt_file(tmp_path):
    f = tmp_path / "p.txt"
    f.write_text("=== system\nx\n=== user_1\nno placeholders\n=== user_2\ny\n")
    with pytest.raises(ValueError, match="placeholder"):
        J.load_prompt(f)
    with pytest.raises(FileNotFoundError):
        J.load_prompt(tmp_path / "missing.txt")


def test_judge_against_stub_server(server, monkeypatch):
    monkeypatch.setenv("JUDGE_TEST_KEY", "sekrit")
    prompts = [f"Story {i} starts." for i in range(8)]
    gens = [" It went well.", " SLOW story.", " FAIL story.", " MALFORMED story.", " BROKEN story.",
            " Another one.", " And more.", " DROP the line."]
    delays = []
    client = J.ChatClient(_cfg(server.url, api_key_env="JUDGE_TEST_KEY", concurrency=3), sleep=delays.append)
    res = J.judge(prompts, gens, client.cfg, client=client)
    # concurrency limit: 3 stories in flight, one request each at a time
    assert 2 <= server.peak <= 3
    assert all(r["auth"] == "Bearer sekrit" and r["path"] == "/v1/chat/completions" for r in server.requests)
    assert all(r["body"]["model"] == "judge-test" and r["body"]["max_tokens"] == 512 for r in server.requests)
    items = res["items"]
    good = [0, 1, 2, 5, 6, 7]
    for i in good:
        assert items[i]["marks"] == {"grammar": 8.0, "creativity": 7.0, "consistency": 6.0, "plot": 5.0}, i
    assert items[1]["attempts"] == 4  # the first request of each turn times out and is retried
    assert items[2]["attempts"] == 4  # two 503s, success, second turn
    assert items[7]["attempts"] == 3  # first turn, a dropped connection, the retried second turn
    # MALFORMED: recorded with its answer, no mark invented, left out of the means
    assert res["unparsed"] == [{"index": 3, "problems": items[3]["problems"], "answer": items[3]["answer"]}]
    assert items[3]["marks"] == {} and set(items[3]["problems"]) == set(J.ASPECTS)
    # BROKEN: 1 + 3 retries, then listed as failed with the HTTP error
    assert [f["index"] for f in res["failed"]] == [4] and "HTTP 500" in res["failed"][0]["error"]
    assert res["counts"] == {a: 6 for a in J.ASPECTS}
    assert res["means"] == {"grammar": 8.0, "creativity": 7.0, "consistency": 6.0, "plot": 5.0}
    # exponential backoff: FAIL slept 0.01, 0.02; SLOW 0.01 per turn; BROKEN 0.01, 0.02, 0.04; DROP 0.01
    assert sorted(delays) == sorted([0.01, 0.02, 0.01, 0.01, 0.01, 0.02, 0.04, 0.01])
    # the second turn carries the first answer as the assistant's message
    second = [r["body"] for r in server.requests if len(r["body"]["messages"]) == 4]
    assert all(m["messages"][2]["content"].startswith("A fine review") for m in second)


def test_non_retryable_error_and_missing_key(server, monkeypatch):
    delays = []
    client = J.ChatClient(_cfg(server.url), sleep=delays.append)
    res = J.judge(["Start."], [" DENIED."], client.cfg, client=client)
    assert "HTTP 401" in res["failed"][0]["error"] and delays == []
    assert res["means"] == {a: None for a in J.ASPECTS}
    monkeypatch.delenv("NO_SUCH_JUDGE_KEY", raising=False)
    with pytest.raises(ValueError, match="NO_SUCH_JUDGE_KEY"):
        J.ChatClient(_cfg(server.url, api_key_env="NO_SUCH_JUDGE_KEY"))
    with pytest.raises(ValueError, match="http"):
        J.JudgeConfig(url="127.0.0.1:1").validate()


def test_cli(server, tmp_path, capsys):
    recs = [{"prefix": "A dog ran.", "full_text": "A dog ran. It was fast.", "original_text": "x"},
            {"prefix": "A cat sat.", "full_text": "A cat sat. MALFORMED now.", "original_text": "y"}]
    src = tmp_path / "gen.json"
    src.write_text(json.dumps(recs))
    out = tmp_path / "judged.json"
    assert J.main([str(src), "--url", server.url, "--timeout", "2", "--backoff", "0", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "Grammar     : 8.00 (n=1)" in printed and "1 answers not fully parsed" in printed
    saved = json.loads(out.read_text())
    assert saved["mode"] == "llm_judge" and saved["unparsed"][0]["index"] == 1
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps([{"prefix": "A.", "full_text": "B. C."}]))
    assert J.main([str(bad), "--url", server.url]) == 2


def test_cli_fails_above_the_allowed_share_says_why_and_shows_retries(server, tmp_path, capsys):
    """Issue 27: when more than --max-failed-share of the stories fail, exit 1 with one line giving the first
    reasons and nothing written (was exit 0 and only '1 stories failed'); every retry is said on stderr as it
    happens (an HTTP 500 sat silent through the backoff); within the share, exit 0 and the result is written."""
    recs = [{"prefix": "A dog ran.", "full_text": "A dog ran. It was fast."},
            {"prefix": "A cat sat.", "full_text": "A cat sat. BROKEN now."}]
    src = tmp_path / "gen.json"
    src.write_text(json.dumps(recs))
    out = tmp_path / "judged.json"
    argv = [str(src), "--url", server.url, "--timeout", "2", "--retries", "2", "--backoff", "0", "--out", str(out)]
    assert J.main(argv) == 1 and not out.exists()
    lines = capsys.readouterr().err.splitlines()
    retries = [line for line in lines if "retry" in line]
    assert [line.split("retry ")[1].split(" ")[0] for line in retries] == ["1/2", "2/2"]
    assert all(line.startswith("judge: story 1 review: HTTP 500") for line in retries)
    assert lines[-1].startswith("judge failed: 1 of 2 stories failed") and "story 1: gave up after 3" in lines[-1]
    assert "HTTP 500" in lines[-1] and len(lines) == len(retries) + 1
    assert J.main([*argv, "--max-failed-share", "0.5"]) == 0
    saved = json.loads(out.read_text())
    assert [f["index"] for f in saved["failed"]] == [1] and saved["counts"]["grammar"] == 1
