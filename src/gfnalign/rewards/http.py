"""A reward behind HTTP: the client (:class:`HttpReward`) and a small reference server (stdlib only).

Wire format (never pickle):

* ``POST <url>`` with either
  - ``format="png"`` (default): ``Content-Type: application/json``, body
    ``{"prompts": [str, ...], "images": [base64 PNG, ...]}`` (8-bit RGB, ``round(255 x)``), or
  - ``format="safetensors"``: ``Content-Type: application/x-safetensors``, body a safetensors file holding
    ``images`` (float32 ``[N,3,H,W]`` in [0,1], lossless) with the prompts as JSON in its metadata
    (``__metadata__["prompts"]``).
* Answer ``200 {"scores": [float, ...]}``; errors are ``{"error": message, "kind": "input"|"output"|"server"}``
  with status 400 (bad request), 422 (the reward produced unusable scores) or 500.
* ``GET /health`` -> ``{"status": "ok"}``; ``GET /info`` -> the reward's name, inputs, differentiable flag.
  Any other path is a 404, any other method a 405.
* Every malformed request gets a 4xx with ``{"error", "kind": "input"}``: 400 (bad JSON, nesting deeper than
  ``MAX_JSON_DEPTH``, bad base64/PNG, bad safetensors header or offsets, wrong field types), 401 (missing or
  wrong token), 408 (the client went silent for ``read_timeout`` seconds mid-body), 411/413 (missing or too
  large Content-Length), 415 (a content type other than JSON or safetensors); 503 when ``max_concurrent``
  requests are already being served (the client retries).
* Optional shared token: the server (``--token`` or ``GFNALIGN_REWARD_TOKEN``; required when binding beyond
  loopback) accepts only requests carrying ``Authorization: Bearer TOKEN``; the client's ``token`` option (or
  the same environment variable) sends it. ``/health`` stays open.

The client retries connection failures, timeouts and 502/503/504 with exponential backoff
(``backoff * 2**k``, capped at ``max_backoff``) and then raises :class:`RewardServerError` naming the URL.
A 422 becomes :class:`RewardOutputError` (the trainer skips the step); other 4xx/5xx raise at once.

Serve any reward with ``gfnalign rewards serve --reward NAME --port P`` (loopback only unless --host says so).
"""

from __future__ import annotations

import base64
import hmac
import io
import ipaddress
import json
import os
import socket
import struct
import threading
import time
import urllib.error
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import torch

from gfnalign.rewards.base import Reward, RewardOutputError, RewardUnreachableError, check_inputs

FORMATS = ("png", "safetensors")
SAFETENSORS_CONTENT_TYPE = "application/x-safetensors"
RETRY_STATUS = (502, 503, 504)
MAX_JSON_DEPTH = 8  # the request format nests 2 levels; deeper bodies are refused before parsing
TOKEN_ENV = "GFNALIGN_REWARD_TOKEN"


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _json_depth_ok(body: bytes, limit: int = MAX_JSON_DEPTH) -> bool:
    """True when no JSON value in ``body`` nests deeper than ``limit`` (brackets inside strings ignored)."""
    depth, in_string, escaped = 0, False, False
    for byte in body:
        if in_string:
            if escaped:
                escaped = False
            elif byte == 0x5C:  # backslash
                escaped = True
            elif byte == 0x22:
                in_string = False
        elif byte == 0x22:
            in_string = True
        elif byte in (0x5B, 0x7B):
            depth += 1
            if depth > limit:
                return False
        elif byte in (0x5D, 0x7D):
            depth -= 1
    return True


class RewardServerError(RuntimeError):
    """The reward server could not be reached (after retries) or answered with an error."""


class RewardServerUnreachable(RewardServerError, RewardUnreachableError):
    """No answer after the client's retries (connection refused, timeouts, 502/503/504): the trainer waits."""


# ----------------------------------------------------------------------------------------------------------
# encoding


def encode_png(images: torch.Tensor) -> list[str]:
    """[N,3,H,W] in [0,1] -> base64 PNG strings (8-bit RGB)."""
    from PIL import Image

    arrs = (images.detach() * 255).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    out = []
    for arr in arrs:
        buf = io.BytesIO()
        Image.fromarray(arr).save(buf, format="PNG")
        out.append(base64.b64encode(buf.getvalue()).decode("ascii"))
    return out


def decode_png(items: list[str]) -> torch.Tensor:
    """base64 PNG strings (all the same size) -> [N,3,H,W] float32 in [0,1]."""
    import numpy as np
    from PIL import Image

    arrs = []
    for i, item in enumerate(items):
        try:
            img = Image.open(io.BytesIO(base64.b64decode(item, validate=True)))
            img.load()
        except Exception as err:  # noqa: BLE001 - any decode failure is the client's fault
            raise ValueError(f"images[{i}] is not a base64-encoded PNG ({err})") from err
        arrs.append(np.asarray(img.convert("RGB")))
    if len({a.shape for a in arrs}) > 1:
        raise ValueError(f"all images must have the same size, got {sorted({a.shape for a in arrs})}")
    if not arrs:
        return torch.zeros(0, 3, 1, 1)
    return torch.from_numpy(np.stack(arrs)).permute(0, 3, 1, 2).float().div(255.0)


def encode_safetensors(images: torch.Tensor, prompts: list[str]) -> bytes:
    from safetensors.torch import save

    tensor = images.detach().to(device="cpu", dtype=torch.float32).contiguous()
    return save({"images": tensor}, metadata={"prompts": json.dumps(prompts)})


def decode_safetensors(body: bytes) -> tuple[torch.Tensor, list[str]]:
    from safetensors.torch import load

    if len(body) < 8:
        raise ValueError("body too short to be a safetensors file")
    (header_len,) = struct.unpack("<Q", body[:8])
    if header_len > len(body) - 8:
        raise ValueError("corrupt safetensors header length")
    header = json.loads(body[8 : 8 + header_len])
    metadata = header.get("__metadata__") or {}
    if "prompts" not in metadata:
        raise ValueError("safetensors metadata must hold the prompts as JSON under 'prompts'")
    prompts = json.loads(metadata["prompts"])
    tensors = load(body)
    if "images" not in tensors:
        raise ValueError(f"safetensors body must hold a tensor named 'images', got {sorted(tensors)}")
    return tensors["images"].float(), prompts


# ----------------------------------------------------------------------------------------------------------
# client


class HttpReward(Reward):
    """Scores images by POSTing them to a reward server. Black-box: no gradient."""

    differentiable = False
    inputs = "image+prompt"

    def __init__(
        self,
        *,
        url: str = "http://127.0.0.1:8765/score",
        format: str = "png",
        timeout: float = 60.0,
        retries: int = 3,
        backoff: float = 0.5,
        max_backoff: float = 8.0,
        name: str | None = None,
        headers: dict[str, str] | None = None,
        token: str | None = None,
        device=None,
    ):
        super().__init__(device="cpu")
        if not isinstance(url, str) or not url.startswith(("http://", "https://")):
            raise ValueError(f"http reward: url must start with http:// or https://, got {url!r}")
        if format not in FORMATS:
            raise ValueError(f"http reward: format must be one of {FORMATS}, got {format!r}")
        if not (isinstance(retries, int) and retries >= 0):
            raise ValueError(f"http reward: retries must be an int >= 0, got {retries!r}")
        if not (timeout > 0 and backoff >= 0 and max_backoff >= 0):
            raise ValueError("http reward: timeout must be > 0 and backoff/max_backoff >= 0")
        self.url = url
        self.format = format
        self.timeout = float(timeout)
        self.retries = retries
        self.backoff = float(backoff)
        self.max_backoff = float(max_backoff)
        self.headers = dict(headers or {})
        token = token or os.environ.get(TOKEN_ENV)
        if token:
            self.headers.setdefault("Authorization", f"Bearer {token}")
        self.name = name or "http"

    def _request(self, images: torch.Tensor, prompts: list[str]) -> urllib.request.Request:
        if self.format == "png":
            body = json.dumps({"prompts": prompts, "images": encode_png(images)}).encode("utf-8")
            ctype = "application/json"
        else:
            body = encode_safetensors(images, prompts)
            ctype = SAFETENSORS_CONTENT_TYPE
        headers = {"Content-Type": ctype, "Accept": "application/json", **self.headers}
        return urllib.request.Request(self.url, data=body, headers=headers, method="POST")

    def score(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        request = self._request(images, prompts)
        attempts = self.retries + 1
        last_error = "no attempt made"
        start = time.monotonic()
        for attempt in range(attempts):
            if attempt:
                time.sleep(min(self.max_backoff, self.backoff * 2 ** (attempt - 1)))
            try:
                with urllib.request.urlopen(request, timeout=self.timeout) as resp:
                    payload = resp.read()
                break
            except urllib.error.HTTPError as err:
                message = _error_message(err)
                if err.code in RETRY_STATUS:
                    last_error = f"HTTP {err.code}: {message}"
                    continue
                if err.code == 422:
                    raise RewardOutputError(self.name, f"server at {self.url} said: {message}") from None
                raise RewardServerError(
                    f"reward server at {self.url} rejected the request (HTTP {err.code}): {message}"
                ) from None
            except (urllib.error.URLError, TimeoutError, ConnectionError, OSError) as err:
                reason = getattr(err, "reason", err)
                last_error = f"{type(reason).__name__}: {reason}"
        else:
            raise RewardServerUnreachable(
                f"reward server at {self.url} did not answer after {attempts} attempt(s) over "
                f"{time.monotonic() - start:.1f} s (last error: {last_error}). Is it running? Start one with "
                "`gfnalign rewards serve --reward NAME --port PORT`, or check url/timeout/retries."
            )
        try:
            data = json.loads(payload)
        except json.JSONDecodeError as err:
            raise RewardOutputError(self.name, f"server at {self.url} sent invalid JSON ({err})") from None
        if not isinstance(data, dict) or "scores" not in data:
            raise RewardOutputError(self.name, f"server answer must be a JSON object with 'scores', got {str(data)[:200]}")
        scores = data["scores"]
        if not isinstance(scores, list) or not all(isinstance(s, (int, float)) and not isinstance(s, bool) for s in scores):
            raise RewardOutputError(self.name, f"'scores' must be a list of numbers, got {str(scores)[:200]}")
        return torch.tensor(scores, dtype=torch.float32).reshape(-1)


def _error_message(err: urllib.error.HTTPError) -> str:
    try:
        body = err.read()
        data = json.loads(body)
        return str(data.get("error", body[:500]))
    except Exception:  # noqa: BLE001
        return str(err.reason)


# ----------------------------------------------------------------------------------------------------------
# reference server


class _Handler(BaseHTTPRequestHandler):
    server: RewardHTTPServer

    def setup(self) -> None:
        self.timeout = self.server.read_timeout  # socket timeout: a silent client cannot hold a thread forever
        super().setup()

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
        if self.server.verbose:
            super().log_message(format, *args)

    def _send(self, status: int, payload: dict[str, Any], *, close: bool = False) -> None:
        body = json.dumps(payload).encode("utf-8")
        try:
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            if status == 503:
                self.send_header("Retry-After", "1")
            if close:
                self.send_header("Connection", "close")
                self.close_connection = True
            self.end_headers()
            self.wfile.write(body)
        except OSError:  # the client went away: nothing to answer
            self.close_connection = True

    def _refuse(self, status: int, message: str, *, close: bool = False) -> None:
        self._send(status, {"error": message, "kind": "input"}, close=close)

    def _path(self) -> str:
        return self.path.split("?")[0].rstrip("/") or "/"

    def _authorised(self) -> bool:
        token = self.server.token
        if not token:
            return True
        given = self.headers.get("Authorization") or ""
        ok = hmac.compare_digest(given.encode("utf-8", "replace"), f"Bearer {token}".encode())
        if not ok:
            self._refuse(401, "missing or wrong token: send 'Authorization: Bearer TOKEN' (the http reward's "
                              "token option or GFNALIGN_REWARD_TOKEN)")
        return ok

    def do_GET(self) -> None:  # noqa: N802
        path = self._path()
        if path == "/health":
            self._send(200, {"status": "ok", "reward": self.server.reward.name})
        elif path == "/info":
            if self._authorised():
                self._send(200, self.server.reward.info())
        elif path == "/score":
            self._refuse(405, "use POST /score to score images")
        else:
            self._refuse(404, f"unknown path {self.path[:100]!r}; use POST /score, GET /health or GET /info")

    def _method_not_allowed(self) -> None:
        self._refuse(405, f"method {self.command} is not supported; use POST /score, GET /health or GET /info",
                     close=True)

    do_PUT = do_DELETE = do_PATCH = do_OPTIONS = _method_not_allowed  # noqa: N815

    def do_POST(self) -> None:  # noqa: N802
        if self._path() != "/score":
            self._refuse(404, f"unknown path {self.path[:100]!r}; POST images to /score", close=True)
            return
        if not self._authorised():
            self.close_connection = True
            return
        raw_length = self.headers.get("Content-Length")
        if raw_length is None or not raw_length.strip().isdigit():
            self._refuse(411 if raw_length is None else 400,
                         f"a POST needs a Content-Length header with a byte count, got {raw_length!r}", close=True)
            return
        length = int(raw_length)
        if length <= 0:
            self._refuse(400, "empty body: send the images and prompts", close=True)
            return
        if length > self.server.max_body_bytes:
            self._refuse(413, f"body of {length} bytes exceeds the limit {self.server.max_body_bytes}", close=True)
            return
        ctype = (self.headers.get("Content-Type") or "").split(";")[0].strip().lower()
        if ctype not in ("application/json", SAFETENSORS_CONTENT_TYPE):
            self._refuse(415, f"Content-Type {ctype or '(none)'!r} is not supported; use application/json "
                              f"(base64 PNGs) or {SAFETENSORS_CONTENT_TYPE}", close=True)
            return
        try:
            body = self.rfile.read(length)
        except (TimeoutError, OSError):
            self._refuse(408, f"no data for {self.server.read_timeout:g} s while reading the body", close=True)
            return
        if len(body) < length:
            self._refuse(400, f"body ended after {len(body)} of {length} bytes", close=True)
            return
        self._score(body, ctype)

    def _score(self, body: bytes, ctype: str) -> None:
        try:
            if ctype == SAFETENSORS_CONTENT_TYPE:
                images, prompts = decode_safetensors(body)
            else:
                if not _json_depth_ok(body):
                    raise ValueError(f"JSON nested deeper than {MAX_JSON_DEPTH} levels")
                data = json.loads(body)
                if not isinstance(data, dict) or "images" not in data or "prompts" not in data:
                    raise ValueError("JSON body must be an object with 'images' (base64 PNGs) and 'prompts'")
                if not isinstance(data["images"], list) or not all(isinstance(i, str) for i in data["images"]):
                    raise ValueError("'images' must be a list of base64 PNG strings")
                images, prompts = decode_png(data["images"]), data["prompts"]
            prompts = check_inputs(images, prompts, self.server.reward.name)
        except (ValueError, TypeError, KeyError, RecursionError, UnicodeDecodeError, struct.error) as err:
            self._refuse(400, " ".join(str(err).split())[:500] or type(err).__name__)
            return
        except Exception as err:  # noqa: BLE001 - e.g. safetensors' own errors on bad offsets: still the input's fault
            self._refuse(400, f"unreadable body ({type(err).__name__}: {' '.join(str(err).split())[:300]})")
            return
        if not self.server.slots.acquire(blocking=False):  # bounded work; the client retries a 503
            self._send(503, {"error": f"busy: {self.server.max_concurrent} requests in progress; retry shortly",
                             "kind": "server"})
            return
        try:
            with self.server.lock, torch.no_grad():
                scores = self.server.reward(images, prompts)
        except RewardOutputError as err:
            self._send(422, {"error": str(err), "kind": "output"})
            return
        except (ValueError, TypeError) as err:
            self._send(400, {"error": str(err), "kind": "input"})
            return
        except Exception as err:  # noqa: BLE001 - report, keep serving
            self._send(500, {"error": f"{type(err).__name__}: {err}", "kind": "server"})
            return
        finally:
            self.server.slots.release()
        self._send(200, {"scores": [float(s) for s in scores.detach().cpu().tolist()]})


class RewardHTTPServer(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 64

    def __init__(self, reward: Reward, host: str, port: int, *, max_body_mb: float = 512, verbose: bool = False,
                 token: str | None = None, max_concurrent: int = 4, read_timeout: float = 30.0):
        self.reward = reward
        self.lock = threading.Lock()
        self.max_body_bytes = int(max_body_mb * 2**20)
        self.verbose = verbose
        self.token = token or None
        self.max_concurrent = int(max_concurrent)
        self.slots = threading.BoundedSemaphore(self.max_concurrent)
        self.read_timeout = float(read_timeout)
        if ":" in host:
            self.address_family = socket.AF_INET6
        super().__init__((host, port), _Handler)

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{host}:{port}/score"


def make_reward_server(
    reward: Reward | str | dict, host: str = "127.0.0.1", port: int = 0, **kwargs: Any
) -> RewardHTTPServer:
    """A server for ``reward`` bound to ``host:port`` (port 0 picks a free one; see ``server.url``).

    Call ``serve_forever()`` (or run it in a thread) and ``shutdown()``/``server_close()`` to stop.
    """
    from gfnalign.rewards.registry import build_reward

    return RewardHTTPServer(build_reward(reward), host, port, **kwargs)


def start_server_thread(reward: Reward | str | dict, host: str = "127.0.0.1", port: int = 0, **kwargs: Any):
    """Start a server in a daemon thread; returns ``(server, thread)``. Stop with ``server.shutdown()``."""
    server = make_reward_server(reward, host, port, **kwargs)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    return server, thread
