import math

import pytest

from accel_hydra import MetricMonitor


def test_min_mode_counts_epochs_without_improvement():
    monitor = MetricMonitor(metric_name="loss", mode="min")
    assert [monitor({"loss": v}) for v in (1.0, 0.5, 0.7, 0.6, 0.4)] == [
        True,
        True,
        False,
        False,
        True,
    ]
    assert monitor.best_value == 0.4
    assert monitor.worse_count == 0


def test_max_mode_and_min_delta():
    monitor = MetricMonitor(metric_name="acc", mode="max", min_delta=0.05)
    assert monitor({"acc": 0.5})
    assert not monitor({"acc": 0.54})  # better, but by less than min_delta
    assert monitor.worse_count == 1
    assert monitor({"acc": 0.56})
    assert monitor.best_value == 0.56


def test_nan_is_never_an_improvement():
    monitor = MetricMonitor()
    monitor({"loss": 1.0})
    assert not monitor({"loss": math.nan})
    assert monitor.best_value == 1.0


def test_missing_metric_names_the_keys_returned():
    monitor = MetricMonitor(metric_name="acc")
    with pytest.raises(KeyError, match=r"'acc' not in get_val_metrics\(\) keys \['f1', 'loss'\]"):
        monitor({"loss": 1.0, "f1": 0.3})


def test_state_dict_round_trip():
    monitor = MetricMonitor(mode="max")
    for value in (0.1, 0.3, 0.2):
        monitor({"loss": value})
    restored = MetricMonitor(mode="max")
    restored.load_state_dict(monitor.state_dict())
    assert (restored.best_value, restored.worse_count) == (0.3, 1)


def test_bad_mode_is_rejected():
    with pytest.raises(ValueError, match="'min' or 'max'"):
        MetricMonitor(mode="up")
