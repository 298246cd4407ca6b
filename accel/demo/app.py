"""The side-by-side demo: the same seed through a plain and an accelerated pipeline, outputs and timings compared.

    accel-demo                              # http://127.0.0.1:7860, digits-dit and moving-digits
    accel-demo --model /path/to/pipeline    # add a local diffusers pipeline folder (repeatable)

``build_demo(...)`` returns the Gradio Blocks app. Each model loads once; each (model, accelerator stack, settings)
gets its own wrapped pipeline, built on first use and kept, so the plain pipeline is never touched by accel.
Methods with an offline pass (BAC) are calibrated when their pipeline is built, on seeds the demo never shows.

Presets: choosing a preset fills its number boxes with the preset's values; a box the user changed away from the
preset's value overrides that field, every other field (numeric or not) is the preset's own (``page_configs``).

Timing follows ``accel.eval.timing``: one untimed warm-up call each (after any calibration), then "Timing rounds"
interleaved rounds (baseline, accelerated, baseline, ...); the headline is the median per-round speedup with its
spread, "within noise" when the spread reaches 1.0×. PSNR compares the warm-up outputs (every round is the same
seed). Progress names the phase: calibration, warm-up, timing round k/n.

Images show both outputs and a slider; video shows one side-by-side animation (baseline | accelerated, same frame
in each picture, so they never drift apart) and a frame grid with the difference. Inputs are bounded and checked
(a step count of 2.5 is refused, never rounded); a bad input or a failed run is shown in the status line above
the results, which keep the previous run's pictures. Runs are queued with a concurrency limit; the API endpoint is
``/compare`` (gradio_client).
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import json
import logging
import math
import tempfile
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

import accel
from accel.eval.metrics import output_array, psnr
from accel.eval.models import ModelHandle, load_model
from accel.eval.timing import Speedup, Spread, interleaved_timings
from accel.registry import available, registered, resolve, spec_for

DEFAULT_MODELS = ("digits-dit", "moving-digits")
LIMITS = {"steps": (1, 50), "guidance": (1.0, 10.0), "seed": (0, 2**31 - 1), "rounds": (1, 10)}
DEFAULT_ROUNDS = 3
CALIBRATION_SEED = 777_777
DISPLAY_SIZE = 256
GRID_CELL = 64
MAX_GRID_FRAMES = 24
GRID_COLUMNS = 9
SUMMARY_WIDTH = 88  # characters per line of the summary box's header (it does not wrap)
CALIBRATING = "calibrating {method}, once per model, steps and settings"

log = logging.getLogger("accel.demo")
Progress = Callable[[float, str], None]


def default_stack() -> tuple[str, str]:
    """The accelerator and preset the page starts with: BAC's bac-forecast, else Δ-DiT, else the first one."""
    presets = {entry["name"]: entry["presets"] for entry in available()}
    if "bac-forecast" in presets.get("bac", []):
        return "bac", "bac-forecast"
    if "delta-dit" in presets:
        return "delta-dit", "delta-dit"
    first = next(iter(presets))
    return first, first


def whole_number(name: str, value: Any, low: int | None = None, high: int | None = None) -> int:
    """``value`` as an int when it is a whole number in [low, high]; ``ValueError`` otherwise (2.5 is refused, not
    rounded; 3.0 from a number box is 3)."""
    bounds = f" in {low}..{high}" if low is not None and high is not None else ""
    if (isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value)
            or value != int(value) or (low is not None and value < low) or (high is not None and value > high)):
        raise ValueError(f"{name} must be a whole number{bounds}, got {value!r}.")
    return int(value)


def tunable_fields(method: str) -> list[dataclasses.Field]:
    """The numeric fields of a method's config, shown as its key parameters."""
    spec = next(s for s in registered() if s.name == method)
    return [f for f in dataclasses.fields(spec.config_cls)
            if f.type in ("int", "float", int, float) and not isinstance(f.default, dataclasses._MISSING_TYPE)]


def preset_values(preset: str) -> dict[str, int | float]:
    """The values a preset gives the number boxes of its method (what choosing it in the dropdown shows)."""
    (config,) = resolve([preset])
    return {field.name: getattr(config, field.name) for field in tunable_fields(config.method)}


def page_configs(presets: list[str], boxes: dict[str, dict[str, Any]] | None = None) -> list:
    """Configs for the chosen presets. ``boxes[method][field]`` is what the page's number box holds: a value other
    than the preset's overrides that field; the preset's own value or an empty box (None) leaves it. Every other
    field (bac-forecast's metric, per_block, ...) is the preset's. Int fields must be whole numbers."""
    configs = []
    for preset in presets:
        (config,) = resolve([preset])
        kinds = {field.name: field.type for field in tunable_fields(config.method)}
        changes = {}
        for name, value in (boxes or {}).get(config.method, {}).items():
            if value is None or name not in kinds:
                continue
            if kinds[name] in ("int", int):
                value = whole_number(f"{config.method} {name}", value)
            elif isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ValueError(f"{config.method} {name} must be a finite number, got {value!r}.")
            if value != getattr(config, name):
                changes[name] = value
        configs.append(config.replace(**changes) if changes else config)
    return configs


def _shown(config) -> str:
    """A config's fields for the summary, without a calibrated schedule."""
    fields = {k: v for k, v in config.to_dict().items() if k not in ("method", "schedule", "artifact")}
    return f"{config.method}: " + ", ".join(f"{k}={v}" for k, v in fields.items())


class DemoBackend:
    """Model handles, one plain pipeline per model and one wrapped pipeline per configuration, built lazily."""

    def __init__(self, model_names: list[str]) -> None:
        self.handles: dict[str, ModelHandle] = {}
        for name in model_names:
            try:
                self.handles[name] = load_model(name)
            except ValueError as error:  # a model whose weights are absent is left out, with the reason
                print(f"accel-demo: skipping {name}: {error}")
        if not self.handles:
            raise ValueError("No model could be loaded; train the reference models or pass --model FOLDER.")
        self._plain: dict[str, Any] = {}
        self._wrapped: dict[tuple, Any] = {}
        self._lock = threading.Lock()

    def plain(self, model: str):
        with self._lock:
            if model not in self._plain:
                self._plain[model] = self.handles[model].build()
            return self._plain[model]

    def wrapped(self, model: str, configs: list, steps: int, guidance: float, progress: Progress | None = None):
        """The pipeline wrapped with ``configs``; calibrating methods (BAC) are calibrated on first use, which
        ``progress`` announces (their tqdm bar shows when ``progress`` is given)."""
        key = (model, tuple(sorted(repr(c.to_dict()) for c in configs)), steps, guidance)
        with self._lock:
            if key not in self._wrapped:
                handle = self.handles[model]
                pipe = handle.build()
                conditions = list(range(10)) if handle.conditioning == "class" else ["a photo"]
                seeds = [CALIBRATION_SEED + i for i in range(len(conditions))]
                kwargs = handle.call_kwargs(pipe, conditions, seeds, steps, guidance)
                del kwargs["num_inference_steps"]
                ready = []
                for config in configs:
                    spec = spec_for(config)
                    if spec.calibrate is not None:
                        if progress is not None:
                            progress(0.0, CALIBRATING.format(method=config.method.upper()))
                        artifact = accel.calibrate(pipe, config, kwargs, num_inference_steps=steps,
                                                   progress=progress is not None)
                        config = config.replace(**{spec.artifact_field: artifact})
                    ready.append(config)
                self._wrapped[key] = accel.wrap(pipe, ready)
            return self._wrapped[key]


def _picture(frame: np.ndarray, size: int = DISPLAY_SIZE):
    """One frame as an RGB PIL image scaled up with nearest-neighbour, so every pixel stays visible."""
    from PIL import Image

    frame = (np.clip(frame, 0, 1) * 255).round().astype(np.uint8)
    frame = np.repeat(frame, 3, axis=-1) if frame.shape[-1] == 1 else frame
    scale = max(1, size // max(frame.shape[:2]))
    return Image.fromarray(frame).resize((frame.shape[1] * scale, frame.shape[0] * scale), Image.NEAREST)


def _font(size: int):
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow without FreeType sizes
        return ImageFont.load_default()


def _display(sample: np.ndarray, folder: Path, name: str) -> str:
    """A lossless PNG (image) or GIF (video) of one output."""
    if sample.ndim == 4:
        frames = [_picture(frame) for frame in sample]
        path = folder / f"{name}.gif"
        frames[0].save(path, save_all=True, append_images=frames[1:], duration=100, loop=0)
    else:
        path = folder / f"{name}.png"
        _picture(sample).save(path)
    return str(path)


def side_by_side(baseline: np.ndarray, accelerated: np.ndarray, folder: Path, label: str) -> str:
    """One GIF whose every frame is baseline frame k | accelerated frame k, labelled above and numbered below, so
    the two play in sync."""
    from PIL import Image, ImageDraw

    font, band, gap = _font(16), 28, 8
    pictures = []
    for index, (left, right) in enumerate(zip(baseline, accelerated)):
        left, right = _picture(left), _picture(right)
        canvas = Image.new("RGB", (left.width + gap + right.width, left.height + 2 * band), "white")
        canvas.paste(left, (0, band))
        canvas.paste(right, (left.width + gap, band))
        draw = ImageDraw.Draw(canvas)
        draw.text((left.width // 2, band // 2), "baseline", fill="black", font=font, anchor="mm")
        draw.text((left.width + gap + right.width // 2, band // 2), label, fill="black", font=font, anchor="mm")
        draw.text((canvas.width // 2, canvas.height - band // 2), f"frame {index + 1}/{len(baseline)}",
                  fill="dimgray", font=font, anchor="mm")
        pictures.append(canvas)
    path = folder / "side-by-side.gif"
    pictures[0].save(path, save_all=True, append_images=pictures[1:], duration=120, loop=0)
    return str(path)


def frame_grid(baseline: np.ndarray, accelerated: np.ndarray, folder: Path) -> str:
    """A PNG of every frame (at most ``MAX_GRID_FRAMES``, evenly spaced), ``GRID_COLUMNS`` to a block, each block
    with rows baseline, accelerated and |difference| x4, under a title."""
    from PIL import Image, ImageDraw

    count = len(baseline)
    chosen = np.unique(np.linspace(0, count - 1, min(count, MAX_GRID_FRAMES)).round().astype(int))
    difference = np.clip(np.abs(baseline - accelerated) * 4, 0, 1).mean(axis=-1, keepdims=True)
    rows = [("baseline", baseline), ("accelerated", accelerated), ("|diff| x4", difference)]
    font, title_font, label_width, header, gap, title = _font(14), _font(16), 104, 22, 2, 30
    cell = _picture(baseline[0], GRID_CELL).size
    blocks = [chosen[i:i + GRID_COLUMNS] for i in range(0, len(chosen), GRID_COLUMNS)]
    block_height = header + len(rows) * (cell[1] + gap)
    width = label_width + min(len(chosen), GRID_COLUMNS) * (cell[0] + gap)
    grid = Image.new("RGB", (max(width, 420), title + len(blocks) * block_height), "white")
    draw = ImageDraw.Draw(grid)
    draw.text((4, title // 2), "Every frame: baseline, accelerated, |difference| x4", fill="black", font=title_font,
              anchor="lm")
    for number, block in enumerate(blocks):
        top = title + number * block_height
        for column, frame in enumerate(block):
            draw.text((label_width + column * (cell[0] + gap) + cell[0] // 2, top + 4), str(frame + 1),
                      fill="dimgray", font=font, anchor="ma")
        for row, (name, frames) in enumerate(rows):
            row_top = top + header + row * (cell[1] + gap)
            draw.text((4, row_top + cell[1] // 2), name, fill="black", font=font, anchor="lm")
            for column, frame in enumerate(block):
                grid.paste(_picture(frames[frame], GRID_CELL), (label_width + column * (cell[0] + gap), row_top))
    path = folder / "frames.png"
    grid.save(path)
    return str(path)


def _wrap(line: str, separator: str) -> str:
    """``line`` broken after ``separator``s into lines of at most ``SUMMARY_WIDTH`` characters where it can be."""
    lines = [""]
    for part in line.split(separator):
        if lines[-1] and len(lines[-1]) + len(separator) + len(part) > SUMMARY_WIDTH:
            lines[-1] += separator.rstrip()
            lines.append("    " + part)
        else:
            lines[-1] += (separator if lines[-1] else "") + part
    return "\n".join(lines)


def _percent(share: float | None) -> str:
    return "–" if share is None else f"{share:.1%}"


def run_comparison(backend: DemoBackend, model: str, condition, seed: int, steps: int, guidance: float,
                   methods: list[str], parameters: dict[str, dict[str, Any]] | None = None, *,
                   rounds: int = DEFAULT_ROUNDS, progress: Progress | None = None) -> dict[str, Any]:
    """Generate with the plain and the accelerated pipeline from the same seed, timed with the shared protocol
    (one untimed warm-up, then ``rounds`` interleaved rounds); return paths and figures.

    ``methods`` are preset names; ``parameters[method][field]`` are number boxes (see ``page_configs``)."""
    if model not in backend.handles:
        raise ValueError(f"Unknown model {model!r}; choose one of {', '.join(backend.handles)}.")
    steps = whole_number("Steps", steps, *LIMITS["steps"])
    low, high = LIMITS["guidance"]
    if isinstance(guidance, bool) or not isinstance(guidance, (int, float)) or not low <= guidance <= high:
        raise ValueError(f"Guidance must be a number in {low}..{high}, got {guidance!r}.")
    seed = whole_number("Seed", seed, *LIMITS["seed"])
    rounds = whole_number("Timing rounds", rounds, *LIMITS["rounds"])
    if not methods:
        raise ValueError("Choose at least one accelerator.")
    handle = backend.handles[model]
    if handle.conditioning == "class":
        condition = whole_number("Class", condition, 0, (handle.num_classes or 10) - 1)
    elif not isinstance(condition, str) or not condition.strip() or len(condition) > 500:
        raise ValueError("The prompt must be 1 to 500 characters.")
    configs = page_configs(methods, parameters)
    report = progress or (lambda fraction, message: None)
    plain = backend.plain(model)
    wrapped = backend.wrapped(model, configs, steps, float(guidance), progress)

    def call(pipe):
        kwargs = handle.call_kwargs(pipe, [condition], [seed], steps, float(guidance))

        def once():  # a fresh generator from the same seed on every call
            return output_array(pipe(**kwargs, **{"generator": [torch.Generator("cpu").manual_seed(seed)]}))[0]

        kwargs.pop("generator")
        return once

    def on_round(done: int, total: int) -> None:
        if done < total:
            report(done / total, f"timing round {done}/{rounds}")

    report(0.0, "warm-up (untimed)")
    outputs: dict[str, np.ndarray] = {}
    times = interleaved_timings({"baseline": call(plain), "accelerated": call(wrapped)}, rounds, warmup=1,
                                on_round=on_round, keep=outputs.__setitem__)
    speedup = Speedup.from_times(times["baseline"], times["accelerated"])
    seconds = {label: Spread.of(values).median for label, values in times.items()}
    quality = psnr(outputs["baseline"], outputs["accelerated"])
    summary = accel.summary(wrapped)
    names = " + ".join(methods)
    headline = (f"speedup {speedup.describe()} · PSNR {quality:.2f} dB vs baseline · blocks computed "
                f"{_percent(summary.blocks_computed_share)} · branches computed "
                f"{_percent(summary.branches_computed_share)}")
    if summary.attention_density is not None and summary.attention_density < 1.0:  # a sparse-attention method
        headline += f" · attention computed {_percent(summary.attention_density)}"
    header = [_wrap(headline, " · "), "", *(_wrap(_shown(config), ", ") for config in configs)]
    text = "\n".join([*header, "", str(summary)])
    folder = Path(tempfile.mkdtemp(prefix="accel-demo-"))
    video = outputs["baseline"].ndim == 4
    return {
        "baseline": _display(outputs["baseline"], folder, "baseline"),
        "accelerated": _display(outputs["accelerated"], folder, "accelerated"),
        "video": video,
        "side_by_side": side_by_side(outputs["baseline"], outputs["accelerated"], folder,
                                     f"accelerated ({names})") if video else None,
        "frames": frame_grid(outputs["baseline"], outputs["accelerated"], folder) if video else None,
        "timings": times,
        "baseline_seconds": seconds["baseline"],
        "accelerated_seconds": seconds["accelerated"],
        "speedup": speedup.median,
        "speedup_spread": speedup.to_dict(),
        "within_noise": speedup.within_noise,
        "psnr_db": quality,
        "headline": headline,
        "summary": text,
        "configs": [config.to_dict() for config in configs],
        "blocks_computed": summary.blocks_computed_share,
        "branches_computed": summary.branches_computed_share,
    }


def figures_markdown(result: dict[str, Any], rounds: int) -> str:
    """The figures line under the outputs: the headline, then the median seconds per call."""
    return (f"**{result['headline']}**\n\nbaseline {result['baseline_seconds']:.3f} s · accelerated "
            f"{result['accelerated_seconds']:.3f} s (median per call over {rounds} interleaved "
            f"round{'s' if rounds != 1 else ''}, after one untimed warm-up each)")


def _phases(progress) -> Progress:
    """A ``Progress`` callback that shows the phase as the outer level of a ``gr.Progress(track_tqdm=True)``: kept
    first among its tracked levels, so the pipeline's own step bars show under it instead of replacing it."""
    from gradio.helpers import TrackedIterable

    phase = TrackedIterable(None, None, None, None, None)

    def report(fraction: float, message: str) -> None:
        phase.desc, phase.progress = message, fraction
        if phase not in progress.iterables:
            progress.iterables.insert(0, phase)
        send = progress._progress_callback()
        if send is not None:  # only inside a Gradio event
            send(progress.iterables)

    return report


def _visibility(handle: ModelHandle) -> dict[str, bool]:
    """Which controls and outputs the page shows for a model."""
    return {"class": handle.conditioning == "class", "prompt": handle.conditioning != "class",
            "image": not handle.video, "video": handle.video}


def build_demo(model_names: list[str] | tuple[str, ...] = DEFAULT_MODELS, *, concurrency_limit: int = 1):
    """The Gradio Blocks app comparing plain and accelerated generation of ``model_names``."""
    import gradio as gr

    backend = DemoBackend(list(model_names))
    methods = [entry["name"] for entry in available() if not entry["trained_with"]]  # no training in a page
    presets = {entry["name"]: entry["presets"] for entry in available() if not entry["trained_with"]}
    start_method, start_preset = default_stack()
    first = next(iter(backend.handles))
    shown = _visibility(backend.handles[first])

    with gr.Blocks(title="accel: baseline vs accelerated") as app:
        gr.Markdown("## accel — baseline vs accelerated\nThe same seed through a plain and an accelerated pipeline.")
        with gr.Row():
            with gr.Column(scale=1, min_width=320):
                model = gr.Dropdown(list(backend.handles), value=first, label="Model", elem_id="model")
                class_id = gr.Slider(0, 9, value=3, step=1, label="Class", visible=shown["class"],
                                     elem_id="class")
                prompt = gr.Textbox(value="a photo of a cat", label="Prompt", max_lines=2, visible=shown["prompt"],
                                    elem_id="prompt")
                chosen = gr.CheckboxGroup(methods, value=[start_method], label="Accelerators (several stack)",
                                          elem_id="accelerators")
                run = gr.Button("Run", variant="primary", elem_id="run")
                with gr.Accordion("Generation and timing", open=False, elem_id="settings"):
                    seed = gr.Number(value=0, label=f"Seed (0..{LIMITS['seed'][1]})", elem_id="seed")
                    steps = gr.Slider(*LIMITS["steps"], value=20, step=1, label="Steps", elem_id="steps")
                    guidance = gr.Slider(*LIMITS["guidance"], value=1.5, step=0.5, label="Guidance scale",
                                         elem_id="guidance")
                    rounds = gr.Slider(*LIMITS["rounds"], value=DEFAULT_ROUNDS, step=1, label="Timing rounds",
                                       info="interleaved, after one untimed warm-up", elem_id="rounds")
                parameter_inputs: list[tuple[str, str, Any]] = []
                for method in methods:
                    start = start_preset if method == start_method else method
                    values = preset_values(start)
                    with gr.Accordion(f"{method} settings", open=False, elem_id=f"{method}-settings"):
                        preset = gr.Dropdown(presets[method], value=start, label=f"{method} preset",
                                             elem_id=f"{method}-preset")
                        boxes = [gr.Number(value=values[field.name], label=field.name,
                                           elem_id=f"{method}-{field.name}") for field in tunable_fields(method)]
                    parameter_inputs.append((method, "__preset__", preset))
                    parameter_inputs += [(method, f.name, box) for f, box in zip(tunable_fields(method), boxes)]
                    # choosing a preset shows its values, in the browser (no round trip that a quick Run could
                    # overtake); a box the user then edits away from them overrides the preset (page_configs)
                    table = {name: list(preset_values(name).values()) for name in presets[method]}
                    preset.change(None, preset, boxes, js=f"(name) => ({json.dumps(table)})[name]",
                                  api_visibility="private", queue=False)
            with gr.Column(scale=2):
                status = gr.Markdown("Press **Run** to compare.", elem_id="status")
                figures = gr.Markdown(elem_id="figures")
                with gr.Row(visible=shown["image"]) as image_row:
                    baseline_image = gr.Image(label="Baseline", type="filepath", format="png", elem_id="baseline")
                    accelerated_image = gr.Image(label="Accelerated", type="filepath", format="png",
                                                 elem_id="accelerated")
                slider = gr.ImageSlider(label="Slide to compare (lossless PNG)", type="filepath",
                                        visible=shown["image"], elem_id="slider")
                # labelled inside the pictures (Gradio's label badge would cover the top-left corner)
                animation = gr.Image(label="Baseline | accelerated, in sync", show_label=False, type="filepath",
                                     visible=shown["video"], elem_id="side-by-side")
                frames = gr.Image(label="Every frame", show_label=False, type="filepath", format="png",
                                  visible=shown["video"], elem_id="frames")
                summary = gr.Code(label="accel.summary of the accelerated run", language=None, max_lines=24,
                                  elem_id="summary")

        def on_model(model_name):
            visible = _visibility(backend.handles[model_name])
            return (gr.update(visible=visible["class"], maximum=(backend.handles[model_name].num_classes or 10) - 1),
                    gr.update(visible=visible["prompt"]), gr.update(visible=visible["image"]),
                    gr.update(visible=visible["image"]), gr.update(visible=visible["video"]),
                    gr.update(visible=visible["video"]))

        model.change(on_model, model, [class_id, prompt, image_row, slider, animation, frames],
                     api_visibility="private", queue=False)

        def on_run(*values):
            (model_name, class_value, prompt_text, seed_value, steps_value, guidance_value, rounds_value,
             chosen_methods, *parameter_values, progress) = values
            stack, boxes = [], {}
            for (method, name, _), value in zip(parameter_inputs, parameter_values):
                if name == "__preset__":
                    if method in (chosen_methods or []):
                        stack.append(value or method)
                else:
                    boxes.setdefault(method, {})[name] = value
            keep = [gr.skip()] * 7
            try:
                handle = backend.handles.get(model_name)
                condition = prompt_text if handle is not None and handle.conditioning != "class" else class_value
                result = run_comparison(backend, model_name, condition, seed_value, steps_value, guidance_value,
                                        stack, boxes, rounds=rounds_value, progress=_phases(progress))
            except ValueError as error:  # the user's input: said plainly, no traceback in the log
                return [f"**Not run:** {error}", *keep]
            except Exception as error:  # a failure of ours: logged with its traceback, never one on the page
                log.exception("accel-demo: the run failed")
                return [f"**The run failed:** {type(error).__name__}: {error}", *keep]
            video = result["video"]
            shown_condition = f"prompt {condition!r}" if isinstance(condition, str) else f"class {condition}"
            done = (f"Done: {model_name}, {shown_condition}, seed {int(seed_value)}, {int(steps_value)} steps, "
                    f"{' + '.join(stack)}.")
            return [done, figures_markdown(result, int(rounds_value)),
                    None if video else result["baseline"], None if video else result["accelerated"],
                    None if video else (result["baseline"], result["accelerated"]),
                    result["side_by_side"], result["frames"], result["summary"]]

        names = ["model_name", "class_value", "prompt_text", "seed_value", "steps_value", "guidance_value",
                 "rounds_value", "chosen_methods",
                 *[f"{method}_{'preset' if name == '__preset__' else name}".replace("-", "_")
                   for method, name, _ in parameter_inputs]]
        on_run.__signature__ = inspect.Signature(
            [inspect.Parameter(name, inspect.Parameter.POSITIONAL_OR_KEYWORD) for name in names]
            + [inspect.Parameter("progress", inspect.Parameter.POSITIONAL_OR_KEYWORD,
                                 default=gr.Progress(track_tqdm=True))])

        inputs = [model, class_id, prompt, seed, steps, guidance, rounds, chosen, *[w for _, _, w in parameter_inputs]]
        outputs = [status, figures, baseline_image, accelerated_image, slider, animation, frames, summary]
        run.click(on_run, inputs, outputs, concurrency_limit=concurrency_limit, api_name="compare")

        bac_preset = next((w for m, n, w in parameter_inputs if m == "bac" and n == "__preset__"), None)
        if bac_preset is not None and "bac-forecast" in presets["bac"] and "delta-dit" in methods:
            rows = [["digits-dit", 3, 20, 1.5, ["bac"], "bac-forecast"],
                    ["digits-dit", 7, 20, 1.5, ["bac"], "bac-fast"],
                    ["moving-digits", 5, 20, 6.0, ["delta-dit"], "bac-forecast"]]
            rows = [row for row in rows if row[0] in backend.handles]
            if rows:
                gr.Examples(rows, [model, class_id, steps, guidance, chosen, bac_preset], label="Examples",
                            cache_examples=False)
    app.queue(max_size=16, default_concurrency_limit=concurrency_limit)
    return app


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="accel-demo", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", action="append", default=None,
                        help="a reference model name or local diffusers pipeline folder (repeatable; default: "
                             "digits-dit and moving-digits)")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=7860)
    parser.add_argument("--share", action="store_true", help="a public gradio.live link (off by default)")
    args = parser.parse_args(argv)
    try:
        app = build_demo(args.model or list(DEFAULT_MODELS))
    except ValueError as error:
        print(f"accel-demo: {error}")
        return 2
    app.launch(server_name=args.host, server_port=args.port, share=args.share)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
