"""A real PyTorch Lightning Trainer(gradient_clip_val=...) clips through fastclip under
fastclip.patched(): Lightning's precision plugin calls torch.nn.utils.clip_grad_norm_ (and
clip_grad_value_) by attribute at call time."""

from __future__ import annotations

import warnings

import pytest
import torch

import fastclip
from reference import exact_norm

L = pytest.importorskip("lightning")

CLIP = 0.5
STEPS = 4


def grad_norm(params) -> float:
    return exact_norm([p.grad for p in params if p.grad is not None], 2.0)


class RecordingSGD(torch.optim.SGD):
    """SGD that records the grads' exact norm and max |g| after Lightning's clipping: Lightning
    runs the closure (backward, then clipping) inside ``optimizer.step``."""

    def __init__(self, params, lr):
        super().__init__(params, lr=lr)
        self.after = []

    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        params = [p for g in self.param_groups for p in g["params"]]
        self.after.append((grad_norm(params),
                           max(float(p.grad.abs().max()) for p in params if p.grad is not None)))
        super().step()
        return loss


class Tiny(L.LightningModule):
    def __init__(self):
        super().__init__()
        self.net = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.Tanh(),
                                       torch.nn.Linear(32, 4))
        self.before = []  # exact grad norm before clipping, one per optimizer step

    def training_step(self, batch, batch_idx):
        x, y = batch
        return torch.nn.functional.mse_loss(self.net(x), y)

    def on_before_optimizer_step(self, optimizer):
        # Lightning calls this hook after backward and before clipping.
        self.before.append(grad_norm(self.parameters()))

    def configure_optimizers(self):
        return RecordingSGD(self.parameters(), lr=1e-3)


def fit(algorithm: str = "norm") -> Tiny:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(STEPS * 8, 16, generator=gen)
    y = 10 * torch.randn(STEPS * 8, 4, generator=gen)  # large targets: large grads to clip
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=8)
    torch.manual_seed(0)
    model = Tiny()
    trainer = L.Trainer(
        gradient_clip_val=CLIP, gradient_clip_algorithm=algorithm, max_epochs=1,
        accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Lightning's advice about dataloader workers etc.
        trainer.fit(model, loader)
    return model




def test_trainer_gradient_clip_val_runs_fastclip(build_calls):
    with fastclip.patched():
        model = fit()
    assert build_calls == ["clip_grad_norm_"] * STEPS
    opt_after = model.trainer.optimizers[0].after
    assert len(model.before) == len(opt_after) == STEPS
    # the test can only fail if there is something to clip
    assert all(b > 4 * CLIP for b in model.before)
    for before, (after, _) in zip(model.before, opt_after):
        # torch's coefficient max_norm / (norm + 1e-6): the result sits just below max_norm
        # (float32 grads: float rounding only, not exactly <= max_norm)
        assert after == pytest.approx(CLIP * before / (before + 1e-6), rel=1e-6)
        assert after <= CLIP * (1 + 1e-6)


def test_trainer_without_patch_does_not_reach_fastclip(build_calls):
    """Negative control: unpatched, Lightning clips with torch's own function."""
    model = fit()
    assert build_calls == []
    assert all(after <= CLIP * (1 + 1e-6) for after, _ in model.trainer.optimizers[0].after)


def test_trainer_clip_by_value_runs_fastclip(build_calls):
    with fastclip.patched():
        model = fit("value")
    assert build_calls == ["clip_grad_value_"] * STEPS
    assert all(max_abs <= CLIP for _, max_abs in model.trainer.optimizers[0].after)
    assert any(b > CLIP for b in model.before)
