"""Serving figure (issue 15): honest clients' median latency while 500 bad-token requests a second arrive.

- honest median latency of ``POST /v1/predict`` (one instance, a valid token, keep-alive) with a
  second process sending bad-token requests at 500 a second from the same address, as a ratio to
  the same median measured in the same run with no attack; goal <= 1.2x. The server is the real app
  under uvicorn on loopback, serving a model in the training stage's format; the attacker's address
  is limited after 20 failures a window, so most of its requests are refused before a token check.
"""

from __future__ import annotations

import http.client
import json
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from bench import Figure

REPO = Path(__file__).resolve().parents[1]
ROW = {"age": 41, "credit_amount": 2500.0, "sex": "female", "purpose": "car"}
ATTACKER = r"""
import http.client, sys, threading, time
port, rate, seconds = int(sys.argv[1]), float(sys.argv[2]), float(sys.argv[3])
sent = [0]
def worker(share):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    start = time.perf_counter(); n = 0
    while time.perf_counter() - start < seconds:
        target = start + n / share
        delay = target - time.perf_counter()
        if delay > 0: time.sleep(delay)
        try:
            conn.request("POST", "/v1/predict", body=b'{"instances": []}',
                         headers={"Authorization": "Bearer wrong-%d" % n, "Content-Type": "application/json"})
            conn.getresponse().read()
        except Exception:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        n += 1; sent[0] += 1
threads = [threading.Thread(target=worker, args=(rate / 4,)) for _ in range(4)]
[t.start() for t in threads]; [t.join() for t in threads]
print(sent[0] / seconds)
"""


def _latencies(port: int, token: str, n: int) -> list[float]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    body = json.dumps({"instances": [ROW]}).encode()
    out = []
    for _ in range(n):
        started = time.perf_counter()
        conn.request("POST", "/v1/predict", body=body,
                     headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"})
        response = conn.getresponse()
        response.read()
        if response.status != 200:
            raise RuntimeError(f"honest request got {response.status}")
        out.append(time.perf_counter() - started)
        time.sleep(0.01)
    return out


def run(quick: bool) -> list[Figure]:
    import uvicorn

    sys.path.insert(0, str(REPO / "tests"))
    from _release_fixtures import make_model_dir

    from secure_ml.release import serving
    from secure_ml.training.predictor import load_predictor

    n = 100 if quick else 400
    with tempfile.TemporaryDirectory(prefix="bench-serving-") as tmp:
        root = Path(tmp)
        directory = make_model_dir(root / "model")
        spec = serving.FeatureSpec.from_preprocessing(json.loads((directory / "preprocessing.json").read_text()))
        model = serving.LoadedModel(directory, "ab" * 32, "v1", spec, load_predictor(directory))
        tokens = serving.TokenStore(root / "tokens.json")
        token = tokens.issue("honest")
        events: list[Any] = []
        app = serving.create_app(model, tokens, rate_per_minute=10**6, on_event=lambda *e: events.append(e))
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="error"))
        thread = threading.Thread(target=server.run, daemon=True)
        thread.start()
        while not server.started:
            time.sleep(0.02)
        try:
            _latencies(port, token, 20)                          # warm up
            quiet = statistics.median(_latencies(port, token, n))
            seconds = n * 0.013 + 5
            attacker = subprocess.Popen([sys.executable, "-c", ATTACKER, str(port), "500", str(seconds)],
                                        stdout=subprocess.PIPE, text=True)
            time.sleep(1.0)
            attacked = statistics.median(_latencies(port, token, n))
            achieved = float(attacker.communicate(timeout=seconds + 60)[0].strip() or 0)
        finally:
            server.should_exit = True
            thread.join(10)
    return [Figure(15, f"honest median latency under {achieved:.0f} bad-token req/s", attacked * 1000, "ms",
                   "same, no attack", quiet * 1000, "<= 1.2x", attacked <= 1.2 * quiet)]
