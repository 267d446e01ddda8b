"""Where one graddyn step's time goes on a real-model case of ``real_models.py``.

Usage:
    env -u OMP_NUM_THREADS .venv/bin/python benchmarks/phases.py lstm medium
    env -u OMP_NUM_THREADS .venv/bin/python benchmarks/phases.py vit tiny --repeats 20

Times each phase of a Gram step — the forward under the capture's hooks, the captured
backward (autograd to the recorded outputs, then the rules), ``write_grad`` (with a Gram
expected: the per-example rows of book-kept layers, their sum and their Gram) and ``gram()``
(the rest) — alternating with a plain step (forward, backward of the mean loss), and prints
the median of each in milliseconds. For a recurrent model it also gives the recurrent rule's
own two parts (gates, backward through time).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import real_models as rm


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("model", choices=sorted(set(rm.TINY) | set(rm.MEDIUM)))
    ap.add_argument("size", choices=["tiny", "medium"])
    ap.add_argument("--repeats", type=int, default=10)
    args = ap.parse_args()

    import graddyn
    from graddyn.pergrad import _rules_rnn

    rule_parts: dict[str, list[float]] = {}
    for name in ("_gates", "_backward"):  # the recurrent rule's parts, timed where they run
        fn = getattr(_rules_rnn, name)

        def timed(*a, _fn=fn, _name=name, **k):
            t0 = time.perf_counter()
            out = _fn(*a, **k)
            rule_parts.setdefault(_name, []).append(time.perf_counter() - t0)
            return out
        setattr(_rules_rnn, name, timed)

    case = rm.build(args.model, args.size)
    model, b = case.model, case.size
    cap = graddyn.capture(model).__enter__()
    phases: dict[str, list[float]] = {}

    def graddyn_step(record: bool) -> None:
        t = [time.perf_counter()]
        cap.rearm()
        losses = case.losses()
        t.append(time.perf_counter())
        grads = cap.backward(losses)
        t.append(time.perf_counter())
        grads.write_grad(scale=1.0 / b, overwrite=True)
        t.append(time.perf_counter())
        grads.gram()
        t.append(time.perf_counter())
        if record:
            for k, a, c in zip(("forward", "captured backward", "write_grad", "gram"), t, t[1:]):
                phases.setdefault(k, []).append(c - a)

    def plain_step(record: bool) -> None:  # after cap.backward: recorded by no hook
        t0 = time.perf_counter()
        model.zero_grad(set_to_none=True)
        loss = case.losses().mean()
        t1 = time.perf_counter()
        loss.backward()
        t2 = time.perf_counter()
        if record:
            phases.setdefault("plain forward", []).append(t1 - t0)
            phases.setdefault("plain backward", []).append(t2 - t1)

    for i in range(args.repeats + 2):  # two warm-up steps (plans, calibration, allocations)
        if i == 2:
            rule_parts.clear()
        graddyn_step(i >= 2)
        plain_step(i >= 2)
    print(f"{args.model} ({args.size}), torch {torch.__version__}, {torch.get_num_threads()} "
          f"threads, median of {args.repeats} (ms)")
    for k, v in {**phases, **{f"rnn rule {k}": v for k, v in rule_parts.items()}}.items():
        print(f"  {k:20s} {statistics.median(v) * 1e3:8.2f}")


if __name__ == "__main__":
    main()
