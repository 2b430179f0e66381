"""timm's models converted by repnet and by timm's own ``reparameterize_model``, side by side.

For each model (random weights, random BN statistics, eval mode): the BatchNorms
(``_BatchNorm`` subclasses, timm's ``BatchNormAct2d`` included) before and after each
conversion, the modules still summing parallel linear branches
(``repnet.reparam.unmerged_branches``), repnet's error in float64 on two random images at
the model's default input size, float32 latency at batch 1 (interleaved rounds, 2 threads)
and the conversion times (each a converted copy, interleaved, 1 thread: conversion is
thousands of small ops, which a second thread on a shared machine only slows down).

Timing runs with denormal floats flushed to zero: random BN statistics make activations
grow through deep nets (1e18 at the end of ``mobileone_s0``), and without flushing, the
denormals on the way made its forward 25x slower (4.5 s instead of 0.18 s at batch 1),
which measures the random statistics, not the models.

    python benchmarks/timm_models.py [--rounds 15] [--json out.json] [model ...]
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import warnings
from collections.abc import Callable
from pathlib import Path

import timm
import torch
from bench import interleaved  # the sibling script's timing rounds
from timm.utils.model import reparameterize_model
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

import repnet
from repnet.reparam import unmerged_branches

MODELS = (
    "repvgg_a0",
    "mobileone_s0",
    "fastvit_t8",
    "repvit_m1_0",
    "repghostnet_050",
    "efficientnet_b0",
    "lcnet_050",
    "ghostnet_100",
    "resnet18",
    "mobilenetv3_small_100",
    "levit_128s",
    "efficientvit_m0",
    "tiny_vit_5m_224",
)


@torch.no_grad()
def random_norms(model: nn.Module, seed: int = 0) -> nn.Module:
    """Random running statistics and affine parameters in every BatchNorm (never identity)."""
    generator = torch.Generator().manual_seed(seed)
    for module in model.modules():
        if not isinstance(module, _BatchNorm):
            continue
        for tensor, low, high in (
            (module.running_mean, -1.0, 1.0),
            (module.running_var, 0.3, 3.0),
            (module.weight, 0.3, 2.0),
            (module.bias, -1.0, 1.0),
        ):
            if tensor is not None:
                tensor.uniform_(low, high, generator=generator)
    return model


def norms(model: nn.Module) -> int:
    return sum(isinstance(m, _BatchNorm) for m in model.modules())


def quietly(convert: Callable[[nn.Module], nn.Module], model: nn.Module) -> tuple[nn.Module, list]:
    """``convert(model)`` and the warnings it gave (repnet names what it left unmerged)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = convert(model)
    return result, [str(w.message) for w in caught]


def per_round(fns: dict[str, Callable[[], object]], rounds: int) -> dict[str, list[float]]:
    """Per-round seconds of each function (``bench.interleaved``: a new order each round)."""
    return {name: times for name, (_, times) in interleaved(fns, rounds, warmup=1).items()}


def per_round_ratio(times: dict[str, list[float]], top: str, bottom: str) -> float:
    return statistics.median(a / b for a, b in zip(times[top], times[bottom]))


def measure_model(name: str, rounds: int) -> dict:
    torch.manual_seed(0)
    model = random_norms(timm.create_model(name)).eval()
    size = model.pretrained_cfg["input_size"]
    row: dict = {"model": name, "input": "x".join(map(str, size[1:])), "bn before": norms(model)}

    # float64: what each conversion leaves, and repnet's error
    exact = copy.deepcopy(model).double()
    ours, row["repnet warnings"] = quietly(repnet.reparameterize, exact)
    theirs = reparameterize_model(exact)
    row["bn repnet"], row["bn timm"] = norms(ours), norms(theirs)
    row["summed repnet"], row["summed timm"] = unmerged_branches(ours), unmerged_branches(theirs)
    x = torch.randn(2, *size, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    row["rel error"] = repnet.verify(exact, ours, x).max_rel
    del exact, ours, theirs

    # float32, denormals flushed: conversion times, then latency at batch 1
    flushing = torch.set_flush_denormal(True)
    try:
        _time_float32(model, size, rounds, row)
    finally:
        torch.set_flush_denormal(False)
    row["denormals flushed"] = flushing
    return row


def _time_float32(model: nn.Module, size: tuple[int, ...], rounds: int, row: dict) -> None:
    convert = {
        "repnet": lambda: quietly(repnet.reparameterize, model)[0],
        "timm": lambda: reparameterize_model(model),
    }
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # small ops: a second, contended thread only adds waiting
    try:
        spent = per_round(convert, max(3, rounds // 3))
    finally:
        torch.set_num_threads(threads)
    row["convert repnet ms"] = 1e3 * statistics.median(spent["repnet"])
    row["convert timm ms"] = 1e3 * statistics.median(spent["timm"])
    row["convert repnet/timm"] = per_round_ratio(spent, "repnet", "timm")
    one = torch.randn(1, *size)
    variants = {"built": model, "repnet": convert["repnet"](), "timm": convert["timm"]()}
    with torch.no_grad():
        times = per_round({k: (lambda m=m: m(one)) for k, m in variants.items()}, rounds)
    for key in variants:
        row[f"{key} ms"] = 1e3 * statistics.median(times[key])
    row["repnet/timm"] = per_round_ratio(times, "repnet", "timm")
    row["repnet/built"] = per_round_ratio(times, "repnet", "built")


COLUMNS = (
    ("model", "{}"),
    ("input", "{}"),
    ("bn before", "{}"),
    ("bn repnet", "{}"),
    ("bn timm", "{}"),
    ("summed repnet", "{}"),
    ("summed timm", "{}"),
    ("rel error", "{:.1e}"),
    ("built ms", "{:.2f}"),
    ("repnet ms", "{:.2f}"),
    ("timm ms", "{:.2f}"),
    ("repnet/timm", "{:.2f}"),
    ("convert repnet ms", "{:.0f}"),
    ("convert timm ms", "{:.0f}"),
    ("convert repnet/timm", "{:.2f}"),
)


def markdown(rows: list[dict]) -> str:
    lines = ["| " + " | ".join(c for c, _ in COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for row in rows:
        if "error" in row:
            lines.append(f"| {row['model']} | failed: {row['error']} |")
            continue
        cells = [
            str(len(row[c])) if isinstance(row[c], list) else spec.format(row[c])
            for c, spec in COLUMNS
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("models", nargs="*", default=MODELS, help="timm model names")
    parser.add_argument("--rounds", type=int, default=15, help="latency rounds per model")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", type=Path, help="also write the rows here")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    rows = []
    for name in args.models:
        try:
            rows.append(measure_model(name, args.rounds))
        except Exception as error:  # a model that fails is a result too
            rows.append({"model": name, "error": f"{type(error).__name__}: {error}"})
        print(f"{name} done", flush=True)
    print(f"\ntorch {torch.__version__}, timm {timm.__version__}, {args.threads} threads\n")
    print(markdown(rows))
    for row in rows:
        for key in ("repnet warnings", "summed repnet", "summed timm"):
            if row.get(key):
                print(f"\n{row['model']} {key}: {row[key]}")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))
    return rows


if __name__ == "__main__":
    main()
