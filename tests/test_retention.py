from accel_hydra.retention import checkpoint_order, checkpoints_to_prune


def info(step, epoch=0):
    return {"step": step, "epoch": epoch}


def test_keeps_newest_k_by_progress_not_by_name():
    committed = {"step_9": info(9), "step_10": info(10), "step_100": info(100)}
    assert checkpoints_to_prune(committed, 2) == ["step_9"]


def test_best_and_permanent_are_never_pruned():
    committed = {
        "best": info(1, 1),
        "permanent_step_2": info(2),
        "epoch_1": info(5, 1),
        "epoch_2": info(10, 2),
    }
    assert checkpoints_to_prune(committed, 1) == ["epoch_1"]


def test_protected_checkpoint_survives():
    committed = {"step_1": info(1), "step_2": info(2), "step_3": info(3)}
    assert checkpoints_to_prune(committed, 1, protected={"step_1"}) == ["step_2"]


def test_none_keeps_everything():
    assert checkpoints_to_prune({"step_1": info(1), "step_2": info(2)}, None) == []


def test_epoch_end_checkpoint_follows_step_checkpoint_at_same_update():
    assert checkpoint_order("epoch_1", info(12, 1)) > checkpoint_order("step_12", info(12, 0))
    assert checkpoint_order("epoch_1", info(12, 1)) > checkpoint_order("best", info(12, 1))
