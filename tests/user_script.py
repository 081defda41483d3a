"""A user's own training script on the Python API, as run under ``torchrun``.

Nothing in it tears the process group down or skips interpreter exit: the trainer
created the group, so the trainer leaves it at exit.
"""

import sys
from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from accel_hydra import Trainer


@dataclass(kw_only=True, eq=False)
class MyTrainer(Trainer):
    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.mse_loss(self.model(x), y)

    def validation_step(self, batch, batch_idx):
        pass


torch.manual_seed(0)
x = torch.randn(64, 4)
data = TensorDataset(x, x.sum(dim=1, keepdim=True))
model = nn.Linear(4, 1)
MyTrainer(
    model=model,
    optimizer=torch.optim.SGD(model.parameters(), lr=0.01),
    train_dataloader=DataLoader(data, batch_size=8, shuffle=True),
    epochs=1,
    project_dir=sys.argv[1],
    progress_bar=False,
    report_to=None,
).train(seed=0)
print("user script done", flush=True)
