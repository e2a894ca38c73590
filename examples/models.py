"""The example models and their data, shared by the Horovod training scripts, the simulator
example and the convergence study (no Horovod here).  All data ships with Python or
scikit-learn: nothing is downloaded."""
from __future__ import annotations

import sysconfig
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F


class DigitsNet(nn.Module):
    """Two 3x3 conv layers and two linear layers: ~30k parameters, trains in seconds on a CPU."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 16, 3, padding=1)
        self.conv2 = nn.Conv2d(16, 32, 3, padding=1)
        self.fc1 = nn.Linear(32 * 4 * 4, 64)
        self.fc2 = nn.Linear(64, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.conv1(x))
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        x = F.relu(self.fc1(x.flatten(1)))
        return self.fc2(x)


def load_digits_split(seed: int):
    """scikit-learn's 1,797 8x8 digits, shuffled by ``seed``: ((x_train, y_train), (x_test,
    y_test)) with the first fifth of the shuffle held out."""
    from sklearn.datasets import load_digits
    digits = load_digits()
    x = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(digits.target, dtype=torch.long)
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    n_test = len(y) // 5
    return (x[order[n_test:]], y[order[n_test:]]), (x[order[:n_test]], y[order[:n_test]])


def evaluate_digits(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[float, float]:
    """(cross-entropy, accuracy in [0, 1]) of ``model`` on (x, y)."""
    model.eval()
    with torch.no_grad():
        logits = model(x)
        loss = F.cross_entropy(logits, y).item()
        acc = (logits.argmax(1) == y).float().mean().item()
    model.train()
    return loss, acc


class CharGRU(nn.Module):
    """A one-layer GRU character model: embedding, GRU, linear head."""

    def __init__(self, vocab: int, embed: int = 64, hidden: int = 128) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, embed)
        self.gru = nn.GRU(embed, hidden, batch_first=True)
        self.head = nn.Linear(hidden, vocab)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, _ = self.gru(self.embed(x))
        return self.head(out)


class TinyTransformer(nn.Module):
    """A causal Transformer LM: learned positions, ``layers`` pre-norm blocks of width ``d``."""

    def __init__(self, vocab: int, seq: int, d: int = 128, heads: int = 4, layers: int = 2) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, d)
        self.pos = nn.Parameter(torch.zeros(seq, d))
        block = nn.TransformerEncoderLayer(d, heads, 2 * d, dropout=0.0, batch_first=True, norm_first=True)
        self.blocks = nn.TransformerEncoder(block, layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(d)
        self.head = nn.Linear(d, vocab)
        self.register_buffer("mask", nn.Transformer.generate_square_subsequent_mask(seq), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n = x.shape[1]
        h = self.embed(x) + self.pos[:n]
        return self.head(self.norm(self.blocks(h, mask=self.mask[:n, :n], is_causal=True)))


def pydoc_text() -> str:
    """The Python documentation topics in ``pydoc_data.topics`` (about 465k characters), in
    sorted order."""
    from pydoc_data.topics import topics
    return "".join(topics[k] for k in sorted(topics))


def stdlib_text(limit: int) -> str:
    """The standard library's top-level modules' source, in sorted order, up to ``limit``
    characters."""
    root = Path(sysconfig.get_paths()["stdlib"])
    parts, total = [], 0
    for path in sorted(root.glob("*.py")):
        src = path.read_text(encoding="utf-8", errors="replace")
        parts.append(src)
        total += len(src)
        if total >= limit:
            break
    return "".join(parts)[:limit]
