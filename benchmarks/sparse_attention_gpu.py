"""The Triton block-sparse attention kernel against dense SDPA (flash) on a CUDA GPU.

    python benchmarks/sparse_attention_gpu.py --out results/    # writes sparse_attention_gpu.{json,md}

1. Correctness on the GPU: the kernel against a dense masked fp32 reference, fp32 / fp16 / bf16, ragged lengths,
   strided [B, S, H, D] views, empty rows.
2. Speed: B=1, 16 heads x 128, bf16, 16K / 32K / 64K tokens, densities 0.1 / 0.25 / 0.5 (each query block keeps
   its own block plus random others); the median of 10 timed calls (CUDA events) after 3 warm-ups, for the kernel
   and for dense SDPA restricted to the flash backend. A first sweep picks num_warps / num_stages at 16K, 0.25.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from accel.kernels.triton_backend import block_sparse_attention_triton  # noqa: E402


def timed(fn, *args, warmup=3, repeats=10, **kwargs) -> float:
    for _ in range(warmup):
        fn(*args, **kwargs)
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn(*args, **kwargs)
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / 1000)
    return statistics.median(times)


def selection(batch, heads, q_blocks, k_blocks, density, generator, device):
    keep = max(1, round(density * k_blocks))
    scores = torch.rand(batch, heads, q_blocks, k_blocks, generator=generator, device=device)
    own = torch.arange(q_blocks, device=device).clamp_max(k_blocks - 1)
    scores[:, :, torch.arange(q_blocks, device=device), own] = 2.0  # the own block always kept
    index = scores.topk(keep, dim=-1).indices.sort(dim=-1).values.to(torch.int32).contiguous()
    count = torch.full((batch, heads, q_blocks), keep, dtype=torch.int32, device=device)
    return index, count


def reference(q, k, v, index, count, block, scale):
    q_len, k_len = q.shape[2], k.shape[2]
    q_blocks, k_blocks = math.ceil(q_len / block), math.ceil(k_len / block)
    hits = torch.zeros(*q.shape[:2], q_blocks, k_blocks, dtype=torch.int32, device=q.device)
    used = torch.arange(index.shape[-1], device=q.device) < count[..., None]
    hits.scatter_add_(3, index.long(), used.int())
    block_mask = hits > 0
    mask = block_mask.repeat_interleave(block, 2).repeat_interleave(block, 3)[:, :, :q_len, :k_len]
    scores = (q.float() @ k.float().transpose(-1, -2)) * scale
    scores = scores.masked_fill(~mask, -math.inf)
    lse = torch.logsumexp(scores, -1)
    probs = torch.exp(scores - lse.masked_fill(torch.isinf(lse), 0)[..., None]).masked_fill(~mask, 0)
    return probs @ v.float(), lse


def correctness(device) -> list[dict]:
    results = []
    generator = torch.Generator(device=device).manual_seed(0)
    for dtype, tolerance in ((torch.float32, 1e-4), (torch.float16, 1e-2), (torch.bfloat16, 3e-2)):
        for q_len, dim in ((1000, 64), (777, 128)):
            shape = (2, q_len, 4, dim)
            q, k, v = (torch.randn(shape, generator=generator, device=device).to(dtype).transpose(1, 2)
                       for _ in range(3))
            blocks = math.ceil(q_len / 64)
            index, count = selection(2, 4, blocks, blocks, 0.3, generator, device)
            count[0, 0, 0] = 0
            out, lse = block_sparse_attention_triton(q, k, v, index, count, 64, 1 / math.sqrt(dim))
            ref_out, ref_lse = reference(q, k, v, index, count, 64, 1 / math.sqrt(dim))
            finite = torch.isfinite(ref_lse)
            error = float((out.float() - ref_out).abs().max())
            lse_error = float((lse[finite] - ref_lse[finite]).abs().max())
            ok = (error <= tolerance and lse_error <= 1e-3 and bool((out[0, 0, :64] == 0).all())
                  and bool(torch.isinf(lse[0, 0, :64]).all()) and not bool(torch.isnan(out).any()))
            results.append({"dtype": str(dtype), "q_len": q_len, "dim": dim, "max_abs_error": error,
                            "lse_max_abs_error": lse_error, "ok": ok})
            print(results[-1], flush=True)
    return results


def speed(device) -> tuple[dict, list[dict]]:
    from torch.nn.attention import SDPBackend, sdpa_kernel

    heads, dim, block = 16, 128, 64
    generator = torch.Generator(device=device).manual_seed(1)
    rows = []
    tuning = {}

    def case(tokens):
        shape = (1, tokens, heads, dim)
        return [torch.randn(shape, generator=generator, device=device, dtype=torch.bfloat16).transpose(1, 2)
                for _ in range(3)]

    q, k, v = case(16384)
    index, count = selection(1, heads, 256, 256, 0.25, generator, device)
    for warps in (4, 8):
        for stages in (1, 2, 3):
            try:
                tuning[f"{warps}w{stages}s"] = timed(block_sparse_attention_triton, q, k, v, index, count, block,
                                                     1 / math.sqrt(dim), num_warps=warps, num_stages=stages)
            except Exception as error:  # a configuration the compiler rejects
                tuning[f"{warps}w{stages}s"] = f"failed: {type(error).__name__}"
    best = min((t, name) for name, t in tuning.items() if isinstance(t, float))[1]
    warps, stages = int(best.split("w")[0]), int(best.split("w")[1][:-1])
    print("tuning", tuning, "best", best, flush=True)
    for tokens in (16384, 32768, 65536):
        q, k, v = case(tokens)
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            dense = timed(torch.nn.functional.scaled_dot_product_attention, q, k, v)
        blocks = tokens // block
        for density in (0.1, 0.25, 0.5):
            index, count = selection(1, heads, blocks, blocks, density, generator, device)
            sparse = timed(block_sparse_attention_triton, q, k, v, index, count, block, 1 / math.sqrt(dim),
                           num_warps=warps, num_stages=stages)
            kept = int(count.sum()) * block * block  # (query, key) pairs computed
            flops = 4 * kept * dim
            rows.append({"tokens": tokens, "density": density, "realised_density": kept / (heads * tokens**2),
                         "dense_sdpa_flash_ms": dense * 1e3, "triton_sparse_ms": sparse * 1e3,
                         "speedup": dense / sparse, "sparse_tflops": flops / sparse / 1e12,
                         "dense_tflops": 4 * heads * tokens**2 * dim / dense / 1e12})
            print(rows[-1], flush=True)
    return {"tuning": tuning, "best": best}, rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("."))
    args = parser.parse_args(argv)
    device = torch.device("cuda")
    info = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__}
    import triton

    info["triton"] = triton.__version__
    checks = correctness(device)
    tuning, rows = speed(device)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "sparse_attention_gpu.json").write_text(json.dumps(
        {"info": info, "correctness": checks, "tuning": tuning, "speed": rows}, indent=1))
    lines = [f"{info['gpu']}, torch {info['torch']}, triton {info['triton']}; bf16, B=1, 16 heads x 128, block 64, "
             f"launch config {tuning['best']}.", "",
             "| tokens | density | dense SDPA flash ms | Triton block-sparse ms | speedup | sparse TFLOP/s |",
             "|---:|---:|---:|---:|---:|---:|"]
    for row in rows:
        lines.append(f"| {row['tokens']} | {row['density']} | {row['dense_sdpa_flash_ms']:.2f} | "
                     f"{row['triton_sparse_ms']:.2f} | {row['speedup']:.2f}x | {row['sparse_tflops']:.0f} |")
    lines.append("")
    lines.append("Correctness: " + ", ".join(f"{c['dtype']} S={c['q_len']} D={c['dim']}: "
                                             f"{'ok' if c['ok'] else 'FAILED'} ({c['max_abs_error']:.1e})"
                                             for c in checks))
    (args.out / "sparse_attention_gpu.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0 if all(c["ok"] for c in checks) else 1


if __name__ == "__main__":
    raise SystemExit(main())
