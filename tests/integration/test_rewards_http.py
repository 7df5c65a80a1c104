"""The HTTP reward against the reference server on 127.0.0.1: round trips, restarts, outages, bad answers."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import pytest
import torch

from gfnalign.rewards import CallableReward, RewardOutputError, build_reward
from gfnalign.rewards.http import RewardServerError, start_server_thread


def _images(n=8, size=16, seed=0):
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def server():
    started = []

    def start(reward="jpeg-incompressibility", port=0):
        srv, thread = start_server_thread(reward, "127.0.0.1", port)
        started.append((srv, thread))
        return srv

    yield start
    for srv, thread in started:
        srv.shutdown()
        srv.server_close()
        thread.join(timeout=5)


def _quantised(x):
    return (x * 255).round() / 255


@pytest.mark.parametrize("fmt", ["png", "safetensors"])
def test_round_trip_matches_local_reward(server, fmt):
    srv = server("jpeg-incompressibility")
    remote = build_reward({"name": "http", "url": srv.url, "format": fmt, "timeout": 10})
    local = build_reward("jpeg-incompressibility")
    x = _images()
    out = remote(x, [f"p{i}" for i in range(8)])
    assert out.shape == (8,) and out.dtype == torch.float32
    assert torch.equal(out, local(_quantised(x) if fmt == "png" else x, ["p"] * 8))
    assert not remote.differentiable


def test_prompts_arrive_intact(server):
    seen = {}

    def fn(images, prompts):
        seen["prompts"] = list(prompts)
        seen["shape"] = tuple(images.shape)
        return torch.arange(len(prompts), dtype=torch.float32)

    srv = server(CallableReward(fn, name="echo"))
    prompts = ['a "quoted" prompt', "ünïcödé ✓", "x, y\nz"]
    for fmt in ("png", "safetensors"):
        out = build_reward({"name": "http", "url": srv.url, "format": fmt})(_images(3), prompts)
        assert out.tolist() == [0.0, 1.0, 2.0]
        assert seen["prompts"] == prompts and seen["shape"] == (3, 3, 16, 16)
    with urllib.request.urlopen(srv.url.replace("/score", "/info"), timeout=5) as resp:
        assert json.loads(resp.read())["name"] == "echo"


def test_survives_server_restart_mid_run(server):
    port = _free_port()
    srv = server("jpeg-compressibility", port)
    reward = build_reward({"name": "http", "url": srv.url, "retries": 6, "backoff": 0.1, "timeout": 5})
    x = _images(4)
    first = reward(x, ["a"] * 4)
    srv.shutdown()
    srv.server_close()

    def restart():
        time.sleep(0.4)
        server("jpeg-compressibility", port)

    t = threading.Thread(target=restart)
    t.start()
    t0 = time.monotonic()
    second = reward(x, ["a"] * 4)  # fails while the server is down, retries with backoff, then succeeds
    t.join()
    assert torch.equal(first, second)
    assert time.monotonic() - t0 >= 0.3


def test_clear_error_when_server_is_gone():
    url = f"http://127.0.0.1:{_free_port()}/score"
    reward = build_reward({"name": "http", "url": url, "retries": 2, "backoff": 0.05, "timeout": 2})
    with pytest.raises(RewardServerError, match=r"did not answer after 3 attempt.*gfnalign rewards serve") as info:
        reward(_images(2), ["a", "b"])
    assert url in str(info.value)


def test_bad_server_outputs_become_reward_output_errors(server):
    n = 4
    bad = {
        "nan": lambda x, p: torch.full((x.shape[0],), float("nan")),
        "short": lambda x, p: torch.zeros(x.shape[0] - 1),
        "wrong_dtype": lambda x, p: torch.zeros(x.shape[0], dtype=torch.float64),
        "wrong_shape": lambda x, p: torch.zeros(x.shape[0], 2),
    }
    for label, fn in bad.items():
        srv = server(CallableReward(fn, name=label))
        reward = build_reward({"name": "http", "url": srv.url, "retries": 0})
        with pytest.raises(RewardOutputError, match=label):
            reward(_images(n), ["a"] * n)

    def crash(x, p):
        raise RuntimeError("model exploded")

    srv = server(CallableReward(crash, name="crash"))
    with pytest.raises(RewardServerError, match="HTTP 500.*model exploded"):
        build_reward({"name": "http", "url": srv.url, "retries": 0})(_images(2), ["a", "b"])


def test_server_rejects_malformed_requests(server):
    srv = server()
    req = urllib.request.Request(srv.url, data=b'{"images": ["not base64 png"], "prompts": ["a"]}',
                                 headers={"Content-Type": "application/json"}, method="POST")
    with pytest.raises(urllib.error.HTTPError) as info:
        urllib.request.urlopen(req, timeout=5)
    assert info.value.code == 400 and "base64" in json.loads(info.value.read())["error"]
    with pytest.raises(ValueError, match="http://"):
        build_reward({"name": "http", "url": "127.0.0.1:80"})
    with pytest.raises(ValueError, match="format"):
        build_reward({"name": "http", "url": srv.url, "format": "pickle"})


@pytest.mark.slow
def test_cli_list_and_serve_subprocess(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    src = str(Path(__file__).resolve().parents[2] / "src")
    env["PYTHONPATH"] = src + os.pathsep + env.get("PYTHONPATH", "")
    listing = subprocess.run(
        [sys.executable, "-m", "gfnalign", "rewards", "list"], capture_output=True, text=True, env=env, timeout=60
    )
    assert listing.returncode == 0, listing.stderr
    for name in ("jpeg-compressibility", "aesthetic", "http", "composite"):
        assert name in listing.stdout
    port = _free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "gfnalign", "rewards", "serve", "--reward", "jpeg-incompressibility",
         "--port", str(port), "-o", "quality=80"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
    )
    try:
        reward = build_reward({"name": "http", "url": f"http://127.0.0.1:{port}/score", "retries": 20,
                               "backoff": 0.25, "max_backoff": 2.0, "timeout": 10})
        x = _images(2)
        try:
            out = reward(x, ["a", "b"])
        except RewardServerError:
            proc.terminate()
            pytest.fail(f"server did not come up; its stderr:\n{proc.communicate(timeout=10)[1]}")
        expected = build_reward({"name": "jpeg-incompressibility", "quality": 80})(_quantised(x), ["a", "b"])
        assert torch.equal(out, expected)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)
