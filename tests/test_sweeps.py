import pytest

from accel_hydra.sweeps import expand_sweeps


def test_cartesian_product_in_written_order():
    jobs = expand_sweeps(["optimizer.lr=1e-3,1e-2", "trainer.epochs=2", "seed=range(0,2)"])
    assert jobs == [
        ["optimizer.lr=0.001", "trainer.epochs=2", "seed=0"],
        ["optimizer.lr=0.001", "trainer.epochs=2", "seed=1"],
        ["optimizer.lr=0.01", "trainer.epochs=2", "seed=0"],
        ["optimizer.lr=0.01", "trainer.epochs=2", "seed=1"],
    ]


def test_no_sweep_is_one_job_with_grammar_kept():
    assert expand_sweeps(["+a=1", "~b", "c='x,y'"]) == [["+a=1", "~b", "c='x,y'"]]


def test_group_switch_sweep():
    assert expand_sweeps(["model=mlp,big"]) == [["model=mlp"], ["model=big"]]


def test_unparsable_override_is_a_clear_error():
    with pytest.raises(ValueError, match="cannot expand the sweep"):
        expand_sweeps(["a=[1,2"])
