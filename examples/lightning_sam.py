"""SAM in PyTorch Lightning, with automatic optimization (the LightningModule returns its loss
from training_step; Lightning calls SAM.step(closure), which evaluates the closure twice: at x_t
for the first gradient and at the perturbed point) or with manual optimization.

    python examples/lightning_sam.py --steps 100 [--manual] [--precision bf16-mixed]
"""
import argparse

import lightning as L
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from sam_kernels import SAM


def dataset(n: int = 2048, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 32, generator=g)
    y = (x[:, :4].sum(1) > 0).long() + 2 * (x[:, 4:8].sum(1) > 0).long()
    return TensorDataset(x, y)


def make_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(32, 128), nn.ReLU(), nn.Linear(128, 4))


class LitSAMAutomatic(L.LightningModule):
    """Nothing SAM-specific but the optimizer: step(closure) follows torch's closure convention."""

    def __init__(self, rho: float = 0.05, lr: float = 0.1):
        super().__init__()
        self.model = make_model()
        self.rho, self.lr = rho, lr
        self.loss_fn = nn.CrossEntropyLoss()

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = self.loss_fn(self.model(x), y)
        self.log("train_loss", loss.detach(), prog_bar=True)
        return loss

    def configure_optimizers(self):
        return SAM(self.parameters(), torch.optim.SGD, rho=self.rho, lr=self.lr, momentum=0.9)


class LitSAM(L.LightningModule):
    def __init__(self, rho: float = 0.05, lr: float = 0.1):
        super().__init__()
        self.automatic_optimization = False
        self.model = make_model()
        self.rho, self.lr = rho, lr
        self.loss_fn = nn.CrossEntropyLoss()

    def training_step(self, batch, batch_idx):
        x, y = batch
        opt = self.optimizers()  # Lightning's wrapper around our SAM
        loss = self.loss_fn(self.model(x), y)
        self.manual_backward(loss)  # the first gradient, at x_t

        def closure():  # the second, at the perturbed point
            perturbed_loss = self.loss_fn(self.model(x), y)
            self.manual_backward(perturbed_loss)
            return perturbed_loss

        # SAM.step(closure): perturb, closure(), restore + update. Stepping through the wrapper
        # (not opt.optimizer.first_step / second_step) is what makes the trainer count the step.
        opt.step(closure=closure)
        opt.zero_grad()
        self.log("train_loss", loss.detach(), prog_bar=True)
        return loss

    def configure_optimizers(self):
        return SAM(self.parameters(), torch.optim.SGD, rho=self.rho, lr=self.lr, momentum=0.9)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--manual", action="store_true", help="manual optimization (default: automatic)")
    ap.add_argument("--precision", default="32-true", help="Lightning's precision: 32-true or bf16-mixed")
    args = ap.parse_args(argv)
    module = LitSAM() if args.manual else LitSAMAutomatic()
    trainer = L.Trainer(max_steps=args.steps, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                        enable_model_summary=False, enable_progress_bar=False, precision=args.precision)
    trainer.fit(module, DataLoader(dataset(), batch_size=args.batch, shuffle=False))
    return module


if __name__ == "__main__":
    main()
