"""The pipeline on Kubernetes: every object the project would create, rendered and checked.

``secure-ml k8s render OUTDIR`` (secure_ml/cli/cmd_k8s.py) composes these: ``helm_values`` (the
Dagster chart's values, pinned to the image digest and checked against the chart's schema),
``objects`` (policies, Secrets, the code location) and ``checks`` (schema, admission, pod rules).
"""
