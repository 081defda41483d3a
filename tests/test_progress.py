"""Progress: the loop's counters as one object, saved and restored whole."""

import json

import pytest

from accel_hydra.progress import Progress


def test_the_epoch_is_done_once_its_last_batch_is():
    progress = Progress(epoch_batches=6, batch=5)
    assert not progress.epoch_done()
    progress.batch = 6
    assert progress.epoch_done()
    progress.finish_epoch()
    assert (progress.epoch, progress.batch, progress.accumulated) == (1, 0, 0)
    assert not progress.epoch_done()


def test_state_is_a_json_friendly_dict_of_ints_and_round_trips():
    saved = Progress(epoch=2, step=17, batch=5, epoch_batches=6, accumulated=0)
    state = json.loads(json.dumps(saved.state_dict()))
    restored = Progress(epoch_batches=6)
    restored.load_state_dict(state)
    assert restored == saved


@pytest.mark.parametrize(
    ("field", "value"), [("step", -1), ("batch", "3"), ("epoch", 1.5), ("accumulated", None)]
)
def test_a_damaged_counter_is_refused_naming_it(field, value):
    state = Progress(epoch_batches=6).state_dict()
    state[field] = value
    with pytest.raises(ValueError, match=rf"progress\.{field} in the checkpoint must be"):
        Progress(epoch_batches=6).load_state_dict(state)


def test_a_mid_epoch_position_from_epochs_of_another_length_is_refused():
    state = Progress(epoch=1, step=9, batch=3, epoch_batches=6).state_dict()
    with pytest.raises(ValueError, match="batch 3 of an epoch of 6 batches, but this run's"):
        Progress(epoch_batches=12).load_state_dict(state)
    at_epoch_start = Progress(epoch=1, step=6, batch=0, epoch_batches=6).state_dict()
    progress = Progress(epoch_batches=12)
    progress.load_state_dict(at_epoch_start)  # an epoch boundary means the same thing
    assert (progress.epoch, progress.step) == (1, 6)
