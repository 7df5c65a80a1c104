"""The reward server answers every malformed request with a 4xx and a reason, times out silent clients,
serves only its documented paths, checks an optional token, limits concurrent work, and survives a soak."""

from __future__ import annotations

import http.client
import json
import socket
import struct
import threading
import time

import pytest
import torch

from gfnalign.rewards.http import HttpReward, encode_png, encode_safetensors, start_server_thread


def _mean_reward(images, prompts):
    return images.mean(dim=(1, 2, 3))


def _slow_reward(images, prompts):
    time.sleep(0.6)
    return images.mean(dim=(1, 2, 3))


@pytest.fixture()
def server():
    srv, _ = start_server_thread(_mean_reward, read_timeout=0.5, max_concurrent=2)
    yield srv
    srv.shutdown()
    srv.server_close()


def _request(srv, method, path, body=None, headers=None):
    host, port = srv.server_address[:2]
    conn = http.client.HTTPConnection(host, port, timeout=10)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        resp = conn.getresponse()
        payload = resp.read()
        return resp.status, json.loads(payload) if payload else {}
    finally:
        conn.close()


def _valid_body(n=2):
    images = torch.rand(n, 3, 4, 4)
    return json.dumps({"prompts": ["a"] * n, "images": encode_png(images)}).encode()


JSON = {"Content-Type": "application/json"}
ST = {"Content-Type": "application/x-safetensors"}


def _bad_offsets() -> bytes:
    good = encode_safetensors(torch.rand(1, 3, 2, 2), ["a"])
    (n,) = struct.unpack("<Q", good[:8])
    header = json.loads(good[8:8 + n])
    header["images"]["data_offsets"] = [0, 10**9]
    text = json.dumps(header).encode()
    return struct.pack("<Q", len(text)) + text + good[8 + n:]


BAD_REQUESTS = [
    ("GET", "/", None, {}, 404, "unknown path"),
    ("GET", "/admin", None, {}, 404, "unknown path"),
    ("GET", "/score", None, {}, 405, "POST"),
    ("POST", "/other", b"{}", JSON, 404, "unknown path"),
    ("PUT", "/score", b"{}", JSON, 405, "not supported"),
    ("POST", "/score", b"hello", {"Content-Type": "text/plain"}, 415, "Content-Type"),
    ("POST", "/score", b"{}", {**JSON, "Content-Length": "abc"}, 400, "Content-Length"),
    ("POST", "/score", b"not json", JSON, 400, "Expecting value"),
    ("POST", "/score", b"[" * 5000 + b"]" * 5000, JSON, 400, "nested deeper"),
    ("POST", "/score", json.dumps({"prompts": ["a"], "images": "x"}).encode(), JSON, 400, "list of base64"),
    ("POST", "/score", json.dumps({"prompts": ["a"], "images": ["@@@"]}).encode(), JSON, 400, "base64"),
    ("POST", "/score", json.dumps({"prompts": 3, "images": []}).encode(), JSON, 400, "prompts"),
    ("POST", "/score", json.dumps({"images": []}).encode(), JSON, 400, "'images'"),
    ("POST", "/score", struct.pack("<Q", 10**12) + b"{}", ST, 400, "header length"),
    ("POST", "/score", b"\x01", ST, 400, "too short"),
    ("POST", "/score", _bad_offsets(), ST, 400, ""),
]


@pytest.mark.parametrize("method,path,body,headers,status,reason", BAD_REQUESTS,
                         ids=[f"{m}-{p}-{s}-{i}" for i, (m, p, _, _, s, _) in enumerate(BAD_REQUESTS)])
def test_malformed_requests_get_a_4xx_with_a_reason(server, method, path, body, headers, status, reason):
    code, payload = _request(server, method, path, body, headers)
    assert code == status, payload
    assert payload.get("kind") == "input" and reason in payload["error"], payload


def test_missing_content_length_and_oversized_bodies(server):
    host, port = server.server_address[:2]
    with socket.create_connection((host, port), timeout=5) as s:
        s.sendall(b"POST /score HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n\r\n")
        assert b" 411 " in s.recv(4096)
    server.max_body_bytes = 100
    code, payload = _request(server, "POST", "/score", _valid_body(), JSON)
    assert code == 413 and "exceeds the limit" in payload["error"]


def test_a_client_that_stops_mid_body_times_out_and_the_server_keeps_serving(server):
    host, port = server.server_address[:2]
    t0 = time.monotonic()
    with socket.create_connection((host, port), timeout=5) as s:
        s.sendall(b"POST /score HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 1000\r\n\r\n{\"pro")
        answer = s.recv(4096)
    assert b" 408 " in answer and time.monotonic() - t0 < 3.0
    with socket.create_connection((host, port), timeout=5) as s:  # idle: connected, sends nothing
        t0 = time.monotonic()
        assert s.recv(4096) == b"" and time.monotonic() - t0 < 3.0  # closed after the read timeout
    code, payload = _request(server, "POST", "/score", _valid_body(), JSON)
    assert code == 200 and len(payload["scores"]) == 2


def test_token_is_required_when_set(monkeypatch):
    srv, _ = start_server_thread(_mean_reward, token="s3cret")
    try:
        assert _request(srv, "GET", "/health")[0] == 200  # health stays open for probes
        assert _request(srv, "GET", "/info")[0] == 401
        assert _request(srv, "POST", "/score", _valid_body(), JSON)[0] == 401
        wrong = {**JSON, "Authorization": "Bearer nope"}
        assert _request(srv, "POST", "/score", _valid_body(), wrong)[0] == 401
        right = {**JSON, "Authorization": "Bearer s3cret"}
        assert _request(srv, "POST", "/score", _valid_body(), right)[0] == 200
        x = torch.rand(2, 3, 4, 4)
        assert HttpReward(url=srv.url, token="s3cret", retries=0)(x, ["a", "b"]).shape == (2,)
        monkeypatch.setenv("GFNALIGN_REWARD_TOKEN", "s3cret")
        assert HttpReward(url=srv.url, retries=0)(x, ["a", "b"]).shape == (2,)
    finally:
        srv.shutdown()
        srv.server_close()


def test_serving_beyond_loopback_needs_a_token(monkeypatch, capsys):
    from gfnalign.cli.main import main

    monkeypatch.delenv("GFNALIGN_REWARD_TOKEN", raising=False)
    assert main(["rewards", "serve", "--reward", "ink", "--host", "0.0.0.0", "--port", "0"]) == 2
    assert "--token" in capsys.readouterr().err


def test_concurrent_requests_beyond_the_limit_get_503():
    srv, _ = start_server_thread(_slow_reward, max_concurrent=1)
    try:
        results = []

        def call():
            results.append(_request(srv, "POST", "/score", _valid_body(1), JSON)[0])

        threads = [threading.Thread(target=call) for _ in range(3)]
        for t in threads:
            t.start()
            time.sleep(0.05)
        for t in threads:
            t.join(10)
        assert sorted(results) == [200, 503, 503]
    finally:
        srv.shutdown()
        srv.server_close()


def test_loopback_soak_mixed_good_and_bad_clients(server):
    """8 clients x 30 requests (valid, malformed, deep, truncated and abandoned), bounded to ~30 s."""
    host, port = server.server_address[:2]
    statuses: list[int] = []
    lock = threading.Lock()
    before = threading.active_count()

    def client(k: int) -> None:
        for i in range(30):
            kind = (k + i) % 5
            if kind == 3:  # a client that sends half a body and hangs up
                with socket.create_connection((host, port), timeout=5) as s:
                    s.sendall(b"POST /score HTTP/1.1\r\nContent-Type: application/json\r\nContent-Length: 50\r\n\r\n{")
                continue
            body = {0: _valid_body(2), 1: b"{bad", 2: b"[" * 100 + b"]" * 100, 4: _valid_body(1)}[kind]
            code, _ = _request(server, "POST", "/score", body, JSON)
            with lock:
                statuses.append(code)

    t0 = time.monotonic()
    threads = [threading.Thread(target=client, args=(k,)) for k in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert time.monotonic() - t0 < 60
    assert len(statuses) == 8 * 24 and set(statuses) <= {200, 400, 503}
    assert statuses.count(200) > 0 and statuses.count(400) == 8 * 12
    code, payload = _request(server, "POST", "/score", _valid_body(), JSON)
    assert code == 200
    time.sleep(1.0)  # abandoned connections are closed after the read timeout: handler threads end
    assert threading.active_count() <= before + 2
