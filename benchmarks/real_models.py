"""Per-example Gram and norms on real model code: graddyn vs torch.func, Opacus, BackPACK.

Usage:
    .venv/bin/python benchmarks/real_models.py                       # tiny and medium, all
    .venv/bin/python benchmarks/real_models.py --size tiny --models gpt2 llama --repeats 7
    .venv/bin/python benchmarks/real_models.py --memory              # + peak memory per method

Every method does one training step's worth of work on one batch: forward, backward, the
mean-loss gradient in ``p.grad`` and the per-example statistic (B x B Gram or B norms).
``plain`` is the step alone (forward + backward of the mean loss). Methods take turns inside
each repeat (plain, graddyn, peers, plain, ...), so machine drift hits all alike; the table
gives the median time over repeats and its ratio to plain's median. Models run in eval mode
with dropout set to 0 (torch.func cannot draw dropout masks under vmap; Opacus records only
in train mode), the ResNet in eval mode (BatchNorm statistics), float32, random data.
``--memory`` runs each method once more in a fresh process and reports its peak resident
memory above the model-and-data baseline. A peer that fails prints its error.

Sizes (batch B, sequence T, width d):
    tiny    B 32, T 64, d 64, 2 layers, vocabulary 1000 (ResNet: 16-32-64 channels; ViT 32x32
            images in 8x8 patches)
    medium  B 16, T 128, d 512, 6 layers, vocabulary 8192 (ViT-S-like: d 384, 4x4 patches;
            ResNet-18 on 32x32 images; LSTM d 512)
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
import warnings
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

warnings.filterwarnings("ignore")
TINY = ["gpt2", "llama", "vit", "resnet", "lstm", "encoder_layer", "conv3d", "seqcls"]
MEDIUM = ["gpt2", "llama", "vit", "resnet", "lstm"]
METHODS = ["plain", "graddyn_gram", "graddyn_norms", "func_gram", "func_norms", "opacus_gram",
           "opacus_ghost_norms", "backpack_gram", "backpack_norms"]


# --- models ---------------------------------------------------------------------------------
class Batch:
    """Inputs, targets and the per-example loss ``loss_fn(output, targets) -> (B,)`` of one
    benchmark case."""

    def __init__(self, model: nn.Module, inputs: dict, targets: Tensor,
                 loss_fn: Callable[[object, Tensor], Tensor], classify: bool) -> None:
        self.model, self.inputs, self.targets, self.loss_fn = model, inputs, targets, loss_fn
        self.size, self.classify = targets.shape[0], classify

    def losses(self, model: nn.Module | None = None) -> Tensor:
        return self.loss_fn((model or self.model)(**self.inputs), self.targets)


def _logits(out: object) -> Tensor:
    return out.logits if hasattr(out, "logits") else out


def _lm_loss(out: object, ids: Tensor) -> Tensor:
    return F.cross_entropy(_logits(out).transpose(1, 2), ids, reduction="none").mean(1)


def _cls_loss(out: object, y: Tensor) -> Tensor:
    return F.cross_entropy(_logits(out), y, reduction="none")


def _lm_case(model: nn.Module, b: int, t: int, vocab: int) -> Batch:
    ids = torch.randint(0, vocab, (b, t))
    return Batch(model, {"input_ids": ids}, ids, _lm_loss, classify=False)


def _cls_case(model: nn.Module, x: Tensor, classes: int, key: str = "x") -> Batch:
    y = torch.randint(0, classes, (x.shape[0],))
    return Batch(model, {key: x}, y, _cls_loss, classify=True)


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.c1, self.b1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout)
        self.c2, self.b2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False), nn.BatchNorm2d(cout)
        self.short = nn.Sequential()
        if stride != 1 or cin != cout:
            self.short = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False),
                                       nn.BatchNorm2d(cout))

    def forward(self, x: Tensor) -> Tensor:
        h = F.relu(self.b1(self.c1(x)))
        return F.relu(self.b2(self.c2(h)) + self.short(x))


class ResNet(nn.Module):
    """CIFAR ResNet with basic blocks (ResNet-18: widths 64-512, two blocks per stage)."""

    def __init__(self, widths: list[int], blocks: int, classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, widths[0], 3, 1, 1, bias=False),
                                  nn.BatchNorm2d(widths[0]), nn.ReLU())
        layers, cin = [], widths[0]
        for i, w in enumerate(widths):
            for j in range(blocks):
                layers.append(BasicBlock(cin, w, 2 if (i > 0 and j == 0) else 1))
                cin = w
        self.layers = nn.Sequential(*layers)
        self.head = nn.Linear(cin, classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.layers(self.stem(x)).mean((2, 3)))


class LSTMClassifier(nn.Module):
    def __init__(self, vocab: int, d: int, classes: int = 4) -> None:
        super().__init__()
        self.emb, self.lstm, self.head = nn.Embedding(vocab, d), nn.LSTM(d, d, batch_first=True), \
            nn.Linear(d, classes)

    def forward(self, x: Tensor) -> Tensor:
        out, _ = self.lstm(self.emb(x))
        return self.head(out.mean(1))


def _no_dropout(config: object) -> object:
    for k in list(config.to_dict()):
        if isinstance(getattr(config, k, None), float) and ("dropout" in k or "pdrop" in k
                                                            or "drop_prob" in k):
            setattr(config, k, 0.0)
    return config


def build(name: str, size: str) -> Batch:
    """The benchmark case ``name`` at ``size`` (float32, dropout 0, seed 0)."""
    torch.manual_seed(0)
    tiny = size == "tiny"
    b, t, d, layers, vocab = (32, 64, 64, 2, 1000) if tiny else (16, 128, 512, 6, 8192)
    import transformers as tr

    if name == "gpt2":
        m = tr.GPT2LMHeadModel(_no_dropout(tr.GPT2Config(
            n_embd=d, n_layer=layers, n_head=2 if tiny else 8, vocab_size=vocab, n_positions=t)))
        return _lm_case(m, b, t, vocab)
    if name == "llama":
        m = tr.LlamaForCausalLM(_no_dropout(tr.LlamaConfig(
            hidden_size=d, intermediate_size=(172 if tiny else 1376), num_hidden_layers=layers,
            num_attention_heads=2 if tiny else 8, num_key_value_heads=2 if tiny else 8,
            vocab_size=vocab, max_position_embeddings=t)))
        return _lm_case(m, b, t, vocab)
    if name == "vit":
        hd, patch = (64, 8) if tiny else (384, 4)
        m = tr.ViTForImageClassification(_no_dropout(tr.ViTConfig(
            hidden_size=hd, num_hidden_layers=layers, num_attention_heads=2 if tiny else 6,
            intermediate_size=4 * hd, image_size=32, patch_size=patch, num_labels=10)))
        return _cls_case(m, torch.randn(b, 3, 32, 32), 10, "pixel_values")
    if name == "resnet":
        m = ResNet([16, 32, 64], 1) if tiny else ResNet([64, 128, 256, 512], 2)
        return _cls_case(m.eval(), torch.randn(b, 3, 32, 32), 10)
    if name == "lstm":
        return _cls_case(LSTMClassifier(vocab, d), torch.randint(0, vocab, (b, t)), 4)
    if name == "encoder_layer":
        m = nn.Sequential(nn.TransformerEncoderLayer(d, 2, 4 * d, dropout=0.0, batch_first=True),
                          nn.Flatten(), nn.Linear(t * d, 4))
        return _cls_case(m, torch.randn(b, t, d), 4, "input")
    if name == "conv3d":
        m = nn.Sequential(nn.Conv3d(1, 8, 3), nn.ReLU(), nn.Conv3d(8, 16, 3), nn.ReLU(),
                          nn.AdaptiveAvgPool3d(1), nn.Flatten(), nn.Linear(16, 4))
        return _cls_case(m, torch.randn(b, 1, 12, 12, 12), 4, "input")
    if name == "seqcls":
        sys.path.insert(0, __file__.rsplit("/", 1)[0])
        from pergrad import SeqClassifier

        return _cls_case(SeqClassifier(), torch.randint(0, 1000, (b, t)), 2, "ids")
    raise ValueError(f"unknown model {name!r}; tiny: {TINY}, medium: {MEDIUM}")


# --- methods --------------------------------------------------------------------------------
def _flat(per_ex: list[Tensor], b: int) -> Tensor:
    return torch.cat([g.reshape(b, -1) for g in per_ex], 1)  # (B, P)


def make_runner(method: str, case: Batch) -> Callable[[], Tensor]:
    """One step of ``method``: p.grad = mean-loss gradient, returns the Gram or the norms."""
    model, b = case.model, case.size
    params = [p for p in model.parameters() if p.requires_grad]

    if method == "plain":
        def run() -> Tensor:
            model.zero_grad(set_to_none=True)
            loss = case.losses().mean()
            loss.backward()
            return loss.detach()
        return run
    if method.startswith("graddyn"):
        import graddyn

        cap = graddyn.capture(model).__enter__()  # one capture per run, rearmed every step
        first = [True]

        def run() -> Tensor:
            if not first[0]:
                cap.rearm()
            first[0] = False
            grads = cap.backward(case.losses())  # row n: the gradient of loss n
            grads.write_grad(scale=1.0 / b, overwrite=True)  # p.grad: of the mean loss
            return grads.gram() if method == "graddyn_gram" else grads.norms()
        return run
    if method.startswith("func"):
        from torch.func import functional_call, grad, vmap

        names = [n for n, p in model.named_parameters() if p.requires_grad]
        keys = list(case.inputs)

        def one(p: dict, target: Tensor, *xs: Tensor) -> Tensor:  # one example
            inputs = {k: x[None] for k, x in zip(keys, xs)}
            return case.loss_fn(functional_call(model, p, (), inputs), target[None])[0]

        per_ex = vmap(grad(one), in_dims=(None, 0, *[0] * len(keys)))

        def run() -> Tensor:
            ps = {n: p.detach() for n, p in model.named_parameters() if n in names}
            g = per_ex(ps, case.targets, *case.inputs.values())
            for p, n in zip(params, names):
                p.grad = g[n].mean(0)
            flat = _flat(list(g.values()), b)
            return flat @ flat.T if method == "func_gram" else flat.norm(dim=1)
        return run
    if method == "opacus_gram":
        from opacus import GradSampleModule

        gsm = GradSampleModule(model, loss_reduction="mean")

        def run() -> Tensor:
            gsm.zero_grad(set_to_none=True)
            for p in params:
                p.grad_sample = None
            case.losses(gsm).mean().backward()
            flat = _flat([p.grad_sample for p in params], b)
            return flat @ flat.T
        return run
    if method == "opacus_ghost_norms":
        from opacus.grad_sample import GradSampleModuleFastGradientClipping

        gsm = GradSampleModuleFastGradientClipping(model, max_grad_norm=1e9,
                                                   use_ghost_clipping=True, loss_reduction="mean")

        def run() -> Tensor:
            gsm.zero_grad(set_to_none=True)
            case.losses(gsm).mean().backward()
            return gsm.get_norm_sample()
        return run
    if method.startswith("backpack"):
        from backpack import backpack, extend
        from backpack.extensions import BatchGrad, BatchL2Grad

        bmodel = extend(model)
        ext = BatchGrad() if method == "backpack_gram" else BatchL2Grad()
        loss_fn = extend(nn.CrossEntropyLoss(reduction="sum"))  # grad_batch: d loss_n

        def run() -> Tensor:
            bmodel.zero_grad(set_to_none=True)
            logits = bmodel(**case.inputs)
            logits = logits.logits if hasattr(logits, "logits") else logits
            if not case.classify:
                raise TypeError("BackPACK's extended loss covers classification cases here")
            with backpack(ext):
                loss_fn(logits, case.targets).backward()
            if method == "backpack_gram":
                flat = _flat([p.grad_batch for p in params], b)
                return flat @ flat.T
            return sum(p.batch_l2 for p in params).sqrt()
        return run
    raise ValueError(f"unknown method {method!r}; choose from {METHODS}")


# --- measurement ----------------------------------------------------------------------------
def time_case(name: str, size: str, methods: list[str], repeats: int) -> dict[str, dict]:
    """Median seconds per method, interleaved over ``repeats`` rounds; errors kept."""
    runners, res, first = {}, {}, {}
    for method in methods:
        try:
            case = build(name, size)
            run = make_runner(method, case)
            first[method] = run().detach().double()  # warm-up: lazy init, graddyn's probe
            runners[method] = run
        except Exception as e:  # noqa: BLE001 - a peer that does not support the model
            res[method] = {"error": f"{type(e).__name__}: {str(e).splitlines()[0][:70]}"}
    times: dict[str, list[float]] = {m: [] for m in runners}
    for _ in range(repeats):
        for method, run in runners.items():
            t0 = time.perf_counter()
            run()
            times[method].append(time.perf_counter() - t0)
    for method, ts in times.items():
        res[method] = {"time": statistics.median(ts), "times": ts}
        stat = "gram" if method.endswith("gram") else "norms" if method.endswith("norms") else ""
        ref = first.get(f"func_{stat}", first.get(f"graddyn_{stat}"))
        if stat and ref is not None and ref.shape == first[method].shape:  # same numbers?
            res[method]["diff"] = float((first[method] - ref).abs().max() / ref.abs().max())
    return res


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def memory_one(name: str, size: str, method: str) -> dict:
    case = build(name, size)
    base = _rss()
    try:
        run = make_runner(method, case)
        run()
        run()
    except Exception as e:  # noqa: BLE001
        return {"error": f"{type(e).__name__}"}
    return {"mib": max(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base, 0)
            / 2**20}


def report(name: str, size: str, res: dict, mem: dict) -> None:
    plain = res.get("plain", {}).get("time")
    print(f"\n### {name} ({size})\n| method | time (ms) | x plain | peak memory (MiB) | "
          f"max rel. diff to torch.func |")
    print("|---|---:|---:|---:|---:|")
    for method, r in res.items():
        m = mem.get(method, {})
        mtxt = f"{m['mib']:.0f}" if "mib" in m else m.get("error", "")
        if "error" in r:
            print(f"| {method} | fails: {r['error']} | | |")
            continue
        diff = f"{r['diff']:.0e}" if "diff" in r else ""
        print(f"| {method} | {1e3 * r['time']:.1f} | {r['time'] / plain:.2f} | {mtxt} | {diff} |")
    t = {k: v["time"] for k, v in res.items() if "time" in v}
    for stat in ("gram", "norms"):
        peers = {k: v for k, v in t.items() if k.endswith(stat) and not k.startswith("graddyn")}
        if f"graddyn_{stat}" in t and peers:
            best = min(peers, key=peers.get)
            ours = t[f"graddyn_{stat}"]
            print(f"graddyn {stat}: {ours / plain:.2f}x plain; fastest peer {best} "
                  f"{peers[best] / plain:.2f}x; graddyn {peers[best] / ours:.2f}x faster")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", choices=["tiny", "medium", "both"], default="both")
    ap.add_argument("--models", nargs="*")
    ap.add_argument("--methods", nargs="*", default=METHODS)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch default)")
    ap.add_argument("--memory", action="store_true", help="also peak memory per method")
    ap.add_argument("--one", nargs=3, metavar=("MODEL", "SIZE", "METHOD"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.one:
        print(json.dumps(memory_one(*args.one)))
        return
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, median of "
          f"{args.repeats} interleaved repeats")
    sizes = ["tiny", "medium"] if args.size == "both" else [args.size]
    for size in sizes:
        for name in args.models or (TINY if size == "tiny" else MEDIUM):
            res = time_case(name, size, args.methods, args.repeats)
            mem = {}
            if args.memory:
                for method in args.methods:
                    out = subprocess.run([sys.executable, __file__, "--one", name, size, method,
                                          "--threads", str(args.threads)],
                                         capture_output=True, text=True)
                    lines = out.stdout.strip().splitlines()
                    mem[method] = json.loads(lines[-1]) if lines else {"error": "crashed"}
            report(name, size, res, mem)
            sys.stdout.flush()


if __name__ == "__main__":
    main()
