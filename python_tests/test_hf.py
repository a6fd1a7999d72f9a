"""SAMTrainer (sam_kernels/integrations/hf.py): our optimizers inside transformers' Trainer, on a
tiny BERT built from a config in code (nothing downloaded), on the CPU: the Trainer's step equals
our two-pass loop over the same micro-batches (gradient accumulation, the lr scheduler, our fused
clipping), bf16 autocast, MSAM's and LookSAM's pass counts, and checkpoint / resume."""
from __future__ import annotations

import math

import pytest
import torch

transformers = pytest.importorskip("transformers")
from transformers import BertConfig, BertForSequenceClassification, TrainingArguments  # noqa: E402

from sam_kernels import MSAM, SAM, LookSAM  # noqa: E402
from sam_kernels.integrations.hf import SAMTrainer  # noqa: E402

GA, BATCH, STEPS = 2, 4, 3


def tiny_bert(seed=0):
    torch.manual_seed(seed)
    config = BertConfig(vocab_size=40, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=24, max_position_embeddings=16, num_labels=3, hidden_dropout_prob=0.0,
                        attention_probs_dropout_prob=0.0)
    return BertForSequenceClassification(config)


def dataset(n=48):
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(1, 40, (n, 8), generator=g)
    labels = torch.randint(0, 3, (n,), generator=g)
    return [{"input_ids": i, "labels": y} for i, y in zip(ids, labels)]


def arguments(tmp_path, **kw):
    base = dict(output_dir=str(tmp_path), per_device_train_batch_size=BATCH, gradient_accumulation_steps=GA,
                max_steps=STEPS, learning_rate=0.1, optim="sgd", weight_decay=0.01, max_grad_norm=1.0,
                lr_scheduler_type="linear", warmup_steps=0, report_to=[], use_cpu=True, seed=0, save_strategy="no",
                disable_tqdm=True, logging_steps=1, dataloader_num_workers=0)
    return TrainingArguments(**{**base, **kw})


def recording(model):
    """The input_ids of every training forward, in order."""
    seen = []

    def hook(module, args, kwargs):
        if module.training:
            seen.append(kwargs["input_ids"].clone())
    model.register_forward_pre_hook(hook, with_kwargs=True)
    return seen


def test_the_trainer_step_is_our_two_pass_step(tmp_path):
    model = tiny_bert()
    seen = recording(model)
    trainer = SAMTrainer(model=model, args=arguments(tmp_path), train_dataset=dataset(), sam_class=SAM,
                         sam_kwargs=dict(rho=0.05, backend="cpu"))
    trainer.train()
    assert isinstance(trainer.optimizer.optimizer, SAM)  # (inside Accelerate's wrapper)
    assert len(seen) == STEPS * GA * 2  # every micro-batch twice: the first pass and the perturbed one

    # the reference: our two-pass API over the micro-batches the Trainer saw, each loss scaled as the
    # Trainer scales it (/ GA, unless the model takes num_items_in_batch: BERT's signature has **kwargs)
    scale = 1.0 if trainer.model_accepts_loss_kwargs else 1.0 / GA
    ref = tiny_bert()
    decay = set(trainer.get_decay_parameter_names(ref))
    named = list(ref.named_parameters())
    groups = [{"params": [p for n, p in named if n in decay], "weight_decay": 0.01},
              {"params": [p for n, p in named if n not in decay], "weight_decay": 0.0}]
    opt = SAM(groups, torch.optim.SGD, rho=0.05, lr=0.1, max_grad_norm=1.0, backend="cpu")
    sched = transformers.get_linear_schedule_with_warmup(opt, 0, STEPS)
    labels = {tuple(d["input_ids"].tolist()): d["labels"] for d in dataset()}
    ref.train()
    for step in range(STEPS):
        window = seen[step * 2 * GA: step * 2 * GA + GA]
        batches = [(ids, torch.stack([labels[tuple(r.tolist())] for r in ids])) for ids in window]
        for ids, y in batches:
            (ref(input_ids=ids, labels=y).loss * scale).backward()
        opt.first_step(zero_grad=True)
        for ids, y in batches:
            (ref(input_ids=ids, labels=y).loss * scale).backward()
        opt.second_step(zero_grad=True)
        sched.step()
    for (n, p), q in zip(model.named_parameters(), ref.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6, msg=n)


@pytest.mark.parametrize("cls, kw, passes", [
    (MSAM, dict(rho=0.3), lambda steps: steps),  # one gradient per step
    (LookSAM, dict(rho=0.05, k=2), lambda steps: steps + math.ceil(steps / 2)),  # T + ceil(T / k)
])
def test_one_gradient_steps_in_the_trainer(tmp_path, cls, kw, passes):
    model = tiny_bert()
    seen = recording(model)
    args = arguments(tmp_path, max_steps=4, optim="adamw_torch", learning_rate=1e-3)
    trainer = SAMTrainer(model=model, args=args, train_dataset=dataset(), sam_class=cls, sam_kwargs=kw)
    before = [p.detach().clone() for p in model.parameters()]
    trainer.train()
    assert len(seen) == GA * passes(4)
    assert isinstance(trainer.optimizer.optimizer, cls) and trainer.optimizer.optimizer.steps == 4
    assert isinstance(trainer.optimizer.optimizer.base_optimizer, torch.optim.AdamW)
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_bf16_autocast_through_accelerate(tmp_path):
    model = tiny_bert()
    trainer = SAMTrainer(model=model, args=arguments(tmp_path, bf16=True, max_steps=6), train_dataset=dataset(),
                         sam_kwargs=dict(rho=0.05))
    result = trainer.train()
    assert math.isfinite(result.training_loss)
    assert all(p.dtype == torch.float32 and torch.isfinite(p).all() for p in model.parameters())  # fp32 master weights
    assert trainer.optimizer.optimizer.steps == 6 and trainer.optimizer.optimizer.skipped_steps == 0


def test_checkpoint_and_resume_through_the_trainer(tmp_path):
    """Saved at step 2 of 4 by the Trainer (our state_dict: the base state and ours), resumed by a
    new Trainer: the weights of the run without a break."""
    whole = tiny_bert()
    SAMTrainer(model=whole, args=arguments(tmp_path / "a", max_steps=4), train_dataset=dataset(),
               sam_kwargs=dict(rho=0.05, backend="cpu")).train()
    first = tiny_bert()
    SAMTrainer(model=first, args=arguments(tmp_path / "b", max_steps=4, save_strategy="steps", save_steps=2),
               train_dataset=dataset(), sam_kwargs=dict(rho=0.05, backend="cpu")).train()
    resumed = tiny_bert(seed=7)  # other initial weights: the checkpoint's replace them
    trainer = SAMTrainer(model=resumed, args=arguments(tmp_path / "b", max_steps=4), train_dataset=dataset(),
                         sam_kwargs=dict(rho=0.05, backend="cpu"))
    trainer.train(resume_from_checkpoint=str(tmp_path / "b" / "checkpoint-2"))
    assert trainer.optimizer.optimizer.steps == 4  # 2 loaded with the checkpoint, 2 taken
    for (n, p), q in zip(resumed.named_parameters(), whole.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7, msg=n)


def test_fp16_is_refused_by_name(tmp_path):
    with pytest.raises(ValueError, match="fp16"):
        SAMTrainer(model=tiny_bert(), args=arguments(tmp_path, fp16=True), train_dataset=dataset())
