"""Parameters used outside their module, losses that are not one per example, in-place ops,
non-finite input: each exact, or refused with a message that names the problem and the fix."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import graddyn
from graddyn.pergrad import CaptureError, UnsupportedModuleError

B = 4


def ce(logits, y):
    if logits.ndim == 3:
        return F.cross_entropy(logits.transpose(1, 2), y, reduction="none").mean(1)
    return F.cross_entropy(logits, y, reduction="none")


class TiedMatmulLM(nn.Module):
    """Tied LM head written as a plain matmul: emb.weight is used outside emb's call."""

    def __init__(self, vocab=7, d=5, functional=False):
        super().__init__()
        self.emb, self.mix = nn.Embedding(vocab, d), nn.Linear(d, d)
        self.functional = functional

    def forward(self, ids):
        h = torch.tanh(self.mix(self.emb(ids)))
        return F.linear(h, self.emb.weight) if self.functional else h @ self.emb.weight.T


class LayerScale(nn.Module):
    """A gate parameter multiplied in the parent's forward, around a child with a rule."""

    def __init__(self, d=5):
        super().__init__()
        self.fc, self.head = nn.Linear(d, d), nn.Linear(d, 3)
        self.gamma = nn.Parameter(torch.rand(d))

    def forward(self, x):
        return self.head(x + self.gamma * torch.tanh(self.fc(x)))


class ParamAsInput(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(3, 3), nn.Linear(3, 2)

    def forward(self, x):
        return self.b(x + self.a(self.b.weight[0].expand(x.shape[0], 3)))


class Positions(nn.Module):
    """pos(arange(T)) broadcast over the batch: with T == B its output looks batched."""

    def __init__(self, t=B, d=3, proj=True):
        super().__init__()
        self.emb, self.pos, self.head = nn.Embedding(9, d), nn.Embedding(t, d), nn.Linear(d, 2)
        self.proj = nn.Linear(d, d) if proj else None

    def forward(self, ids):
        p = self.pos(torch.arange(ids.shape[1]))  # (T, d), shared by every example
        if self.proj is not None:
            p = self.proj(torch.tanh(p))
        return self.head(torch.tanh(self.emb(ids) + p[None]).mean(1))


def ids_and_targets(vocab=7, t=B, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randint(0, vocab, (B, t), generator=g),
            torch.randint(0, vocab, (B, t), generator=g))


@pytest.mark.parametrize("functional", [False, True], ids=["matmul", "F.linear"])
def test_tied_head_outside_the_module(exact, functional):
    ids, y = ids_and_targets()
    exact(TiedMatmulLM(functional=functional), lambda m: ce(m(ids), y),
          exact_path={"emb.weight"}, strategies=("auto", "ghost", "materialize"))


def test_layer_scale_in_parent(exact):
    """gamma only broadcasts over the examples: book-kept in one pass, not the exact path."""
    x, y = torch.randn(B, 5), torch.randint(0, 3, (B,))
    exact(LayerScale(), lambda m: ce(m(x), y), exact_path=set())


def test_parameter_passed_as_module_input(exact):
    x, y = torch.randn(B, 3), torch.randint(0, 2, (B,))
    exact(ParamAsInput(), lambda m: ce(m(x), y), exact_path=set())  # expand: book-kept


@pytest.mark.parametrize("proj", [False, True], ids=["pos", "pos+proj"])
def test_shared_positions_with_t_equal_to_b(exact, proj):
    ids, _ = ids_and_targets(vocab=9)
    y = torch.randint(0, 2, (B,))
    exact(Positions(proj=proj), lambda m: ce(m(ids), y), exact_path=set())  # book-kept


def test_penalty_added_to_every_loss(exact):
    """``losses + lam ||W||^2``: every example's gradient has the penalty's share."""
    model = nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3))
    x, y = torch.randn(B, 5), torch.randint(0, 3, (B,))
    exact(model, lambda m: ce(m(x), y) + 0.1 * m[2].weight.square().sum(),
          exact_path=set())  # the penalty broadcasts over the examples: book-kept


LOSSES = {
    "plus_mean": lambda l: l + l.mean(),
    "flip": lambda l: l.flip(0),
    "first_three": lambda l: l[:3],
    "softmax_weighted": lambda l: l * torch.softmax(l, 0),
}


@pytest.mark.parametrize("name", list(LOSSES))
def test_losses_that_mix_examples(exact, name):
    """Each row is the gradient of that entry of the losses, whatever it mixes."""
    model = nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3))
    x, y = torch.randn(B, 5), torch.randint(0, 3, (B,))
    exact(model, lambda m: LOSSES[name](ce(m(x), y)),
          strategies=("auto", "ghost", "materialize"))


def test_mode_output_ntk_on_a_sequence_first_model(exact):
    layer = nn.TransformerEncoderLayer(6, 2, 8, dropout=0.0, batch_first=False)
    x = torch.randn(B, B, 6)  # (T, B, D), T == B
    exact(layer, lambda m: m(x)[-1, :, :2], mode="output", exact_path=set())


def test_inplace_residual_on_module_outputs(exact):
    class Residual(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b, self.head = nn.Linear(5, 5), nn.Linear(5, 5), nn.Linear(5, 3)

        def forward(self, x):
            h = self.a(x)
            h += x  # modifies a's recorded output in place
            h = self.b(torch.relu_(h))  # ... and again
            return self.head(h)

    x, y = torch.randn(B, 5), torch.randint(0, 3, (B,))
    exact(Residual(), lambda m: ce(m(x), y), exact_path=set())
    relu_model = nn.Sequential(nn.Linear(5, 4), nn.ReLU(inplace=True), nn.Linear(4, 3))
    exact(relu_model, lambda m: ce(m(x), y), exact_path=set())


def test_input_modified_after_the_call_is_an_error():
    class Stale(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(5, 5), nn.Linear(5, 3)

        def forward(self, x):
            h = torch.tanh(x)
            out = self.a(h)
            h.mul_(2)  # a's recorded input changes after the call
            return self.b(out + h)

    model = Stale()
    with graddyn.capture(model) as cap:
        losses = ce(model(torch.randn(B, 5)), torch.randint(0, 3, (B,)))
    with pytest.raises(CaptureError, match="input was modified in place.*inplace=False"):
        cap.backward(losses)


def test_nan_losses_and_scale_are_errors():
    model = nn.Sequential(nn.Linear(5, 3))
    x = torch.randn(B, 5)
    x[2, 1] = float("nan")
    with graddyn.capture(model) as cap:
        losses = ce(model(x), torch.randint(0, 3, (B,)))
    with pytest.raises(CaptureError, match=r"example\(s\) \[2\] are not finite.*inputs for NaN"):
        cap.backward(losses)
    with graddyn.capture(model) as cap:
        losses = ce(model(torch.randn(B, 5)), torch.randint(0, 3, (B,)))
    with pytest.raises(CaptureError, match=r"scale=nan is not finite"):
        cap.backward(losses, scale=float("nan"))


def test_fallback_false_names_the_parameters_and_the_fix():
    ids, y = ids_and_targets()
    model = TiedMatmulLM()
    with graddyn.capture(model, fallback=False) as cap:
        losses = ce(model(ids), y)
    with pytest.raises(UnsupportedModuleError,
                       match=r"'emb\.weight' \(also used outside its Embedding's call\).*"
                             r"fallback=True.*register_rule.*params="):
        cap.backward(losses)
    lstm = nn.LSTM(3, 4, num_layers=2, dropout=0.5).train()  # masks inside the fused kernel
    with graddyn.capture(lstm, fallback=False) as cap:
        out = lstm(torch.randn(2, B, 3))[0]
    with pytest.raises(UnsupportedModuleError, match=r"'weight_ih_l0' \("):
        cap.backward(out.sum((0, 2)))


def test_reentrant_checkpoint_is_refused_with_the_fix():
    from torch.utils.checkpoint import checkpoint

    class Ckpt(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(5, 5), nn.Linear(5, 3)

        def forward(self, x, reentrant):
            return self.b(checkpoint(lambda h: torch.tanh(self.a(h)), x,
                                     use_reentrant=reentrant))

    model, y = Ckpt(), torch.randint(0, 3, (B,))
    x = torch.randn(B, 5, requires_grad=True)
    with graddyn.capture(model) as cap:
        losses = ce(model(x, True), y)
    with pytest.raises(CaptureError, match="use_reentrant=False"):
        cap.backward(losses)


def test_non_reentrant_checkpoint_is_exact(exact):
    from torch.utils.checkpoint import checkpoint

    class Ckpt(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.drop, self.b = nn.Linear(5, 5), nn.Dropout(0.3), nn.Linear(5, 3)

        def forward(self, x):
            return self.b(checkpoint(lambda h: self.drop(torch.tanh(self.a(h))), x,
                                     use_reentrant=False))

    x, y = torch.randn(B, 5), torch.randint(0, 3, (B,))
    exact(Ckpt().train(), lambda m: ce(m(x), y), exact_path=set())
