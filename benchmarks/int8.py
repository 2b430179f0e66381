"""ONNX Runtime int8 against fp32 on a trained run: accuracy, agreement, size, latency.

    python benchmarks/int8.py --ckpt outputs/<day>/<time>/checkpoints/last.ckpt

It quantizes the run's deploy form as ``deploy.py 'export=[onnx_int8]'`` does (calibrated on
the run's training images) in several settings, scores each on the whole validation split
against the fp32 ONNX model, then times fp32 and the default int8 setting in ONNX Runtime
on one thread at batch 1 and 32: every round runs each model once per batch size in a new
random order, and ratios are medians of the per-round ratios (load drift hits both alike).
"""

from __future__ import annotations

import argparse
import statistics
from functools import partial
from pathlib import Path

import numpy as np
import onnxruntime
import torch
from bench import interleaved, ratio  # the sibling script's timing rounds

from repnet import RepBlock, quantize
from repnet.checkpoints import load_checkpoint
from repnet.deployment import find_run_config, load_model, run_datamodule, training_images
from repnet.export import onnx_bytes
from repnet.reparam import reparameterize

SETTINGS = {  # name: (per_channel, calibration, float_head); the first is deploy's default
    "per-channel, minmax, float head": (True, "minmax", True),
    "per-channel, minmax, int8 head": (True, "minmax", False),
    "per-channel, percentile, float head": (True, "percentile", True),
    "per-tensor, minmax, float head": (False, "minmax", True),
}


def session(model: bytes) -> onnxruntime.InferenceSession:
    """One-thread CPU session of an ONNX model (no spinning threads)."""
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = options.inter_op_num_threads = 1
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return onnxruntime.InferenceSession(model, options, providers=["CPUExecutionProvider"])


def logits(run: onnxruntime.InferenceSession, images: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(run.run(None, {"images": images})[0])


def validation_split(run_config: dict) -> tuple[np.ndarray, torch.Tensor]:
    """The run's whole validation split: images and labels."""
    datamodule, why = run_datamodule(run_config)
    if datamodule is None:
        raise SystemExit(f"int8.py: error: {why}")
    datamodule.setup("validate")
    images, labels = zip(*datamodule.val_dataloader())
    return torch.cat(images).numpy(), torch.cat(labels)


def identity_block_sqnr(model: torch.nn.Module, deployed: torch.nn.Module) -> dict[str, float]:
    """Median int8 weight SQNR (dB, per tensor and per channel) of the fused kernels of the
    blocks that had an identity branch: where a BN per branch spreads the ranges most."""
    names = [
        name
        for name, module in model.named_modules()
        if isinstance(module, RepBlock) and "identity" in module.branch_names
    ]
    weights = [deployed.get_submodule(f"{name}.fused").weight.detach() for name in names]
    return {
        mode: statistics.median(quantize.sqnr_db(w, per_channel) for w in weights)
        for mode, per_channel in (("per tensor", False), ("per channel", True))
    }


def latency(sessions: dict, images: np.ndarray, rounds: int, calls: int) -> dict:
    """Median ms per call of each session at batch 1 and 32 (``bench.interleaved`` rounds of
    ``calls`` back-to-back calls), and median int8/fp32 ratios of the rounds."""
    runs = {
        (name, batch): partial(_calls, session, np.ascontiguousarray(images[:batch]), calls)
        for name, session in sessions.items()
        for batch in (1, 32)
    }
    times = interleaved(runs, rounds, warmup=1)
    result = {key: 1e3 * median / calls for key, (median, _) in times.items()}
    for batch in (1, 32):
        result["ratio", batch] = ratio(times, ("int8", batch), ("fp32", batch))
    return result


def _calls(run: onnxruntime.InferenceSession, x: np.ndarray, calls: int) -> None:
    for _ in range(calls):
        run.run(None, {"images": x})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ckpt", type=Path, required=True)
    parser.add_argument("--calibration-images", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--calls", type=int, default=50, help="calls per model per round")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(1)

    checkpoint = load_checkpoint(args.ckpt)
    architecture = checkpoint.hyper_parameters["architecture"]
    model = load_model(architecture, checkpoint.state_dict)
    deployed = reparameterize(model)
    _, run_config = find_run_config(args.ckpt, None)
    train = training_images(run_config, args.calibration_images, args.seed)
    batches = quantize.equal_batches(train.images, min(64, len(train.images)))
    images, labels = validation_split(run_config)
    fp32 = onnx_bytes(deployed, torch.as_tensor(images[:2]), True)
    reference = logits(session(fp32), images)
    print(f"{args.ckpt}: {len(labels)} validation images, {sum(map(len, batches))} calibration")
    accuracy = quantize.compare(reference, reference, labels).float_accuracy
    print(f"fp32 onnx: {len(fp32) / 1024:.1f} KiB, accuracy {accuracy:.2%}")
    if any(isinstance(m, RepBlock) and "identity" in m.branch_names for m in model.modules()):
        sqnr = identity_block_sqnr(model, deployed)
        print(
            "identity blocks, median weight SQNR: "
            + ", ".join(f"{v:.1f} dB {k}" for k, v in sqnr.items())
        )
    print("setting | drop (points) | agreement | logit err max / mean | size vs fp32")
    models = {}
    for name, (per_channel, method, float_head) in SETTINGS.items():
        models[name] = quantize.quantize_onnx(fp32, batches, per_channel, method, float_head)
        got = quantize.compare(reference, logits(session(models[name]), images), labels)
        print(
            f"{name} | {got.drop:.2f} | {got.argmax_agreement:.2%} | "
            f"{got.max_logit_error:.3f} / {got.mean_logit_error:.3f} | "
            f"{len(models[name]) / len(fp32):.3f}"
        )
    default = models[next(iter(SETTINGS))]
    sessions = {"fp32": session(fp32), "int8": session(default)}
    times = latency(sessions, images, args.rounds, args.calls)
    for batch in (1, 32):
        print(
            f"batch {batch}: fp32 {times['fp32', batch]:.3f} ms, int8 {times['int8', batch]:.3f} "
            f"ms, int8/fp32 {times['ratio', batch]:.2f} (median of {args.rounds} rounds)"
        )


if __name__ == "__main__":
    main()
