"""Dagster assets and asset checks, one module per pipeline stage.

A stage is a module here, listed in ``secure_ml.definitions.STAGES`` (its assets and checks are
loaded from it there).

The contract between stages (asset key: what the sealed output is; how downstream reads it).
Every output goes through ``custody.output(...)`` / ``sealed_output(...)``: encrypted into the
store, its plaintext SHA-256 in the ``sha256`` metadata and the data version. Downstream never
trusts a path: the IO manager (or ``custody.recorded``) gives the digest of the latest
materialization and the store verifies tag and digest on read.

========================  ======  ========  =====================================================
asset                     group   kind      value downstream receives
========================  ======  ========  =====================================================
dataset                   data    parquet   DataFrame (the accepted drop)
validated_dataset         data    json      dict ``secure-ml-validated/1``: train_sha256,
                                            test_sha256 (parquet artifacts), label, features,
                                            numeric, categorical, protected, dataset_sha256,
                                            dvc_version, source, pii, poisoning
trained_model             training tree     recorded metadata dict; ``sha256`` is the tree
                                            manifest: ``custody.store(ctx).get_tree(sha, dir)``
                                            gives model.safetensors, config.json,
                                            preprocessing.json, training_record.json,
                                            MODEL_CARD.md
model_evaluation          training json     dict: metrics, fairness, robustness, passed
scan_report               security json     dict: findings, counts, blocking, sbom_sha256
model_signature           security bytes    the model-signing (Sigstore) bundle bytes
attestation               security bytes    the DSSE envelope (in-toto Statement, SLSA v1)
registered_model          release  json     dict: version, model_sha256, stage, approvals
deployment                release  json     dict: target, model digest, manifests, history
========================  ======  ========  =====================================================
"""
