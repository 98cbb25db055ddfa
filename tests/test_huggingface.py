"""Accelerate's ``accelerator.clip_grad_norm_`` and the Transformers ``Trainer``'s ``max_grad_norm``
clip through fastclip under ``fastclip.patched()``: both end in ``torch.nn.utils.clip_grad_norm_``,
looked up at call time. Real objects, on the CPU, with a tiny model built from a config (no
download)."""

from __future__ import annotations

import warnings

import pytest
import torch

import fastclip
from reference import exact_norm

accelerate = pytest.importorskip("accelerate")

CLIP = 0.5
STEPS = 3
# What fastclip records when it did every step's clip. Accelerate before 1.16 calls
# torch.nn.utils.clip_grad_norm_; from 1.16 it splits the clip into get_total_norm +
# clip_grads_with_norm_ (to group DTensor grads by mesh), both looked up in torch.nn.utils at call
# time, so both are patched. (The Trainer clips through Accelerate.)
FASTCLIP_CLIPPED_EVERY_STEP = (["clip_grad_norm_"] * STEPS,
                               ["get_total_norm", "clip_grads_with_norm_"] * STEPS)


def grad_norm(params) -> float:
    return exact_norm([p.grad for p in params if p.grad is not None], 2.0)


@pytest.fixture
def fresh_accelerate_state():
    from accelerate.state import AcceleratorState, GradientState

    yield
    AcceleratorState._reset_state(True)
    GradientState._reset_state()


def _accelerate_run():
    """STEPS steps of a plain Accelerate loop: (exact norm before, after) each clip."""
    accelerator = accelerate.Accelerator(cpu=True)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.Tanh(), torch.nn.Linear(32, 4))
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    gen = torch.Generator().manual_seed(0)
    data = torch.utils.data.TensorDataset(torch.randn(STEPS * 8, 16, generator=gen),
                                          10 * torch.randn(STEPS * 8, 4, generator=gen))
    loader = torch.utils.data.DataLoader(data, batch_size=8)
    model, opt, loader = accelerator.prepare(model, opt, loader)
    norms = []
    for x, y in loader:
        opt.zero_grad()
        accelerator.backward(torch.nn.functional.mse_loss(model(x), y))
        before = grad_norm(model.parameters())
        returned = accelerator.clip_grad_norm_(model.parameters(), CLIP)
        norms.append((before, float(returned), grad_norm(model.parameters())))
        opt.step()
    return norms


def test_accelerator_clip_grad_norm_runs_fastclip(build_calls, fresh_accelerate_state):
    with fastclip.patched():
        norms = _accelerate_run()
    assert build_calls in FASTCLIP_CLIPPED_EVERY_STEP, build_calls
    for before, returned, after in norms:
        assert before > 4 * CLIP  # something to clip
        assert returned == pytest.approx(before, rel=1e-6)
        assert after == pytest.approx(CLIP * before / (before + 1e-6), rel=1e-6)


def test_accelerator_without_patch_does_not_reach_fastclip(build_calls, fresh_accelerate_state):
    """Negative control: unpatched, Accelerate clips with torch's own function."""
    norms = _accelerate_run()
    assert build_calls == []
    assert all(after <= CLIP * (1 + 1e-6) for _, _, after in norms)


def _trainer_run(tmp_path):
    transformers = pytest.importorskip("transformers")

    class RecordAfterClip(transformers.TrainerCallback):
        """The Trainer calls on_pre_optimizer_step after clipping, before the step."""

        def __init__(self):
            self.after = []

        def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
            self.after.append(grad_norm(model.parameters()))

    torch.manual_seed(0)
    config = transformers.GPT2Config(vocab_size=64, n_positions=16, n_embd=16, n_layer=1, n_head=2)
    model = transformers.GPT2LMHeadModel(config)
    gen = torch.Generator().manual_seed(0)
    data = [{"input_ids": ids, "labels": ids}
            for ids in torch.randint(0, 64, (STEPS * 4, 16), generator=gen)]
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path), max_steps=STEPS, per_device_train_batch_size=4,
        learning_rate=1e-3, max_grad_norm=CLIP, report_to="none", save_strategy="no",
        logging_strategy="no", use_cpu=True, disable_tqdm=True, dataloader_num_workers=0)
    recorder = RecordAfterClip()
    trainer = transformers.Trainer(model=model, args=args, train_dataset=data, callbacks=[recorder])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.train()
    return recorder.after


def test_transformers_trainer_max_grad_norm_runs_fastclip(build_calls, tmp_path,
                                                          fresh_accelerate_state):
    with fastclip.patched():
        after = _trainer_run(tmp_path)
    assert build_calls in FASTCLIP_CLIPPED_EVERY_STEP, build_calls
    assert len(after) == STEPS
    assert all(a <= CLIP * (1 + 1e-6) for a in after)
    assert all(a == pytest.approx(CLIP, rel=1e-4) for a in after)  # each step was clipped


def test_transformers_trainer_without_patch_does_not_reach_fastclip(build_calls, tmp_path,
                                                                    fresh_accelerate_state):
    _trainer_run(tmp_path)
    assert build_calls == []
