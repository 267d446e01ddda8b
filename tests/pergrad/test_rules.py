"""Every closed-form rule against the per-example reference loop, for every strategy."""

from __future__ import annotations

import pytest
import torch
from torch import nn


def test_mlp(check):
    model = nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 4), nn.ReLU(), nn.Linear(4, 3))
    check(model, torch.randn(7, 6), torch.randint(0, 3, (7,)))


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("lead", [(), (3,), (2, 3)], ids=["2d", "seq", "2lead"])
def test_linear_leading_dims(check, lead, bias):
    model = nn.Sequential(nn.Linear(4, 5, bias=bias), nn.Tanh(), nn.Linear(5, 3, bias=bias))
    b = 5
    x = torch.randn(b, *lead, 4)

    def loss(out, y):  # squared error summed over all but the batch dim
        return ((out - y) ** 2).reshape(out.shape[0], -1).sum(1)

    check(model, x, torch.randn(b, *lead, 3), loss_fn=loss)


CONV2D = [
    dict(kernel_size=3),
    dict(kernel_size=3, stride=2),
    dict(kernel_size=(3, 2), stride=(2, 1), padding=(1, 2)),
    dict(kernel_size=3, padding="same"),
    dict(kernel_size=4, padding="same", dilation=1),
    dict(kernel_size=3, padding="same", dilation=2),
    dict(kernel_size=2, padding="valid"),
    dict(kernel_size=3, dilation=2, padding=1),
    dict(kernel_size=3, groups=2),
    dict(kernel_size=3, groups=4, bias=False),
    dict(kernel_size=3, padding=1, padding_mode="reflect"),
    dict(kernel_size=3, padding=1, padding_mode="circular", stride=2),
    dict(kernel_size=1, bias=False),
]


@pytest.mark.parametrize("opts", CONV2D, ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()))
def test_conv2d(check, opts):
    model = nn.Sequential(nn.Conv2d(4, 8, **opts), nn.Tanh(), nn.Flatten(), nn.LazyLinear(3))
    x = torch.randn(4, 4, 7, 6)
    model(x)  # materialise the lazy layer
    check(model, x, torch.randint(0, 3, (4,)))


WIDE = [(nn.Conv1d, dict(kernel_size=3, padding=2, padding_mode="replicate")),
        (nn.Conv2d, dict(kernel_size=3, stride=2, padding="valid")),
        (nn.Conv2d, dict(kernel_size=4, padding="same", dilation=1, groups=2)),
        (nn.Conv2d, dict(kernel_size=3, padding=1, padding_mode="circular", bias=False)),
        (nn.Conv3d, dict(kernel_size=2, dilation=2, padding=1))]


@pytest.mark.parametrize("conv,opts", WIDE, ids=lambda o: getattr(o, "__name__", None) or str(o))
def test_conv_per_example_kernel(check, conv, opts):
    """Groups of 8-64 input channels take their per-example gradients from the convolution's
    own backward kernel (the examples folded into its groups), not from the patches."""
    nd = {nn.Conv1d: 1, nn.Conv2d: 2, nn.Conv3d: 3}[conv]
    model = nn.Sequential(conv(16, 8, **opts), nn.Tanh(), nn.Flatten(), nn.LazyLinear(3))
    x = torch.randn(4, 16, *[(7, 6, 5)[i] for i in range(nd)])
    model(x)
    check(model, x, torch.randint(0, 3, (4,)))


@pytest.mark.parametrize("opts", [dict(kernel_size=3), dict(kernel_size=4, stride=2, padding=1),
                                  dict(kernel_size=3, padding="same", dilation=2),
                                  dict(kernel_size=3, groups=2, bias=False),
                                  dict(kernel_size=3, padding=2, padding_mode="replicate")],
                         ids=str)
def test_conv1d(check, opts):
    model = nn.Sequential(nn.Conv1d(2, 4, **opts), nn.Tanh(), nn.Flatten(), nn.LazyLinear(3))
    x = torch.randn(5, 2, 9)
    model(x)
    check(model, x, torch.randint(0, 3, (5,)))


def test_small_cnn(check):
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Conv2d(4, 6, 3), nn.ReLU(),
                          nn.MaxPool2d(2), nn.Flatten(), nn.Linear(6 * 2 * 2, 5), nn.ReLU(),
                          nn.Linear(5, 3))
    check(model, torch.randn(6, 1, 8, 8), torch.randint(0, 3, (6,)))


class TinyTransformer(nn.Module):
    """Embedding (+positions) -> one pre-LN self-attention block + MLP -> mean pool -> head."""

    def __init__(self, vocab=11, d=8, t=5, classes=3, padding_idx=0, tied=False):
        super().__init__()
        self.emb = nn.Embedding(vocab, d, padding_idx=padding_idx)
        self.pos = nn.Embedding(t, d)
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.q, self.k, self.v, self.o = (nn.Linear(d, d) for _ in range(4))
        self.mlp = nn.Sequential(nn.Linear(d, 2 * d), nn.GELU(), nn.Linear(2 * d, d))
        self.tied = tied
        self.head = nn.Linear(d, vocab if tied else classes, bias=False)
        if tied:
            self.head.weight = self.emb.weight

    def forward(self, ids):
        h = self.emb(ids) + self.pos(torch.arange(ids.shape[1]))[None]
        z = self.ln1(h)
        att = (self.q(z) @ self.k(z).transpose(1, 2) / z.shape[-1] ** 0.5).softmax(-1)
        h = h + self.o(att @ self.v(z))
        h = h + self.mlp(self.ln2(h))
        return self.head(h) if self.tied else self.head(h.mean(1))


def test_transformer_block(check):
    ids = torch.randint(0, 11, (4, 5))
    ids[0, 1] = 0  # padding token: no gradient to row 0 of the embedding
    check(TinyTransformer(), ids, torch.randint(0, 3, (4,)))


def test_embedding_tied_to_lm_head(check):
    """A weight shared by nn.Embedding and the output nn.Linear: cross terms included."""
    model = TinyTransformer(tied=True, padding_idx=None)
    ids = torch.randint(0, 11, (3, 5))
    check(model, ids, torch.randint(0, 11, (3, 5)))


def test_linear_called_twice(check):
    class Twice(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(4, 4), nn.Linear(4, 2)

        def forward(self, x):
            return self.b(torch.tanh(self.a(torch.tanh(self.a(x)))))

    check(Twice(), torch.randn(5, 4), torch.randint(0, 2, (5,)))


def test_groupnorm_layernorm(check):
    model = nn.Sequential(nn.Conv2d(2, 6, 3), nn.GroupNorm(3, 6), nn.Tanh(), nn.Flatten(),
                          nn.LayerNorm(6 * 3 * 3), nn.Linear(54, 3))
    check(model, torch.randn(5, 2, 5, 5), torch.randint(0, 3, (5,)))


def test_layernorm_multi_dim_shape(check):
    model = nn.Sequential(nn.LayerNorm((3, 4)), nn.Flatten(), nn.Linear(12, 2))
    check(model, torch.randn(4, 3, 4), torch.randint(0, 2, (4,)))


def test_batchnorm_eval(check):
    model = nn.Sequential(nn.Conv2d(2, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(),
                          nn.Linear(36, 5), nn.BatchNorm1d(5), nn.Linear(5, 2))
    model.train()
    for _ in range(3):  # non-trivial running statistics
        model(torch.randn(8, 2, 5, 5))
    model.eval()
    check(model, torch.randn(4, 2, 5, 5), torch.randint(0, 2, (4,)))
