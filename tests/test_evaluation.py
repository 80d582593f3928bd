"""Evaluation core: metrics, bias per protected group, robustness under attack, thresholds, plots.

Touches: real models trained in-process on the sample (the pipeline's seeded split): an honest one,
and one trained on labels that are the applicant's sex (a real bias breach); scikit-learn metrics,
torch gradients for FGSM/PGD, matplotlib (Agg), the shipped training.yaml thresholds.

Does not touch: Dagster (test_training_stage.py checks the blocking/warn behaviour of the asset
checks and the plots in the asset's metadata), the isolated training process.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
import yaml

from secure_ml.data import splitting
from secure_ml.errors import BadInput, ConfigurationError
from secure_ml.training.evaluation import EvaluationConfig, evaluate, group_metrics, markdown, render_plots
from secure_ml.training.config import TrainingConfig
from secure_ml.training.features import DataSpec
from secure_ml.training.predictor import LoadedModel, load_model
from secure_ml.training.trainer import train_model
from tests.conftest import SAMPLE_CSV

pytestmark = [pytest.mark.slow, pytest.mark.timeout(180)]  # slow: trains models to evaluate
CONFIG = yaml.safe_load((Path(__file__).resolve().parents[1] / "secure_ml" / "config" / "training.yaml").read_text())
SPEC = DataSpec("risk", ["job", "credit_amount", "duration", "age"],
                ["sex", "housing", "saving_accounts", "checking_account", "purpose"])
PROTECTED = ["sex", "age"]


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    frame = pd.read_csv(SAMPLE_CSV)
    train, test = splitting.split(frame, "risk", test_fraction=0.2, seed=20261123)
    root = tmp_path_factory.mktemp("models")
    config = TrainingConfig.from_mapping(CONFIG["training"])  # the shipped configuration
    train_model(train, SPEC, config, root / "honest", isolation=None)
    biased = train.assign(risk=(train["sex"] == "male").astype(int))  # the label *is* the protected attribute
    train_model(biased, SPEC, config, root / "biased", isolation=None)
    return {"test": test, "honest": load_model(root / "honest"), "biased": load_model(root / "biased")}


def shipped() -> EvaluationConfig:
    return EvaluationConfig.from_mapping(CONFIG["evaluation"])


def test_the_honest_model_passes_the_shipped_thresholds(data: dict[str, Any]) -> None:
    report = evaluate(data["honest"], data["test"], protected=PROTECTED, config=shipped())
    assert report["passed"] is True, [c for c in report["checks"] if c["breached"]]
    metrics = report["metrics"]
    assert 0.65 <= metrics["accuracy"] <= 1 and 0.65 <= metrics["roc_auc"] <= 1 and 0.6 <= metrics["f1"] <= 1
    matrix = report["confusion_matrix"]["matrix"]
    assert sum(map(sum, matrix)) == len(data["test"]) == report["rows"]
    assert (matrix[0][0] + matrix[1][1]) / report["rows"] == pytest.approx(metrics["accuracy"])
    assert 0 <= metrics["expected_calibration_error"] <= 1
    assert sum(b["count"] for b in report["calibration"]["bins"]) == report["rows"]
    assert set(report["fairness"]) == {"sex", "age"}
    assert set(report["bias_groups"]["age"]["groups"]) == {"<25", "25-40", "40-60", ">=60"}
    sex = report["bias_groups"]["sex"]["groups"]
    assert report["fairness"]["sex"]["demographic_parity_difference"] == pytest.approx(
        abs(sex["male"]["selection_rate"] - sex["female"]["selection_rate"]))
    robust = report["robustness"]
    assert robust["pgd_accuracy"] <= robust["clean_accuracy"] and robust["fgsm_accuracy"] <= robust["clean_accuracy"]
    assert robust["clean_accuracy"] == pytest.approx(metrics["accuracy"])
    assert report["status"] == {"metrics": "pass", "fairness": "pass", "robustness": "pass"}


def test_a_model_that_decides_by_sex_breaches_fairness(data: dict[str, Any]) -> None:
    report = evaluate(data["biased"], data["test"], protected=PROTECTED, config=shipped())
    assert report["passed"] is False and report["status"]["fairness"] == "fail"
    assert report["fairness"]["sex"]["demographic_parity_difference"] == pytest.approx(1.0)
    assert report["fairness"]["sex"]["equalized_odds_difference"] == pytest.approx(1.0)
    breached = {(c["name"], c["subject"]) for c in report["checks"] if c["breached"]}
    assert ("demographic_parity_difference", "sex") in breached

    # The same breach, configured to warn, is reported but does not fail the evaluation.
    warn = {**CONFIG["evaluation"], "fairness": {k: {**v, "on_breach": "warn"}
                                                 for k, v in CONFIG["evaluation"]["fairness"].items()},
            "metrics": {k: {**v, "on_breach": "warn"} for k, v in CONFIG["evaluation"]["metrics"].items()}}
    softened = evaluate(data["biased"], data["test"], protected=PROTECTED, config=EvaluationConfig.from_mapping(warn))
    assert softened["status"]["fairness"] == "warn" and softened["passed"] is True


def test_robustness_drop_grows_with_epsilon_and_breaches_the_threshold(data: dict[str, Any]) -> None:
    none = dataclasses.replace(shipped(), epsilon=0.0)
    calm = evaluate(data["honest"], data["test"], protected=PROTECTED, config=none)["robustness"]
    assert calm["fgsm_drop"] == calm["pgd_drop"] == calm["noise_drop"] == 0.0
    strong = dataclasses.replace(shipped(), epsilon=1.5, pgd_step_size=0.3)
    report = evaluate(data["honest"], data["test"], protected=PROTECTED, config=strong)
    assert report["robustness"]["pgd_drop"] > 0.15 and report["status"]["robustness"] == "fail"
    assert report["robustness"]["pgd_accuracy"] <= report["robustness"]["fgsm_accuracy"] + 0.02


def test_unseen_categories_are_evaluated_and_reported(data: dict[str, Any]) -> None:
    test = data["test"].copy()
    test.loc[test.index[:4], "housing"] = "houseboat"
    report = evaluate(data["honest"], test, protected=PROTECTED, config=shipped())
    assert report["unknown_categories"] == {"housing": {"count": 4, "values": ["houseboat"]}}
    assert report["rows"] == len(test)
    assert "houseboat" in markdown(report, {})


def test_bad_held_out_data_is_refused(data: dict[str, Any]) -> None:
    test = data["test"].astype({"credit_amount": float})
    test.loc[test.index[2], "credit_amount"] = float("nan")
    with pytest.raises(BadInput, match="feature 'credit_amount' has 1 NaN"):
        evaluate(data["honest"], test, protected=PROTECTED, config=shipped())
    with pytest.raises(BadInput, match="held-out split is empty"):
        evaluate(data["honest"], data["test"].iloc[:0], protected=PROTECTED, config=shipped())
    with pytest.raises(BadInput, match="lacks the protected attribute 'religion'"):
        evaluate(data["honest"], data["test"], protected=["religion"], config=shipped())


def test_small_groups_are_reported_but_not_compared() -> None:
    import numpy as np

    y = np.array([1, 0, 1, 0, 1, 1, 0, 0, 1, 0, 1, 1])
    predicted = np.array([1, 0, 1, 0, 1, 1, 0, 0, 1, 0, 0, 0])
    groups = np.array(["a"] * 5 + ["b"] * 5 + ["tiny"] * 2)
    result = group_metrics(y, predicted, groups, min_size=5)
    assert result["groups"]["tiny"]["included"] is False and result["groups_compared"] == 2
    assert result["gaps"]["demographic_parity_difference"] == pytest.approx(0.6 - 0.4)


def test_threshold_configuration_errors_are_clear() -> None:
    with pytest.raises(ConfigurationError, match="exactly one of min or max"):
        EvaluationConfig.from_mapping({"metrics": {"accuracy": {"min": 0.5, "max": 0.9}}})
    with pytest.raises(ConfigurationError, match="on_breach must be block or warn"):
        EvaluationConfig.from_mapping({"fairness": {"equalized_odds_difference": {"max": 0.3, "on_breach": "ignore"}}})
    with pytest.raises(ConfigurationError, match="bands.age must be increasing"):
        EvaluationConfig.from_mapping({"bands": {"age": [60, 25]}})


def test_plots_are_pngs_embedded_in_the_summary(data: dict[str, Any]) -> None:
    report = evaluate(data["honest"], data["test"], protected=PROTECTED, config=shipped())
    plots = render_plots(report)
    assert set(plots) == {"roc", "confusion", "groups", "calibration"}
    assert all(png.startswith(b"\x89PNG\r\n\x1a\n") and len(png) > 2000 for png in plots.values())
    summary = markdown(report, plots)
    assert summary.startswith("**PASSED**") and summary.count("![") == 4
    assert "![" not in markdown(report)  # the verdict table alone: plots are metadata entries of their own
    assert "| fairness | demographic_parity_difference (sex) |" in summary
    assert isinstance(data["honest"], LoadedModel)


def test_bands_read_in_numeric_order_and_classes_by_name(data: dict[str, Any]) -> None:
    from secure_ml.training.evaluation import ordered_groups, render_loss

    report = evaluate(data["honest"], data["test"], protected=PROTECTED, config=shipped())
    ages = report["bias_groups"]["age"]
    assert ordered_groups(ages["groups"], ages["bands"]) == [g for g in ["<25", "25-40", "40-60", ">=60"]
                                                              if g in ages["groups"]]
    assert ordered_groups({"b": 1, "a": 2}, None) == ["b", "a"]
    named = render_plots(report, class_names={"0": "bad risk", "1": "good risk"})["confusion"]
    assert named != render_plots(report)["confusion"]  # the class names are drawn on the axes
    loss = render_loss([0.7, 0.5, 0.45, 0.44])
    assert loss.startswith(b"\x89PNG\r\n\x1a\n") and len(loss) > 2000


def test_each_plot_has_a_text_chart_short_enough_to_show_inline(data: dict[str, Any]) -> None:
    """Dagster shows markdown inline under 1,000 characters: every chart fits, names the classes, keeps
    the bands in order, and a long table is cut saying so (never past the limit)."""
    from resources.metadata import plot_metadata
    from secure_ml.training.charts import LIMIT, bar, charts, groups_chart, loss_chart

    report = evaluate(data["honest"], data["test"], protected=PROTECTED, config=shipped())
    text = charts(report, class_names={"0": "bad risk", "1": "good risk"})
    assert list(text) == ["roc", "confusion", "groups_sex", "groups_age", "calibration"]
    assert all(0 < len(chart) <= LIMIT < 1000 for chart in text.values()), {k: len(v) for k, v in text.items()}
    assert "| **bad risk** |" in text["confusion"] and "| **good risk** |" in text["confusion"]
    assert f"ROC AUC **{report['metrics']['roc_auc']:.3f}**" in text["roc"]
    ages = [line.split(" (")[0].strip("| ") for line in text["groups_age"].splitlines() if line.startswith("| <")
            or line.startswith("| 25") or line.startswith("| 40") or line.startswith("| >=")]
    assert ages == sorted(ages, key=["<25", "25-40", "40-60", ">=60"].index) and len(ages) >= 3
    assert bar(0.52) == "█████░░░░░ 0.52" and bar(None) == "n/a"
    many = {**report, "bias_groups": {"job": {"groups": {f"g{i:03d}": {"rows": 5, "selection_rate": 0.5, "tpr": 0.5,
                                                                       "fpr": 0.5} for i in range(80)}}},
            "fairness": {"job": {"demographic_parity_difference": 0.0, "equalized_odds_difference": 0.0}}}
    cut = groups_chart(many, "job")
    assert len(cut) <= LIMIT and "more rows in the plot" in cut
    assert loss_chart([0.7, 0.5, 0.45, 0.44]) == "`█▃▁▁` 0.700 → 0.440 over 4 epochs (min 0.440)"
    entries = list(plot_metadata(render_plots(report), charts=text))
    assert entries == ["roc", "plot_roc", "confusion", "plot_confusion", "groups_sex", "groups_age", "plot_groups",
                       "calibration", "plot_calibration"]
