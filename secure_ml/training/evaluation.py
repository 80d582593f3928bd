"""Held-out evaluation of a trained model: metrics, bias on protected attributes, robustness, plots.

    config = EvaluationConfig.from_mapping(settings.load_config("training")["evaluation"])
    report = evaluate(load_model(model_dir), test_frame, protected=["sex", "age"], config=config)
    report["passed"]               # False when a threshold set to ``block`` is breached
    plots = render_plots(report, class_names={"0": "bad risk", "1": "good risk"})
    # {"roc": PNG bytes, "confusion": ..., "groups": ..., "calibration": ...}; legends under the axes,
    # numeric bands in order; render_loss(losses) draws the training loss per epoch
    markdown(report)               # the verdict table (the plots are metadata entries of their own)

What it measures, on the held-out split only:

- metrics: accuracy, ROC AUC, F1, precision, recall, Brier score, expected calibration error,
  confusion matrix and a reliability curve;
- bias, per protected attribute (numeric ones such as age in the configured bands): each group's
  size, selection rate, TPR and FPR; the demographic-parity difference (largest gap in selection
  rate) and the equalized-odds difference (largest gap in TPR or FPR). Groups smaller than
  ``min_group_size`` are reported but left out of the gaps, since a handful of rows says little;
- robustness: accuracy under FGSM and PGD (L-infinity, within ``epsilon`` on the standardised
  numeric features; categorical codes are not perturbed) and under uniform random noise of the
  same size, and the drop from clean accuracy.

Every threshold has ``on_breach: block`` (the check fails and stops what comes after) or
``warn`` (reported, not blocking). Categories not seen in training are evaluated with the
all-zero code and reported under ``unknown_categories``.
"""

from __future__ import annotations

import base64
import io
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from secure_ml.errors import BadInput, ConfigurationError

REPORT_FORMAT = "secure-ml-evaluation/1"
AREAS = ("metrics", "fairness", "robustness")
BREACH = ("block", "warn")


@dataclass(frozen=True)
class Threshold:
    name: str
    limit: float
    kind: str  # "min" or "max"
    on_breach: str = "block"

    def breached(self, value: float | None) -> bool:
        if value is None or not math.isfinite(value):
            return True  # a metric that could not be measured cannot pass
        return value < self.limit if self.kind == "min" else value > self.limit


def _thresholds(area: str, data: Mapping[str, Any] | None) -> tuple[Threshold, ...]:
    out = []
    for name, spec in dict(data or {}).items():
        if not isinstance(spec, Mapping) or len({"min", "max"} & set(spec)) != 1:
            raise ConfigurationError(f"evaluation.{area}.{name} needs exactly one of min or max")
        kind = "min" if "min" in spec else "max"
        on_breach = str(spec.get("on_breach", "block"))
        if on_breach not in BREACH:
            raise ConfigurationError(f"evaluation.{area}.{name}.on_breach must be block or warn, not {on_breach!r}")
        try:
            limit = float(spec[kind])
        except (TypeError, ValueError):
            raise ConfigurationError(f"evaluation.{area}.{name}.{kind} must be a number") from None
        out.append(Threshold(str(name), limit, kind, on_breach))
    return tuple(out)


@dataclass(frozen=True)
class EvaluationConfig:
    metrics: tuple[Threshold, ...] = ()
    fairness: tuple[Threshold, ...] = ()
    robustness: tuple[Threshold, ...] = ()
    bands: dict[str, tuple[float, ...]] = field(default_factory=lambda: {"age": (25.0, 40.0, 60.0)})
    min_group_size: int = 10
    calibration_bins: int = 10
    epsilon: float = 0.1
    pgd_steps: int = 10
    pgd_step_size: float = 0.025
    seed: int = 0

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any] | None) -> EvaluationConfig:
        data = dict(data or {})
        robust = dict(data.get("robustness") or {})
        attack = dict(robust.pop("attack", None) or {})
        try:
            bands = {str(k): tuple(float(x) for x in v) for k, v in dict(data.get("bands") or {}).items()}
            config = cls(
                metrics=_thresholds("metrics", data.get("metrics")),
                fairness=_thresholds("fairness", data.get("fairness")),
                robustness=_thresholds("robustness", robust),
                bands=bands or {"age": (25.0, 40.0, 60.0)},
                min_group_size=int(data.get("min_group_size", 10)),
                calibration_bins=int(data.get("calibration_bins", 10)),
                epsilon=float(attack.get("epsilon", 0.1)),
                pgd_steps=int(attack.get("pgd_steps", 10)),
                pgd_step_size=float(attack.get("pgd_step_size", 0.025)),
                seed=int(attack.get("seed", 0)),
            )
        except (TypeError, ValueError) as exc:
            raise ConfigurationError(f"evaluation: a setting has the wrong type ({exc})") from None
        if config.epsilon < 0 or config.pgd_steps < 1 or config.calibration_bins < 2 or config.min_group_size < 1:
            raise ConfigurationError("evaluation: epsilon >= 0, pgd_steps >= 1, calibration_bins >= 2 and "
                                     "min_group_size >= 1 are required")
        for name, edges in config.bands.items():
            if list(edges) != sorted(set(edges)):
                raise ConfigurationError(f"evaluation.bands.{name} must be increasing")
        return config


def preload() -> None:
    """The evaluation's imports: torch (with safetensors), scikit-learn's metrics, scipy's logistic,
    matplotlib (Agg). Seconds when cold; trained_model runs this in a thread while its sandbox trains,
    so the evaluation (and the loss plot) find them loaded."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.figure  # noqa: F401
    import safetensors.torch  # noqa: F401
    import scipy.special  # noqa: F401
    import sklearn.metrics  # noqa: F401
    import torch  # noqa: F401


# -- metrics ---------------------------------------------------------------------------------------
def classification_metrics(y: np.ndarray, p: np.ndarray, threshold: float, bins: int) -> dict[str, Any]:
    from sklearn import metrics as skm

    predicted = (p >= threshold).astype(int)
    truth = y.astype(int)
    both = len(set(truth.tolist())) == 2
    matrix = skm.confusion_matrix(truth, predicted, labels=[0, 1])
    calibration = reliability(truth, p, bins)
    return {
        "accuracy": float(skm.accuracy_score(truth, predicted)),
        "roc_auc": float(skm.roc_auc_score(truth, p)) if both else float("nan"),
        "f1": float(skm.f1_score(truth, predicted, zero_division=0)),
        "precision": float(skm.precision_score(truth, predicted, zero_division=0)),
        "recall": float(skm.recall_score(truth, predicted, zero_division=0)),
        "brier": float(skm.brier_score_loss(truth, p)),
        "expected_calibration_error": calibration["ece"],
        "confusion_matrix": {"labels": [0, 1], "matrix": matrix.tolist()},
        "calibration": calibration,
        "rows": int(len(truth)),
        "positive_rate": float(truth.mean()) if len(truth) else float("nan"),
    }


def reliability(y: np.ndarray, p: np.ndarray, bins: int) -> dict[str, Any]:
    """Equal-width bins of predicted probability: mean prediction vs observed rate, and the ECE."""
    edges = np.linspace(0.0, 1.0, bins + 1)
    which = np.clip(np.digitize(p, edges[1:-1]), 0, bins - 1)
    rows = []
    ece = 0.0
    for b in range(bins):
        members = which == b
        count = int(members.sum())
        if not count:
            continue
        mean_p, observed = float(p[members].mean()), float(y[members].mean())
        ece += count / len(p) * abs(mean_p - observed)
        rows.append({"bin": b, "count": count, "mean_predicted": mean_p, "observed": observed})
    return {"bins": rows, "ece": float(ece)}


# -- bias --------------------------------------------------------------------------------------------
def band_labels(edges: Sequence[float]) -> list[str]:
    fmt = [f"{e:g}" for e in edges]
    return [f"<{fmt[0]}", *[f"{fmt[i]}-{fmt[i + 1]}" for i in range(len(fmt) - 1)], f">={fmt[-1]}"]


def groups_of(frame: Any, attribute: str, config: EvaluationConfig) -> np.ndarray:
    import pandas as pd

    if attribute not in frame.columns:
        raise BadInput(f"the held-out split lacks the protected attribute {attribute!r}")
    column = frame[attribute]
    if attribute in config.bands:
        values = pd.to_numeric(column, errors="coerce").to_numpy(dtype=float)
        labels = np.array(band_labels(config.bands[attribute]), dtype=object)
        index = np.searchsorted(np.asarray(config.bands[attribute]), values, side="right")
        out = labels[np.clip(index, 0, len(labels) - 1)]
        out[~np.isfinite(values)] = "<missing>"
        return out
    if pd.api.types.is_numeric_dtype(column) and column.nunique() > 20:
        raise ConfigurationError(f"protected attribute {attribute!r} is numeric: give its bands in "
                                 f"evaluation.bands.{attribute}")
    return np.array(["<missing>" if pd.isna(v) else str(v) for v in column.tolist()], dtype=object)


def group_metrics(y: np.ndarray, predicted: np.ndarray, groups: np.ndarray, min_size: int) -> dict[str, Any]:
    per_group: dict[str, dict[str, Any]] = {}
    for group in sorted(set(groups.tolist())):
        members = groups == group
        yt, yp = y[members].astype(int), predicted[members].astype(int)
        positives, negatives = int((yt == 1).sum()), int((yt == 0).sum())
        per_group[str(group)] = {
            "rows": int(members.sum()),
            "selection_rate": float(yp.mean()),
            "tpr": float(yp[yt == 1].mean()) if positives else None,
            "fpr": float(yp[yt == 0].mean()) if negatives else None,
            "included": bool(members.sum() >= min_size),
        }
    included = [g for g in per_group.values() if g["included"]]

    def spread(key: str) -> float:
        values = [g[key] for g in included if g[key] is not None]
        return float(max(values) - min(values)) if len(values) >= 2 else 0.0

    tpr_gap, fpr_gap = spread("tpr"), spread("fpr")
    return {
        "groups": per_group,
        "gaps": {"demographic_parity_difference": spread("selection_rate"),
                 "equalized_odds_difference": max(tpr_gap, fpr_gap),
                 "tpr_difference": tpr_gap, "fpr_difference": fpr_gap},
        "groups_compared": len(included),
    }


# -- robustness ---------------------------------------------------------------------------------------
def robustness(model: Any, X: np.ndarray, y: np.ndarray, numeric_columns: int, threshold: float,
               config: EvaluationConfig) -> dict[str, Any]:
    """Accuracy under FGSM, PGD (L-inf, epsilon, numeric columns only) and uniform noise."""
    import torch

    model.eval()
    x0 = torch.from_numpy(np.ascontiguousarray(X, dtype=np.float32))
    target = torch.from_numpy(y.astype(np.float32))
    mask = torch.zeros(X.shape[1])
    mask[:numeric_columns] = 1.0
    eps = config.epsilon
    cut = math.log(threshold / (1 - threshold))  # logit of the decision threshold

    def accuracy(x: torch.Tensor) -> float:
        with torch.no_grad():
            return float(((model(x) >= cut).float() == target).float().mean())

    def gradient_sign(x: torch.Tensor) -> torch.Tensor:
        x = x.clone().requires_grad_(True)
        loss = torch.nn.functional.binary_cross_entropy_with_logits(model(x), target)
        (grad,) = torch.autograd.grad(loss, x)
        return grad.sign() * mask

    fgsm = x0 + eps * gradient_sign(x0)
    pgd = x0.clone()
    for _ in range(config.pgd_steps):
        pgd = pgd + config.pgd_step_size * gradient_sign(pgd)
        pgd = x0 + torch.clamp(pgd - x0, -eps, eps)
    generator = torch.Generator().manual_seed(config.seed)
    noise = x0 + (torch.rand(x0.shape, generator=generator) * 2 - 1) * eps * mask
    clean = accuracy(x0)
    result = {"clean_accuracy": clean, "fgsm_accuracy": accuracy(fgsm), "pgd_accuracy": accuracy(pgd),
              "noise_accuracy": accuracy(noise)}
    for attack in ("fgsm", "pgd", "noise"):
        result[f"{attack}_drop"] = clean - result[f"{attack}_accuracy"]
    return result


# -- the whole evaluation --------------------------------------------------------------------------------
def evaluate(loaded: Any, frame: Any, *, protected: Sequence[str], config: EvaluationConfig) -> dict[str, Any]:
    """The report for ``loaded`` (secure_ml.training.LoadedModel) on the held-out ``frame``."""
    if len(frame) == 0:
        raise BadInput("the held-out split is empty: nothing to evaluate on")
    prep = loaded.preprocessing
    X, unknown = prep.transform(frame, where="held-out split")
    y = prep.labels(frame, where="held-out split")
    p = loaded.probabilities(X)
    threshold = loaded.threshold
    predicted = (p >= threshold).astype(int)
    metrics = classification_metrics(y, p, threshold, config.calibration_bins)
    fairness: dict[str, dict[str, float]] = {}
    groups: dict[str, Any] = {}
    for attribute in protected:
        result = group_metrics(y, predicted, groups_of(frame, attribute, config), config.min_group_size)
        fairness[attribute] = result["gaps"]
        groups[attribute] = {"groups": result["groups"], "groups_compared": result["groups_compared"],
                             "bands": list(config.bands.get(attribute, ())) or None}
    robust = robustness(loaded.model, X, y, len(prep.numeric), threshold, config)
    checks = _judge(config, metrics, fairness, robust)
    blocking = [c for c in checks if c["breached"] and c["on_breach"] == "block"]
    roc = _roc(y, p)
    return {
        "format": REPORT_FORMAT,
        "passed": not blocking,
        "metrics": {k: v for k, v in metrics.items() if k not in ("confusion_matrix", "calibration")},
        "confusion_matrix": metrics["confusion_matrix"],
        "calibration": metrics["calibration"],
        "roc_curve": roc,
        "fairness": fairness,
        "bias_groups": groups,
        "robustness": robust,
        "robustness_settings": {"epsilon": config.epsilon, "pgd_steps": config.pgd_steps,
                                "pgd_step_size": config.pgd_step_size, "norm": "L-infinity",
                                "perturbed": list(prep.numeric), "space": "standardised numeric features"},
        "checks": checks,
        "status": {area: _status([c for c in checks if c["area"] == area]) for area in AREAS},
        "unknown_categories": unknown,
        "threshold": threshold,
        "rows": int(len(frame)),
    }


def _judge(config: EvaluationConfig, metrics: Mapping[str, Any], fairness: Mapping[str, Mapping[str, float]],
           robust: Mapping[str, float]) -> list[dict[str, Any]]:
    checks: list[dict[str, Any]] = []

    def add(area: str, threshold: Threshold, subject: str, value: Any) -> None:
        number = float(value) if isinstance(value, int | float) else None
        checks.append({"area": area, "name": threshold.name, "subject": subject, "value": number,
                       "limit": threshold.limit, "kind": threshold.kind, "on_breach": threshold.on_breach,
                       "breached": threshold.breached(number)})

    for t in config.metrics:
        add("metrics", t, "held-out", metrics.get(t.name))
    for t in config.fairness:
        for attribute, gaps in fairness.items():
            add("fairness", t, attribute, gaps.get(t.name))
    for t in config.robustness:
        add("robustness", t, "held-out", robust.get(t.name))
    return checks


def _status(checks: list[dict[str, Any]]) -> str:
    if any(c["breached"] and c["on_breach"] == "block" for c in checks):
        return "fail"
    return "warn" if any(c["breached"] for c in checks) else "pass"


def describe(check: Mapping[str, Any]) -> str:
    value = "not measurable" if check["value"] is None else f"{check['value']:.3f}"
    relation = ">=" if check["kind"] == "min" else "<="
    subject = "" if check["subject"] == "held-out" else f" ({check['subject']})"
    verdict = ("BREACH" + (" (warn only)" if check["on_breach"] == "warn" else "")) if check["breached"] else "ok"
    return f"{check['name']}{subject} = {value}, must be {relation} {check['limit']:g}: {verdict}"


def _roc(y: np.ndarray, p: np.ndarray) -> dict[str, list[float]]:
    from sklearn.metrics import roc_curve

    if len(set(y.astype(int).tolist())) < 2:
        return {"fpr": [], "tpr": []}
    fpr, tpr, _ = roc_curve(y.astype(int), p)
    return {"fpr": [float(v) for v in fpr], "tpr": [float(v) for v in tpr]}


# -- plots ----------------------------------------------------------------------------------------------
def _png(fig: Any) -> bytes:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=80, bbox_inches="tight", metadata={"Software": None})
    return buffer.getvalue()


def _figure(size: tuple[float, float]) -> Any:
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    return Figure(figsize=size)


def _below(ax: Any, columns: int) -> None:
    """The legend under the axes, never over the data."""
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.2), ncol=columns, fontsize=8, frameon=False)


def ordered_groups(groups: Mapping[str, Any], bands: Sequence[float] | None) -> list[str]:
    """Group names in reading order: numeric bands low to high (then ``<missing>``), else as given."""
    if not bands:
        return list(groups)
    order = [*band_labels(bands), "<missing>"]
    return [g for g in order if g in groups] + [g for g in groups if g not in order]


def render_loss(losses: Sequence[float]) -> bytes:
    """PNG bytes of the training loss per epoch."""
    fig = _figure((4.6, 3.2))
    ax = fig.subplots()
    ax.plot(range(1, len(losses) + 1), list(losses), color="#4F43DD", lw=2, marker="o" if len(losses) <= 30 else None,
            markersize=3)
    ax.set(xlabel="epoch", ylabel="training loss", title=f"Training loss ({len(losses)} epochs, final "
                                                           f"{losses[-1]:.4f})" if losses else "Training loss")
    ax.grid(alpha=0.3)
    return _png(fig)


def render_plots(report: Mapping[str, Any], class_names: Mapping[str, str] | None = None) -> dict[str, bytes]:
    """PNG bytes of the ROC curve, confusion matrix (rows/columns named by ``class_names``, e.g.
    ``{"0": "bad risk", "1": "good risk"}``), per-group bars and reliability curve (Agg)."""
    png = _png
    names = dict(class_names or {})
    classes = [names.get("0", "class 0"), names.get("1", "class 1")]

    plots: dict[str, bytes] = {}
    metrics = report["metrics"]
    fig = _figure((4.2, 4))
    ax = fig.subplots()
    ax.plot(report["roc_curve"]["fpr"], report["roc_curve"]["tpr"], color="#4F43DD", lw=2,
            label=f"model (AUC {metrics['roc_auc']:.3f})")
    ax.plot([0, 1], [0, 1], ls="--", color="grey", lw=1, label="chance")
    ax.set(xlabel="false positive rate", ylabel="true positive rate", title="ROC curve (held-out)")
    _below(ax, 2)
    plots["roc"] = png(fig)

    fig = _figure((3.8, 3.4))
    ax = fig.subplots()
    matrix = np.array(report["confusion_matrix"]["matrix"])
    ax.imshow(matrix, cmap="Blues")
    for (i, j), value in np.ndenumerate(matrix):
        ax.text(j, i, str(value), ha="center", va="center",
                color="white" if value > matrix.max() / 2 else "black", fontsize=13)
    ax.set(xlabel="predicted", ylabel="actual", title=f"Confusion matrix (accuracy {metrics['accuracy']:.3f})")
    ax.set_xticks([0, 1], classes)
    ax.set_yticks([0, 1], classes, rotation=90, va="center")
    plots["confusion"] = png(fig)

    attributes = list(report["bias_groups"])
    if attributes:
        fig = _figure((5.2 * len(attributes), 3.6))
        axes = np.atleast_1d(fig.subplots(1, len(attributes)))
        for ax, attribute in zip(axes, attributes, strict=True):
            groups = report["bias_groups"][attribute]["groups"]
            order = ordered_groups(groups, report["bias_groups"][attribute].get("bands"))
            x = np.arange(len(order))
            for k, (key, colour) in enumerate((("selection_rate", "#4F43DD"), ("tpr", "#2BA84A"),
                                               ("fpr", "#D1495B"))):
                values = [groups[g][key] if groups[g][key] is not None else 0.0 for g in order]
                ax.bar(x + (k - 1) * 0.27, values, width=0.27, color=colour,
                       label={"tpr": "true positive rate", "fpr": "false positive rate"}.get(key, "selection rate"))
            ax.set_xticks(x, [f"{g}\n(n={groups[g]['rows']})" for g in order], fontsize=8)
            gaps = report["fairness"][attribute]
            ax.set(ylim=(0, 1.05), title=f"{attribute}: DP gap {gaps['demographic_parity_difference']:.2f}, "
                                         f"EO gap {gaps['equalized_odds_difference']:.2f}")
            _below(ax, 3)
        plots["groups"] = png(fig)

    fig = _figure((4.2, 4))
    ax = fig.subplots()
    bins = report["calibration"]["bins"]
    ax.plot([0, 1], [0, 1], ls="--", color="grey", lw=1, label="perfect")
    ax.plot([b["mean_predicted"] for b in bins], [b["observed"] for b in bins], marker="o", color="#4F43DD",
            label=f"model (ECE {metrics['expected_calibration_error']:.3f})")
    ax.set(xlabel="mean predicted probability", ylabel="observed rate", title="Calibration (held-out)")
    _below(ax, 2)
    plots["calibration"] = png(fig)
    return plots


def markdown(report: Mapping[str, Any], plots: Mapping[str, bytes] | None = None) -> str:
    """A summary for the Dagster UI: the checks (then ``plots`` as embedded PNG images, when given)."""
    plots = plots or {}
    metrics = report["metrics"]
    robust = report["robustness"]
    lines = [
        f"**{'PASSED' if report['passed'] else 'FAILED'}**: accuracy {metrics['accuracy']:.3f}, ROC AUC "
        f"{metrics['roc_auc']:.3f}, F1 {metrics['f1']:.3f}, ECE {metrics['expected_calibration_error']:.3f} "
        f"on {report['rows']} held-out rows. Under attack (eps {report['robustness_settings']['epsilon']:g}): "
        f"FGSM {robust['fgsm_accuracy']:.3f}, PGD {robust['pgd_accuracy']:.3f}, noise {robust['noise_accuracy']:.3f}.",
        "",
        "| area | check | value | limit | result |",
        "| --- | --- | ---: | ---: | --- |",
    ]
    for c in report["checks"]:
        value = "n/a" if c["value"] is None else f"{c['value']:.3f}"
        name = c["name"] + ("" if c["subject"] == "held-out" else f" ({c['subject']})")
        result = ("**breach**" if c["on_breach"] == "block" else "warn") if c["breached"] else "ok"
        lines.append(f"| {c['area']} | {name} | {value} | {'>=' if c['kind'] == 'min' else '<='} {c['limit']:g} "
                     f"| {result} |")
    if report.get("unknown_categories"):
        shown = "; ".join(f"{k}: {v['count']} rows ({', '.join(v['values'])})"
                          for k, v in report["unknown_categories"].items())
        lines += ["", f"Categories unseen in training (evaluated with the all-zero code): {shown}."]
    for name in ("roc", "confusion", "groups", "calibration"):
        if name in plots:
            lines += ["", f"![{name}](data:image/png;base64,{base64.b64encode(plots[name]).decode()})"]
    return "\n".join(lines)
