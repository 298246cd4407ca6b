"""Sparse-attention benchmark on the CPU: the attention op, a long synthetic video, and the reference video model.

    python benchmarks/sparse_attention.py                     # everything (~25 minutes on 2 cores)
    python benchmarks/sparse_attention.py --sections op --lengths 4096,16384

Sections (``--sections``, comma-separated):

* ``op``: one attention call, fp32, 1 x 4 heads x 64, at 4K-32K tokens and densities 0.1 / 0.25 / 0.5 (random
  key blocks of 64, each query block's own block kept, the same count in every row): dense SDPA, our PyTorch path
  (``accel.kernels.block_sparse_attention``), and compiled FlexAttention with the same blocks as a ``BlockMask``.
  Median of ``--repeats`` calls after a warm-up, methods interleaved; FLOPs saved = 1 - density computed.
* ``synthetic``: a random-init ``WanTransformer3DModel`` (2 layers, 4 heads x 64) at 16,384 tokens per clip
  (4 latent frames of 64 x 64), 8 steps without guidance: wall-clock of the whole pipeline call, dense vs AdaSpa vs
  VMoBA, interleaved in rotating order, speedup with its spread. Random weights: speed alone, labelled synthetic.
* ``moving-digits``: the trained reference video model at its default call (576 tokens per clip): end-to-end
  speedup, PSNR / SSIM against the dense output for the same seeds, per-frame class accuracy, attention density
  and recall (attention mass kept; AdaSpa at its search steps, VMoBA on every sparse step of a separate run).
* ``selection``: on the reference video model, each method's recall over the oracle's at the same key-block budget
  (every query-block row keeping the same number of its heaviest blocks), on every sparse step.
* ``oracle``: the best recall any selection can reach on the reference video model: from the exact attention
  probabilities of every self-attention call of a dense run (every layer, step, CFG branch and head), the mass kept
  when each query row keeps its own heaviest keys, or each query block its heaviest key blocks (row-wise top-k, as
  AdaSpa selects), at the same densities. A method's recall cannot exceed the oracle of its granularity.

Writes ``sparse_attention_cpu.json`` and ``sparse_attention_cpu.md`` to ``--out`` (default docs/benchmarks); the
sections of an earlier ``sparse_attention_cpu.json`` there that this run does not measure are kept, with their dates.
"""

from __future__ import annotations

import argparse
import functools
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import accel  # noqa: E402
from accel.attention import AttentionCall, intercept_sdpa  # noqa: E402
from accel.eval.metrics import output_array  # noqa: E402
from accel.kernels import block_sparse_attention  # noqa: E402
from benchmarks.caching import _fmt  # noqa: E402

DOCS = Path(__file__).resolve().parents[1] / "docs" / "benchmarks"
SECTIONS = ("op", "synthetic", "moving-digits", "oracle", "selection")


def random_blocks(heads: int, blocks: int, density: float, seed: int = 0):
    """Each query block keeps its own block and random others, ``round(density * blocks)`` in all."""
    generator = torch.Generator().manual_seed(seed)
    keep = max(1, round(density * blocks))
    index = torch.empty(1, heads, blocks, keep, dtype=torch.int32)
    for h in range(heads):
        for m in range(blocks):
            others = torch.randperm(blocks - 1, generator=generator)[: keep - 1]
            others = others + (others >= m).long()  # skip the own block
            index[0, h, m] = torch.sort(torch.cat([torch.tensor([m]), others])).values.int()
    return index, torch.full((1, heads, blocks), keep, dtype=torch.int32)


def median_seconds(function, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        function()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def flex_runner(q, k, v, index, count, block: int):
    from torch.nn.attention.flex_attention import BlockMask, flex_attention

    key_blocks = k.shape[2] // block  # the mask's key extent is read from the index width: pad it to every block
    index = torch.nn.functional.pad(index, (0, key_blocks - index.shape[-1]))
    mask = BlockMask.from_kv_blocks(count, index, BLOCK_SIZE=block, seq_lengths=(q.shape[2], k.shape[2]))
    compiled = torch.compile(flex_attention, dynamic=False)
    return lambda: compiled(q, k, v, block_mask=mask)


def op_section(lengths: list[int], densities: list[float], repeats: int) -> list[dict]:
    rows = []
    for length in lengths:
        generator = torch.Generator().manual_seed(length)
        q, k, v = (torch.randn(1, 4, length, 64, generator=generator) for _ in range(3))
        dense = functools.partial(F.scaled_dot_product_attention, q, k, v)
        dense()
        for density in densities:
            index, count = random_blocks(4, length // 64, density)
            ours = functools.partial(block_sparse_attention, q, k, v, index, count, block_size=64)
            expected = F.scaled_dot_product_attention(q, k, v, attn_mask=_mask(index, count, length))
            torch.testing.assert_close(ours(), expected, atol=1e-4, rtol=1e-4)
            row = {"tokens": length, "density": density, "density_computed": float(count[0, 0, 0]) / (length // 64)}
            try:
                started = time.perf_counter()
                flex = flex_runner(q, k, v, index, count, 64)
                torch.testing.assert_close(flex(), expected, atol=1e-4, rtol=1e-4)
                row["flex_compile_s"] = time.perf_counter() - started
            except Exception as error:  # report why FlexAttention could not run here, keep the other columns
                flex, row["flex_error"] = None, f"{type(error).__name__}: {str(error)[:200]}"
            timings = {"dense": [], "ours": [], "flex": []}
            for _ in range(repeats):  # interleaved
                timings["dense"].append(median_seconds(dense, 1))
                timings["ours"].append(median_seconds(ours, 1))
                if flex is not None:
                    timings["flex"].append(median_seconds(flex, 1))
            row.update({f"{name}_s": statistics.median(values) for name, values in timings.items() if values})
            row["ours_speedup"] = row["dense_s"] / row["ours_s"]
            if "flex_s" in row:
                row["flex_speedup"] = row["dense_s"] / row["flex_s"]
            print(json.dumps(row), flush=True)
            rows.append(row)
    return rows


def _mask(index, count, length: int) -> torch.Tensor:
    from accel.kernels import mask_from_selection

    selected = mask_from_selection(index, count, length // 64)
    return selected.repeat_interleave(64, dim=2).repeat_interleave(64, dim=3)


def _wan_pipeline(layers: int, heads: int, head_dim: int, temporal_factor: int):
    from diffusers import FlowMatchEulerDiscreteScheduler, WanPipeline, WanTransformer3DModel

    from accel.pipelines.adapters import ready_for_inference
    from accel.pipelines.pixel_space import FramePackingVAE

    torch.manual_seed(0)
    model = WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=heads, attention_head_dim=head_dim, in_channels=temporal_factor,
        out_channels=temporal_factor, text_dim=64, freq_dim=64, ffn_dim=512, num_layers=layers, cross_attn_norm=True,
        qk_norm="rms_norm_across_heads", eps=1e-6, rope_max_seq_len=128,
    )
    vae = FramePackingVAE(channels=1, scale_factor_temporal=temporal_factor, z_dim=temporal_factor,
                          latents_mean=(0.0,) * temporal_factor, latents_std=(1.0,) * temporal_factor)
    return ready_for_inference(WanPipeline(tokenizer=None, text_encoder=None, transformer=model, vae=vae,
                                           scheduler=FlowMatchEulerDiscreteScheduler(shift=2.0)))


SPARSE_METHODS = {
    "AdaSpa (sparsity 0.9)": lambda: accel.AdaSpaConfig(sparsity=0.9),
    "AdaSpa (sparsity 0.75)": lambda: accel.AdaSpaConfig(sparsity=0.75),
    "AdaSpa (sparsity 0.75, dense search: the paper's)": lambda: accel.AdaSpaConfig(sparsity=0.75, search_rows=None),
    "VMoBA (threshold 0.25)": lambda: accel.VMoBAConfig(),
    "VMoBA (threshold 0.25, never dense: dense_above=1.0)": lambda: accel.VMoBAConfig(dense_above=1.0),
    "VMoBA (threshold 0.25, exact per-token gate)": lambda: accel.VMoBAConfig(gate="token-exact"),
    "VMoBA (threshold 0.25, block gate: vmoba-fast)": lambda: accel.VMoBAConfig(gate="block"),
}


def synthetic_section(repeats: int) -> list[dict]:
    from accel.eval.timing import Speedup, interleaved_timings

    embeds = torch.randn(1, 4, 64, generator=torch.Generator().manual_seed(0))
    call = dict(prompt_embeds=embeds, num_inference_steps=8, guidance_scale=1.0, height=128, width=128,
                num_frames=13, output_type="np")
    pipes = {"dense": _wan_pipeline(2, 4, 64, 4)}
    pipes.update({name: accel.wrap(_wan_pipeline(2, 4, 64, 4), make()) for name, make in SPARSE_METHODS.items()})
    for pipe in pipes.values():  # warm-up outside the timed rounds: one short call each
        pipe(**{**call, "num_inference_steps": 1}, generator=torch.Generator().manual_seed(0))
    calls = {name: functools.partial(lambda pipe: pipe(**call, generator=torch.Generator().manual_seed(1)), pipe)
             for name, pipe in pipes.items()}
    seconds = interleaved_timings(calls, repeats, warmup=0, rotate=True,
                                  on_round=lambda done, total: print(f"round {done}/{total}", flush=True))
    rows = []
    for name, pipe in pipes.items():
        speedup = Speedup.from_times(seconds["dense"], seconds[name])
        density = accel.summary(pipe).attention_density if accel.is_wrapped(pipe) else 1.0
        rows.append({"method": name, "tokens": 16384, "steps": 8, "seconds": statistics.median(seconds[name]),
                     "seconds_all": seconds[name], "speedup": speedup.median, "speedup_spread": speedup.to_dict(),
                     "attention_density": density, "selected_density": _selected_density(pipe)})
        print(json.dumps(rows[-1]), flush=True)
    return rows


def selection_section(model: str = "moving-digits", clips: int = 2) -> list[dict]:
    """Each method's recall over the oracle's best at the same key-block budget, on every step (AdaSpa between
    searches included), from one call with ``measure_recall=True``."""
    from accel.pipelines import reference

    methods = {"AdaSpa (sparsity 0.7)": accel.AdaSpaConfig(sparsity=0.7, measure_recall=True),
               "AdaSpa (sparsity 0.7, dense search: the paper's)":
                   accel.AdaSpaConfig(sparsity=0.7, search_rows=None, measure_recall=True),
               # dense_above=1.0: the recall of the selection itself, also where the default would run it dense
               "VMoBA (threshold 0.25)": accel.VMoBAConfig(measure_recall=True, dense_above=1.0),
               "VMoBA (threshold 0.25, exact per-token gate)":
                   accel.VMoBAConfig(gate="token-exact", measure_recall=True, dense_above=1.0),
               "VMoBA (threshold 0.25, block gate: vmoba-fast)":
                   accel.VMoBAConfig(gate="block", measure_recall=True, dense_above=1.0)}
    labels = [(3 * number) % 10 for number in range(clips)]
    rows = []
    for name, config in methods.items():
        pipe = accel.wrap(reference.load(model), config)
        with torch.no_grad():
            pipe(**reference.call_kwargs("moving-digits", pipe, labels, seed=0))
        extras = accel.summary(pipe).extras[config.method]
        entries = extras.get("recall") or extras.get("layers")  # AdaSpa: every sparse call; VMoBA: its layer log
        by_step: dict[int, list] = {}
        for layer_entries in entries.values():
            for entry in layer_entries:
                if "oracle_recall_per_head" in entry:
                    by_step.setdefault(entry["step"], []).append(entry)
        for step in sorted(by_step):
            kept = float(np.mean([np.mean(e["recall_per_head"]) for e in by_step[step]]))
            oracle = float(np.mean([np.mean(e["oracle_recall_per_head"]) for e in by_step[step]]))
            rows.append({"method": name, "model": model, "clips": clips, "step": step,
                         "searched": any(e.get("searched", False) for e in by_step[step]),
                         "recall": kept, "oracle_recall": oracle, "ratio": kept / oracle})
            print(json.dumps(rows[-1]), flush=True)
    return rows


def _mean_recall(summary_extras: dict, method: str, exact_only: bool) -> float | None:
    layers = summary_extras.get(method, {}).get("layers", {}).values()
    values = [np.mean(entry["recall_per_head"]) for entries in layers for entry in entries
              if "recall_per_head" in entry and (entry.get("exact", True) or not exact_only)]
    return float(np.mean(values)) if values else None


def _selected_density(pipe) -> float | None:
    """VMoBA's mean density as selected over its sparse calls, before a call at or above ``dense_above`` runs
    dense (None for the other methods, whose selection is what they compute)."""
    if not accel.is_wrapped(pipe):
        return None
    layers = accel.summary(pipe).extras.get("vmoba", {}).get("layers", {}).values()
    values = [entry["selected_density"] for entries in layers for entry in entries]
    return float(np.mean(values)) if values else None


def _tokens_per_clip(pipe) -> int:
    from accel.pipelines import reference

    call = reference.DEFAULT_CALL["moving-digits"]
    _, patch_h, patch_w = pipe.transformer.config.patch_size
    latent_frames = 1 + (call["num_frames"] - 1) // pipe.vae.config.scale_factor_temporal
    return latent_frames * (call["height"] // patch_h) * (call["width"] // patch_w)


def moving_digits_section(clips: int, batch: int, model: str = "moving-digits") -> list[dict]:
    from accel.eval.metrics import psnr, ssim
    from accel.pipelines import reference

    classifier = reference.classifier()
    methods = {"dense": None,
               "AdaSpa (sparsity 0.7)": lambda: accel.AdaSpaConfig(sparsity=0.7),
               "AdaSpa (sparsity 0.5)": lambda: accel.AdaSpaConfig(sparsity=0.5),
               "VMoBA (threshold 0.25)": lambda: accel.VMoBAConfig(),
               "VMoBA (threshold 0.25, exact per-token gate)": lambda: accel.VMoBAConfig(gate="token-exact"),
               "VMoBA (threshold 0.25, block gate: vmoba-fast)": lambda: accel.VMoBAConfig(gate="block"),
               "VMoBA (threshold 0.5, block gate)": lambda: accel.VMoBAConfig(threshold=0.5, gate="block")}
    pipes = {name: reference.load(model) for name in methods}
    for name, make in methods.items():
        if make is not None:
            accel.wrap(pipes[name], make())
    labels = [label for label in range(10) for _ in range(clips // 10)]
    outputs: dict[str, list] = {name: [] for name in methods}
    seconds: dict[str, list] = {name: [] for name in methods}
    densities: dict[str, list] = {name: [] for name in methods}
    recalls: dict[str, list] = {name: [] for name in methods}
    selected: dict[str, list] = {name: [] for name in methods}
    for number, start in enumerate(range(0, len(labels), batch)):
        names = list(methods)
        names = names[number % len(names):] + names[: number % len(names)]  # rotate the order: drift hits all alike
        for name in names:
            kwargs = reference.call_kwargs("moving-digits", pipes[name], labels[start : start + batch], seed=number)
            started = time.perf_counter()
            outputs[name].append(output_array(pipes[name](**kwargs)))
            seconds[name].append(time.perf_counter() - started)
            if methods[name] is not None:
                summary = accel.summary(pipes[name])
                densities[name].append(summary.attention_density)
                if _selected_density(pipes[name]) is not None:
                    selected[name].append(_selected_density(pipes[name]))
                recall = _mean_recall(summary.extras, "adaspa", exact_only=True)
                if recall is not None:
                    recalls[name].append(recall)
    for name, make in methods.items():  # VMoBA's recall needs a dense pass per call: a separate run on one batch
        if make is not None and make().method == "vmoba":
            probe = accel.wrap(reference.load(model), make().replace(measure_recall=True, dense_above=1.0))
            probe(**reference.call_kwargs("moving-digits", probe, labels[:batch], seed=0))
            recalls[name].append(_mean_recall(accel.summary(probe).extras, "vmoba", exact_only=False))
    dense = np.concatenate(outputs["dense"])
    rows = []
    for name in methods:
        frames = np.concatenate(outputs[name])
        ratios = [d / s for d, s in zip(seconds["dense"], seconds[name])]
        rows.append({
            "method": name, "clips": len(labels), "tokens_per_clip": _tokens_per_clip(pipes["dense"]),
            "speedup": statistics.median(ratios), "seconds_per_batch": statistics.median(seconds[name]),
            "psnr_vs_dense": psnr(dense, frames) if name != "dense" else None,
            "ssim_vs_dense": ssim(dense, frames) if name != "dense" else None,
            "per_frame_class_accuracy": classifier.accuracy(frames, labels),
            "attention_density": float(np.mean(densities[name])) if densities[name] else 1.0,
            "selected_density": float(np.mean(selected[name])) if selected[name] else None,
            "recall": float(np.mean(recalls[name])) if recalls[name] else None,
        })
        print(json.dumps(rows[-1]), flush=True)
    return rows


def oracle_recall(probabilities: torch.Tensor, density: float, block_size: int | None = None) -> float:
    """Mean share of each query row's attention mass kept by the best selection at ``density``: every row's own
    ``round(density * keys)`` heaviest keys (``block_size=None``), or every query block's ``round(density *
    key blocks)`` heaviest key blocks by their summed mass (row-wise top-k). ``probabilities``: [..., queries, keys]
    rows summing to 1; a ragged last block is padded with zero mass."""
    if not 0 < density <= 1:
        raise ValueError(f"density must be in (0, 1], got {density}")
    if block_size is not None and (not isinstance(block_size, int) or block_size < 1):
        raise ValueError(f"block_size must be a positive int or None (per token), got {block_size!r}")
    queries, keys = probabilities.shape[-2:]
    if block_size is None:
        keep = max(1, round(density * keys))
        return probabilities.topk(keep, dim=-1).values.sum(-1).mean().item()
    blocks_q, blocks_k = -(-queries // block_size), -(-keys // block_size)
    padded = F.pad(probabilities, (0, blocks_k * block_size - keys, 0, blocks_q * block_size - queries))
    # [..., query block, row in it, key block]
    row_mass = padded.reshape(*padded.shape[:-2], blocks_q, block_size, blocks_k, block_size).sum(-1)
    keep = max(1, round(density * blocks_k))
    chosen = row_mass.sum(-2).topk(keep, dim=-1).indices  # [..., qb, keep]: by the query block's summed mass
    kept = row_mass.gather(-1, chosen.unsqueeze(-2).expand(*row_mass.shape[:-1], keep)).sum(-1)
    return (kept.flatten(-2)[..., :queries].sum(-1) / queries).mean().item()


def oracle_section(model: str = "moving-digits", clips: int = 2, densities=(0.3, 0.5),
                   block_sizes=(None, 64, 16)) -> list[dict]:
    from accel.pipelines import reference

    pipe = reference.load(model)
    sums: dict[tuple, list] = {(d, b): [] for d in densities for b in block_sizes}

    def measure_and_run(call: AttentionCall) -> torch.Tensor:
        if call.query.shape[-2] == call.key.shape[-2] and call.attn_mask is None:  # self-attention
            scale = call.scale or call.query.shape[-1] ** -0.5
            logits = call.query.float() @ call.key.float().transpose(-1, -2) * scale
            probabilities = torch.softmax(logits, dim=-1)
            for density, block_size in sums:
                sums[density, block_size].append(oracle_recall(probabilities, density, block_size))
        return call.dense()

    labels = [(3 * number) % 10 for number in range(clips)]
    with torch.no_grad(), intercept_sdpa(measure_and_run):
        pipe(**reference.call_kwargs("moving-digits", pipe, labels, seed=0))
    rows = [{"model": model, "clips": clips, "density": density,
             "selection": f"blocks of {block_size}, per query block" if block_size else "tokens, per query row",
             "calls": len(values), "recall": float(np.mean(values))}
            for (density, block_size), values in sums.items()]
    for row in rows:
        print(json.dumps(row), flush=True)
    return rows


def earlier_sections(path: Path, rerun: list[str]) -> dict:
    """What an earlier result file holds that this run does not measure (a run of one section keeps the others and
    any extra raw figures), with the sections' dates; nothing if there is no earlier file."""
    if not path.is_file():
        return {}
    try:
        earlier = json.loads(path.read_text())
        if not isinstance(earlier, dict):
            raise TypeError(f"a JSON {type(earlier).__name__}, not an object")
    except (json.JSONDecodeError, UnicodeDecodeError, TypeError) as error:
        raise ValueError(f"{path} is not a sparse-attention result ({error}); move it away or pick another --out, "
                         "so sections not rerun are not lost silently") from error
    date = earlier.get("machine", {}).get("date")
    dropped = {"machine", "section_dates", *rerun, *(["moving-digits-model"] if "moving-digits" in rerun else [])}
    kept = {key: value for key, value in earlier.items() if key not in dropped}  # extra raw figures stay too
    dates = earlier.get("section_dates", {})
    kept["section_dates"] = {key: dates.get(key, date) for key in SECTIONS if key in kept}
    return kept


def _measured(results: dict, section: str) -> list[str]:
    date = results.get("section_dates", {}).get(section)
    return [f"Measured {date}.", ""] if date and date != results["machine"]["date"] else []


def markdown(results: dict) -> str:
    machine = results["machine"]
    lines = ["# Sparse attention on the CPU", "",
             f"Measured by `benchmarks/sparse_attention.py` on {machine['processor']} ({machine['threads']} threads), "
             f"torch {machine['torch']}, {machine['date']}.", ""]
    if results.get("op"):
        lines += ["## The attention op", "", *_measured(results, "op"),
                  "fp32, 1 x 4 heads x 64, random key blocks of 64 (own block kept), "
                  "median seconds per call, methods interleaved.", "",
                  "| tokens | density | FLOPs saved | dense SDPA s | ours s | ours speedup | FlexAttention s | "
                  "Flex speedup | Flex compile s |", "|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for r in results["op"]:
            lines.append(f"| {r['tokens']} | {r['density']} | {1 - r['density_computed']:.0%} | {r['dense_s']:.3f} | "
                         f"{r['ours_s']:.3f} | {r['ours_speedup']:.2f}x | {_fmt(r.get('flex_s'), '.3f')} | "
                         f"{_fmt(r.get('flex_speedup'), '.2f')}x | {_fmt(r.get('flex_compile_s'), '.0f')} |")
        errors = {r["flex_error"] for r in results["op"] if "flex_error" in r}
        lines += [""] + [f"FlexAttention failed: {error}" for error in errors]
    if results.get("synthetic"):
        lines += ["", "## Synthetic: random-init Wan, 16,384 tokens per clip, 8 steps (speed only)", "",
                  *_measured(results, "synthetic"),
                  "Whole pipeline calls, methods interleaved in rotating order; the speedup is the median of the "
                  "per-round ratios to dense, with their spread.", "",
                  "Attention density: the share of the attention matrix computed, dense steps and calls included; "
                  "selected: VMoBA's selections on its sparse steps, before a selection at or above `dense_above` "
                  "(default: the kernel's break-even on the device) runs dense.", "",
                  "| method | seconds per call | speedup | spread | attention density | selected |",
                  "|---|---:|---:|---|---:|---:|"]
        for r in results["synthetic"]:
            spread = r.get("speedup_spread")
            spread_text = (f"{spread['low']:.2f}–{spread['high']:.2f}x ({spread['spread']}, {spread['n']} rounds)"
                           if spread else "")
            lines.append(f"| {r['method']} | {r['seconds']:.1f} | {r['speedup']:.2f}x | {spread_text} | "
                         f"{r['attention_density']:.3f} | {_fmt(r.get('selected_density'), '.3f')} |")
    if results.get("moving-digits"):
        tokens = results["moving-digits"][0]["tokens_per_clip"]
        lines += ["", f"## moving-digits ({results.get('moving-digits-model')}, {tokens} tokens per clip)", "",
                  *_measured(results, "moving-digits"),
                  "| method | speedup | PSNR vs dense | SSIM vs dense | per-frame class accuracy | attention density "
                  "| selected | recall |", "|---|---:|---:|---:|---:|---:|---:|---:|"]
        for r in results["moving-digits"]:
            lines.append(f"| {r['method']} | {r['speedup']:.2f}x | {_fmt(r['psnr_vs_dense'], '.1f')} | "
                         f"{_fmt(r['ssim_vs_dense'], '.3f')} | {r['per_frame_class_accuracy']:.1%} | "
                         f"{r['attention_density']:.3f} | {_fmt(r.get('selected_density'), '.3f')} | "
                         f"{_fmt(r['recall'], '.3f')} |")
    if results.get("oracle"):
        first = results["oracle"][0]
        lines += ["", f"## Best possible recall on {first['model']} (oracle)", "", *_measured(results, "oracle"),
                  f"Exact attention probabilities of every self-attention call of a dense run ({first['clips']} "
                  f"clips, default call: {first['calls']} calls x batch x heads), mass kept by the best selection "
                  "at each density. No method's recall at that density and granularity can be higher.", "",
                  "| density | selection | recall |", "|---:|---|---:|"]
        for r in results["oracle"]:
            lines.append(f"| {r['density']} | {r['selection']} | {r['recall']:.3f} |")
    if results.get("selection"):
        first = results["selection"][0]
        lines += ["", f"## Selection quality against the oracle on {first['model']}", "",
                  *_measured(results, "selection"),
                  f"One call ({first['clips']} clips, default call), `measure_recall=True`: on every sparse step, the "
                  "attention mass each method's selection keeps (recall), the most any selection with the same "
                  "number of key blocks in each query-block row keeps (oracle), and their ratio; means over layers, "
                  "CFG branches and heads. VMoBA's exact per-token gate: each query token's row over its partition "
                  "blocks. VMoBA with `dense_above=1.0`: the selection's own recall. `searched`: AdaSpa searched at "
                  "that step.", "",
                  "| method | step | searched | recall | oracle | recall / oracle |", "|---|---:|---|---:|---:|---:|"]
        for r in results["selection"]:
            lines.append(f"| {r['method']} | {r['step']} | {'yes' if r['searched'] else ''} | {r['recall']:.3f} | "
                         f"{r['oracle_recall']:.3f} | {r['ratio']:.3f} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sections", default=",".join(SECTIONS))
    parser.add_argument("--lengths", default="4096,8192,16384,32768")
    parser.add_argument("--densities", default="0.1,0.25,0.5")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--clips", type=int, default=40)
    parser.add_argument("--batch", type=int, default=10)
    parser.add_argument("--moving-digits", default="moving-digits",
                        help="the shipped model's name, or a folder with a checkpoint of it (say which in the doc)")
    parser.add_argument("--out", type=Path, default=DOCS)
    args = parser.parse_args(argv)
    sections = [s for s in args.sections.split(",") if s]
    unknown = sorted(set(sections) - set(SECTIONS))
    if unknown:
        parser.error(f"unknown sections {unknown}; choose from {', '.join(SECTIONS)}")
    today = time.strftime("%Y-%m-%d")
    earlier = earlier_sections(args.out / "sparse_attention_cpu.json", sections)  # sections not rerun stay
    results = {**earlier,
               "machine": {"processor": platform.processor() or platform.machine(),
                           "threads": torch.get_num_threads(), "torch": torch.__version__, "date": today},
               "section_dates": {**earlier.get("section_dates", {}), **{section: today for section in sections}}}
    if "op" in sections:
        results["op"] = op_section([int(x) for x in args.lengths.split(",")],
                                   [float(x) for x in args.densities.split(",")], args.repeats)
    if "synthetic" in sections:
        results["synthetic"] = synthetic_section(args.repeats)
    if "moving-digits" in sections:
        results["moving-digits"] = moving_digits_section(args.clips, args.batch, args.moving_digits)
        results["moving-digits-model"] = args.moving_digits
    if "oracle" in sections:
        results["oracle"] = oracle_section(args.moving_digits)
    if "selection" in sections:
        results["selection"] = selection_section(args.moving_digits)
    args.out.mkdir(parents=True, exist_ok=True)
    from accel.io import atomic_write

    atomic_write(args.out / "sparse_attention_cpu.json", json.dumps(results, indent=2) + "\n")
    atomic_write(args.out / "sparse_attention_cpu.md", markdown(results))
    print(markdown(results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
