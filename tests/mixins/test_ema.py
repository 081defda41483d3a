"""EMAMixin: the average it keeps, where it is saved, and what validation sees."""

from __future__ import annotations

import functools
import os
import sys
from dataclasses import dataclass, field

import pytest
import torch
from safetensors.torch import load_file

from accel_hydra import (
    CheckpointMixin,
    EarlyStoppingMixin,
    EMAMixin,
    GradClipMixin,
    LoggingMixin,
    LoopBase,
    LRSchedulingMixin,
    MetricMonitor,
    Trainer,
)
from tests.conftest import ToyTrainer, compose, make_model, parameters_of, trainer_kwargs
from tests.test_resume import assert_bitwise_equal, harness

ALL = (CheckpointMixin, EarlyStoppingMixin, LRSchedulingMixin, LoggingMixin, GradClipMixin)


@dataclass(kw_only=True, eq=False)
class EMAToy(EMAMixin, ToyTrainer):
    """Records the weights after every update and what each validation pass ran with."""

    weights_per_update: list = field(default_factory=list)
    validated_with: list = field(default_factory=list)
    validated_weight: list = field(default_factory=list)

    def _after_optimizer_step(self):
        super()._after_optimizer_step()
        self.weights_per_update.append(parameters_of(self.model))

    def validation_step(self, batch, batch_idx):
        if batch_idx == 0:
            ema = self.ema_state_dict()
            plain = self.accelerator.unwrap_model(self.model, keep_torch_compile=False)
            weights = plain.state_dict()
            self.validated_with.append(all(torch.equal(weights[k], ema[k]) for k in ema))
            self.validated_weight.append(weights["0.weight"].clone())
        super().validation_step(batch, batch_idx)


def expected_ema(trainer: EMAToy, initial: dict) -> dict:
    """The average by its definition, from the recorded weights of every update."""
    ema = {k: v.clone() for k, v in initial.items()}
    for step, weights in enumerate(trainer.weights_per_update, start=1):
        if step <= trainer.ema_start_step:
            ema = {k: v.clone() for k, v in weights.items()}
        elif step % trainer.ema_every_n_steps == 0:
            for k in ema:
                ema[k] = ema[k].lerp(weights[k], 1.0 - trainer.ema_decay)
    return ema


@pytest.mark.parametrize(
    ("accumulation", "direct"),
    [(1, True), (2, True), (2, False)],
    ids=["plain", "acc", "acc-wrapped"],
)
def test_the_average_follows_its_definition(tmp_path, accumulation, direct):
    cls = type("Checked", (EMAToy,), {"_allow_direct_updates": direct})
    cls = dataclass(kw_only=True, eq=False)(cls)
    torch.manual_seed(0)
    model = make_model(dropout=0.1)
    initial = parameters_of(model)
    trainer = cls(
        **trainer_kwargs(tmp_path, model=model, optimizer=torch.optim.AdamW(model.parameters())),
        gradient_accumulation_steps=accumulation,
        ema_decay=0.8,
        ema_every_n_steps=2,
        ema_start_step=3,
    )
    trainer.train(seed=0)
    assert trainer.direct_updates == direct
    assert len(trainer.weights_per_update) == trainer.step == 24 // accumulation
    ema = trainer.ema_state_dict()
    for key, value in expected_ema(trainer, initial).items():
        assert torch.equal(ema[key], value), key
    assert not torch.equal(ema["0.weight"], trainer.model.state_dict()["0.weight"])


def run(tmp_path, validate_with_ema, epochs=2, **overrides):
    torch.manual_seed(0)
    model = make_model(dropout=0.1)
    kwargs = trainer_kwargs(tmp_path, model=model, epochs=epochs)
    kwargs.update(optimizer=torch.optim.SGD(model.parameters(), lr=0.05), **overrides)
    trainer = EMAToy(**kwargs, ema_decay=0.9, validate_with_ema=validate_with_ema)
    trainer.train(seed=0)
    return trainer


def test_validation_with_ema_differs_and_gives_the_weights_back(tmp_path):
    plain = run(tmp_path / "plain", validate_with_ema=False)
    with_ema = run(tmp_path / "ema", validate_with_ema=True)
    assert plain.val_metrics["loss"] != with_ema.val_metrics["loss"]
    assert with_ema.validated_with == [True, True, True]  # sanity pass, epoch 1, epoch 2
    assert plain.validated_with == [True, False, False]  # the same before any update
    # Swapped back bitwise: training went on exactly as without it.
    for key, value in parameters_of(plain.model).items():
        assert torch.equal(value, parameters_of(with_ema.model)[key])
    for key, value in plain.ema_state_dict().items():
        assert torch.equal(value, with_ema.ema_state_dict()[key])


def test_the_sanity_validation_of_a_resumed_run_uses_the_restored_average(tmp_path):
    first = run(tmp_path, validate_with_ema=True, epochs=1)
    resumed = run(tmp_path, validate_with_ema=True, resume_from_checkpoint="latest")
    assert resumed.step == 24
    assert resumed.validated_with == [True, True]  # its sanity pass, then epoch 2
    # The sanity pass saw the saved average, not the saved weights (they differ).
    assert torch.equal(resumed.validated_weight[0], first.ema_state_dict()["0.weight"])
    assert not torch.equal(first.ema_state_dict()["0.weight"], first.model.state_dict()["0.weight"])


def test_every_checkpoint_holds_the_average_and_best_is_a_weights_file(tmp_path):
    trainer = run(
        tmp_path, validate_with_ema=True, metric_monitor=MetricMonitor(metric_name="loss")
    )
    checkpoints = tmp_path / "checkpoints"
    assert sorted(os.listdir(checkpoints)) == ["best", "epoch_2"]
    saved = load_file(checkpoints / "epoch_2" / "ema.safetensors")
    for key, value in trainer.ema_state_dict().items():
        assert torch.equal(saved[key], value)
    # best's ema.safetensors loads into a fresh model, strictly.
    fresh = make_model(dropout=0.1)
    fresh.load_state_dict(load_file(checkpoints / "best" / "ema.safetensors"))
    committed = (checkpoints / "best" / "accel_hydra_committed.json").read_text()
    assert "ema.safetensors" in committed  # checksummed like every file


def test_a_checkpoint_without_the_average_starts_it_from_its_weights(tmp_path):
    torch.manual_seed(0)
    model = make_model()
    ToyTrainer(**trainer_kwargs(tmp_path, model=model, epochs=1)).train(seed=0)
    resumed = run(tmp_path, validate_with_ema=False, epochs=1, resume_from_checkpoint="latest")
    assert resumed.step == 12
    for key, value in resumed.ema_state_dict().items():
        assert torch.equal(value, resumed.model.state_dict()[key])


@pytest.mark.parametrize(
    ("name", "value"), [("ema_decay", 1.5), ("ema_every_n_steps", 0), ("ema_start_step", -1)]
)
def test_bad_settings_fail_at_construction(tmp_path, name, value):
    with pytest.raises(ValueError, match=f"^{name} must be"):
        EMAToy(**trainer_kwargs(tmp_path), **{name: value})


# ------------------------------------------------------------------ composition


def composed_run(cls, tmp_path):
    torch.manual_seed(0)
    model = make_model(dropout=0.1)
    trainer = cls(
        **trainer_kwargs(tmp_path, model=model, optimizer=torch.optim.AdamW(model.parameters())),
        metric_monitor=MetricMonitor(metric_name="loss"),
        lr_scheduler=functools.partial(torch.optim.lr_scheduler.CosineAnnealingLR),
        max_grad_norm=0.5,
        log_every_n_steps=4,
        ema_decay=0.9,
        validate_with_ema=True,
    )
    trainer.train(seed=0)
    return trainer


def test_ema_composes_in_any_order(tmp_path):
    first = composed_run(compose(EMAMixin, *ALL), tmp_path / "first")
    last = composed_run(compose(*reversed(ALL), EMAMixin), tmp_path / "last")
    middle = composed_run(compose(*ALL[:2], EMAMixin, *ALL[2:]), tmp_path / "middle")
    for other in (last, middle):
        assert other.val_metrics == first.val_metrics
        for key, value in first.ema_state_dict().items():
            assert torch.equal(value, other.ema_state_dict()[key])
        for key, value in parameters_of(first.model).items():
            assert torch.equal(value, parameters_of(other.model)[key])
    assert os.path.exists(tmp_path / "last" / "checkpoints" / "best" / "ema.safetensors")


@pytest.mark.parametrize(
    "mixins", [(), (CheckpointMixin,), (GradClipMixin, LoggingMixin)], ids=["alone", "ckpt", "two"]
)
def test_ema_in_a_subset(tmp_path, mixins):
    cls = compose(EMAMixin, *mixins)
    assert cls.__mro__[-3:] == (LoopBase, LoopBase.__mro__[1], object)
    trainer = cls(**trainer_kwargs(tmp_path), ema_decay=0.5, validate_with_ema=True)
    trainer.train(seed=0)
    assert trainer.step == 24
    saved = tmp_path / "checkpoints" / "epoch_2" / "ema.safetensors"
    assert os.path.exists(saved) == (CheckpointMixin in mixins)


def test_trainer_stays_as_specified():
    assert EMAMixin not in Trainer.__mro__


def test_the_average_adds_no_read_from_the_device(tmp_path, monkeypatch):
    """Counted as tests/test_composition.py counts: every ``.item()``, ``bool()`` and
    ``.tolist()`` on a tensor from the package's own files, with and without EMA."""

    def count(cls, where):
        reads = []
        originals = {name: getattr(torch.Tensor, name) for name in ("item", "__bool__", "tolist")}

        def counting(name):
            def read(self, *args):
                caller = sys._getframe(1).f_code.co_filename
                # The shuffling sampler lists its CPU generator's permutation once per
                # epoch, as torch's RandomSampler does: not a read from the device.
                if f"accel_hydra{os.sep}" in caller and not caller.endswith("epoch_order.py"):
                    reads.append(name)
                return originals[name](self, *args)

            return read

        trainer = cls(
            **trainer_kwargs(tmp_path / where, epochs=3),
            max_grad_norm=1.0,
            log_every_n_steps=50,
            stop_on_nan=False,
        )
        for name in originals:
            monkeypatch.setattr(torch.Tensor, name, counting(name))
        trainer.train(seed=0)
        monkeypatch.undo()
        assert trainer.step == 36
        return reads

    without = count(compose(*ALL), "without")
    with_ema = count(compose(EMAMixin, *ALL), "with")
    assert len(without) == 3  # one loss read per epoch, as test_composition counts
    assert with_ema == without


# ------------------------------------------------------------------ exact resume


def ema_harness(tmp_path, name, *args):
    result = tmp_path / name / "result.pt"
    done = harness(tmp_path / name, result, "--ema", *args)
    return done, result


RESUME_CASES = [
    pytest.param("2", "mid_epoch", "5", False, id="acc2-mid_epoch"),
    pytest.param(
        "1", "mid_epoch", "7", True, id="acc1-mid_epoch-val_ema", marks=pytest.mark.full_grid
    ),
    pytest.param(
        "1", "after_checkpoint", "6", False, id="acc1-after_ckpt", marks=pytest.mark.full_grid
    ),
    pytest.param(
        "2", "in_validation", "-1", True, id="acc2-in_val-val_ema", marks=pytest.mark.full_grid
    ),
]


@pytest.mark.parametrize(("accumulation", "kill", "at", "validate_with_ema"), RESUME_CASES)
def test_killed_and_resumed_ema_is_bitwise_the_uninterrupted_one(
    tmp_path, accumulation, kill, at, validate_with_ema
):
    common = ["--accumulation", accumulation]
    if validate_with_ema:
        common.append("--validate-with-ema")
    reference, reference_result = ema_harness(tmp_path, "reference", *common)
    assert reference.returncode == 0, reference.stderr[-3000:]
    killed, _ = ema_harness(tmp_path, "run", *common, "--kill", kill, "--at", at)
    assert killed.returncode == -9, killed.stderr[-3000:]
    resumed, result = ema_harness(tmp_path, "run", *common, "--resume", "latest")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from" in resumed.stdout
    assert_bitwise_equal(result, reference_result)
    ema, reference_ema = torch.load(result)["ema"], torch.load(reference_result)["ema"]
    assert ema.keys() == reference_ema.keys()
    for key, value in reference_ema.items():
        assert torch.equal(ema[key], value), f"EMA {key} differs"


def test_the_average_travels_through_an_object_store_and_is_verified(tmp_path, s3):
    from accel_hydra.storage import CheckpointCorruptError

    url = s3.new_bucket() + "/run"
    remote = {"checkpoint_dir": url, "storage_options": s3.storage_options}
    first = run(tmp_path / "first", validate_with_ema=True, epochs=1, **remote)
    saved = {k: v.clone() for k, v in first.ema_state_dict().items()}
    resumed = run(
        tmp_path / "second",
        validate_with_ema=True,
        epochs=1,
        resume_from_checkpoint="latest",
        **remote,
    )
    assert resumed.resumed_from == "epoch_1"
    for key, value in saved.items():
        assert torch.equal(resumed.ema_state_dict()[key], value)
    # Bytes changed in the bucket after the commit: the checksum refuses the file.
    fs = s3.filesystem()
    path = f"{url}/epoch_1/ema.safetensors".split("://")[1]
    data = bytearray(fs.cat(path))
    data[-1] ^= 0xFF
    fs.pipe(path, bytes(data))
    with pytest.raises(CheckpointCorruptError, match="ema.safetensors"):
        run(tmp_path / "third", validate_with_ema=True, resume_from_checkpoint="latest", **remote)


@pytest.mark.full_grid
@pytest.mark.skipif(not torch.distributed.is_available(), reason="needs torch.distributed")
def test_two_processes_killed_and_resumed_keep_the_same_average(tmp_path):
    from tests.test_resume import torchrun_harness

    args = ["--ema", "--validate-with-ema", "--accumulation", "2", "--epochs", "2"]

    def torchrun(project, result, *more):
        return torchrun_harness(project, result, *args, *more)

    full = torchrun(tmp_path / "full", tmp_path / "full.pt")
    assert full.returncode == 0, full.stderr[-3000:]
    stopped = torchrun(tmp_path / "run", tmp_path / "unused.pt", "--signal-at", "train:1:3")
    assert stopped.returncode != 0
    resumed = torchrun(tmp_path / "run", tmp_path / "result.pt", "--resume", "latest")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from" in resumed.stdout
    assert_bitwise_equal(tmp_path / "result.pt", tmp_path / "full.pt")
    ema, reference = (
        torch.load(tmp_path / "result.pt")["ema"],
        torch.load(tmp_path / "full.pt")["ema"],
    )
    for key, value in reference.items():
        assert torch.equal(ema[key], value), f"EMA {key} differs"
