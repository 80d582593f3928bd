"""secure-ml: a machine-learning pipeline that is secure by construction.

The core library (this package, except ``definitions.py``) never imports Dagster, so every
control can be used from the CLI, a test or another orchestrator::

    from secure_ml.settings import Settings
    settings = Settings.from_env()
    store = settings.artifact_store()
    ref = store.put_bytes(b"hello", kind="json")
    assert store.get_bytes(ref.sha256) == b"hello"
"""

__version__ = "0.1.0"
