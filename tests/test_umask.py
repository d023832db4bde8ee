"""Every file a run writes follows the umask, as a plain open() would: safetensors creates its files 0600 and
temporary folders are 0700, so without care every .safetensors output was private (issue 20)."""

import os
import stat
import subprocess
import sys

import torch
from safetensors.torch import save_file

from harness import REPO, tiny_train_args, write_prompts
from yoso.utils.atomic import atomic_path, current_umask, follow_umask

UMASK = 0o027  # not the usual 022: the modes must come from the umask, not be fixed


def modes(root):
    return {str(p.relative_to(root)): stat.S_IMODE(p.stat().st_mode) for p in root.rglob("*")}


def test_atomic_safetensors_write_follows_the_umask(tmp_path):
    old = os.umask(UMASK)
    try:
        with atomic_path(tmp_path / "x.safetensors") as tmp:
            save_file({"a": torch.zeros(2)}, str(tmp))
        folder = tmp_path / "f"
        folder.mkdir(mode=0o700)
        save_file({"a": torch.zeros(2)}, str(folder / "y.safetensors"))
        follow_umask(folder)
        assert current_umask() == UMASK
    finally:
        os.umask(old)
    assert modes(tmp_path) == {"x.safetensors": 0o640, "f": 0o750, "f/y.safetensors": 0o640}


def test_every_output_of_a_run_follows_the_umask(tiny_base, tiny_teacher, tmp_path):
    output_dir = tmp_path / "out"
    args = tiny_train_args(tiny_base, tiny_teacher, write_prompts(tmp_path / "p.jsonl"), output_dir, steps=2,
                           checkpointing_steps=1, use_ema=True, save_kohya=True, validation_prompts=["a cat"],
                           validation_steps=2, report_to="tensorboard")
    env = dict(os.environ, ACCELERATE_USE_CPU="true", HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    result = subprocess.run([sys.executable, str(REPO / "train_yoso_lora.py"), *map(str, args)], cwd=REPO, env=env,
                            capture_output=True, text=True, timeout=600, preexec_fn=lambda: os.umask(UMASK))
    assert result.returncode == 0, result.stderr[-3000:]
    found = modes(output_dir)
    safetensors = [name for name in found if name.endswith(".safetensors")]
    assert {"pytorch_lora_weights.safetensors", "pytorch_lora_weights_kohya.safetensors",
            "checkpoint-2/pytorch_lora_weights.safetensors", "checkpoint-2/discriminator.safetensors"} <= set(safetensors)
    wrong = {name: oct(mode) for name, mode in found.items()
             if mode != (0o750 if (output_dir / name).is_dir() else 0o640)}
    assert not wrong, wrong
