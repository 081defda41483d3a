"""``compile``: a compiled model trains, its checkpoints fit uncompiled runs (and back),
and a machine that cannot build kernels says so before training."""

from __future__ import annotations

import os
import re
import stat

import pytest
import torch
from safetensors.torch import load_file

from accel_hydra.compiling import CompileToolchainError
from tests.conftest import ToyTrainer, make_model, parameters_of, trainer_kwargs
from tests.test_cli import CONFIG, run_cli

FAST = {"backend": "aot_eager"}  # no C++ compiler, seconds instead of a minute


def toy_run(tmp_path, compile, epochs=2, **overrides):
    torch.manual_seed(0)
    model = make_model(dropout=0.1)
    kwargs = trainer_kwargs(tmp_path, model=model, epochs=epochs, compile=compile)
    kwargs.update(optimizer=torch.optim.AdamW(model.parameters(), lr=0.01), **overrides)
    trainer = ToyTrainer(**kwargs)
    trainer.train(seed=0)
    return trainer


def plain_weights(trainer):
    model = trainer.accelerator.unwrap_model(trainer.model, keep_torch_compile=False)
    return parameters_of(model)


def test_a_compiled_run_saves_the_plain_models_keys(tmp_path):
    trainer = toy_run(tmp_path, FAST)
    assert isinstance(trainer.model, torch._dynamo.eval_frame.OptimizedModule)
    saved = load_file(tmp_path / "checkpoints" / "epoch_2" / "model.safetensors")
    assert sorted(saved) == sorted(make_model().state_dict())  # no "_orig_mod." prefix
    for key, value in plain_weights(trainer).items():
        assert torch.equal(saved[key], value)


def test_a_compiled_run_resumes_exactly(tmp_path):
    whole = toy_run(tmp_path / "whole", FAST)
    toy_run(tmp_path / "cut", FAST, epochs=1)
    resumed = toy_run(tmp_path / "cut", FAST, resume_from_checkpoint="latest")
    assert resumed.resumed_from == "epoch_1"
    for key, value in plain_weights(whole).items():
        assert torch.equal(plain_weights(resumed)[key], value), key


def test_a_compiled_trainer_validates_a_checkpoint(tmp_path):
    # validate(checkpoint) loads plain keys into the model under the compiled wrapper.
    trainer = toy_run(tmp_path, FAST, epochs=2, save_last_k=2)
    at_epoch_1 = load_file(tmp_path / "checkpoints" / "epoch_1" / "model.safetensors")
    trainer.validate(checkpoint="epoch_1")
    for key, value in plain_weights(trainer).items():
        assert torch.equal(at_epoch_1[key], value), key


@pytest.mark.parametrize(
    ("first", "then"),
    [(FAST, False), (False, FAST)],
    ids=["compiled-then-plain", "plain-then-compiled"],
)
def test_compiled_and_plain_checkpoints_resume_each_other(tmp_path, first, then):
    saved = toy_run(tmp_path, first, epochs=1)
    at_save = plain_weights(saved)
    model = make_model(dropout=0.1)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.01)
    resumed = ToyTrainer(
        **trainer_kwargs(tmp_path, model=model, optimizer=optimizer, epochs=1, compile=then),
        resume_from_checkpoint="latest",
    )
    resumed.train(seed=0)  # epochs=1 is done: nothing trains, the weights stay as loaded
    assert resumed.resumed_from == "epoch_1" and resumed.step == 12
    for key, value in at_save.items():
        assert torch.equal(plain_weights(resumed)[key], value), key
    continued = toy_run(tmp_path, then, epochs=2, resume_from_checkpoint="latest")
    assert continued.step == 24


def fake_compiler(tmp_path, works_for_version: bool) -> str:
    """A real executable that answers ``--version`` but cannot compile."""
    path = tmp_path / "broken-g++"
    version = "echo broken 1.0; exit 0" if works_for_version else "exit 1"
    path.write_text(
        "#!/bin/sh\n"
        f'if [ "$1" = --version ]; then {version}; fi\n'
        'echo "broken-g++: fatal error: no assembler" >&2\nexit 1\n'
    )
    path.chmod(path.stat().st_mode | stat.S_IEXEC)
    return str(path)


@pytest.mark.parametrize(
    ("compiler", "expected"),
    [
        ("/nonexistent/g++", "compile=True needs a C++ compiler for torch.compile's inductor"),
        ("broken", "compile=True needs a working C++ compiler for torch.compile's inductor"),
    ],
    ids=["missing", "broken"],
)
def test_no_toolchain_fails_in_one_line_before_training(tmp_path, compiler, expected):
    from torch._inductor import config

    if compiler == "broken":
        compiler = fake_compiler(tmp_path, works_for_version=True)
    trainer = ToyTrainer(**trainer_kwargs(tmp_path, compile=True))
    with config.patch({"cpp.cxx": (compiler,)}), pytest.raises(CompileToolchainError) as raised:
        trainer.train(seed=0)
    message = str(raised.value)
    assert message.startswith(expected) and "\n" not in message
    assert "compile=False" in message and "'aot_eager'" in message
    if "broken" in compiler:
        assert "fatal error: no assembler" in message
    assert trainer.step == 0
    assert not os.path.exists(tmp_path / "checkpoints")


def test_an_option_torch_compile_does_not_take_is_refused_at_construction(tmp_path):
    with pytest.raises(ValueError, match=r"compile has option\(s\) \['mdoe'\] that torch.compile"):
        ToyTrainer(**trainer_kwargs(tmp_path, compile={"mdoe": "max-autotune"}))
    with pytest.raises(ValueError, match="compile must be True, False or a dict"):
        ToyTrainer(**trainer_kwargs(tmp_path, compile="yes"))


def digits_accuracy(tmp_path, *overrides):
    result = run_cli(tmp_path, "-c", CONFIG, "-o", f"trainer.project_dir={tmp_path}", *overrides)
    assert result.returncode == 0, result.stderr[-3000:]
    accuracies = [float(a) for a in re.findall(r"validation: accuracy=([0-9.]+)", result.stdout)]
    return result, max(accuracies)


def test_digits_compiled_with_aot_eager_reaches_the_accuracy_band(tmp_path):
    result, accuracy = digits_accuracy(
        tmp_path, "trainer.epochs=6", "+trainer.compile={backend: aot_eager}"
    )
    assert "compile            torch.compile(backend='aot_eager')" in result.stdout
    assert accuracy >= 0.95


@pytest.mark.full_grid
def test_digits_compiled_with_inductor_reaches_the_accuracy_band(tmp_path):
    result, accuracy = digits_accuracy(tmp_path, "+trainer.compile=true")
    assert "compile            torch.compile()" in result.stdout
    assert accuracy >= 0.95  # as tests/test_cli.py asks of the uncompiled example


def test_the_ema_of_a_compiled_model_has_the_plain_keys_and_validates(tmp_path):
    from tests.mixins.test_ema import EMAToy

    trainer = EMAToy(**trainer_kwargs(tmp_path, compile=FAST), validate_with_ema=True)
    trainer.train(seed=0)
    assert sorted(trainer.ema_state_dict()) == sorted(make_model().state_dict())
    assert trainer.validated_with == [True, True, True]
    saved = load_file(tmp_path / "checkpoints" / "epoch_2" / "ema.safetensors")
    assert sorted(saved) == sorted(make_model().state_dict())
