"""The side-by-side demo: the same seed through a plain and an accelerated pipeline, outputs and timings compared.

    accel-demo                              # http://127.0.0.1:7860, digits-dit and moving-digits
    accel-demo --model /path/to/pipeline    # add a local diffusers pipeline folder (repeatable)

``build_demo(...)`` returns the Gradio Blocks app. Each model loads once; each (model, accelerator stack, settings)
gets its own wrapped pipeline instance, built on first use and kept, so the plain pipeline is never touched by
accel. Methods with an offline pass (BAC) are calibrated when their pipeline is built, on seeds the demo never
shows. Inputs are bounded (steps, batch, frames), runs are queued with a concurrency limit, and errors reach the
page as readable messages.
"""

from __future__ import annotations

import argparse
import dataclasses
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

import accel
from accel.eval.metrics import output_array, psnr
from accel.eval.models import ModelHandle, load_model
from accel.registry import available, registered, resolve

DEFAULT_MODELS = ("digits-dit", "moving-digits")
LIMITS = {"steps": (1, 50), "guidance": (1.0, 10.0), "seed": (0, 2**31 - 1)}
CALIBRATION_SEED = 777_777
DISPLAY_SIZE = 256


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

    def wrapped(self, model: str, configs: list, steps: int, guidance: float):
        key = (model, tuple(sorted(repr(c.to_dict()) for c in configs)), steps, guidance)
        with self._lock:
            if key not in self._wrapped:
                handle = self.handles[model]
                pipe = handle.build()
                conditions = list(range(10)) if handle.conditioning == "class" else ["a photo"]
                seeds = [CALIBRATION_SEED + i for i in range(len(conditions))]
                kwargs = handle.call_kwargs(pipe, conditions, seeds, steps, guidance)
                del kwargs["num_inference_steps"]
                self._wrapped[key] = accel.wrap_calibrated(pipe, configs, kwargs, num_inference_steps=steps)
            return self._wrapped[key]


def method_configs(methods: list[str], parameters: dict[str, dict[str, Any]]) -> list:
    """Configs for the chosen presets with the parameters the page set (validated, ``ValueError`` if bad)."""
    configs = []
    for preset in methods:
        (config,) = resolve([preset])
        changes = {k: v for k, v in parameters.get(config.method, {}).items() if k in config.__dataclass_fields__}
        configs.append(config.replace(**changes) if changes else config)
    return configs


def tunable_fields(method: str) -> list[dataclasses.Field]:
    """The numeric fields of a method's config, shown as its key parameters."""
    spec = next(s for s in registered() if s.name == method)
    return [f for f in dataclasses.fields(spec.config_cls)
            if f.type in ("int", "float", int, float) and not isinstance(f.default, dataclasses._MISSING_TYPE)]


def _display(sample: np.ndarray, folder: Path, name: str) -> str:
    """A lossless PNG (image) or GIF (video) scaled up with nearest-neighbour, so every pixel stays visible."""
    from PIL import Image

    def picture(frame):
        frame = (np.clip(frame, 0, 1) * 255).round().astype(np.uint8)
        frame = frame[..., 0] if frame.shape[-1] == 1 else frame
        scale = max(1, DISPLAY_SIZE // max(frame.shape[:2]))
        return Image.fromarray(frame).resize((frame.shape[1] * scale, frame.shape[0] * scale), Image.NEAREST)

    if sample.ndim == 4:
        frames = [picture(frame) for frame in sample]
        path = folder / f"{name}.gif"
        frames[0].save(path, save_all=True, append_images=frames[1:], duration=100, loop=0)
    else:
        path = folder / f"{name}.png"
        picture(sample).save(path)
    return str(path)


def run_comparison(backend: DemoBackend, model: str, condition, seed: int, steps: int, guidance: float,
                   methods: list[str], parameters: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Generate with the plain and the accelerated pipeline from the same seed; return paths and figures."""
    if model not in backend.handles:
        raise ValueError(f"Unknown model {model!r}; choose one of {', '.join(backend.handles)}.")
    low, high = LIMITS["steps"]
    if not isinstance(steps, int) or not low <= steps <= high:
        raise ValueError(f"Steps must be an integer in {low}..{high}, got {steps!r}.")
    if not LIMITS["guidance"][0] <= guidance <= LIMITS["guidance"][1]:
        raise ValueError(f"Guidance must be in {LIMITS['guidance'][0]}..{LIMITS['guidance'][1]}, got {guidance}.")
    if not isinstance(seed, int) or not LIMITS["seed"][0] <= seed <= LIMITS["seed"][1]:
        raise ValueError(f"Seed must be an integer in 0..{LIMITS['seed'][1]}, got {seed!r}.")
    if not methods:
        raise ValueError("Choose at least one accelerator.")
    handle = backend.handles[model]
    if handle.conditioning == "class":
        if not isinstance(condition, int) or not 0 <= condition < (handle.num_classes or 10):
            raise ValueError(f"Class must be an integer in 0..{(handle.num_classes or 10) - 1}, got {condition!r}.")
    elif not isinstance(condition, str) or not condition.strip() or len(condition) > 500:
        raise ValueError("The prompt must be 1 to 500 characters.")
    configs = method_configs(methods, parameters)
    plain = backend.plain(model)
    wrapped = backend.wrapped(model, configs, steps, guidance)
    outputs, seconds = {}, {}
    for name, pipe in (("baseline", plain), ("accelerated", wrapped)):
        kwargs = handle.call_kwargs(pipe, [condition], [seed], steps, guidance)
        started = time.perf_counter()
        outputs[name] = output_array(pipe(**kwargs))[0]
        seconds[name] = time.perf_counter() - started
    folder = Path(tempfile.mkdtemp(prefix="accel-demo-"))
    summary = accel.summary(wrapped)
    return {
        "baseline": _display(outputs["baseline"], folder, "baseline"),
        "accelerated": _display(outputs["accelerated"], folder, "accelerated"),
        "video": outputs["baseline"].ndim == 4,
        "baseline_seconds": seconds["baseline"],
        "accelerated_seconds": seconds["accelerated"],
        "speedup": seconds["baseline"] / seconds["accelerated"],
        "psnr_db": psnr(outputs["baseline"], outputs["accelerated"]),
        "summary": str(summary),
        "blocks_computed": summary.blocks_computed_share,
        "branches_computed": summary.branches_computed_share,
    }


def build_demo(model_names: list[str] | tuple[str, ...] = DEFAULT_MODELS, *, concurrency_limit: int = 1):
    """The Gradio Blocks app comparing plain and accelerated generation of ``model_names``."""
    import gradio as gr

    backend = DemoBackend(list(model_names))
    methods = [entry["name"] for entry in available()]
    presets = {entry["name"]: entry["presets"] for entry in available()}
    first = next(iter(backend.handles))

    with gr.Blocks(title="accel: baseline vs accelerated") as app:
        gr.Markdown("# accel — baseline vs accelerated\nThe same seed through a plain and an accelerated pipeline.")
        with gr.Row():
            with gr.Column(scale=1):
                model = gr.Dropdown(list(backend.handles), value=first, label="Model")
                class_id = gr.Slider(0, 9, value=3, step=1, label="Class (class-conditional models)")
                prompt = gr.Textbox(value="a photo of a cat", label="Prompt (prompt models)", max_lines=2)
                seed = gr.Number(value=0, precision=0, minimum=0, maximum=LIMITS["seed"][1], label="Seed")
                steps = gr.Slider(*LIMITS["steps"], value=20, step=1, label="Steps")
                guidance = gr.Slider(*LIMITS["guidance"], value=1.5, step=0.5, label="Guidance scale")
                chosen = gr.CheckboxGroup(methods, value=methods[:1], label="Accelerators (several stack)")
                parameter_inputs: list[tuple[str, str, Any]] = []
                for method in methods:
                    with gr.Accordion(f"{method} settings", open=False):
                        preset = gr.Dropdown(presets[method], value=method, label="Preset")
                        parameter_inputs.append((method, "__preset__", preset))
                        for field in tunable_fields(method):
                            widget = gr.Number(value=field.default, label=field.name)
                            parameter_inputs.append((method, field.name, widget))
                run = gr.Button("Run", variant="primary", elem_id="run")
            with gr.Column(scale=2):
                with gr.Row():
                    baseline_image = gr.Image(label="Baseline", type="filepath", format="png", elem_id="baseline")
                    accelerated_image = gr.Image(label="Accelerated", type="filepath", format="png",
                                                 elem_id="accelerated")
                slider = gr.ImageSlider(label="Slide to compare (lossless PNG)", type="filepath")
                figures = gr.Markdown(elem_id="figures")
                summary = gr.Textbox(label="accel.summary of the accelerated run", lines=8)

        def on_run(model_name, class_value, prompt_text, seed_value, steps_value, guidance_value, chosen_methods,
                   *parameter_values):
            parameters: dict[str, dict[str, Any]] = {}
            stack = []
            for (method, name, _), value in zip(parameter_inputs, parameter_values):
                if name == "__preset__":
                    if method in chosen_methods:
                        stack.append(value or method)
                elif value is not None:
                    parameters.setdefault(method, {})[name] = value
            for method, fields in parameters.items():  # the page gives floats; keep ints as ints
                for field in tunable_fields(method):
                    if field.name in fields and field.type in ("int", int):
                        fields[field.name] = int(fields[field.name])
            try:
                handle = backend.handles[model_name]
                condition = int(class_value) if handle.conditioning == "class" else prompt_text
                result = run_comparison(backend, model_name, condition, int(seed_value or 0), int(steps_value),
                                        float(guidance_value), stack, parameters)
            except ValueError as error:
                raise gr.Error(str(error)) from None
            except Exception as error:  # never a stack trace on the page
                raise gr.Error(f"The run failed: {type(error).__name__}: {error}") from None
            text = (f"**Baseline** {result['baseline_seconds']:.3f} s · **accelerated** "
                    f"{result['accelerated_seconds']:.3f} s · **speedup {result['speedup']:.2f}×** · "
                    f"PSNR vs baseline {result['psnr_db']:.2f} dB")
            pair = None if result["video"] else (result["baseline"], result["accelerated"])
            return result["baseline"], result["accelerated"], pair, text, result["summary"]

        inputs = [model, class_id, prompt, seed, steps, guidance, chosen, *[w for _, _, w in parameter_inputs]]
        outputs = [baseline_image, accelerated_image, slider, figures, summary]
        run.click(on_run, inputs, outputs, concurrency_limit=concurrency_limit, api_name="compare")
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
