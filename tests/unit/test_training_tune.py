"""The Optuna loop: two trials stored in SQLite, resumed by a second call."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from training.cli import train as train_group
from training.synthetic import write_kermany
from training.tune import objective_scores

TINY = """
architecture = "separable_cnn"
architecture_args = {widths = [8, 16]}
init = "none"
input_size = 32
freeze = 0
val_fraction = 0.4
threads = 1
epochs = 1
"""


def test_two_trials_then_resume(tmp_path: Path) -> None:
    import optuna

    data = write_kermany(tmp_path / "data", per_class=16, size=32)
    config = tmp_path / "tiny.toml"
    config.write_text(TINY)
    storage = tmp_path / "study.sqlite"
    args = ["tune", "--data", str(data), "--storage", str(storage), "--config", str(config),
            "--cache-dir", str(tmp_path / "cache"), "--study-name", "t"]
    result = CliRunner().invoke(train_group, [*args, "--trials", "2"])
    assert result.exit_code == 0, result.output + repr(result.exception)
    assert "best trial #" in result.output and "\nlr = " in result.output
    toml_lines = result.output.split("(only what differs from the base settings)\n")[1]
    import tomllib

    from training.train import TrainConfig

    tuned = tomllib.loads(toml_lines)  # valid TOML with TrainConfig fields only
    assert TrainConfig.from_dict({"data": str(data), **tuned}).lr == tuned["lr"]
    study = optuna.load_study(study_name="t", storage=f"sqlite:///{storage}")
    assert len(study.trials) == 2
    trial = study.trials[0]
    assert {"lr", "batch_size", "focal_gamma", "min_recall", "sampling"} <= set(trial.params)
    assert {"balanced_accuracy", "threshold", "auroc"} <= set(trial.user_attrs)
    again = CliRunner().invoke(train_group, [*args, "--trials", "1", "--subset", "0.8"])
    assert again.exit_code == 0, again.output
    assert len(optuna.load_study(study_name="t", storage=f"sqlite:///{storage}").trials) == 3


def test_objective_scores_threshold_on_one_half_only() -> None:
    labels = np.array([0, 0, 1, 1, 0, 0, 1, 1])
    probs = np.array([0.1, 0.2, 0.8, 0.9, 0.3, 0.7, 0.6, 0.95])
    scores = objective_scores(labels, probs, np.arange(4), np.arange(4, 8), min_recall=1.0)
    # threshold from the first half: every threshold in (0.2, 0.8] separates it, the Youden rule takes the middle
    # of that run in logit space, 0.5; second half at 0.5: positives 0.6 and 0.95 hit, negative 0.7 called too
    assert scores["threshold"] == pytest.approx(0.5)
    assert scores["pneumonia_recall"] == 1.0 and scores["normal_recall"] == 0.5
    assert scores["balanced_accuracy"] == 0.75


def test_a_diverging_trial_is_pruned_and_the_study_goes_on(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A trial whose training diverges is recorded as pruned, with the reason, and the next trial runs."""
    import tomllib

    import optuna

    from training import tune
    from training.train import TrainConfig, TrainingDiverged

    data = write_kermany(tmp_path / "data", per_class=16, size=32)
    base = TrainConfig.from_dict({**tomllib.loads(TINY), "data": str(data), "cache_dir": str(tmp_path / "cache")})
    real_fit, calls = tune.fit, []

    def fit_that_diverges_once(*args: object, **kwargs: object) -> object:
        calls.append(1)
        if len(calls) == 1:
            raise TrainingDiverged("training diverged: the loss is nan at epoch 1, step 3 (lr 0.01)")
        return real_fit(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(tune, "fit", fit_that_diverges_once)
    study = tune.run_study(base, tmp_path / "study.sqlite", "d", trials=2)
    states = [t.state for t in study.trials]
    assert states == [optuna.trial.TrialState.PRUNED, optuna.trial.TrialState.COMPLETE]
    assert "loss is nan" in study.trials[0].user_attrs["diverged"]


def test_the_frozen_depth_is_searched_for_efficientnet_only() -> None:
    import optuna

    from training.train import TrainConfig
    from training.tune import FREEZE_CHOICES, suggest

    params = {"sampling": "none", "lr": 2e-4, "batch_size": 32, "focal_gamma": 0.6, "min_recall": 0.96,
              "use_focal_alpha": False, "max_class_weight": 5.0}
    lite0 = suggest(optuna.trial.FixedTrial({**params, "freeze": 2}), TrainConfig(freeze=4))
    assert (lite0.freeze, lite0.lr, lite0.class_weighting, lite0.focal_alpha) == (2, 2e-4, "balanced", None)
    assert set(FREEZE_CHOICES) == {0, 2, 4}
    cnn = suggest(optuna.trial.FixedTrial(params), TrainConfig(architecture="separable_cnn", freeze=0))
    assert cnn.freeze == 0  # nothing pretrained to keep: not a parameter of its trials
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=1))
    trial = study.ask()
    suggest(trial, TrainConfig())
    assert trial.params["freeze"] in FREEZE_CHOICES
