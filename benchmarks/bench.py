"""Speed, measured as ratios within one run: ``python benchmarks/bench.py [--quick] [--json PATH]``.

1. Inference latency: train form (eval) vs deploy form vs a plain conv net of the
   same shapes built directly, batch 1 and 8, NCHW and channels_last.
2. Whole-model conversion time of RepVGG-A0.
3. Training step time and activation memory of one stage of blocks: plain conv,
   offline and online ``full`` and ``dbb``.
4. Model scale: a training step (forward, backward, SGD) of RepVGG-A0 with every preset,
   online and offline, against the plain net, with each step's peak memory; conversion
   time per preset; and, when timm is installed, timm's ``repvgg_a0`` step and its
   ``reparameterize_model`` in the same rounds. The targets of issue 19 are checked last.
5. Dynamic conv: one grouped conv vs a per-sample loop vs a static conv.

Every figure is the median of several repeats; compare ratios, not absolute times.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import platform
import random
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.profiler import ProfilerActivity, profile

from repnet.block import RepBlock
from repnet.dynamic import DynamicConv2d
from repnet.models import SPECS, build_model
from repnet.reparam import reparameterize


@dataclass(frozen=True)
class Settings:
    repeats: int
    inference: tuple[tuple[str, int, str], ...]  # model, image size, block preset
    batches: tuple[int, ...]
    stage: dict  # one stage of blocks for the training rows
    dynamic: tuple[tuple[int, int], ...]  # (channels, map size) for the dynamic conv rows
    model_scale: dict  # the whole-model rows: model, classes, image, batch, rounds


FULL = Settings(
    repeats=15,
    inference=(("repvgg_a0", 224, "repvgg"), ("cifar", 32, "full")),
    batches=(1, 8),
    stage={"channels": 64, "blocks": 4, "image": 32, "batch": 32},
    dynamic=((32, 16), (64, 32), (64, 56)),
    model_scale={"model": "repvgg_a0", "classes": 10, "image": 96, "batch": 32, "repeats": 9},
)
QUICK = Settings(
    repeats=3,
    inference=(("repvgg_a0", 224, "repvgg"), ("cifar", 32, "full")),
    batches=(1,),
    stage={"channels": 32, "blocks": 2, "image": 16, "batch": 16},
    dynamic=((32, 16),),
    model_scale={"model": "repvgg_a0", "classes": 10, "image": 32, "batch": 2, "repeats": 1},
)


def median_seconds(fn: Callable[[], object], repeats: int, warmup: int = 2) -> float:
    """Median wall time of ``fn()`` over ``repeats`` calls after ``warmup`` calls."""
    return interleaved({"fn": fn}, repeats, warmup)["fn"][0]


def interleaved(
    fns: dict[str, Callable[[], object]], repeats: int, warmup: int = 2
) -> dict[str, tuple[float, list[float]]]:
    """Time several functions in rounds, each round in a new (seeded) random order, so load
    drift and whatever ran just before (caches, allocator state) hit all alike.

    Returns, per name, the median seconds and the list of per-round times.
    """
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    order, shuffle = list(fns), random.Random(0).shuffle
    for _ in range(repeats):
        shuffle(order)
        for name in order:
            start = time.perf_counter()
            fns[name]()
            times[name].append(time.perf_counter() - start)
    return {name: (statistics.median(t), t) for name, t in times.items()}


def ratio(times: dict, numerator: str, denominator: str) -> float:
    """Median over rounds of ``t_numerator / t_denominator`` (robust to drift between rounds)."""
    pairs = zip(times[numerator][1], times[denominator][1])
    return statistics.median(a / b for a, b in pairs)


def plain_twin(name: str, num_classes: int = 1000) -> nn.Sequential:
    """The deploy form's shapes built directly from the size table: conv(+bias), ReLU, …, linear."""
    spec, layers, channels = SPECS[name], [], 3
    for depth, width, stride in zip(spec.depths, spec.widths, spec.strides):
        for index in range(depth):
            layers += [nn.Conv2d(channels, width, 3, stride if index == 0 else 1, 1), nn.ReLU()]
            channels = width
    return nn.Sequential(
        *layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(channels, num_classes)
    )


def inference_rows(settings: Settings) -> list[dict]:
    rows = []
    for name, image, block in settings.inference:
        torch.manual_seed(0)
        train = build_model(name, num_classes=1000, block=block).eval()
        forms = {"train": train, "deploy": reparameterize(train), "plain": plain_twin(name).eval()}
        for batch in settings.batches:
            for layout in (torch.contiguous_format, torch.channels_last):
                x = torch.randn(batch, 3, image, image).contiguous(memory_format=layout)
                laid_out = {form: m.to(memory_format=layout) for form, m in forms.items()}
                with torch.inference_mode():
                    times = interleaved(
                        {form: lambda m=m, x=x: m(x) for form, m in laid_out.items()},
                        settings.repeats,
                    )
                rows.append(
                    {
                        "model": name,
                        "block": block,
                        "image": image,
                        "batch": batch,
                        "layout": "channels_last" if layout is torch.channels_last else "NCHW",
                        **{f"{form}_ms": round(1e3 * times[form][0], 3) for form in forms},
                        "train/deploy": round(ratio(times, "train", "deploy"), 2),
                        "deploy/plain": round(ratio(times, "deploy", "plain"), 3),
                    }
                )
    return rows


def conversion_row(settings: Settings) -> dict:
    model = build_model("repvgg_a0", num_classes=1000, block="repvgg").eval()
    seconds = median_seconds(lambda: reparameterize(model), settings.repeats, warmup=1)
    return {"model": "repvgg_a0", "block": "repvgg", "convert_ms": round(1e3 * seconds, 1)}


def _stage(kind: str, channels: int, blocks: int) -> nn.Module:
    if kind == "plain conv":
        return nn.Sequential(
            *(
                nn.Sequential(
                    nn.Conv2d(channels, channels, 3, 1, 1, bias=False),
                    nn.BatchNorm2d(channels),
                    nn.ReLU(),
                )
                for _ in range(blocks)
            )
        )
    mode, branches = kind.split()
    return nn.Sequential(
        *(
            RepBlock(channels, channels, branches=branches, online=mode == "online")
            for _ in range(blocks)
        )
    )


def activation_megabytes(step: Callable[[], Tensor]) -> float:
    """Memory autograd keeps for the backward pass (distinct storages saved by the forward)."""
    seen: dict[int, int] = {}

    def pack(tensor: Tensor) -> Tensor:
        storage = tensor.untyped_storage()
        seen[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        step().backward()
    return sum(seen.values()) / 2**20


def training_rows(settings: Settings) -> list[dict]:
    stage, rows = settings.stage, []
    x = torch.randn(stage["batch"], stage["channels"], stage["image"], stage["image"])
    for kind in ("plain conv", "offline full", "online full", "offline dbb", "online dbb"):
        torch.manual_seed(0)
        model = _stage(kind, stage["channels"], stage["blocks"]).train()
        optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)

        def loss(model=model) -> Tensor:
            return model(x).square().mean()

        def step(model=model, optimizer=optimizer, loss=loss) -> None:
            optimizer.zero_grad(set_to_none=True)
            loss().backward()
            optimizer.step()

        rows.append(
            {
                "stage": kind,
                "step_ms": round(1e3 * median_seconds(step, settings.repeats), 2),
                "activation_MB": round(activation_megabytes(loss), 1),
            }
        )
    base = rows[0]
    for row in rows:
        row["step_vs_plain"] = round(row["step_ms"] / base["step_ms"], 2)
        row["memory_vs_plain"] = round(row["activation_MB"] / base["activation_MB"], 2)
    return rows


COMPARED = ("repvgg", "acb", "full", "dbb")  # presets against the plain net at model scale
TIMM = "timm repvgg_a0"


def _timm():
    """timm, or ``None`` where it is not installed (an optional extra, never needed to train)."""
    try:
        import timm
        from timm.utils.model import reparameterize_model
    except ImportError:
        return None
    return timm, reparameterize_model


def _scale_model(variant: str, spec: dict) -> nn.Module:
    """``plain``, ``"<online|offline> <preset>"`` or timm's model, seeded alike."""
    torch.manual_seed(0)
    if variant == TIMM:
        return _timm()[0].create_model("repvgg_a0", num_classes=spec["classes"])
    mode, _, preset = variant.rpartition(" ")
    block = {"branches": preset, "online": mode == "online"}
    return build_model(spec["model"], num_classes=spec["classes"], block=block)


def _training_step(model: nn.Module, x: Tensor, y: Tensor) -> Callable[[], None]:
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        optimizer.step()

    return step


def step_peak_megabytes(step: Callable[[], None]) -> float:
    """The most memory PyTorch's allocator held at once during ``step()``, above what it held
    before: activations, gradients and temporaries (parameters and, after a warm-up step,
    optimizer state are held before). Read from the profiler's allocation events."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as recorded:
        step()
    events = [e for e in recorded.profiler.kineto_results.events() if e.name() == "[memory]"]
    live = peak = 0
    for event in sorted(events, key=lambda e: e.start_ns()):
        live += event.nbytes()
        peak = max(peak, live)
    return peak / 2**20


def model_scale_rows(settings: Settings) -> dict:
    """Training step and peak memory of every preset, online and offline, against the plain
    net (and timm's ``repvgg_a0``), all in the same interleaved rounds; then conversion."""
    spec = settings.model_scale
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(spec["batch"], 3, spec["image"], spec["image"], generator=generator)
    y = torch.randint(0, spec["classes"], (spec["batch"],), generator=generator)
    variants = ["plain", *(f"{m} {p}" for m in ("online", "offline") for p in COMPARED)]
    if _timm() is not None:
        variants.append(TIMM)
    models = {variant: _scale_model(variant, spec).train() for variant in variants}
    steps = {variant: _training_step(model, x, y) for variant, model in models.items()}
    times = interleaved(steps, spec["repeats"])
    peaks = {variant: step_peak_megabytes(step) for variant, step in steps.items()}
    training = [
        {
            "variant": variant,
            "step_ms": round(1e3 * times[variant][0], 1),
            "step_vs_plain": round(ratio(times, variant, "plain"), 2),
            "peak_MB": round(peaks[variant], 1),
            "memory_vs_plain": round(peaks[variant] / peaks["plain"], 2),
        }
        for variant in variants
    ]
    conversions = {
        variant: partial(reparameterize, model.eval())
        for variant, model in models.items()
        if variant != TIMM
    }
    if TIMM in models:
        conversions[TIMM] = partial(_timm()[1], models[TIMM].eval())
    converted = interleaved(conversions, spec["repeats"], warmup=1)
    conversion = [
        {
            "variant": variant,
            "convert_ms": round(1e3 * converted[variant][0], 1),
            "vs_offline_repvgg": round(ratio(converted, variant, "offline repvgg"), 2),
        }
        for variant in conversions
    ]
    return {
        "training": training,
        "conversion": conversion,
        "targets": targets(times, peaks, converted),
    }


def targets(times: dict, peaks: dict, converted: dict) -> list[dict]:
    """Issue 19's targets, each as measured (ratios within this run) against its limit."""
    rows = [
        (f"online {p} step / plain", ratio(times, f"online {p}", "plain"), 1.25) for p in COMPARED
    ]
    rows.append(("offline dbb step / plain", ratio(times, "offline dbb", "plain"), 3.0))
    rows += [
        (f"online {p} peak memory / plain", peaks[f"online {p}"] / peaks["plain"], 1.2)
        for p in COMPARED
    ]
    rows.append(("dbb conversion / repvgg", ratio(converted, "offline dbb", "offline repvgg"), 1.5))
    if TIMM in times:
        rows.append(("offline repvgg step / timm", ratio(times, "offline repvgg", TIMM), 1.0))
        rows.append(
            (
                "dbb conversion / timm reparameterize_model",
                ratio(converted, "offline dbb", TIMM),
                1.0,
            )
        )
    return [
        {"target": name, "measured": round(value, 2), "limit": limit, "met": value <= limit}
        for name, value, limit in rows
    ]


def dynamic_rows(settings: Settings, batch: int = 32) -> list[dict]:
    """Deployed dynamic conv (4 experts): one grouped conv vs the per-sample loop vs a static
    conv of the same shape, inference and a training step (forward + backward)."""
    rows = []
    for channels, size in settings.dynamic:
        x = torch.randn(batch, channels, size, size)
        for mode in ("inference", "training"):
            fns = {
                name: partial(_run, _dynamic_or_static(name, channels, mode), x, mode)
                for name in ("grouped", "per_sample", "static")
            }
            with torch.inference_mode(mode == "inference"):
                times = interleaved(fns, settings.repeats)
            rows.append(
                {
                    "map": f"{channels}ch {size}x{size}",
                    "batch": batch,
                    "mode": mode,
                    **{f"{name}_ms": round(1e3 * t[0], 2) for name, t in times.items()},
                    "grouped/static": round(ratio(times, "grouped", "static"), 2),
                    "per_sample/grouped": round(ratio(times, "per_sample", "grouped"), 2),
                }
            )
    return rows


def _dynamic_or_static(name: str, channels: int, mode: str) -> nn.Module:
    """A dynamic conv of strategy ``name`` (the same weights for both) or the static conv,
    deployed for inference (BNs folded into the convs on both sides)."""
    torch.manual_seed(0)
    if name == "static":
        model = nn.Sequential(nn.Conv2d(channels, channels, 3, padding=1), nn.BatchNorm2d(channels))
        return reparameterize(model) if mode == "inference" else model
    model = DynamicConv2d(channels, channels, 3, act=None, strategy=name)
    if mode == "inference":
        model.eval().switch_to_deploy()
    return model


def _run(model: Callable[[Tensor], Tensor], x: Tensor, mode: str) -> None:
    y = model(x)
    if mode == "training":
        y.sum().backward()


def pin_allocator() -> str:
    """Fix glibc malloc's thresholds (mmap above 32 MiB, never trim) for this process.

    glibc adapts them as the process runs, so the same conv took 0 or ~230 page faults
    per call (and up to 2x the time) depending on what ran before; pinned, large
    temporaries are reused, as with the caching allocators (jemalloc, tcmalloc) PyTorch
    recommends for CPU work. Returns what was done, for the results file.
    """
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):
        return "system default (not glibc)"
    m_trim_threshold, m_mmap_threshold = -1, -3
    if mallopt(m_mmap_threshold, 32 << 20) and mallopt(m_trim_threshold, 1 << 30):
        return "glibc, thresholds pinned (mmap 32 MiB, no trim)"
    return "system default (mallopt refused)"


def format_table(rows: list[dict]) -> str:
    header = list(rows[0])
    cells = [header] + [[str(row[key]) for key in header] for row in rows]
    widths = [max(len(line[i]) for line in cells) for i in range(len(header))]
    return "\n".join("  ".join(c.rjust(w) for c, w in zip(line, widths)) for line in cells)


def run(settings: Settings, allocator: str = "system default") -> dict:
    return {
        "machine": {
            "platform": platform.platform(),
            "allocator": allocator,
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
        },
        "settings": {
            "repeats": settings.repeats,
            "stage": settings.stage,
            "model_scale": settings.model_scale,
        },
        "inference": inference_rows(settings),
        "conversion": [conversion_row(settings)],
        "training": training_rows(settings),
        "model_scale": model_scale_rows(settings),
        "dynamic": dynamic_rows(settings),
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer, smaller runs (< 1 min)")
    parser.add_argument("--json", type=Path, default=Path("bench.json"), help="results file")
    parser.add_argument(
        "--system-malloc", action="store_true", help="keep glibc's adaptive malloc thresholds"
    )
    args = parser.parse_args(argv)
    allocator = "system default" if args.system_malloc else pin_allocator()
    results = run(QUICK if args.quick else FULL, allocator)
    for section in ("inference", "conversion", "training", "dynamic"):
        print(f"\n## {section}\n{format_table(results[section])}")
    for part, rows in results["model_scale"].items():
        print(f"\n## model scale: {part}\n{format_table(rows)}")
    temporary = args.json.with_suffix(".tmp")
    temporary.write_text(json.dumps(results, indent=2))
    temporary.replace(args.json)
    print(f"\nwritten to {args.json}")
    return results


if __name__ == "__main__":
    main()
