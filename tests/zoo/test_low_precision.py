"""Autocast bfloat16 and half / bfloat16 weights: within the stated tolerance of float64.

Tolerance (what the README states): the Gram matrix within 2 % of its largest entry, the norms
within 2 %, relative to the per-loss reference of the same model in float64. bfloat16 keeps 8
bits of mantissa (a relative step of 0.4 %): the forward and backward themselves round at that
level, and graddyn's products of the per-example factors run in float32.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import graddyn
from graddyn.reference import per_loss_grads

B, T, V = 4, 6, 40
RTOL = 2e-2


@pytest.fixture(autouse=True)
def _float32():  # the zoo's conftest sets float64; these models start in float32
    torch.set_default_dtype(torch.float32)


class LSTMTagger(nn.Module):
    """Embedding -> batch-first LSTM -> per-token logits."""

    def __init__(self) -> None:
        super().__init__()
        self.emb, self.lstm, self.head = nn.Embedding(V, 16), nn.LSTM(16, 16, batch_first=True), \
            nn.Linear(16, V)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(self.lstm(self.emb(ids))[0])


def models():
    tr = pytest.importorskip("transformers")
    torch.manual_seed(0)
    return {
        "lstm": LSTMTagger(),
        "gpt2": tr.GPT2LMHeadModel(tr.GPT2Config(n_embd=16, n_head=2, n_layer=2, vocab_size=V,
                                                 n_positions=32)),
        "bert": tr.BertForMaskedLM(tr.BertConfig(hidden_size=16, num_attention_heads=2,
                                                 intermediate_size=32, num_hidden_layers=2,
                                                 vocab_size=V, max_position_embeddings=32)),
        "llama": tr.LlamaForCausalLM(tr.LlamaConfig(hidden_size=16, num_attention_heads=2,
                                                    intermediate_size=32, num_hidden_layers=2,
                                                    vocab_size=V, num_key_value_heads=1,
                                                    max_position_embeddings=32)),
        "encoder_layer": nn.Sequential(nn.Embedding(V, 16), nn.TransformerEncoderLayer(
            16, 2, 32, dropout=0.0, batch_first=True), nn.Linear(16, V)),
    }


IDS = torch.randint(0, V, (B, T), generator=torch.Generator().manual_seed(1))


def losses_of(model):
    out = model(IDS) if isinstance(model, (nn.Sequential, LSTMTagger)) else model(
        input_ids=IDS).logits
    return F.cross_entropy(out.float().transpose(1, 2), IDS, reduction="none").mean(1)


@pytest.mark.parametrize("name", ["gpt2", "bert", "llama", "encoder_layer", "lstm"])
@pytest.mark.parametrize("how", ["autocast_bf16", "bf16_weights", "fp16_weights"])
def test_low_precision_within_tolerance(name, how):
    model = models()[name].eval()
    ref64 = copy.deepcopy(model).double()
    g = per_loss_grads(ref64, losses_of(ref64))
    flat = torch.cat([v.reshape(B, -1) for v in g.values()], 1)
    gram = flat @ flat.T
    low = copy.deepcopy(model)
    if how != "autocast_bf16":
        low = low.to(torch.bfloat16 if how == "bf16_weights" else torch.float16)
    with graddyn.capture(low) as cap:
        with torch.autocast(torch.get_default_device().type, dtype=torch.bfloat16,
                            enabled=how == "autocast_bf16"):
            losses = losses_of(low)
    grads = cap.backward(losses)
    got = grads.gram().double()
    assert got.dtype == torch.float64 and grads.gram().dtype == torch.float32
    assert float((got - gram).abs().max() / gram.abs().max()) < RTOL
    torch.testing.assert_close(grads.norms().double(), flat.norm(dim=1), rtol=RTOL, atol=0)
