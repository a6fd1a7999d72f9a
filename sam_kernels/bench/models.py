"""Models for the whole-training-step benchmarks, built in code on synthetic data (no download):
CIFAR ResNets (He et al. 2016: 6n + 2 layers, 16/32/64 channels, BatchNorm) and a ViT."""
from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F


class _Block(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = (nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
                         if stride != 1 or cin != cout else nn.Identity())

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class CifarResNet(nn.Module):
    """ResNet-(6n+2) for 32x32 images: ResNet-20 (n = 3, 0.27M parameters), ResNet-56 (n = 9, 0.85M)."""

    def __init__(self, depth: int = 20, classes: int = 10):
        super().__init__()
        if (depth - 2) % 6:
            raise ValueError(f"depth must be 6n + 2, got {depth}")
        n = (depth - 2) // 6
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, 1, 1, bias=False), nn.BatchNorm2d(16), nn.ReLU())
        blocks, cin = [], 16
        for cout, stride in ((16, 1), (32, 2), (64, 2)):
            for i in range(n):
                blocks.append(_Block(cin, cout, stride if i == 0 else 1))
                cin = cout
        self.blocks = nn.Sequential(*blocks)
        self.head = nn.Linear(64, classes)

    def forward(self, x):
        return self.head(F.adaptive_avg_pool2d(self.blocks(self.stem(x)), 1).flatten(1))


class ViT(nn.Module):
    """A pre-norm ViT on 32x32 images with 4x4 patches (64 tokens); dim 384, depth 12 is ViT-S-sized
    (21M parameters)."""

    def __init__(self, dim: int = 384, depth: int = 12, heads: int = 6, classes: int = 10, patch: int = 4):
        super().__init__()
        self.patch = nn.Conv2d(3, dim, patch, patch)
        self.pos = nn.Parameter(torch.zeros(1, (32 // patch) ** 2, dim))
        layer = nn.TransformerEncoderLayer(dim, heads, 4 * dim, dropout=0.0, activation="gelu", batch_first=True,
                                           norm_first=True)
        self.encoder = nn.TransformerEncoder(layer, depth, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, classes)

    def forward(self, x):
        tokens = self.patch(x).flatten(2).transpose(1, 2) + self.pos
        return self.head(self.norm(self.encoder(tokens)).mean(1))


class MixerBlock(nn.Module):
    def __init__(self, tokens: int, dim: int, token_mlp: int, channel_mlp: int):
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.token = nn.Sequential(nn.Linear(tokens, token_mlp), nn.GELU(), nn.Linear(token_mlp, tokens))
        self.channel = nn.Sequential(nn.Linear(dim, channel_mlp), nn.GELU(), nn.Linear(channel_mlp, dim))

    def forward(self, x):
        x = x + self.token(self.norm1(x).transpose(1, 2)).transpose(1, 2)
        return x + self.channel(self.norm2(x))


class MLPMixer(nn.Module):
    """MLP-Mixer on 32x32 images with 4x4 patches (64 tokens); dim 768, depth 12 is Mixer-B-sized."""

    def __init__(self, dim: int = 768, depth: int = 12, classes: int = 10, patch: int = 4):
        super().__init__()
        tokens = (32 // patch) ** 2
        self.patch = nn.Conv2d(3, dim, patch, patch)
        self.blocks = nn.Sequential(*[MixerBlock(tokens, dim, dim // 2, 4 * dim) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, classes)

    def forward(self, x):
        return self.head(self.norm(self.blocks(self.patch(x).flatten(2).transpose(1, 2))).mean(1))


MODELS = {
    "resnet20": lambda: CifarResNet(20),
    "resnet56": lambda: CifarResNet(56),
    "vit_s": lambda: ViT(384, 12, 6),
    "vit_b": lambda: ViT(768, 12, 12),
    "mixer_b": lambda: MLPMixer(768, 12),
    "mixer_tiny": lambda: MLPMixer(64, 2),
    "vit_tiny": lambda: ViT(96, 2, 3),  # for smoke tests
}
SIZES = {"resnet20": "small", "resnet56": "small", "vit_s": "large", "vit_b": "large", "mixer_b": "large",
         "vit_tiny": "small", "mixer_tiny": "small"}


def synthetic_batches(n: int, batch: int, device, seed: int = 0, classes: int = 10):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(batch, 3, 32, 32, generator=g).to(device), torch.randint(0, classes, (batch,), generator=g)
             .to(device)) for _ in range(n)]


def cross_entropy(model, batch):
    x, y = batch
    return F.cross_entropy(model(x), y)
