"""Release figures: a promotion policy decision, and the deploy gate's verification of the demo model.

- policy decision (Rego via regopy, the full promotion policy over a realistic input), median of
  N, goal <= 50 ms; baseline: an empty policy evaluated by the same interpreter in the same run
  (the interpreter's fixed cost).
- deploy gate verification of a demo-size model (decrypt the tree, bundle and attestation from
  the encrypted store, recompute the digest, verify the model-signing bundle and the DSSE
  attestation), median, goal <= 1 s; baseline: a raw SHA-256 of the same model directory.
"""

from __future__ import annotations

import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench import Figure

REPO = Path(__file__).resolve().parents[1]


def _median(fn: Any, n: int) -> float:
    times = []
    for _ in range(n):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def run(quick: bool) -> list[Figure]:
    sys.path.insert(0, str(REPO / "tests"))
    from _release_fixtures import make_keys, make_model_dir, publish, release_for
    from test_policy import GOOD

    from secure_ml.custody.integrity import sha256_tree
    from secure_ml.governance.policy import PolicyEngine
    from secure_ml.settings import Settings, init_home

    n = 20 if quick else 200
    figures: list[Figure] = []
    with tempfile.TemporaryDirectory(prefix="bench-release-") as tmp:
        root = Path(tmp)
        settings = Settings.from_env({"SECURE_ML_HOME": str(root / "home"), "SECURE_ML_ACTOR": "bench"})
        init_home(settings)
        engine = PolicyEngine.from_settings(settings)
        empty_dir = root / "empty"
        empty_dir.mkdir()
        (empty_dir / "promotion.rego").write_text(
            "package secure_ml.promotion\nimport rego.v1\ndefault allow := true\ndeny := set()\n")
        empty = PolicyEngine({}, policy_dir=empty_dir)
        engine.decide("promotion", GOOD)
        empty.decide("promotion", GOOD)
        ours = _median(lambda: engine.decide("promotion", GOOD), n)
        base = _median(lambda: empty.decide("promotion", GOOD), n)
        figures.append(Figure(6, "promotion policy decision (Rego, full policy)", ours * 1000, "ms",
                              "empty policy, same interpreter", base * 1000, "<= 50 ms", ours <= 0.050))

        keys = make_keys(root / "keys")
        model_dir = make_model_dir(root / "model")
        if not quick:
            # Demo size: the training stage's MLP on the sample is far under this; pad to ~8 MiB.
            (model_dir / "MODEL_CARD.md").write_bytes(b"#" * (8 << 20))
        published = publish(settings, model_dir, keys, root)
        release = release_for(settings, keys)
        version, _, _ = release.register(published.digest, published.evidence, actor="bob")

        def verify() -> None:
            verified = release.verify(version, actor="bench")
            import shutil

            shutil.rmtree(verified.directory.parent, ignore_errors=True)

        rounds = 5 if quick else 20
        verify()
        ours = _median(verify, rounds)
        base = _median(lambda: sha256_tree(model_dir), rounds)
        size = sum(f.stat().st_size for f in model_dir.iterdir())
        figures.append(Figure(6, f"deploy gate verification ({size / 2**20:.1f} MiB model)", ours, "s",
                              "raw sha256 of the model dir", base, "<= 1 s", ours <= 1.0))
    os.environ.pop("SECURE_ML_HOME", None)
    return figures
