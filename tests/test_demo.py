"""The README's first command, `bash demo.sh`, as a new user runs it (in a temporary output folder)."""

import json
import subprocess
from pathlib import Path

import pytest
from PIL import Image
from safetensors.torch import load_file

REPO = Path(__file__).resolve().parents[1]


def test_demo_runs_end_to_end(tmp_path):
    out = tmp_path / "demo"
    result = subprocess.run(["bash", str(REPO / "demo.sh"), str(out)], capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    summary = json.loads((out / "data" / "train_anno.summary.json").read_text())
    prompts = (out / "data" / "train_anno.jsonl").read_text().splitlines()
    assert len(prompts) >= 16 and all(json.loads(line)["prompt"] for line in prompts)
    assert "https://" not in "".join(prompts) and "--ar" not in "".join(prompts)
    assert summary  # written
    lora = load_file(out / "lora" / "pytorch_lora_weights.safetensors")
    assert any(k.startswith("unet.") and "lora_A" in k for k in lora)
    assert (out / "lora" / "non_ema" / "pytorch_lora_weights.safetensors").is_file()
    assert load_file(out / "lora" / "latent_stats.safetensors")["count"].item() == 30 * 4
    assert (out / "lora" / "checkpoint-30").is_dir() and not (out / "lora" / "checkpoint-15").exists()
    assert len(list((out / "lora" / "validation").glob("step-*.png"))) == 2
    for mode in ("lcm_2step", "one_step_ipi"):
        grid = Image.open(out / "images" / mode / "grid.png")
        assert grid.size == (64, 2 * 64)  # one column, a row per held-out prompt
    assert "Done. Outputs:" in result.stdout and str(out / "images" / "lcm_2step" / "grid.png") in result.stdout
    # Progress bars and results, not library notices that tell a user nothing.
    noise = ("should be kept in float32", "were initialized from the model checkpoint", "requires torchvision",
             "skip_prk_steps", "was not found in config")
    found = [line for line in (result.stdout + result.stderr).splitlines() if any(text in line for text in noise)]
    assert not found, found


@pytest.mark.parametrize("flag", ["--help", "-h"])
def test_demo_help_prints_usage_and_creates_nothing(tmp_path, flag):
    result = subprocess.run(["bash", str(REPO / "demo.sh"), flag], cwd=tmp_path, capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("Usage: bash demo.sh [OUTPUT_DIR]") and result.stderr == ""
    assert not (REPO / flag).exists() and list(tmp_path.iterdir()) == []


def test_demo_refuses_an_unknown_option_in_one_line(tmp_path):
    result = subprocess.run(["bash", str(REPO / "demo.sh"), "--outdir"], cwd=tmp_path, capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr.strip().splitlines() == [
        "demo.sh: error: unknown option --outdir (usage: bash demo.sh [OUTPUT_DIR]; see --help)"]
    assert not (REPO / "--outdir").exists()
