"""torch.nn building blocks in every layout, against the per-loss reference in float64."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

import graddyn
from graddyn.pergrad import CaptureError

B, D = 4, 6


def ce(logits, y):
    return F.cross_entropy(logits, y, reduction="none")


def seq_loss(out, y, batch_first):
    """(B, T, F) or (T, B, F) -> (B,) cross entropy of the time-mean."""
    h = out if batch_first else out.transpose(0, 1)
    return ce(h.mean(1)[:, :3], y)


def inputs(t, batch_first, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, t, D, generator=g)
    return (x if batch_first else x.transpose(0, 1).contiguous()), torch.randint(0, 3, (B,),
                                                                               generator=g)


LAYOUTS = [pytest.param(bf, t, id=f"{'batch' if bf else 'seq'}_first-T{t}")
           for bf in (True, False) for t in (B, 5)]  # T == B is the case that fooled dim 0


@pytest.mark.parametrize("bf, t", LAYOUTS)
@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
def test_transformer_encoder_layer(exact, bf, t, train):
    layer = nn.TransformerEncoderLayer(D, 2, 8, dropout=0.2, batch_first=bf).train(train)
    x, y = inputs(t, bf)
    mask = nn.Transformer.generate_square_subsequent_mask(t)
    exact(layer, lambda m: seq_loss(m(x, src_mask=mask), y, bf), exact_path=set(),
          strategies=("auto", "ghost", "materialize"))


@pytest.mark.parametrize("bf, t", LAYOUTS[:2])
def test_transformer_decoder_layer_train(exact, bf, t):
    layer = nn.TransformerDecoderLayer(D, 2, 8, dropout=0.2, batch_first=bf).train()
    x, y = inputs(t, bf)
    mem, _ = inputs(3, bf, seed=2)
    exact(layer, lambda m: seq_loss(m(x, mem), y, bf), exact_path=set())


@pytest.mark.parametrize("bf, t", LAYOUTS)
@pytest.mark.parametrize("kind", ["self", "cross", "kvdim", "bias_kv"])
def test_multihead_attention(exact, bf, t, kind):
    kw = dict(kdim=4, vdim=5) if kind == "kvdim" else dict(add_bias_kv=kind == "bias_kv")
    mha = nn.MultiheadAttention(D, 2, dropout=0.2, batch_first=bf, **kw).train()
    x, y = inputs(t, bf)
    g = torch.Generator().manual_seed(3)
    mem = torch.randn(*((B, 3) if bf else (3, B)), D, generator=g)
    if kind == "kvdim":
        k, v = torch.randn(*mem.shape[:2], 4, generator=g), torch.randn(*mem.shape[:2], 5,
                                                                         generator=g)
    else:
        k = v = x if kind in ("self", "bias_kv") else mem
    pad = torch.zeros(B, k.shape[1 if bf else 0], dtype=torch.bool)
    pad[0, -1] = True  # a padded key in the first example
    slow = {"bias_k", "bias_v"} if kind == "bias_kv" else set()
    exact(mha, lambda m: seq_loss(m(x, k, v, key_padding_mask=pad, need_weights=kind == "self")[0],
                                  y, bf), exact_path=slow)


@pytest.mark.parametrize("cell", [nn.LSTM, nn.GRU, nn.RNN])
@pytest.mark.parametrize("bf", [True, False], ids=["batch_first", "seq_first"])
@pytest.mark.parametrize("layers, bi, train", [(1, False, True), (2, True, False),
                                               (2, True, True)],
                         ids=["1layer", "2layer-bi", "2layer-bi-dropout"])
def test_recurrent(exact, cell, bf, layers, bi, train):
    """The recurrent rule (gates rebuilt from the recorded states, a hand-written backward
    through time); with inter-layer dropout in train mode (masks drawn inside the fused
    kernel) the exact path."""
    rnn = cell(D, 5, num_layers=layers, bidirectional=bi, batch_first=bf,
               dropout=0.3 if layers > 1 else 0.0).train(train)
    x, y = inputs(B, bf)  # T == B
    h0 = torch.randn(layers * (2 if bi else 1), B, 5, generator=torch.Generator().manual_seed(4))

    def loss(m):
        out, h = m(x, (h0, h0) if cell is nn.LSTM else h0)
        c = h[1] if isinstance(h, tuple) else h * 0
        h = h[0] if isinstance(h, tuple) else h
        # the sequence, the last hidden state and (LSTM) the first layer's last cell
        return seq_loss(out, y, bf) + h[-1].sum(1) + c[0].square().sum(1)

    slow = None if (layers > 1 and train) else set()  # None: some or all via the exact path
    exact(rnn, loss, exact_path=slow, strategies=("auto", "ghost", "materialize"))


@pytest.mark.parametrize("bf", [True, False], ids=["batch_first", "seq_first"])
def test_relu_rnn(exact, bf):
    rnn = nn.RNN(D, 5, num_layers=2, nonlinearity="relu", bidirectional=True, batch_first=bf)
    x, y = inputs(B, bf)
    exact(rnn, lambda m: seq_loss(m(x)[0], y, bf), exact_path=set())


def test_lstm_projection_and_out_only(exact):
    rnn = nn.LSTM(D, 5, proj_size=3, num_layers=2)
    x, y = inputs(5, False)
    exact(rnn, lambda m: seq_loss(m(x)[0], y, False), exact_path=set())


@pytest.mark.parametrize("bf", [True, False], ids=["batch_first", "seq_first"])
def test_lstm_bidirectional_projection_with_states(exact, bf):
    rnn = nn.LSTM(D, 5, proj_size=3, num_layers=2, bidirectional=True, batch_first=bf)
    x, y = inputs(5, bf)
    g = torch.Generator().manual_seed(5)
    h0, c0 = torch.randn(4, B, 3, generator=g), torch.randn(4, B, 5, generator=g)

    def loss(m):
        out, (h, c) = m(x, (h0, c0))
        return seq_loss(out, y, bf) + h[1].sum(1) + c[2].square().sum(1)

    exact(rnn, loss, exact_path=set())


@pytest.mark.parametrize("cell, bf", [(nn.LSTM, False), (nn.GRU, True)])
def test_recurrent_output_modified_in_place(exact, cell, bf):
    """The rule reads the recorded output as the states of the top layer; modified in place
    after the call, it is recomputed instead."""
    rnn = cell(D, 5, num_layers=2, batch_first=bf)
    x, y = inputs(5, bf)

    def loss(m):
        out = m(x)[0]
        out.mul_(2.0)
        return seq_loss(out, y, bf)

    exact(rnn, loss, exact_path=set())


def test_view_output_modified_in_place_is_refused():
    """A batch-first LSTM's ``out`` is a transposed view: modified in place, autograd routes
    its gradient around the edge recorded at the call, which would read zeros."""
    rnn = nn.LSTM(D, 5, batch_first=True)
    x, y = inputs(5, True)
    with graddyn.capture(rnn) as cap:
        out = rnn(x)[0]
        out.mul_(2.0)
        losses = seq_loss(out, y, True)
    with pytest.raises(CaptureError, match=r"LSTM.*view.*modified in place.*Fix: use "
                                           r"out-of-place"):
        cap.backward(losses)


def test_view_output_of_a_module_without_rule_modified_in_place(exact):
    """The model's own output is a view (Unflatten) changed in place by the loss code: no rule
    reads it, so it is not refused, and the Linear's rule stays exact."""
    model = nn.Sequential(nn.Linear(D, 6), nn.Unflatten(1, (2, 3)))
    x, y = inputs(5, True)

    def loss(m):
        out = m(x[:, 0])
        out.mul_(2.0)
        return ce(out.sum(1), y)

    exact(model, loss, exact_path=set())


def test_lstm_projection_and_packed_sequences(exact):
    rnn = nn.LSTM(D, 5, proj_size=3, batch_first=True)
    x, y = inputs(5, True)
    lengths = torch.tensor([5, 3, 4, 1])

    def loss(m):
        packed = pack_padded_sequence(x, lengths, batch_first=True, enforce_sorted=False)
        out, (h, _) = m(packed)
        out, _ = pad_packed_sequence(out, batch_first=True)
        return ce(out.sum(1), y) + h[-1].sum(1)

    exact(rnn, loss)


def test_linear_on_flattened_tokens(exact):
    """(B T, D) and (T B, D) token layouts: the examples are blocks or interleaved rows."""
    class Tokens(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(D, D), nn.Linear(D, 3)

        def forward(self, x):  # x (T, B, D)
            t = x.shape[0]
            h = torch.tanh(self.a(x.reshape(-1, D)))  # rows t B + n
            h = h.reshape(t, B, D).transpose(0, 1).reshape(-1, D)  # rows n T + t
            return self.b(h).reshape(B, t, 3).mean(1)

    x, y = inputs(B, False)
    exact(Tokens(), lambda m: ce(m(x), y), exact_path=set(), strategies=("ghost", "materialize"))


CONVS = [
    (nn.Conv1d, dict(stride=2, padding="same" if False else 1, dilation=2), 1),
    (nn.Conv2d, dict(padding="same", padding_mode="reflect", groups=2), 2),
    (nn.Conv3d, dict(stride=(1, 2, 1)), 3),
    (nn.ConvTranspose1d, dict(stride=2, padding=1, output_padding=1), 1),
    (nn.ConvTranspose2d, dict(stride=2, padding=1, groups=2, dilation=2), 2),
    (nn.ConvTranspose3d, dict(stride=2), 3),
]


@pytest.mark.parametrize("cls, kw, nd", CONVS, ids=[c[0].__name__ for c in CONVS])
def test_convolutions(exact, cls, kw, nd):
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(B, 2, *[5] * nd, generator=g), torch.randint(0, 3, (B,), generator=g)
    model = nn.Sequential(cls(2, 4, 3, **kw), nn.Tanh(), nn.Flatten(), nn.LazyLinear(3))
    model(x)
    exact(model, lambda m: ce(m(x), y), exact_path=set(),
          strategies=("auto", "ghost", "materialize"))


def test_unbatched_conv_call_shared_by_the_examples(exact):
    """A conv applied to one shared (C, L) tensor (a learned template) has no example dim:
    its output is broadcast over the examples, so book-keeping serves it in one pass."""
    class Template(nn.Module):
        def __init__(self):
            super().__init__()
            self.template = nn.Parameter(torch.randn(2, 6))
            self.conv, self.head = nn.Conv1d(2, 3, 3), nn.Linear(3 * 4, 3)

        def forward(self, x):  # x (B, 3 * 4)
            return self.head(x * self.conv(self.template).flatten())

    x, y = torch.randn(B, 12), torch.randint(0, 3, (B,))
    exact(Template(), lambda m: ce(m(x), y), exact_path=set())


NORMS = [
    ("layernorm", lambda: nn.LayerNorm([5, 5])),
    ("rmsnorm", lambda: nn.RMSNorm([5, 5], eps=1e-5)),
    ("groupnorm", lambda: nn.GroupNorm(1, 2)),
    ("instancenorm", lambda: nn.InstanceNorm2d(2, affine=True)),
    ("instancenorm_tracked", lambda: nn.InstanceNorm2d(2, affine=True, track_running_stats=True)),
    ("batchnorm_eval", lambda: nn.BatchNorm2d(2).eval()),
    ("prelu_channels", lambda: nn.PReLU(2)),
    ("prelu_shared", lambda: nn.PReLU()),
]


@pytest.mark.parametrize("name, make", NORMS, ids=[n for n, _ in NORMS])
@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
def test_norms_and_activations(exact, name, make, train):
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(B, 2, 5, 5, generator=g), torch.randint(0, 3, (B,), generator=g)
    norm = make()
    if name != "batchnorm_eval":
        norm.train(train)
    model = nn.Sequential(nn.Conv2d(2, 2, 1), norm, nn.Flatten(), nn.Linear(50, 3))
    exact(model, lambda m: ce(m(x), y), exact_path=set())


@pytest.mark.parametrize("arch", ["mlp", "cnn"])
def test_batchnorm_train_coupled(exact, arch):
    """batchnorm='coupled': the gradient of each loss through the batch statistics."""
    g = torch.Generator().manual_seed(0)
    if arch == "mlp":
        model = nn.Sequential(nn.Linear(D, 5), nn.BatchNorm1d(5), nn.ReLU(), nn.Linear(5, 3))
        x = torch.randn(B, D, generator=g)
        slow = {"0.weight", "0.bias"}
    else:
        model = nn.Sequential(nn.Conv2d(2, 3, 3), nn.BatchNorm2d(3), nn.ReLU(), nn.Conv2d(3, 3, 3),
                              nn.BatchNorm2d(3), nn.Flatten(), nn.Linear(3, 3))
        x = torch.randn(B, 2, 5, 5, generator=g)
        slow = {"0.weight", "0.bias", "1.weight", "1.bias", "3.weight", "3.bias"}
    y = torch.randint(0, 3, (B,), generator=g)
    exact(model.train(), lambda m: ce(m(x), y), batchnorm="coupled", exact_path=slow)


def test_embeddings_and_bags(exact):
    class Bags(nn.Module):
        def __init__(self):
            super().__init__()
            self.tok = nn.Embedding(10, D, padding_idx=0)
            self.sum = nn.EmbeddingBag(10, D, mode="sum", padding_idx=2)
            self.mean = nn.EmbeddingBag(10, D, mode="mean", include_last_offset=True)
            self.head = nn.Linear(D, 3)

        def forward(self, ids, flat, offsets, psw):
            h = self.tok(ids.T).mean(0) + self.sum(ids, per_sample_weights=psw)
            return self.head(h + self.mean(flat, offsets))

    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 10, (B, 5), generator=g)
    flat, offsets = torch.randint(0, 10, (9,), generator=g), torch.tensor([0, 2, 2, 5, 9])
    psw, y = torch.rand(B, 5, generator=g), torch.randint(0, 3, (B,), generator=g)
    exact(Bags(), lambda m: ce(m(ids, flat, offsets, psw), y), exact_path=set(),
          strategies=("auto", "ghost", "materialize"))


def test_embedding_bag_max_takes_the_exact_path(exact):
    model = nn.Sequential(nn.EmbeddingBag(10, D, mode="max"), nn.Linear(D, 3))
    ids, y = torch.randint(0, 10, (B, 5)), torch.randint(0, 3, (B,))
    exact(model, lambda m: ce(m(ids), y), exact_path={"0.weight"})
