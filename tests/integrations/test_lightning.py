"""AdaHessian in Lightning through AdaHessianMixin: trains, and resumes exactly."""

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

pl = pytest.importorskip("pytorch_lightning")

from meanwise.integrations.lightning import AdaHessianMixin  # noqa: E402
from meanwise.optim import AdaBelief, AdaHessian  # noqa: E402


def _loader(batch_size=16):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(48, 5, generator=g)
    y = (x[:, 0] + x[:, 1] > 0).long()
    return DataLoader(TensorDataset(x, y), batch_size=batch_size, shuffle=False)


class Model(AdaHessianMixin, pl.LightningModule):
    def __init__(self, optimizer="adahessian"):
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 2))
        self.optimizer_name = optimizer
        self.losses = []

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = nn.functional.cross_entropy(self.net(x), y)
        self.losses.append(float(loss.detach()))
        return loss

    def configure_optimizers(self):
        if self.optimizer_name == "adabelief":
            return AdaBelief(self.parameters(), lr=0.05)
        return AdaHessian(
            self.parameters(), lr=0.1, update_each=2, generator=torch.Generator().manual_seed(4)
        )


def _trainer(tmp_path, max_steps, callbacks=()):
    return pl.Trainer(
        max_steps=max_steps,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=bool(callbacks),
        callbacks=list(callbacks),
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=str(tmp_path),
    )


@pytest.mark.parametrize("optimizer", ["adahessian", "adabelief"])
def test_trains(tmp_path, optimizer):
    model = Model(optimizer)
    _trainer(tmp_path, 60).fit(model, _loader())
    assert len(model.losses) == 60
    assert sum(model.losses[-5:]) < 0.8 * sum(model.losses[:5])


def test_without_the_mixin_adahessian_fails_with_the_reason(tmp_path):
    class Plain(pl.LightningModule):
        training_step = Model.training_step
        configure_optimizers = Model.configure_optimizers

        def __init__(self):
            super().__init__()
            self.net, self.optimizer_name, self.losses = Model().net, "adahessian", []

    with pytest.raises(ValueError, match="create_graph=True"):
        _trainer(tmp_path, 2).fit(Plain(), _loader())


def test_resume_is_exact(tmp_path):
    """Full-batch steps, so Lightning's own choice of where a resumed epoch restarts its data
    (it re-runs a checkpoint's unfinished epoch) cannot matter: what is tested is that the
    model and AdaHessian (moments, stored Hessian, step count, probe generator) resume."""
    straight = Model()
    _trainer(tmp_path / "a", 9).fit(straight, _loader(48))
    first = Model()
    trainer = _trainer(tmp_path / "b", 3)  # update_each=2: the next step reuses a stored Hessian
    trainer.fit(first, _loader(48))
    trainer.save_checkpoint(tmp_path / "step3.ckpt")
    resumed = Model()
    _trainer(tmp_path / "c", 9).fit(resumed, _loader(48), ckpt_path=tmp_path / "step3.ckpt")
    for a, b in zip(straight.parameters(), resumed.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert straight.losses[3:] == resumed.losses
