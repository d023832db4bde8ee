"""What train_yoso_lora.py hands to users after training (issue 16): wandb in offline mode holds the scalars
and the validation images; the final save writes kohya copies (--save_kohya) and the model card;
--push_to_hub creates the repository before training and uploads the outputs, never checkpoints."""

import json
import struct

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from harness import fresh_accelerator, launch, tiny_train_args, write_prompts

STEPS = 2


def wandb_records(path):
    """The records of a .wandb transaction log: a 7-byte file header (":W&B", magic, version), then records
    in 32 KiB blocks, each with a 7-byte header (checksum, length, type: 1 whole, 2 first, 3 middle, 4 last)."""
    data = path.read_bytes()
    assert data[:4] == b":W&B"
    block, header = 32768, 7
    pos, pending = 7, b""
    while pos + header <= len(data):
        left = block - pos % block
        if left < header:  # the block's tail is padding
            pos += left
            continue
        _checksum, length, kind = struct.unpack("<IHB", data[pos:pos + header])
        if kind == 0 and length == 0:
            break
        pending += data[pos + header:pos + header + length]
        pos += header + length
        if kind in (1, 4):
            yield pending
            pending = b""


def wandb_history(run_dir):
    from wandb.proto import wandb_internal_pb2

    rows = []
    (log,) = run_dir.glob("run-*.wandb")
    for raw in wandb_records(log):
        record = wandb_internal_pb2.Record()
        record.ParseFromString(raw)
        if record.WhichOneof("record_type") == "history":
            rows.append({item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in record.history.item})
    return rows


@pytest.fixture(scope="module")
def wandb_run(tiny_base, tiny_teacher, tmp_path_factory):
    root = tmp_path_factory.mktemp("wandb_run")
    prompts = write_prompts(root / "prompts.jsonl")
    result = launch(tiny_train_args(tiny_base, tiny_teacher, prompts, root / "out", steps=STEPS, use_ema=True,
                                    validation_prompts=["a cat", "a dog"], validation_steps=STEPS, report_to="wandb",
                                    save_kohya=True, checkpointing_steps=1),
                    env={"WANDB_MODE": "offline", "WANDB_DIR": str(root), "WANDB_SILENT": "true"})
    assert result.returncode == 0, result.stderr[-3000:]
    return root


def test_wandb_offline_run_holds_the_scalars_and_the_validation_images(wandb_run):
    (run_dir,) = (wandb_run / "wandb").glob("offline-run-*")
    rows = wandb_history(run_dir)
    assert [row["_step"] for row in rows] == [1, 2]
    for row in rows:
        assert {"loss_con", "loss_kl", "loss_adv", "loss_d", "d_real", "d_fake", "lr", "grad_norm", "nonfinite_steps"} <= set(row)
        assert all(np.isfinite(row[k]) for k in ("loss_con", "loss_kl", "loss_adv", "loss_d"))
    images = rows[1]
    assert images["validation/_type"] == "images/separated" and images["validation/count"] == 8
    assert images["validation/captions"][:4] == ["a cat | lora 1-step", "a cat | lora 2-step", "a cat | ema 1-step",
                                                 "a cat | ema 2-step"]
    # Each logged image is the matching tile of the validation grid saved in --output_dir.
    grid = np.asarray(Image.open(wandb_run / "out" / "validation" / f"step-{STEPS:06d}.png").convert("RGB"))
    for k, name in enumerate(images["validation/filenames"]):
        row, column = divmod(k, 4)
        tile = grid[64 * row:64 * (row + 1), 64 * column:64 * (column + 1)]
        logged = np.asarray(Image.open(run_dir / "files" / name).convert("RGB"))
        assert np.array_equal(logged, tile), name


def test_final_save_writes_kohya_copies_and_the_model_card(wandb_run, tiny_base):
    import yaml
    from diffusers import StableDiffusionPipeline

    out = wandb_run / "out"
    for folder in (out, out / "non_ema"):
        kohya = load_file(folder / "pytorch_lora_weights_kohya.safetensors")
        assert kohya and all(k.startswith("lora_unet_") for k in kohya) and any(k.endswith(".alpha") for k in kohya)
    # The EMA LoRA's kohya copy gives the diffusers file's UNet.
    outputs = []
    for weight_name in ("pytorch_lora_weights.safetensors", "pytorch_lora_weights_kohya.safetensors"):
        pipe = StableDiffusionPipeline.from_pretrained(tiny_base)
        pipe.load_lora_weights(str(out), weight_name=weight_name)
        g = torch.Generator().manual_seed(0)
        with torch.no_grad():
            outputs.append(pipe.unet(torch.randn(2, 4, 8, 8, generator=g), torch.tensor([999, 499]),
                                     torch.randn(2, 77, 32, generator=g)).sample)
    assert (outputs[0] - outputs[1]).abs().max().item() <= 1e-5
    card = (out / "README.md").read_text()
    header = yaml.safe_load(card.split("---")[1])
    assert {"text-to-image", "diffusers", "lora", "yoso"} <= set(header["tags"])
    assert "validation/step-000002.png" in card and "latent_stats.safetensors" in card
    assert "checkpoint-" not in card


def test_push_to_hub_creates_the_repo_first_and_uploads_no_checkpoint(tiny_base, tiny_teacher, tmp_path, monkeypatch):
    import huggingface_hub

    import train_yoso_lora

    calls = []

    class Repo:
        repo_id = "someone/yoso-test"

    class Commit:
        commit_url = "https://huggingface.co/someone/yoso-test/commit/0"

    def create_repo(self, repo_id, **kwargs):
        calls.append(("create_repo", repo_id, sorted(p.name for p in (tmp_path / "out").glob("*"))))
        return Repo()

    def create_commit(self, repo_id, operations, **kwargs):
        calls.append(("create_commit", repo_id, sorted(op.path_in_repo for op in operations)))
        return Commit()

    monkeypatch.setattr(huggingface_hub.HfApi, "create_repo", create_repo)
    monkeypatch.setattr(huggingface_hub.HfApi, "create_commit", create_commit)
    fresh_accelerator()  # accelerate's state is a process singleton; give main() a clean one
    prompts = write_prompts(tmp_path / "prompts.jsonl")
    args = tiny_train_args(tiny_base, tiny_teacher, prompts, tmp_path / "out", steps=STEPS, checkpointing_steps=1,
                           report_to="none", push_to_hub=True, hub_model_id="yoso-test")
    train_yoso_lora.main([str(a) for a in args])
    assert [c[0] for c in calls] == ["create_repo", "create_repo", "create_commit"]
    assert calls[0][1] == "yoso-test" and not any(name.startswith("checkpoint") for name in calls[0][2])  # before training
    assert calls[2][1] == "someone/yoso-test"
    assert calls[2][2] == ["README.md", "latent_stats.safetensors", "pytorch_lora_weights.safetensors"]
    assert (tmp_path / "out" / "checkpoint-2").is_dir()
