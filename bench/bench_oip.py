"""Serving figure (issue 16): an Open Inference Protocol v2 inference round trip vs the same request on /v1/predict.

- median round trip of ``POST /v2/models/{name}/infer`` (rows as one named input per column, INT64 /
  FP64 / BYTES, JSON) over the median of the same rows sent to ``POST /v1/predict``; goal <= 1.2x.
  Both go through the same keep-alive ``http.client`` connection to the real app under uvicorn on
  loopback, interleaved request by request so that machine noise falls on both alike; measured for
  1 row and for 32 rows. Also printed: the same v2 request through NVIDIA's ``tritonclient.http``
  (information: a different HTTP client, so not the figure).

    python -m bench --only oip [--quick]
"""

from __future__ import annotations

import http.client
import json
import socket
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from bench import Figure

REPO = Path(__file__).resolve().parents[1]
ROW = {"age": 41, "credit_amount": 2500.0, "sex": "female", "purpose": "car"}
TYPES = {"age": "INT64", "credit_amount": "FP64", "sex": "BYTES", "purpose": "BYTES"}


def _bodies(rows: int) -> tuple[bytes, bytes]:
    instances = [dict(ROW, age=20 + i % 50) for i in range(rows)]
    v1 = json.dumps({"instances": instances}).encode()
    v2 = json.dumps({"inputs": [{"name": n, "datatype": t, "shape": [rows, 1], "data": [r[n] for r in instances]}
                                for n, t in TYPES.items()]}).encode()
    return v1, v2


def _round_trip(conn: http.client.HTTPConnection, path: str, body: bytes, token: str) -> float:
    started = time.perf_counter()
    conn.request("POST", path, body=body, headers={"Authorization": f"Bearer {token}",
                                                   "Content-Type": "application/json"})
    response = conn.getresponse()
    response.read()
    if response.status != 200:
        raise RuntimeError(f"{path} answered {response.status}")
    return time.perf_counter() - started


def _triton_median(port: int, token: str, n: int) -> float:
    import numpy as np
    import tritonclient.http as triton

    client = triton.InferenceServerClient(url=f"127.0.0.1:{port}")
    inputs = []
    for name, datatype in TYPES.items():
        value = ROW[name]
        array = np.array([[value.encode() if isinstance(value, str) else value]],
                         dtype=object if datatype == "BYTES" else (np.int64 if datatype == "INT64" else np.float64))
        tensor = triton.InferInput(name, [1, 1], datatype)
        tensor.set_data_from_numpy(array, binary_data=False)
        inputs.append(tensor)
    outputs = [triton.InferRequestedOutput(o, binary_data=False) for o in ("probability", "label")]
    times = []
    for _ in range(n):
        started = time.perf_counter()
        client.infer("german_credit", inputs, outputs=outputs, headers={"Authorization": f"Bearer {token}"})
        times.append(time.perf_counter() - started)
    client.close()
    return statistics.median(times)


def run(quick: bool) -> list[Figure]:
    import uvicorn

    sys.path.insert(0, str(REPO / "tests"))
    from _release_fixtures import make_model_dir

    from secure_ml.release import serving
    from secure_ml.training.predictor import load_predictor

    n = 150 if quick else 600
    figures = []
    with tempfile.TemporaryDirectory(prefix="bench-oip-") as tmp:
        root = Path(tmp)
        directory = make_model_dir(root / "model")
        spec = serving.FeatureSpec.from_preprocessing(json.loads((directory / "preprocessing.json").read_text()))
        model = serving.LoadedModel(directory, "ab" * 32, "v1", spec, load_predictor(directory), name="german_credit")
        tokens = serving.TokenStore(root / "tokens.json")
        token = tokens.issue("bench")
        app = serving.create_app(model, tokens, rate_per_minute=10**7, daily_budget=None,
                                 detector=serving.ExtractionDetector(spec), output=serving.OutputPolicy(decimals=2))
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="error"))
        thread = threading.Thread(target=server.run, daemon=True)
        thread.start()
        while not server.started:
            time.sleep(0.02)
        try:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
            for rows in (1, 32):
                v1_body, v2_body = _bodies(rows)
                for _ in range(30):                                   # warm up both routes
                    _round_trip(conn, "/v1/predict", v1_body, token)
                    _round_trip(conn, "/v2/models/german_credit/infer", v2_body, token)
                v1, v2 = [], []
                for _ in range(n):
                    v1.append(_round_trip(conn, "/v1/predict", v1_body, token))
                    v2.append(_round_trip(conn, "/v2/models/german_credit/infer", v2_body, token))
                v1_ms, v2_ms = statistics.median(v1) * 1000, statistics.median(v2) * 1000
                figures.append(Figure(16, f"v2 infer round trip, {rows} row(s), median", v2_ms, "ms",
                                      "/v1/predict same rows", v1_ms, "<= 1.2x", v2_ms <= 1.2 * v1_ms))
            triton_ms = _triton_median(port, token, n // 3) * 1000
            figures.append(Figure(16, "v2 infer via tritonclient.http, 1 row (info)", triton_ms, "ms",
                                  "/v1/predict http.client", figures[0].baseline_value, "info", True))
        finally:
            server.should_exit = True
            thread.join(10)
    for figure in figures:
        print(f"# {figure.name}: {figure.value:.3f} ms vs {figure.baseline_value:.3f} ms -> ratio {figure.ratio:.3f}",
              file=sys.stderr)
    return figures
