"""``m3 serve`` as a process and OpenAI Batch files: a LLaVA-NeXT budget cap, SIGTERM with requests in flight,
the loud non-loopback bind, and ``m3 batch --input-format/--format openai`` killed and resumed."""

from __future__ import annotations

import base64
import io
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest
from click.testing import CliRunner
from serve_live import EXAMPLES, data_url, live_server, messages

from m3cli.answering.core import answer_images, make_policy
from m3cli.cli import cli
from m3cli.fileio import content_hash

# ------------------------------------------------------------------------ LLaVA-NeXT: max_visual_tokens


@pytest.fixture(scope="module")
def next_backend(tmp_path_factory):
    pytest.importorskip("sentencepiece")
    import next_layouts as nl

    from m3cli.backends.torch import TorchBackend

    return TorchBackend(str(nl.build_llava_next_hf(tmp_path_factory.mktemp("next") / "tiny-next")), device="cpu")


def test_next_budgets_per_request_equal_the_core(next_backend):
    from test_next import scene

    picture = scene(80, 100)  # a 2x2 layout on the tiny pinpoints
    buf = io.BytesIO()
    picture.save(buf, "PNG")
    url = "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()
    with live_server(next_backend) as server:
        client = server.client(key="unused")
        for m3, policy_kw in (({"max_visual_tokens": 200}, {"max_visual_tokens": 200}),
                              ({"max_visual_tokens": 40}, {"max_visual_tokens": 40}),
                              ({"tokens": 9}, {"tokens": 9}),
                              ({"auto_scale": True, "max_visual_tokens": 200},
                               {"auto_scale": True, "max_visual_tokens": 200})):
            reply = client.chat.completions.create(model=server.state.name, messages=messages("What is this?", url),
                                                   max_tokens=5, extra_body={"m3": m3})
            want = answer_images(next_backend, [picture], ["What is this?"],
                                 [make_policy(next_backend.grid_side, **policy_kw)], 5)[0]
            got = reply.m3
            assert (got["answer"], got["tokens"], got["visual_tokens"], got["crops"]) == \
                (want.answer, want.tokens, want.visual_tokens, want.crops), m3
            assert got["crops"] == 5 and reply.usage.prompt_tokens == want.prompt_tokens
            if "max_visual_tokens" in m3:
                assert got["visual_tokens"] <= m3["max_visual_tokens"]


# ------------------------------------------------------------------------ the process: SIGTERM, warnings


def _start(args: list[str], timeout: float = 180) -> tuple[subprocess.Popen, str, list[str]]:
    proc = subprocess.Popen([sys.executable, "-m", "m3cli", "serve", "--port", "0", *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    lines: list[str] = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = proc.stderr.readline()
        if not line:
            break
        lines.append(line)
        found = re.search(r"ready at (http://\S+)/v1", line)
        if found:
            threading.Thread(target=lambda: lines.extend(proc.stderr), daemon=True).start()
            return proc, found.group(1), lines
    proc.kill()
    raise AssertionError("m3 serve did not start: " + "".join(lines))


def test_sigterm_finishes_requests_in_flight_and_exits_0(tiny_model_dir):
    proc, url, log = _start(["--model", str(tiny_model_dir), "--max-batch", "4"])
    try:
        body = {"model": tiny_model_dir.name, "messages": messages("What is this?", data_url(EXAMPLES / "scene-0.png")),
                "max_tokens": 200, "m3": {"tokens": 1}}  # random weights: ~200 tokens, seconds of decoding
        replies: list = [None] * 4

        def send(i):
            replies[i] = httpx.post(url + "/v1/chat/completions", json=body, timeout=120)

        threads = [threading.Thread(target=send, args=(i,)) for i in range(4)]
        for t in threads:
            t.start()
        deadline = time.monotonic() + 60
        while httpx.get(url + "/health").json()["in_flight"] < 4:  # all four received, none answered yet
            assert time.monotonic() < deadline
            time.sleep(0.02)
        proc.send_signal(signal.SIGTERM)
        time.sleep(0.5)
        with pytest.raises(httpx.ConnectError):  # no new connections once stopping
            httpx.post(url + "/v1/chat/completions", json=body, timeout=5)
        for t in threads:
            t.join(120)
        assert [r.status_code for r in replies] == [200] * 4, [r.text for r in replies]
        assert len({r.json()["choices"][0]["message"]["content"] for r in replies}) == 1
        assert proc.wait(60) == 0, "".join(log)
        assert "m3 serve: stopped" in "".join(log)
    finally:
        if proc.poll() is None:
            proc.kill()


def test_non_loopback_bind_without_key_warns_and_bad_model_is_one_line(tmp_path):
    res = CliRunner().invoke(cli, ["serve", "--host", "0.0.0.0", "--port", "0", "--model", str(tmp_path / "none")])
    assert res.exit_code == 2
    assert "without --api-key" in res.stderr and res.stderr.count("error:") == 1 and "Traceback" not in res.output
    quiet = CliRunner().invoke(cli, ["serve", "--port", "0", "--model", str(tmp_path / "none"), "--api-key", "k",
                                     "--host", "0.0.0.0"])
    assert "without --api-key" not in quiet.stderr
    bad = CliRunner().invoke(cli, ["serve", "--tokens", "9", "--ladder", "9,576"])  # a fixed scale has no ladder
    assert bad.exit_code == 2 and "--auto-scale" in bad.stderr


# ------------------------------------------------------------------------ OpenAI Batch files


def _request_lines() -> list[bytes]:
    lines = []
    for scene in range(3):
        for k, (question, m3) in enumerate((("what colour is the background?", {"tokens": 1}),
                                            ("what shape is in the top right?", {"auto_scale": True}))):
            body = {"model": "m3-shapes", "messages": messages(question, data_url(EXAMPLES / f"scene-{scene}.png")),
                    "max_tokens": 4, "m3": m3}
            lines.append(json.dumps({"custom_id": f"s{scene}-{k}", "method": "POST", "url": "/v1/chat/completions",
                                     "body": body}).encode())
    lines.insert(5, b'{"custom_id": "broken", "method": "POST", "url": "/v1/chat/completions", "body": {"model": 1}}')
    lines.insert(7, b"this is not json")
    return lines


def _by_custom_id(path: Path) -> dict:
    out = {}
    for raw in path.read_bytes().splitlines():
        line = json.loads(raw)
        key = line["custom_id"] or line["m3"]["id"]
        assert key not in out, f"{key} written twice"
        response = line["response"]
        out[key] = (response and response["status_code"],
                    response and (response["body"].get("choices") or [{}])[0].get("message", {}).get("content"),
                    (line["error"] or {}).get("code"))
    return out


def test_openai_batch_round_trip_killed_and_resumed(tmp_path):
    lines = _request_lines()
    requests = tmp_path / "requests.jsonl"
    requests.write_bytes(b"\n".join(lines) + b"\n")
    args = ["batch", "--input-format", "openai", "--format", "openai"]
    straight = tmp_path / "straight.jsonl"
    res = CliRunner().invoke(cli, [*args, str(requests), "-o", str(straight)])
    assert res.exit_code == 1, res.output  # two lines are no answerable request
    want = _by_custom_id(straight)
    assert len(want) == len(lines)
    assert want["s0-0"] == (200, "brown", None) and want["broken"][0] == 400
    # a line without a custom_id is named by its content (FILE:HASH), never by its line number
    assert want[f"{requests}:{content_hash('this is not json', length=8)}"] == (None, None, "invalid_request_line")
    assert want["s2-1"][0] == 200

    out = tmp_path / "out.jsonl"
    first = subprocess.Popen([sys.executable, "-m", "m3cli", *args, "-", "-o", str(out), "-b", "1"],
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        first.stdin.write(b"\n".join(lines[:3]) + b"\n")
        first.stdin.flush()
        deadline = time.monotonic() + 120
        while not (out.exists() and out.read_bytes().count(b"\n") >= 3):
            assert first.poll() is None and time.monotonic() < deadline, first.stderr.read().decode()
            time.sleep(0.05)
        first.send_signal(signal.SIGKILL)
        first.wait(30)
    finally:
        if first.poll() is None:
            first.kill()
    with open(out, "ab") as f:
        f.write(b'{"id": "batch_req-x", "custom_id": "s1-1", "response": {"status_co')  # cut by the kill
    res = CliRunner().invoke(cli, [*args, str(requests), "-o", str(out), "--resume"])
    assert res.exit_code == 1 and "skipped 3" in res.stderr, res.output
    assert _by_custom_id(out) == want
    again = CliRunner().invoke(cli, [*args, str(requests), "-o", str(out), "--resume"])
    assert f"skipped {len(lines)}" in again.stderr and _by_custom_id(out) == want
    head = tmp_path / "head.jsonl"
    head.write_bytes(b"\n".join(lines[:2]) + b"\n")
    plain = CliRunner().invoke(cli, ["batch", "--input-format", "openai", str(head)])
    rows = [json.loads(x) for x in plain.stdout.splitlines()]
    assert [r["id"] for r in rows[:2]] == ["s0-0", "s0-1"] and rows[0]["answer"] == "brown"
    assert rows[0]["prompt_tokens"] > 0 and rows[0]["finish_reason"] == "stop"
    assert os.path.getsize(out) > 0
