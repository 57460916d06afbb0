"""AdaHessian in Hugging Face Trainer: tiny BERT built from a config (no downloads)."""

import pytest
import torch

transformers = pytest.importorskip("transformers")

from meanwise.integrations.transformers import AdaHessianTrainer  # noqa: E402
from meanwise.optim import AdaHessian  # noqa: E402


def _model(attention="eager"):
    torch.manual_seed(0)
    config = transformers.BertConfig(
        vocab_size=40,
        hidden_size=16,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=16,
        num_labels=2,
    )
    config._attn_implementation = attention
    return transformers.BertForSequenceClassification(config)


def _dataset(n=64):
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(1, 40, (n, 8), generator=g)
    labels = (ids[:, 0] >= 20).long()  # learnable: the first token decides
    return [
        {"input_ids": i, "attention_mask": torch.ones(8, dtype=torch.long), "labels": y}
        for i, y in zip(ids, labels, strict=True)
    ]


def _args(tmp_path, max_steps, **extra):
    options = dict(
        output_dir=str(tmp_path),
        max_steps=max_steps,
        per_device_train_batch_size=8,
        report_to=[],
        use_cpu=True,
        max_grad_norm=0.0,
        seed=0,
        logging_steps=1,
        save_strategy="no",
        lr_scheduler_type="constant",
        disable_tqdm=True,
    )
    return transformers.TrainingArguments(**{**options, **extra})


def _trainer(tmp_path, max_steps, model=None, cls=AdaHessianTrainer, **extra):
    model = model or _model()
    opt = AdaHessian(
        model.parameters(), lr=0.15, update_each=2, generator=torch.Generator().manual_seed(3)
    )
    return cls(
        model=model,
        args=_args(tmp_path, max_steps, **extra),
        train_dataset=_dataset(),
        optimizers=(opt, None),
    )


def _losses(trainer):
    return [e["loss"] for e in trainer.state.log_history if "loss" in e]


def test_adahessian_trains_in_trainer(tmp_path):
    trainer = _trainer(tmp_path, 24)
    trainer.train()
    losses = _losses(trainer)
    assert len(losses) == 24
    assert sum(losses[-4:]) < 0.9 * sum(losses[:4])
    assert trainer.optimizer.optimizer.steps_taken == 24  # accelerate wraps the optimizer


def test_plain_trainer_gives_the_reason(tmp_path):
    trainer = _trainer(tmp_path, 2, cls=transformers.Trainer)
    with pytest.raises(ValueError, match="create_graph=True"):
        trainer.train()


def test_resume_is_exact(tmp_path):
    straight = _trainer(tmp_path / "a", 6)
    straight.train()
    first = _trainer(tmp_path / "b", 6, save_strategy="steps", save_steps=3)
    first.train()
    resumed = _trainer(tmp_path / "b", 6, save_strategy="steps", save_steps=3)
    resumed.train(resume_from_checkpoint=str(tmp_path / "b" / "checkpoint-3"))
    for a, b in zip(straight.model.parameters(), resumed.model.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    assert _losses(straight)[3:] == pytest.approx(_losses(resumed)[-3:], rel=1e-5)


def test_missing_double_backward_is_explained():
    """The CPU flash kernel of scaled_dot_product_attention has no double backward."""
    q = torch.nn.Parameter(torch.randn(2, 2, 8, 8))
    opt = AdaHessian([q])
    torch.nn.functional.scaled_dot_product_attention(q, q, q).sum().backward(create_graph=True)
    with pytest.raises(RuntimeError, match="attn_implementation='eager'"):
        opt.step()
