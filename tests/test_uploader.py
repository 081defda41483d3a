import threading

import pytest

from accel_hydra.uploader import BackgroundUploader, CheckpointUploadError


def test_failed_job_is_retried_then_succeeds_and_runs_after_once():
    attempts, after = [], []

    def flaky():
        attempts.append(1)
        if len(attempts) < 3:
            raise ConnectionError("endpoint restarting")

    uploader = BackgroundUploader(retry_delays=(0, 0, 0))
    uploader.submit(flaky, "s3://b/run/step_1", after=lambda: after.append(1))
    uploader.wait()
    assert len(attempts) == 3
    assert after == [1]


def test_persistent_failure_is_raised_with_url_and_advice_never_dropped():
    def refused():
        raise PermissionError("AccessDenied")

    uploader = BackgroundUploader(retry_delays=(0, 0))
    uploader.submit(refused, "s3://b/run/step_1", on_failure="Files kept in /tmp/stage.")
    with pytest.raises(CheckpointUploadError) as err:
        uploader.submit(lambda: None, "s3://b/run/step_2")
    message = str(err.value)
    assert "s3://b/run/step_1 failed 3 time(s)" in message
    assert "PermissionError: AccessDenied" in message
    assert "Files kept in /tmp/stage." in message
    uploader.wait()  # reported once, then the uploader is usable again


def test_next_job_starts_only_after_the_previous_one_finished():
    order = []
    first_running = threading.Event()
    let_first_finish = threading.Event()

    def first():
        first_running.set()
        let_first_finish.wait(timeout=10)
        order.append("first")

    uploader = BackgroundUploader()
    uploader.submit(first, "memory://run/step_1")
    first_running.wait(timeout=10)
    assert uploader.in_flight == "memory://run/step_1"
    threading.Timer(0.05, let_first_finish.set).start()
    uploader.submit(lambda: order.append("second"), "memory://run/step_2")
    uploader.wait()
    assert order == ["first", "second"]
    assert uploader.in_flight is None
