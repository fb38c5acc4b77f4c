"""A small model for the torch tests: a pre-norm transformer block (projections, causal
self-attention by attnc or by SDPA, an MLP) on a synthetic next-token task."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

import attnc.torch

CAUSAL = """
kernel attend(q: f32[h, n, d], k: f32[h, n, d], v: f32[h, n, d]) -> f32[h, n, d] {
    return softmax(mask(q @ k.T / sqrt(d), causal)) @ v;
}
"""
VOCAB = 16


class Block(nn.Module):
    """Pre-norm transformer block: causal self-attention (attnc or SDPA) and an MLP."""

    def __init__(self, dim=32, heads=4, use_attnc=True):
        super().__init__()
        self.heads = heads
        self.norm1 = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))
        self.use_attnc = use_attnc
        self.attend = attnc.torch.kernel(CAUSAL, threads=2)

    def forward(self, x):
        b, n, dim = x.shape
        h, dh = self.heads, dim // self.heads

        def heads(t):  # [b, n, dim] -> [b * h, n, dh]
            return t.reshape(b, n, h, dh).transpose(1, 2).reshape(b * h, n, dh)

        q, k, v = (heads(t) for t in self.qkv(self.norm1(x)).split(dim, dim=-1))
        if self.use_attnc:
            a = self.attend(q, k, v)
        else:
            a = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        a = a.reshape(b, h, n, dh).transpose(1, 2).reshape(b, n, dim)
        x = x + self.proj(a)
        return x + self.mlp(self.norm2(x))


class Model(nn.Module):
    """Token embedding, one block, a head over the vocabulary."""

    def __init__(self, vocab=VOCAB, dim=32, use_attnc=True):
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.pos = nn.Parameter(torch.zeros(64, dim))
        self.block = Block(dim, use_attnc=use_attnc)
        self.head = nn.Linear(dim, vocab)

    def forward(self, tokens):
        x = self.embed(tokens) + self.pos[: tokens.shape[1]]
        return self.head(self.block(x))


def twin_models(seed=0):
    """The attnc model and the SDPA model with the same parameters."""
    torch.manual_seed(seed)
    ours = Model(use_attnc=True)
    theirs = Model(use_attnc=False)
    theirs.load_state_dict(ours.state_dict())
    return ours, theirs


def synthetic_batch(step, batch=8, n=24, vocab=VOCAB):
    """Sequences whose next token is the token three places back plus one (mod vocab): causal
    attention to a fixed offset solves it."""
    generator = torch.Generator().manual_seed(1000 + step)
    seed = torch.randint(0, vocab, (batch, 3), generator=generator)
    tokens = [seed[:, i] for i in range(3)]
    for i in range(3, n + 1):
        tokens.append((tokens[i - 3] + 1) % vocab)
    sequence = torch.stack(tokens, dim=1)
    return sequence[:, :-1], sequence[:, 1:]


def train(model, steps, lr=1e-2):
    """Adam on the synthetic task; the last step's loss."""
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    loss = None
    for step in range(steps):
        tokens, targets = synthetic_batch(step)
        loss = F.cross_entropy(model(tokens).reshape(-1, VOCAB), targets.reshape(-1))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return loss.item()
