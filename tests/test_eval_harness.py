"""The eval harness (accel-eval): end to end, resumable, two processes, bad input."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from accel.eval import harness

ROOT = Path(__file__).resolve().parents[1]


def _args(out, *extra):
    return ["--model", "tiny:dit", "--methods", "baseline,delta-dit", "--num-images", "6", "--batch-size", "2",
            "--steps", "4", "--out", str(out), *extra]


def _images(out: Path, method: str) -> dict[str, bytes]:
    return {path.name: np.asarray(__import__("PIL.Image").Image.open(path)).tobytes()
            for path in sorted((out / method).glob("*.png"))}


def _env():
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    return env


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("eval") / "tiny"
    assert harness.main(_args(out)) == 0
    assert torch.is_grad_enabled()  # the run leaves the process's autograd mode alone
    return out


def test_end_to_end_on_a_tiny_pipeline(tiny_run):
    out = tiny_run
    for method in ("baseline", "delta-dit"):
        assert sorted(p.name for p in (out / method).glob("*.png")) == [f"{i:06d}.png" for i in range(6)]
    results = json.loads((out / "results.json").read_text())
    rows = {row["method"]: row for row in results["rows"]}
    # the baseline's PSNR against itself is infinite: null in strict JSON, flagged as identical
    assert rows["baseline"]["psnr_db"] is None and rows["baseline"]["identical_to_baseline"]
    assert rows["baseline"]["speedup"] == 1.0
    assert rows["delta-dit"]["psnr_db"] < 100 and rows["delta-dit"]["blocks_computed"] < 1.0
    assert rows["baseline"]["flops_per_sample"] > rows["delta-dit"]["flops_per_sample"] > 0
    assert rows["baseline"]["fid"] is None  # random weights and no reference set: no FID
    for name in ("results.csv", "report.md", "speedup-vs-psnr.png", "grid.png", "run.json"):
        assert (out / name).is_file(), name
    assert "| delta-dit |" in (out / "report.md").read_text()
    assert (out / "results.csv").read_text().splitlines()[0].startswith("method,speedup")


def test_results_json_is_strict_json(tiny_run):
    def refuse(name):
        raise ValueError(f"non-standard JSON constant {name}")

    for name in ("results.json", "run.json", "memory.json", ".flops.json"):
        json.loads((tiny_run / name).read_text(), parse_constant=refuse)
    for path in tiny_run.glob("*/.batches/*.json"):
        json.loads(path.read_text(), parse_constant=refuse)


def test_peak_memory_is_measured_per_method(tiny_run):
    memory = json.loads((tiny_run / "memory.json").read_text())
    assert sorted(memory) == ["baseline", "delta-dit"]
    for entry in memory.values():
        assert entry["measure"] == "rss-increase" and entry["peak_mb"] >= 0 and entry["batch_size"] == 2
    rows = json.loads((tiny_run / "results.json").read_text())["rows"]
    assert [row["peak_memory_mb"] for row in rows] == [memory["baseline"]["peak_mb"], memory["delta-dit"]["peak_mb"]]
    assert "peak_rss_mb" not in rows[0]
    report_text = (tiny_run / "report.md").read_text()
    assert "peak RSS rise MB" in report_text and "clear_refs" in report_text


def test_report_records_the_resolved_call_the_machine_and_the_pictures(tiny_run):
    text = (tiny_run / "report.md").read_text()
    assert "steps: **4** (--steps)" in text
    assert "guidance scale: **4.0** (the model's default)" in text and "model default" not in text.replace(
        "the model's default", "")
    assert "torch threads:" in text and "hardware:" in text and "diffusers" in text and "accel git commit" in text
    for name in ("speedup-vs-psnr.png", "grid.png"):
        assert f"]({name})" in text and (tiny_run / name).is_file()
    assert "speedup-vs-fid.png" not in text  # no FID on random weights: no plot, no broken link
    results = json.loads((tiny_run / "results.json").read_text())
    assert results["resolved"]["steps"] == 4 and results["resolved"]["guidance_scale"] == 4.0
    row = results["rows"][1]
    assert row["latency_spread"]["n"] == 3 and row["latency_spread"]["low"] <= row["latency_s_per_sample"]
    assert row["speedup_spread"]["low"] <= row["speedup"] <= row["speedup_spread"]["high"]


def test_grid_is_labelled_upscaled_and_shows_differences(tiny_run):
    from PIL import Image

    from accel.eval import report

    results = json.loads((tiny_run / "results.json").read_text())
    grid = report._grid(results, tiny_run)
    assert grid["row_labels"] == ["baseline", "delta-dit", "|delta-dit − baseline|"]
    assert grid["column_labels"][0] == "seed 0\nclass 0" and len(grid["column_labels"]) == 6
    with Image.open(tiny_run / "grid.png") as image:
        assert image.size == grid["size"]
        width, height = image.size
    assert width >= 600 and height >= 300  # 8x8 samples: each pixel a visible block, not 240x90 for all


def test_same_seed_per_index_whatever_the_batching(tiny_run, tmp_path):
    # Input i always uses seed + i: a batch of one gives the same pictures (up to float rounding in batched math).
    out = tmp_path / "single"
    args = _args(out)
    args[args.index("--batch-size") + 1] = "1"
    assert harness.main(args) == 0
    for name, data in _images(tiny_run, "baseline").items():
        ours = np.frombuffer(_images(out, "baseline")[name], np.uint8).astype(int)
        assert np.abs(ours - np.frombuffer(data, np.uint8).astype(int)).max() <= 1, name


def test_resume_regenerates_missing_and_corrupt_files_only(tiny_run, tmp_path):
    out = tmp_path / "resumed"
    shutil.copytree(tiny_run, out)
    before = _images(out, "delta-dit")
    (out / "delta-dit" / "000001.png").unlink()
    (out / "delta-dit" / "000004.png").write_bytes((out / "delta-dit" / "000004.png").read_bytes()[:40])
    untouched = (out / "baseline" / "000000.png").stat().st_mtime_ns
    record = (out / "delta-dit" / ".batches" / "000001.json").stat().st_mtime_ns
    assert harness.main(_args(out)) == 0
    assert _images(out, "delta-dit") == before
    assert (out / "baseline" / "000000.png").stat().st_mtime_ns == untouched  # finished batches are skipped
    assert (out / "delta-dit" / ".batches" / "000001.json").stat().st_mtime_ns == record
    assert json.loads((out / "results.json").read_text())["rows"][1]["psnr_db"] == pytest.approx(
        json.loads((tiny_run / "results.json").read_text())["rows"][1]["psnr_db"])


def test_a_killed_run_resumes_to_the_same_results(tmp_path):
    def args(out):
        return ["--model", "tiny:dit", "--methods", "baseline,delta-dit", "--num-images", "60", "--batch-size", "2",
                "--steps", "4", "--no-flops", "--out", str(out)]

    killed, uninterrupted = tmp_path / "killed", tmp_path / "uninterrupted"
    command = [sys.executable, "-m", "accel.eval.harness", *args(killed)]
    process = subprocess.Popen(command, cwd=ROOT, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and len(list(killed.glob("*/.batches/*.json"))) < 4:
        time.sleep(0.02)
    process.kill()
    process.wait()
    written = len(list(killed.glob("*/.batches/*.json")))
    assert 4 <= written < 60, f"the run was not killed part-way ({written} of 60 batches written)"
    assert harness.main(args(killed)) == 0
    assert harness.main(args(uninterrupted)) == 0
    for method in ("baseline", "delta-dit"):
        assert _images(killed, method) == _images(uninterrupted, method)
    assert not [p for p in killed.rglob(".*") if p.is_file()], "a temporary file was left behind"
    rows = [json.loads((out / "results.json").read_text())["rows"] for out in (killed, uninterrupted)]
    assert [r["psnr_db"] for r in rows[0]] == [r["psnr_db"] for r in rows[1]]


def test_two_processes_give_the_same_images(tiny_run, tmp_path):
    out = tmp_path / "two"
    command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
               "-m", "accel.eval.harness", *_args(out)]
    result = subprocess.run(command, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    records = [json.loads(p.read_text()) for p in out.glob("baseline/.batches/*.json")]
    assert sorted(r["process"] for r in records) == [0, 0, 1]  # batches 0 and 2 on process 0, batch 1 on 1
    for method in ("baseline", "delta-dit"):
        assert _images(out, method) == _images(tiny_run, method)
    assert (out / "report.md").is_file()


def test_prompts_files_and_video(tmp_path):
    prompts = tmp_path / "prompts.csv"
    prompts.write_text("prompt,note\na red bicycle,x\na cat,y\n")
    out = tmp_path / "wan"
    assert harness.main(["--model", "tiny:wan", "--methods", "baseline,bac", "--num-images", "2", "--batch-size",
                         "2", "--prompts", str(prompts), "--no-flops", "--out", str(out)]) == 0
    assert (out / "bac" / "000001.gif").is_file()
    from PIL import Image

    with Image.open(out / "side-by-side.gif") as animation:  # every method in one frame, frames in sync
        assert animation.n_frames == np.asarray(Image.open(out / "bac" / "000000.gif").n_frames)
    with Image.open(out / "frames.png") as frames:
        assert frames.size[0] > 600
    assert "![every frame of one clip](frames.png)" in (out / "report.md").read_text()
    results = json.loads((out / "results.json").read_text())
    assert results["rows"][1]["branches_computed"] < 1.0 and results["rows"][1]["ssim"] <= 1.0
    assert harness.read_prompts(prompts) == ["a red bicycle", "a cat"]
    text = tmp_path / "p.txt"
    text.write_text("one\n\n two \n")
    assert harness.read_prompts(text) == ["one", "two"]
    js = tmp_path / "p.json"
    js.write_text(json.dumps(["a", {"prompt": "b"}]))
    assert harness.read_prompts(js) == ["a", "b"]


def test_a_local_pipeline_folder(tmp_path):
    from accel.pipelines import tiny

    folder = tmp_path / "my-dit"
    tiny.build("dit").save_pretrained(folder)
    out = tmp_path / "local"
    assert harness.main(["--model", str(folder), "--methods", "baseline,bac", "--num-images", "2", "--batch-size",
                         "2", "--steps", "3", "--no-flops", "--out", str(out)]) == 0
    rows = json.loads((out / "results.json").read_text())["rows"]
    assert [row["method"] for row in rows] == ["baseline", "bac"] and rows[1]["branches_computed"] < 1.0


def test_reference_model_metrics(tmp_path):
    out = tmp_path / "digits"
    assert harness.main(["--model", "digits-dit", "--methods", "baseline,delta-dit", "--num-images", "70",
                         "--batch-size", "35", "--steps", "6", "--no-flops", "--out", str(out)]) == 0
    rows = json.loads((out / "results.json").read_text())["rows"]
    assert rows[0]["class_accuracy"] > 0.5 and rows[0]["fid"]["n_generated"] == 70
    assert "torchmetrics" in rows[0]["fid"]["library"] and "digit classifier" in rows[0]["fid"]["features"]
    # the bootstrap reproduces torchmetrics' FID on the full set and brackets it
    interval = rows[0]["fid"]["ci95"]
    assert interval["resamples"] == 200 and interval["low"] <= rows[0]["fid"]["value"] <= interval["high"]
    from accel.eval import report

    pictures = report.write_reports(json.loads((out / "results.json").read_text()), out)
    fid_points = {p["method"]: p for p in pictures["plots"]["speedup-vs-fid.png"]}
    for row in rows:
        point = fid_points[row["method"]]
        assert point["y"] == row["fid"]["value"]
        assert (point["y_low"], point["y_high"]) == (row["fid"]["ci95"]["low"], row["fid"]["ci95"]["high"])


@pytest.mark.parametrize("extra, match", [
    (["--methods", "baseline,bak"], "Unknown accelerator 'bak'"),
    (["--methods", ""], "--methods is empty"),
    (["--model", "nowhere/model"], "Unknown model"),
    (["--model", "tiny:sd15", "--methods", "delta-dit", "--prompts", "PROMPTS"], "does not support"),
    (["--model", "tiny:sd15", "--methods", "baseline,bac"], "pass --prompts"),
    (["--model", "tiny:sd15", "--methods", "bac", "--prompts", "MISSING"], "does not exist"),
    (["--model", "tiny:sd15", "--methods", "bac", "--prompts", "EMPTY"], "holds no prompts"),
    (["--model", "tiny:sd15", "--methods", "bac", "--prompts", "BADJSON"], "not valid JSON"),
    (["--model", "tiny:sd15", "--methods", "bac", "--prompts", "BADCSV"], "'prompt' column"),
    (["--model", "digits-dit", "--num-images", "10"], "needs more than 64 samples"),
    (["--num-images", "0"], "at least 1"),
    (["--classes", "3,12"], "class ids in 0..9"),
    (["--out", "FILE/sub"], "Cannot write to the output folder"),
    (["--fid", "inception"], "--inception-weights PATH"),
    (["--fid", "inception", "--inception-weights", "FILE"], "--fid-reference FOLDER"),
    (["--clip-weights", "FILE"], "needs a prompt-conditioned model"),
    (["--model", "tiny:sd15", "--methods", "bac", "--prompts", "PROMPTS", "--clip-weights", "MISSING"],
     "does not exist"),
])
def test_bad_input_fails_before_generating(tmp_path, capsys, extra, match):
    files = {"PROMPTS": ("ok.txt", "a cat\n"), "MISSING": ("missing.txt", None), "EMPTY": ("empty.txt", "\n \n"),
             "BADJSON": ("bad.json", "[1, 2"), "BADCSV": ("bad.csv", "text\nhello\n"), "FILE": ("file", "x")}
    for key, (name, content) in files.items():
        if content is not None:
            (tmp_path / name).write_text(content)
        extra = [item.replace(key, str(tmp_path / name)) if item.startswith(key) else item for item in extra]
    args = _args(tmp_path / "out")
    for flag in extra[::2]:  # drop the defaults the case overrides
        if flag in args:
            position = args.index(flag)
            del args[position : position + 2]
    assert harness.main(args + extra) == 2
    assert match in capsys.readouterr().err
    assert not list((tmp_path / "out").glob("*/*.png"))


def test_an_unsupported_local_pipeline_is_a_clear_error(tmp_path, capsys):
    folder = tmp_path / "other"
    folder.mkdir()
    (folder / "model_index.json").write_text(json.dumps({"_class_name": "KandinskyPipeline"}))
    assert harness.main(["--model", str(folder), "--methods", "baseline", "--out", str(tmp_path / "out")]) == 2
    assert "no adapter for the pipeline class 'KandinskyPipeline'" in capsys.readouterr().err
