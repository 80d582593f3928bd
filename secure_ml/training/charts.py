"""Text charts of the evaluation plots, short enough for the Dagster UI to show inline.

    charts(report, class_names={"0": "bad risk", "1": "good risk"})
    # {"roc": "ROC AUC **0.79** ...", "confusion": "| actual \\\\ predicted | ...", "groups_age": ..., "calibration": ...}
    loss_chart([0.69, 0.61, 0.55])   # "▇▅▁  0.690 → 0.550 over 3 epochs"

The UI renders a markdown metadata value inline only under 1,000 characters; longer ones (a PNG as a
data URI) sit behind its ``[Show Markdown]`` link. Each chart here is markdown of at most
:data:`LIMIT` characters (rows are cut, saying how many, when a table would be longer), so the
numbers behind every plot are readable at a glance; the PNGs stay beside them for the detail.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

#: The most characters a chart may have (Dagster's inline markdown limit is 1,000).
LIMIT = 990
_BAR = 10
_SPARK = "▁▂▃▄▅▆▇█"


def bar(value: float | None, cells: int = _BAR) -> str:
    """``0.52`` -> ``█████░░░░░ 0.52`` (ten cells by default); ``None`` -> ``n/a``."""
    if value is None or not np.isfinite(value):
        return "n/a"
    filled = int(round(min(max(float(value), 0.0), 1.0) * cells))
    return f"{'█' * filled}{'░' * (cells - filled)} {value:.2f}"


def _fit(head: Sequence[str], rows: Sequence[str], tail: Sequence[str] = ()) -> str:
    """The table's head, as many rows as fit under LIMIT, a line saying how many were cut, then ``tail``."""
    kept = list(rows)
    while kept:
        cut = len(rows) - len(kept)
        text = "\n".join([*head, *kept, *([f"\n… {cut} more rows in the plot"] if cut else []), *tail])
        if len(text) <= LIMIT:
            return text
        kept.pop()
    return "\n".join([*head, f"\n… {len(rows)} rows in the plot", *tail])[:LIMIT]


def roc_chart(report: Mapping[str, Any]) -> str:
    """The AUC and the true positive rate reached at a few false positive rates."""
    curve = report["roc_curve"]
    fpr, tpr = np.asarray(curve["fpr"], dtype=float), np.asarray(curve["tpr"], dtype=float)
    rows = []
    for at in (0.05, 0.1, 0.2, 0.3, 0.5):
        reached = tpr[fpr <= at + 1e-12]
        rows.append(f"| {at:.2f} | {bar(float(reached.max()) if reached.size else 0.0)} |")
    head = [f"ROC AUC **{report['metrics']['roc_auc']:.3f}** on held-out data", "",
            "| false positive rate | true positive rate |", "| ---: | --- |"]
    return _fit(head, rows)


def confusion_chart(report: Mapping[str, Any], class_names: Mapping[str, str] | None = None) -> str:
    """The confusion matrix with its classes named."""
    names = dict(class_names or {})
    classes = [names.get("0", "class 0"), names.get("1", "class 1")]
    matrix = report["confusion_matrix"]["matrix"]
    head = [f"| actual \\ predicted | {classes[0]} | {classes[1]} |", "| --- | ---: | ---: |"]
    rows = [f"| **{classes[i]}** | {matrix[i][0]} | {matrix[i][1]} |" for i in range(2)]
    return _fit(head, rows, ["", f"accuracy {report['metrics']['accuracy']:.3f}"])


def groups_chart(report: Mapping[str, Any], attribute: str) -> str:
    """Per-group selection rate, true and false positive rates of one protected attribute, bands in order."""
    from secure_ml.training.evaluation import ordered_groups

    data = report["bias_groups"][attribute]
    groups = data["groups"]
    gaps = report["fairness"][attribute]
    # Two short lines and six-cell bars: the UI's value column is narrow (a long line is cut, not wrapped).
    head = [f"**{attribute}**: demographic-parity gap {gaps['demographic_parity_difference']:.2f}", "",
            f"equalized-odds gap {gaps['equalized_odds_difference']:.2f}", "",
            "| group (n) | selection rate | TPR | FPR |", "| --- | --- | ---: | ---: |"]
    rows = []
    for name in ordered_groups(groups, data.get("bands")):
        g = groups[name]
        tpr = "n/a" if g["tpr"] is None else f"{g['tpr']:.2f}"
        fpr = "n/a" if g["fpr"] is None else f"{g['fpr']:.2f}"
        rows.append(f"| {name} ({g['rows']}) | {bar(g['selection_rate'], 6)} | {tpr} | {fpr} |")
    return _fit(head, rows)


def calibration_chart(report: Mapping[str, Any]) -> str:
    """Observed rate against mean predicted probability per bin, and the ECE."""
    head = [f"expected calibration error **{report['metrics']['expected_calibration_error']:.3f}**", "",
            "| predicted | observed | rows |", "| ---: | --- | ---: |"]
    rows = [f"| {b['mean_predicted']:.2f} | {bar(b['observed'])} | {b['count']} |"
            for b in report["calibration"]["bins"]]
    return _fit(head, rows)


def loss_chart(losses: Sequence[float]) -> str:
    """A sparkline of the training loss per epoch, with its first and last values."""
    values = [float(v) for v in losses if np.isfinite(v)]
    if not values:
        return "no training loss recorded"
    low, high = min(values), max(values)
    span = (high - low) or 1.0
    step = max(1, -(-len(values) // 80))  # at most 80 marks
    marks = "".join(_SPARK[int(round((v - low) / span * (len(_SPARK) - 1)))] for v in values[::step])
    return f"`{marks}` {values[0]:.3f} → {values[-1]:.3f} over {len(values)} epochs (min {low:.3f})"


def charts(report: Mapping[str, Any], class_names: Mapping[str, str] | None = None) -> dict[str, str]:
    """One inline chart per evaluation plot: ``roc``, ``confusion``, ``groups_<attribute>``, ``calibration``."""
    out = {"roc": roc_chart(report), "confusion": confusion_chart(report, class_names)}
    for attribute in report.get("bias_groups") or {}:
        out[f"groups_{attribute}"] = groups_chart(report, attribute)
    out["calibration"] = calibration_chart(report)
    return out
