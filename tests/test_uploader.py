import threading
import time

import pytest

from accel_hydra.uploader import BackgroundUploader, CheckpointUploadError, UploadProgress


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


def test_stalled_job_is_given_up_naming_the_url_and_the_stage():
    hang = threading.Event()
    uploader = BackgroundUploader(retry_delays=(), stall_timeout=0.3)
    uploader.submit(lambda: hang.wait(30), "s3://b/run/step_1", on_failure="Kept in /tmp/s.")
    with pytest.raises(CheckpointUploadError) as err:
        uploader.wait()
    message = str(err.value)
    assert "upload of checkpoint s3://b/run/step_1 did not finish: no progress for" in message
    assert message.endswith("Kept in /tmp/s.")
    assert uploader.in_flight is None
    uploader.wait()  # the given-up job is no longer waited for
    hang.set()


def test_a_slow_upload_that_moves_is_not_a_stall():
    progress = UploadProgress()

    def slow_but_moving():
        for _ in range(8):
            time.sleep(0.1)
            progress.relative_update(1024)

    uploader = BackgroundUploader(retry_delays=(), stall_timeout=0.3)
    uploader.submit(slow_but_moving, "s3://b/run/step_1", progress=progress)
    uploader.wait()


def test_caller_may_give_up_a_wait_and_the_job_stops_retrying():
    attempts = []

    def refused():
        attempts.append(1)
        raise ConnectionError("endpoint down")

    uploader = BackgroundUploader(retry_delays=(0.5, 0.5, 0.5))
    uploader.submit(refused, "s3://b/run/step_1")
    with pytest.raises(CheckpointUploadError, match="did not finish: stopping now"):
        uploader.wait(give_up=lambda: "stopping now")
    time.sleep(0.3)
    assert len(attempts) == 1
