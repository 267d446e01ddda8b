"""Hugging Face ``transformers`` families from tiny configs (random init, nothing downloaded),
in eval mode and in train mode with dropout, against the per-loss reference in float64."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

tr = pytest.importorskip("transformers")

B, T, V = 3, 5, 40
H = dict(hidden_size=16, num_attention_heads=2, intermediate_size=32, num_hidden_layers=2,
         vocab_size=V)
DECODER = dict(H, num_key_value_heads=1, max_position_embeddings=32)
FAMILIES = {  # name -> (config class, model class, config, input kind)
    "gpt2": ("GPT2Config", "GPT2LMHeadModel",
             dict(n_embd=16, n_head=2, n_layer=2, vocab_size=V, n_positions=32), "lm"),
    "llama": ("LlamaConfig", "LlamaForCausalLM", DECODER, "lm"),
    "llama_untied": ("LlamaConfig", "LlamaForCausalLM", dict(DECODER, tie_word_embeddings=False),
                     "lm"),
    "mistral": ("MistralConfig", "MistralForCausalLM", DECODER, "lm"),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", DECODER, "lm"),
    "gemma": ("GemmaConfig", "GemmaForCausalLM", dict(DECODER, head_dim=8), "lm"),
    "phi": ("PhiConfig", "PhiForCausalLM", dict(H, max_position_embeddings=32), "lm"),
    "opt": ("OPTConfig", "OPTForCausalLM",
            dict(hidden_size=16, num_attention_heads=2, ffn_dim=32, num_hidden_layers=2,
                 vocab_size=V, word_embed_proj_dim=16, max_position_embeddings=32), "lm"),
    "gpt_neo": ("GPTNeoConfig", "GPTNeoForCausalLM",
                dict(hidden_size=16, num_heads=2, num_layers=2, vocab_size=V, window_size=4,
                     attention_types=[[["global", "local"], 1]], max_position_embeddings=32),
                "lm"),
    "bloom": ("BloomConfig", "BloomForCausalLM", dict(hidden_size=16, n_head=2, n_layer=2,
                                                       vocab_size=V), "lm"),
    "falcon": ("FalconConfig", "FalconForCausalLM", dict(hidden_size=16, num_attention_heads=2,
                                                         num_hidden_layers=2, vocab_size=V),
               "lm"),
    "gptj": ("GPTJConfig", "GPTJForCausalLM", dict(n_embd=16, n_head=2, n_layer=2, vocab_size=V,
                                                    rotary_dim=4, n_positions=32), "lm"),
    "bert": ("BertConfig", "BertForSequenceClassification",
             dict(H, max_position_embeddings=32, num_labels=3), "cls_padded"),
    "distilbert": ("DistilBertConfig", "DistilBertForSequenceClassification",
                   dict(dim=16, n_heads=2, hidden_dim=32, n_layers=2, vocab_size=V, num_labels=3,
                        max_position_embeddings=32), "cls_padded"),
    "roberta": ("RobertaConfig", "RobertaForSequenceClassification",
                dict(H, max_position_embeddings=40, num_labels=3), "cls"),
    "albert": ("AlbertConfig", "AlbertForSequenceClassification",
               dict(H, embedding_size=8, max_position_embeddings=32, num_labels=3), "cls"),
    "electra": ("ElectraConfig", "ElectraForSequenceClassification",
                dict(H, embedding_size=8, max_position_embeddings=32, num_labels=3), "cls"),
    "deberta_v2": ("DebertaV2Config", "DebertaV2ForSequenceClassification",
                   dict(H, max_position_embeddings=32, num_labels=3), "cls"),
    "t5": ("T5Config", "T5ForConditionalGeneration",
           dict(d_model=16, d_kv=8, d_ff=32, num_layers=2, num_heads=2, vocab_size=V,
                decoder_start_token_id=0, pad_token_id=0), "seq2seq"),
    "bart": ("BartConfig", "BartForConditionalGeneration",
             dict(d_model=16, encoder_attention_heads=2, decoder_attention_heads=2,
                  encoder_ffn_dim=32, decoder_ffn_dim=32, encoder_layers=1, decoder_layers=1,
                  vocab_size=V, max_position_embeddings=32), "seq2seq"),
    "vit": ("ViTConfig", "ViTForImageClassification",
            dict(hidden_size=16, num_attention_heads=2, intermediate_size=32, num_hidden_layers=2,
                 image_size=8, patch_size=4, num_channels=3, num_labels=3), "image8"),
    "swin": ("SwinConfig", "SwinForImageClassification",
             dict(image_size=16, patch_size=2, embed_dim=8, depths=[1, 1], num_heads=[2, 2],
                  window_size=2, num_labels=3), "image16"),
    "convnext": ("ConvNextConfig", "ConvNextForImageClassification",
                 dict(hidden_sizes=[8, 16], depths=[1, 1], num_stages=2, num_labels=3,
                      layer_scale_init_value=0.5, drop_path_rate=0.2), "image16"),
    "resnet": ("ResNetConfig", "ResNetForImageClassification",
               dict(hidden_sizes=[8, 16], depths=[1, 1], embedding_size=8, num_labels=3),
               "image16"),
}


def build(name, train):
    cfg_cls, model_cls, cfg, _ = FAMILIES[name]
    torch.manual_seed(1)
    config = getattr(tr, cfg_cls)(**cfg)
    for k in list(config.to_dict()):  # dropout on everywhere (0.1) in train mode
        v = getattr(config, k, None)
        if isinstance(v, float) and ("dropout" in k or k.endswith("_pdrop") or "drop_prob" in k):
            setattr(config, k, 0.1 if train else 0.0)
    return getattr(tr, model_cls)(config).train(train)


def data(kind):
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1, V, (B, T), generator=g)
    labels = torch.randint(0, 3, (B,), generator=g)
    mask = torch.ones(B, T, dtype=torch.long)
    mask[0, -2:] = 0  # the first example is padded
    img = torch.randn(B, 3, 16, 16, generator=g)
    return ids, labels, mask, img


def loss_fn(kind):
    ids, labels, mask, img = data(kind)

    def lm(out):
        return F.cross_entropy(out.logits.transpose(1, 2), ids, reduction="none").mean(1)

    if kind == "lm":
        return lambda m: lm(m(input_ids=ids))
    if kind == "seq2seq":
        return lambda m: lm(m(input_ids=ids, decoder_input_ids=ids))
    if kind.startswith("cls"):
        kw = dict(attention_mask=mask) if kind == "cls_padded" else {}
        return lambda m: F.cross_entropy(m(input_ids=ids, **kw).logits, labels, reduction="none")
    x = img[:, :, :8, :8] if kind == "image8" else img
    return lambda m: F.cross_entropy(m(pixel_values=x).logits, labels, reduction="none")


@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
@pytest.mark.parametrize("name", [n for n in FAMILIES if n != "resnet"])
def test_family(exact, name, train):
    exact(build(name, train), loss_fn(FAMILIES[name][3]))


def test_resnet_batchnorm(exact):
    """Eval statistics: exact; train mode: refused by default, exact with batchnorm='coupled'."""
    import graddyn
    from graddyn.pergrad import CaptureError

    f = loss_fn("image16")
    exact(build("resnet", False), f, exact_path=set())
    model = build("resnet", True)
    with pytest.raises(CaptureError, match="batch statistics.*batchnorm='coupled'"):
        with graddyn.capture(model):
            f(model)
    exact(model, f, batchnorm="coupled")


def test_gpt2_position_ids_given_per_example(exact):
    ids = data("lm")[0]
    pos = torch.arange(T).expand(B, T)
    exact(build("gpt2", True), lambda m: F.cross_entropy(
        m(input_ids=ids, position_ids=pos).logits.transpose(1, 2), ids, reduction="none").mean(1),
        exact_path=set())


def test_gpt2_gradient_checkpointing(exact):
    model = build("gpt2", True)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    exact(model, loss_fn("lm"))
