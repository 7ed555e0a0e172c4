"""Encoder throughput: the original padded forward vs the packed (unpadded) path, on UNITER-shaped random batches.

Lengths follow the original's ``config/pretrain-*.json``: text 10-60 tokens including [CLS]/[SEP]
(max_txt_len 60), regions 10-100 (conf_th 0.2 clamped to [min_bb, max_bb]); both drawn uniformly. Throughput counts
valid tokens only (sum of t_i + n_i), for both paths, so the ratio is the useful speedup. FLOPs are counted on valid
tokens (matmuls only, 2 per multiply-add; training = 3x forward), which gives the MFU on GPUs whose peak we know, and
the padded FLOPs give the speedup that skipping padding can buy at most.

    python bench/encoder_bench.py                       # CPU: base, fp32, batch 4 (about 1 minute on 2 cores)
    python bench/encoder_bench.py --full                # CPU: base and large, batch 16 (over 10 minutes, ~10 GB)
    python bench/encoder_bench.py --device cuda         # GPU: base and large, bf16, batch 80 (10240-token budget)
"""

from __future__ import annotations

import argparse
import os
import statistics
from typing import Any, Callable, Sequence

import torch
from batches import random_batch
from harness import (
    add_output_arguments,
    device_name,
    interleaved_times,
    mib,
    output_dir,
    peak_memory,
    plot_grouped_bars,
    print_table,
    run_meta,
    write_json,
)
from tqdm import tqdm

from uniter_fast import Model, UniterConfig, backends
from uniter_fast.config import IMG_POS_DIM
from uniter_fast.layout import pack_batch

# Dense bf16/fp16 tensor-core peaks (no sparsity), by substring of torch.cuda.get_device_name.
PEAK_FLOPS = {"H200": 989e12, "H100 PCIe": 756e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "A10G": 70e12}


def encoder_flops(config: UniterConfig, num_regions: int, seq_lens: torch.Tensor) -> float:
    """Forward matmul FLOPs: the image/box embedders on ``num_regions`` regions, 4 H x H + 2 H x I per token per
    layer, and QK^T + PV (4 L^2 H per layer) per sequence. ``seq_lens`` [B] are the attended lengths."""
    hidden, inter, layers = config.hidden_size, config.intermediate_size, config.num_hidden_layers
    embed = 2.0 * num_regions * (config.img_dim + IMG_POS_DIM) * hidden
    per_token = 2.0 * (4 * hidden * hidden + 2 * hidden * inter) * layers
    attention = 4.0 * hidden * layers * float((seq_lens.double() ** 2).sum())
    return embed + per_token * float(seq_lens.sum()) + attention


def step_fn(forward: Callable[[], torch.Tensor], train: bool) -> Callable[[], None]:
    """Forward only (no_grad), or forward + backward of a sum over the output."""

    def step() -> None:
        if train:
            forward().float().sum().backward()
        else:
            with torch.no_grad():
                forward()

    return step


def bench_config(
    name: str,
    batch_size: int,
    modes: list[str],
    warmup: int,
    repeats: int,
    device: torch.device,
    dtype: torch.dtype,
    generator: torch.Generator,
    packed_backends: Sequence[str] = (),
    fused_layer: bool = False,
) -> list[dict[str, Any]]:
    """Rows (padded, packed) x ``modes`` ("forward", "train") for the model preset ``name`` on one random batch of
    ``batch_size`` UNITER-shaped examples: median time, valid tokens/s, TFLOP/s, MFU (on GPUs of known peak), peak
    memory, the packed path's speedup and the bound that skipping padding allows. ``packed`` uses the backend that
    ``"auto"`` selects; each of ``packed_backends`` adds a row ``packed:<backend>`` with that backend forced (skipped
    in training when the backend has no dropout); ``fused_layer`` adds a row ``packed+fused`` with the fused encoder
    layer (``encoder_layer_backend="triton"``, docs/encoder.md) beside ``packed``'s eager layer."""
    config = UniterConfig.preset(name)
    model = Model(config).to(device=device, dtype=dtype)
    model.check_values = False
    batch = random_batch(batch_size, config.vocab_size, generator, device)
    packed = pack_batch(batch)
    # Features in the model dtype, as a bf16 data pipeline would deliver them.
    for data in (batch, packed):
        data["img_feat"], data["img_pos_feat"] = data["img_feat"].to(dtype), data["img_pos_feat"].to(dtype)
    txt_lens, num_bbs = batch["txt_lens"].cpu(), batch["num_bbs"].cpu()
    valid_tokens = int((txt_lens + num_bbs).sum())
    padded_len = batch["attn_masks"].size(1)
    useful = encoder_flops(config, int(num_bbs.sum()), txt_lens + num_bbs)
    padded_cost = encoder_flops(config, batch_size * batch["img_feat"].size(1), torch.full_like(txt_lens, padded_len))
    peak = next((v for k, v in PEAK_FLOPS.items() if device.type == "cuda" and k in device_name(device)), None)
    paths: dict[str, Callable[[], torch.Tensor]] = {
        "padded": lambda: model.forward_batch(batch),
        "packed": lambda: model.forward_packed(packed),
    }
    if fused_layer:
        paths["packed+fused"] = forced(model, packed, "encoder_layer", "triton")
    rows = []
    for mode in modes:
        model.train(mode == "train")  # training: dropout on, as in pretraining
        dropout = config.attention_probs_dropout_prob if mode == "train" else 0.0
        attention = {
            "padded": backends.resolve("attention", model.config.attention_backend, device, dtype),
            "packed": backends.resolve(
                "packed_attention", model.config.packed_attention_backend, device, dtype, dropout_p=dropout
            ),
        }
        attention["packed+fused"] = attention["packed"]
        by_backend = {
            f"packed:{b}": forced(model, packed, "packed_attention", b)
            for b in packed_backends
            if dropout == 0 or b not in NO_DROPOUT
        }
        steps = {path: step_fn(forward, mode == "train") for path, forward in {**paths, **by_backend}.items()}
        times = {path: statistics.median(t) for path, t in interleaved_times(steps, device, warmup, repeats).items()}
        for path, seconds in times.items():
            flops = useful * (3.0 if mode == "train" else 1.0)
            rows.append(
                {
                    "model": name,
                    "mode": mode,
                    "path": path,
                    "attention": attention.get(path, path[7:]),
                    "batch": batch_size,
                    "valid_tokens": valid_tokens,
                    "padded_tokens": batch_size * padded_len,
                    "ms": seconds * 1e3,
                    "tokens_per_s": valid_tokens / seconds,
                    "tflops": flops / seconds / 1e12,
                    "mfu": flops / seconds / peak if peak else None,
                    "peak_mem_mb": mib(peak_memory(steps[path], device)),
                    "speedup": times["padded"] / seconds,
                    "max_speedup": padded_cost / useful,
                }
            )
            model.zero_grad(set_to_none=True)
    return rows


NO_DROPOUT = ("torch_varlen",)


def forced(model: Model, packed: dict[str, Any], component: str, backend: str) -> Callable[[], torch.Tensor]:
    """The packed forward with the model's ``component`` backend ("packed_attention" or "encoder_layer") forced to
    ``backend`` for this call (the model's own choice restored)."""
    field = f"{component}_backend"
    setter = getattr(model, f"set_{field}")

    def forward() -> torch.Tensor:
        chosen = getattr(model.config, field)
        setter(backend)
        try:
            return model.forward_packed(packed)
        finally:
            setter(chosen)

    return forward


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default=None, help="default: fp32 CPU, bf16 GPU")
    parser.add_argument(
        "--configs",
        nargs="+",
        default=None,
        choices=["tiny", "base", "large"],
        help="default: base on CPU, base and large on GPU or with --full",
    )
    parser.add_argument("--batch-size", type=int, default=None, help="examples per batch (default: 4 CPU, 80 GPU)")
    parser.add_argument("--modes", nargs="+", default=["forward", "train"], choices=["forward", "train"])
    parser.add_argument("--warmup", type=int, default=None)
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's default)")
    parser.add_argument("--full", action="store_true", help="CPU: base and large, batch 16, 5 repeats")
    parser.add_argument(
        "--fused-layer",
        action="store_true",
        help="add a packed row with the fused encoder layer (Triton: a GPU, or on CPU TRITON_INTERPRET=1, whose "
        "timings measure the interpreter, not the kernels)",
    )
    add_output_arguments(parser)
    args = parser.parse_args()
    device = torch.device(args.device)
    gpu = device.type == "cuda"
    dtype = getattr(torch, args.dtype or ("bfloat16" if gpu else "float32"))
    args.configs = args.configs or (["base", "large"] if gpu or args.full else ["base"])
    args.batch_size = args.batch_size or (80 if gpu else 16 if args.full else 4)
    args.warmup = args.warmup if args.warmup is not None else (5 if gpu else 1)
    args.repeats = args.repeats or (20 if gpu else 5 if args.full else 3)
    if args.threads:
        torch.set_num_threads(args.threads)
    rows = []
    for name in tqdm(args.configs, desc="configs"):  # the same lengths for every config
        generator = torch.Generator().manual_seed(args.seed)
        timing = (args.warmup, args.repeats)
        rows.extend(
            bench_config(
                name, args.batch_size, args.modes, *timing, device, dtype, generator, fused_layer=args.fused_layer
            )
        )
    print(f"\nencoder throughput on {device_name(device)}, {dtype}, batch {args.batch_size}, load {os.getloadavg()[0]}")
    columns = ["model", "mode", "path", "attention", "valid_tokens", "padded_tokens", "ms", "tokens_per_s"]
    print_table(rows, columns + ["tflops", "mfu", "peak_mem_mb", "speedup", "max_speedup"])
    meta = run_meta(args, dtype, flops="matmul FLOPs on valid tokens; train = 3x forward")
    out = output_dir(args)
    print(write_json("encoder_bench", device, rows, meta, out))
    groups = [f"{r['model']}/{r['mode']}" for r in rows if r["path"] == "padded"]
    paths = ("padded", "packed", "packed+fused") if args.fused_layer else ("padded", "packed")
    series = {p: [r["tokens_per_s"] for r in rows if r["path"] == p] for p in paths}
    title = "UNITER encoder: padded vs packed"
    print(plot_grouped_bars("encoder_bench", device, groups, series, "valid tokens / s", title, False, out))


if __name__ == "__main__":
    main()
