"""Model card and Hub upload (issue 16.2): yoso/outputs/model_card.py and yoso/outputs/hub.py. The Hub is unreachable here:
the upload is checked at huggingface_hub's API calls, with the client's methods replaced."""

import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

import inference_examples
import train_yoso_lora
from lora_outputs import make_output_dir
from yoso.outputs import hub
from yoso.outputs.hub import HubUploadError, hub_files, push_to_hub
from yoso.outputs.kohya import KOHYA_WEIGHT_NAME, save_kohya_lora
from yoso.method.lora import LORA_WEIGHT_NAME
from yoso.outputs.model_card import model_card_text, write_model_card

PROMPTS = ["a red fox", "a blue car"]


def train_args(base, out, *extra):
    """``vars()`` of train_yoso_lora.py's real parser, as the script would pass it."""
    return vars(train_yoso_lora.parse_args([
        "--pretrained_model_name_or_path", str(base), "--pretrained_teacher_model", "stabilityai/sd-turbo",
        "--train_data", "train_anno.jsonl", "--output_dir", str(out), "--use_ema", "--lora_rank", "4",
        "--lora_alpha", "3", "--max_train_steps", "10", "--validation_prompts", *PROMPTS, *extra]))


@pytest.fixture(scope="module")
def run_dir(tiny_base, tmp_path_factory):
    out = make_output_dir(tiny_base, tmp_path_factory.mktemp("card") / "out", prompts=PROMPTS)
    save_kohya_lora(out)
    save_kohya_lora(out / "non_ema")
    return out


def add_clutter(out):
    """What a run's folder also holds, none of which may be uploaded."""
    for path, content in {
        "checkpoint-4/pytorch_lora_weights.safetensors": b"x", "checkpoint-4/optimizer.bin": b"x",
        "checkpoint-8.incomplete/pytorch_lora_weights.safetensors": b"x",
        "logs/yoso-lora/events.out.tfevents.1.host": b"x",
        ".tmp-lora-abc123/pytorch_lora_weights.safetensors": b"x",  # save_lora's temporary folder
        ".pytorch_lora_weights_kohya.safetensors.77.0a1b2c3d.tmp.safetensors": b"x",  # atomic_path's temporary name
        "validation/.step-000012.png.77.0a1b2c3d.tmp.png": b"x", "validation/notes.png": b"x",
        "non_ema/.README.md.1.2.tmp.md": b"x", "non_ema/other.safetensors": b"x", "train_args.json": b"x",
    }.items():
        (out / path).parent.mkdir(parents=True, exist_ok=True)
        (out / path).write_bytes(content)


EXPECTED_UPLOAD = {
    "README.md": "README.md",
    "latent_stats.safetensors": "latent_stats.safetensors",
    "non_ema/pytorch_lora_weights.safetensors": "pytorch_lora_weights_non_ema.safetensors",
    "non_ema/pytorch_lora_weights_kohya.safetensors": "pytorch_lora_weights_non_ema_kohya.safetensors",
    "pytorch_lora_weights.safetensors": "pytorch_lora_weights.safetensors",
    "pytorch_lora_weights_kohya.safetensors": "pytorch_lora_weights_kohya.safetensors",
    "validation/README.txt": "validation/README.txt",
    "validation/step-000003.png": "validation/step-000003.png",
    "validation/step-000010.png": "validation/step-000010.png",
}


@pytest.fixture
def cluttered_run(run_dir, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(run_dir, out)
    (out / "README.md").write_text("old card\n")
    add_clutter(out)
    return out


def split_card(text):
    match = re.match(r"^---\n(.*?)\n---\n(.*)$", text, flags=re.S)
    assert match, text[:200]
    return yaml.safe_load(match.group(1)), match.group(2)


def python_blocks(body):
    return re.findall(r"^```python\n(.*?)^```", body, flags=re.S | re.M)


# ---- which files ----------------------------------------------------------------------------------------


def test_upload_list_is_the_outputs_and_nothing_else(cluttered_run):
    assert hub_files(cluttered_run) == EXPECTED_UPLOAD
    assert list(hub_files(cluttered_run)) == sorted(EXPECTED_UPLOAD)


def test_load_lora_weights_of_the_repo_picks_the_ema_lora(cluttered_run, monkeypatch):
    """diffusers' own choice of file for ``load_lora_weights(repo_id)`` (no weight_name), given the repository's
    file list: the EMA LoRA. Control: with the local layout (non_ema/pytorch_lora_weights.safetensors) two files
    qualify and diffusers takes the first listed, the non-EMA one."""
    from types import SimpleNamespace

    from diffusers.loaders import lora_base

    def fake_model_info(paths):
        return lambda repo_id: SimpleNamespace(siblings=[SimpleNamespace(rfilename=p) for p in sorted(paths)])

    monkeypatch.setattr(lora_base, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(lora_base, "model_info", fake_model_info(hub_files(cluttered_run).values()))
    assert lora_base._best_guess_weight_name("me/yoso") == LORA_WEIGHT_NAME
    monkeypatch.setattr(lora_base, "model_info", fake_model_info(hub_files(cluttered_run).keys()))
    assert lora_base._best_guess_weight_name("me/yoso") == f"non_ema/{LORA_WEIGHT_NAME}"


class FakeHub:
    """Stands in for the Hub: records huggingface_hub.HfApi's create_repo and create_commit calls."""

    def __init__(self, monkeypatch, namespace="me"):
        from huggingface_hub import HfApi

        self.calls = []
        fake = self

        def create_repo(api, repo_id, **kwargs):
            fake.calls.append(("create_repo", repo_id, kwargs, api.token))
            full = repo_id if "/" in repo_id else f"{namespace}/{repo_id}"
            return type("RepoUrl", (str,), {"repo_id": full})(f"https://huggingface.co/{full}")

        def create_commit(api, repo_id, operations, **kwargs):
            operations = list(operations)
            fake.calls.append(("create_commit", repo_id, kwargs, api.token))
            fake.uploaded = {op.path_in_repo: op.path_or_fileobj for op in operations}
            fake.card_at_upload = Path(fake.uploaded["README.md"]).read_text(encoding="utf-8")
            return type("CommitInfo", (), {"commit_url": f"https://huggingface.co/{repo_id}/commit/0"})()

        for name in ("create_repo", "create_commit"):
            monkeypatch.setattr(HfApi, name, locals()[name])
        for name in ("upload_file", "upload_folder"):
            monkeypatch.setattr(HfApi, name, lambda *a, **k: pytest.fail("only create_commit may upload"))


def test_push_to_hub_creates_the_repo_writes_the_card_and_uploads_exactly_those_files(cluttered_run, tiny_base,
                                                                                       monkeypatch):
    fake = FakeHub(monkeypatch)
    args = train_args(tiny_base, cluttered_run, "--hub_token", "hf_secret")
    url = push_to_hub(cluttered_run, "yoso-test", token=args["hub_token"], private=True, args_dict=args)
    assert url == "https://huggingface.co/me/yoso-test/commit/0"
    assert [c[:2] for c in fake.calls] == [("create_repo", "yoso-test"), ("create_commit", "me/yoso-test")]
    assert fake.calls[0][2] == {"private": True, "exist_ok": True} and fake.calls[0][3] == "hf_secret"
    assert fake.uploaded == {hub_path: str(cluttered_run / local) for local, hub_path in EXPECTED_UPLOAD.items()}
    # The card was rewritten before the upload, for the repository (not the old card, not local paths).
    _, body = split_card(fake.card_at_upload)
    assert 'load_lora_weights("me/yoso-test")' in body and str(cluttered_run) not in body
    assert "hf_secret" not in fake.card_at_upload


def test_push_to_hub_refuses_a_folder_without_a_lora_before_any_call(tmp_path, monkeypatch):
    fake = FakeHub(monkeypatch)
    (tmp_path / "validation").mkdir()
    with pytest.raises(HubUploadError, match=f"{re.escape(str(tmp_path))}: no pytorch_lora_weights.safetensors"):
        push_to_hub(tmp_path, "me/x")
    assert fake.calls == []


# ---- the card -------------------------------------------------------------------------------------------


def test_card_header_fields(run_dir, tiny_base):
    for base, license in (("runwayml/stable-diffusion-v1-5", "creativeml-openrail-m"),
                          ("stable-diffusion-v1-5/stable-diffusion-v1-5", "creativeml-openrail-m"),
                          ("stabilityai/stable-diffusion-2-1", "openrail++"),
                          ("someone/unknown-model", "other"),
                          (str(tiny_base), "other")):
        meta, body = split_card(model_card_text(run_dir, train_args(base, run_dir)))
        expected = {"license": license, "library_name": "diffusers", "pipeline_tag": "text-to-image",
                    "tags": ["stable-diffusion", "stable-diffusion-diffusers", "text-to-image", "diffusers",
                             "diffusers-training", "lora", "yoso"], "inference": True}
        if base != str(tiny_base):
            expected["base_model"] = base  # a hub id; a local folder is no valid base_model
        assert meta == expected, base
        license_section = body.split("## License", 1)[1]
        if license == "other":
            assert "not in this project's table" in license_section and f"`{base}`" in license_section
        else:
            assert license_section.strip().startswith(f"`{license}`, the license of the base model `{base}`")
    # An explicit license and base (e.g. a local copy of SD1.5) win.
    meta, _ = split_card(model_card_text(run_dir, train_args(tiny_base, run_dir), base_model="runwayml/stable-diffusion-v1-5",
                                         license="mit"))
    assert meta["base_model"] == "runwayml/stable-diffusion-v1-5" and meta["license"] == "mit"


def test_card_body_settings_grid_and_files(run_dir, tiny_base):
    args = train_args("runwayml/stable-diffusion-v1-5", run_dir, "--learning_rate", "3e-4", "--hub_token", "hf_secret")
    path = write_model_card(run_dir, args, num_processes=4)
    text = path.read_text(encoding="utf-8")
    _, body = split_card(text)
    assert "hf_secret" not in text
    # The latest grid by step number (10 > 3), linked relative to the card, and the grid's legend.
    assert "![validation grid at step 10](validation/step-000010.png)" in body and "step-000003" not in body
    assert "columns, left to right: lora 1-step, lora 2-step" in body and "2. a blue car" in body
    settings = dict(re.findall(r"^\| `--(\w+)` \| (.*) \|$", body, flags=re.M))
    assert settings["lora_rank"] == "`4`" and settings["lora_alpha"] == "`3.0`" and settings["learning_rate"] == "`0.0003`"
    assert settings["use_ema"] == "on" and settings["max_train_steps"] == "`10`"
    assert settings["pretrained_teacher_model"] == "`stabilityai/sd-turbo`" and settings["train_data"] == "`train_anno.jsonl`"
    assert "`time_emb_proj`" in settings["lora_target_modules"]
    assert "hub_token" not in settings and "output_dir" not in settings
    assert "- Teacher: `stabilityai/sd-turbo`, 1 step(s), guidance 0.0" in body
    assert "- Data: prompts from `train_anno.jsonl`" in body
    assert "global batch 64 prompts" in body  # 16 per process x 1 accumulation x 4 processes
    files = re.findall(r"^\| `([^`]+)` \| ", body.split("## Files", 1)[1].split("##", 1)[0], flags=re.M)
    assert files == [LORA_WEIGHT_NAME, KOHYA_WEIGHT_NAME, f"non_ema/{LORA_WEIGHT_NAME}", f"non_ema/{KOHYA_WEIGHT_NAME}",
                     "latent_stats.safetensors", "validation/"]
    assert all((run_dir / f).exists() for f in files)
    assert f"load_lora_weights(\"{run_dir / 'non_ema'}\")" in body
    # Atomic write: the card replaced, no temporary file left.
    assert not [p for p in run_dir.iterdir() if p.name.startswith(".")]


def test_card_for_the_hub_names_repository_files(run_dir, tiny_base):
    _, body = split_card(model_card_text(run_dir, train_args(tiny_base, run_dir), repo_id="me/yoso-test"))
    uploaded = set(hub.hub_files(run_dir).values())
    files = re.findall(r"^\| `([^`]+)` \| ", body.split("## Files", 1)[1].split("##", 1)[0], flags=re.M)
    assert set(files) - {"validation/"} <= uploaded and "pytorch_lora_weights_non_ema.safetensors" in files
    lcm, ipi = python_blocks(body)
    assert 'pipeline.load_lora_weights("me/yoso-test")' in lcm
    assert 'lora = "me/yoso-test"' in ipi and 'hf_hub_download(lora, "latent_stats.safetensors")' in ipi
    assert 'weight_name="pytorch_lora_weights_non_ema.safetensors"' in body
    assert "`pytorch_lora_weights_kohya.safetensors`" in body and str(run_dir) not in body


def test_card_snippets_run_and_match_inference_examples(run_dir, tiny_base, tmp_path):
    """The card's snippets (for the local folder) run as written: they pick CUDA in float16 when there is a
    GPU, else the CPU in float32; the 2-step one gives the image that inference_examples.py (the README's
    snippets as a script) gives for its settings."""
    _, body = split_card(model_card_text(run_dir, train_args(tiny_base, run_dir)))
    blocks = python_blocks(body)
    assert len(blocks) == 2 and "num_inference_steps=2" in blocks[0] and "add_noise" in blocks[1]
    images = []
    for block in blocks:
        assert 'device = "cuda" if torch.cuda.is_available() else "cpu"' in block
        assert block.count("torch.float16") == 1 and block.count('"cuda"') == 2 and "dtype=dtype).to(device)" in block
        namespace = {}
        exec(compile(block, "model card snippet", "exec"), namespace)
        device = namespace["device"]
        assert namespace["dtype"] == (torch.float16 if device == "cuda" else torch.float32)
        if not torch.cuda.is_available():
            assert device == "cpu" and namespace["pipeline"].unet.dtype == torch.float32
        images.append(namespace["imgs"][0])
        assert isinstance(images[-1], Image.Image) and images[-1].size == (64, 64)
    cli = inference_examples.main(["--pretrained_model_name_or_path", tiny_base, "--lora", str(run_dir), "--device", device, "--mode", "lcm",
                                   "--seed", "318", "--prompt", PROMPTS[0], "--output_dir", str(tmp_path / "cli")])
    pixels = [np.asarray(im.convert("RGB"), dtype=np.int16) for im in (images[0], Image.open(cli[0]))]
    assert np.abs(pixels[0] - pixels[1]).max() <= 1


def test_card_without_optional_outputs(tiny_base, tmp_path):
    """A run without EMA, kohya files, validation or latent statistics: the card names only what exists."""
    from yoso.method.lora import save_lora
    from lora_outputs import lora_unet

    save_lora(lora_unet(tiny_base, seed=0), tmp_path)
    args = train_args(tiny_base, tmp_path)
    args.update(use_ema=False, validation_prompts=None)
    _, body = split_card(model_card_text(tmp_path, args))
    assert "## Validation" not in body and "non_ema" not in body and "kohya" not in body and "latent_stats" not in body
    assert len(python_blocks(body)) == 1 and '"A photo of a man, XT3"' in body
    assert hub_files(tmp_path) == {LORA_WEIGHT_NAME: LORA_WEIGHT_NAME}


# ---- what the run used, and only its files (issue 20) --------------------------------------------------------


def settings_table(body):
    return dict(re.findall(r"^\| `--(\w+)` \| (.*) \|$", body, flags=re.M))


def test_card_of_an_image_data_run_describes_the_images_not_a_teacher(run_dir, tiny_base):
    args = train_args("runwayml/stable-diffusion-v1-5", run_dir, "--train_data_dir", "/data/pets", "--caption_column",
                      "caption", "--center_crop", "--random_flip", "--resolution", "256", "--max_train_samples", "12")
    _, body = split_card(model_card_text(run_dir, args, num_processes=2, num_samples=12))
    training = body.split("## Training", 1)[1].split("## License", 1)[0]
    assert "- Teacher: none; the training latents are the base VAE's encodings of the images." in training
    assert ("- Data: images with captions from the folder `/data/pets`: image column `image`, caption column "
            "`caption`; 256 px, center crop, random horizontal flip; 12 samples.") in training
    assert "global batch 32 images" in training
    assert "sd-turbo" not in body and "train_anno.jsonl" not in body and "None" not in body
    settings = settings_table(body)
    assert settings["train_data_dir"] == "`/data/pets`" and settings["center_crop"] == "on"
    assert settings["random_flip"] == "on" and settings["caption_column"] == "`caption`"
    assert not {"pretrained_teacher_model", "train_data", "teacher_num_inference_steps"} & set(settings)
    license_section = body.split("## License", 1)[1]
    assert "teacher" not in license_section and "training images' license" in license_section
    # A hub dataset, defaults (random crop, no flip), count unknown (a stream).
    args = train_args("runwayml/stable-diffusion-v1-5", run_dir, "--dataset_name", "lambdalabs/pokemon",
                      "--dataset_config_name", "small", "--streaming")
    _, body = split_card(model_card_text(run_dir, args))
    assert ("images with captions from the dataset `lambdalabs/pokemon` (configuration `small`), streamed: image column "
            "`image`, caption column `text (txt for tar shards)`; 512 px, random crop, no flip. ") in body
    assert settings_table(body)["dataset_name"] == "`lambdalabs/pokemon`"


@pytest.mark.parametrize("train_data,caption_column,field", [
    ("prompts.txt", None, ""), ("train_anno.jsonl", None, " (field `prompt`)"), ("p.jsonl", "text", " (field `text`)")])
def test_card_of_a_prompt_run_names_the_field_it_read(run_dir, train_data, caption_column, field):
    extra = ["--train_data", train_data] + (["--caption_column", caption_column] if caption_column else [])
    _, body = split_card(model_card_text(run_dir, train_args("runwayml/stable-diffusion-v1-5", run_dir, *extra),
                                         num_samples=48))
    assert f"- Data: prompts from `{train_data}`{field}, 48 samples; the training reads prompt text only." in body
    assert "`None`" not in body


def test_card_and_upload_leave_out_files_an_earlier_run_left(run_dir, tmp_path):
    """A rerun without --save_kohya and without EMA into the same folder: the old kohya and non_ema files stay on
    disk, but the card and the upload name only what this run wrote (yoso_run_files.json)."""
    from yoso.outputs.output_files import RUN_FILES_NAME, read_run_files, write_run_files

    out = tmp_path / "out"
    shutil.copytree(run_dir, out)
    write_run_files(out, [LORA_WEIGHT_NAME, "latent_stats.safetensors"])
    args = train_args("runwayml/stable-diffusion-v1-5", out)
    args.update(use_ema=False)
    write_model_card(out, args)
    _, body = split_card((out / "README.md").read_text())
    assert "kohya" not in body and "non_ema" not in body
    assert set(hub_files(out)) == {"README.md", LORA_WEIGHT_NAME, "latent_stats.safetensors", "validation/README.txt",
                                   "validation/step-000003.png", "validation/step-000010.png"}
    assert RUN_FILES_NAME not in hub_files(out)
    # convert_lora_to_kohya.py later: its kohya copy of the run's LoRA joins the run's files, and the upload.
    import convert_lora_to_kohya

    convert_lora_to_kohya.main([str(out / LORA_WEIGHT_NAME)])
    assert KOHYA_WEIGHT_NAME in read_run_files(out) and KOHYA_WEIGHT_NAME in hub_files(out)
    assert f"non_ema/{KOHYA_WEIGHT_NAME}" not in hub_files(out)
