import torch

from accel_hydra import GradClipMixin
from tests.conftest import compose, trainer_kwargs

Clipped = compose(GradClipMixin)


def record_gradients(trainer):
    """Global gradient norms and largest elements as the optimizer sees them."""
    seen = []

    def hook(optimizer, *_):
        grads = [p.grad for group in optimizer.param_groups for p in group["params"]]
        norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))
        seen.append((norm.item(), max(g.abs().max().item() for g in grads)))

    trainer.on_train_start = lambda: trainer.optimizer.optimizer.register_step_pre_hook(hook)
    return seen


def test_global_norm_is_bounded(tmp_path):
    trainer = Clipped(**trainer_kwargs(tmp_path), max_grad_norm=0.05)
    seen = record_gradients(trainer)
    trainer.train(seed=0)
    assert len(seen) == 24
    assert max(norm for norm, _ in seen) <= 0.05 * (1 + 1e-5)
    assert trainer.last_grad_norm.item() > 0.05  # the norm before clipping, reported


def test_clip_by_value(tmp_path):
    trainer = Clipped(**trainer_kwargs(tmp_path), clip_grad_value=0.01)
    seen = record_gradients(trainer)
    trainer.train(seed=0)
    assert max(largest for _, largest in seen) <= 0.01
    assert trainer.last_grad_norm is None


def test_unclipped_norms_exceed_the_bound(tmp_path):
    """Guards the test above: without clipping the same run's norms are larger."""
    trainer = Clipped(**trainer_kwargs(tmp_path))
    seen = record_gradients(trainer)
    trainer.train(seed=0)
    assert max(norm for norm, _ in seen) > 0.05
