"""Kohya-format export (issue 16.1): yoso/outputs/kohya.py and convert_lora_to_kohya.py on a run-shaped folder whose
LoRAs have random nonzero weights on every default target and alpha != rank."""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import convert_lora_to_kohya
from lora_outputs import ALPHA, RANK, make_output_dir, unet_output
from yoso.outputs.kohya import KOHYA_WEIGHT_NAME, KohyaExportError, kohya_state_dict, module_alpha, save_kohya_lora
from yoso.method.lora import DEFAULT_TARGET_MODULES, LORA_WEIGHT_NAME, module_matches_target

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def run_dir(tiny_base, tmp_path_factory):
    return make_output_dir(tiny_base, tmp_path_factory.mktemp("kohya") / "out")


@pytest.fixture(scope="module")
def converted(run_dir):
    """convert_lora_to_kohya.py on the output folder: both LoRAs converted, paths printed."""
    return convert_lora_to_kohya.main([str(run_dir)])


@pytest.fixture(scope="module")
def base_output(tiny_base):
    from diffusers import StableDiffusionPipeline

    return unet_output(StableDiffusionPipeline.from_pretrained(tiny_base).unet)


@pytest.fixture(scope="module")
def reference_outputs(run_dir, tiny_base):
    """The UNet output with each diffusers-format LoRA of the run loaded the documented way."""
    return {folder: unet_output(loaded_unet(tiny_base, run_dir / folder)) for folder in ("", "non_ema")}


def loaded_unet(tiny_base, lora, **kwargs):
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(tiny_base)
    pipe.load_lora_weights(str(lora), **kwargs)
    return pipe.unet


def loaded_types(unet):
    return {t for name, m in unet.named_modules() if getattr(m, "lora_A", None)
            for t in DEFAULT_TARGET_MODULES if module_matches_target(name, t)}


def lora_module_count(unet):
    return sum(1 for _, m in unet.named_modules() if getattr(m, "lora_A", None))


def test_converter_writes_both_loras_of_a_run(run_dir, converted):
    assert converted == [(run_dir / KOHYA_WEIGHT_NAME).resolve(), (run_dir / "non_ema" / KOHYA_WEIGHT_NAME).resolve()]
    # Atomic writes: nothing but the outputs is left beside the sources.
    assert sorted(p.name for p in (run_dir / "non_ema").iterdir()) == [LORA_WEIGHT_NAME, KOHYA_WEIGHT_NAME]
    for path in converted:
        with safe_open(str(path), framework="pt") as f:
            keys, metadata = list(f.keys()), f.metadata()
        modules = {k.split(".")[0] for k in keys}
        assert all(m.startswith("lora_unet_") for m in modules)
        assert sorted(keys) == sorted(f"{m}.{s}" for m in modules for s in ("lora_down.weight", "lora_up.weight", "alpha"))
        state = load_file(str(path))
        assert {state[f"{m}.alpha"].item() for m in modules} == {float(ALPHA)}  # the trained alpha, not the rank
        assert {state[f"{m}.lora_down.weight"].shape[0] for m in modules} == {RANK}
        assert metadata["ss_network_dim"] == str(RANK) and metadata["ss_network_alpha"] == str(ALPHA)


@pytest.mark.parametrize("folder", ["", "non_ema"])
def test_kohya_file_loads_to_the_same_unet_as_the_diffusers_file(folder, run_dir, converted, tiny_base, base_output,
                                                                 reference_outputs):
    source = run_dir / folder
    kohya = loaded_unet(tiny_base, source / KOHYA_WEIGHT_NAME)
    assert (unet_output(kohya) - reference_outputs[folder]).abs().max().item() <= 1e-5
    assert (unet_output(kohya) - base_output).abs().max().item() > 1e-2  # the LoRA does change the UNet
    assert loaded_types(kohya) == set(DEFAULT_TARGET_MODULES)
    assert lora_module_count(kohya) == len(load_file(str(source / LORA_WEIGHT_NAME))) // 2
    # diffusers reads the kohya file with the trained alpha: peft's scale is alpha / rank = 0.75.
    assert {m.scaling[a] for _, m in kohya.named_modules() if getattr(m, "lora_A", None) for a in m.scaling} == {ALPHA / RANK}


def test_negative_controls_dropped_alpha_or_module_type_change_the_output(run_dir, converted, tiny_base, tmp_path,
                                                                         reference_outputs):
    """What the equality above guards against: without .alpha keys (or with diffusers' plain
    convert_state_dict_to_kohya, which writes alpha = rank) the LoRA loads at scale 1 instead of 0.75, and a
    dropped module type is seen by the type check and in the output."""
    from diffusers import StableDiffusionPipeline
    from diffusers.utils import convert_state_dict_to_kohya

    reference = reference_outputs[""]
    kohya = load_file(str(run_dir / KOHYA_WEIGHT_NAME))

    no_alpha = tmp_path / "no_alpha.safetensors"
    save_file({k: v for k, v in kohya.items() if not k.endswith(".alpha")}, str(no_alpha))
    assert (unet_output(loaded_unet(tiny_base, no_alpha)) - reference).abs().max().item() > 1e-2

    plain = tmp_path / "plain.safetensors"
    state, _ = StableDiffusionPipeline.lora_state_dict(str(run_dir), weight_name=LORA_WEIGHT_NAME)
    save_file({k: v.contiguous() for k, v in convert_state_dict_to_kohya(state).items()}, str(plain))
    assert {v.item() for k, v in load_file(str(plain)).items() if k.endswith(".alpha")} == {RANK}
    assert (unet_output(loaded_unet(tiny_base, plain)) - reference).abs().max().item() > 1e-2

    no_time_emb = tmp_path / "no_time_emb_proj.safetensors"
    save_file({k: v for k, v in kohya.items() if "time_emb_proj" not in k}, str(no_time_emb))
    unet = loaded_unet(tiny_base, no_time_emb)
    assert loaded_types(unet) == set(DEFAULT_TARGET_MODULES) - {"time_emb_proj"}
    assert (unet_output(unet) - reference).abs().max().item() > 1e-3


def test_file_without_adapter_metadata_converts_as_diffusers_reads_it(run_dir, tiny_base, tmp_path):
    """No stored config: diffusers loads the file at alpha = rank, and so does its kohya copy."""
    bare = tmp_path / LORA_WEIGHT_NAME
    save_file(load_file(str(run_dir / LORA_WEIGHT_NAME)), str(bare))
    written = save_kohya_lora(tmp_path)
    assert written == tmp_path / KOHYA_WEIGHT_NAME
    assert {v.item() for k, v in load_file(str(written)).items() if k.endswith(".alpha")} == {float(RANK)}
    diff = unet_output(loaded_unet(tiny_base, written)) - unet_output(loaded_unet(tiny_base, tmp_path, weight_name=LORA_WEIGHT_NAME))
    assert diff.abs().max().item() <= 1e-5


def test_alpha_pattern_is_resolved_per_module_with_peft_rule():
    config = {"r": 4, "lora_alpha": 3, "alpha_pattern": {"time_emb_proj": 8, "attn2.to_k": 2}}
    assert module_alpha("down_blocks.0.resnets.1.time_emb_proj", 4, config) == 8
    assert module_alpha("mid_block.attentions.0.transformer_blocks.0.attn2.to_k", 4, config) == 2
    assert module_alpha("mid_block.attentions.0.transformer_blocks.0.attn1.to_k", 4, config) == 3
    assert module_alpha("conv1", 16, None) == 16
    a, b = torch.ones(2, 5), torch.ones(7, 2)
    kohya = kohya_state_dict({"unet.mid_block.resnets.0.time_emb_proj.lora_A.weight": a,
                              "unet.mid_block.resnets.0.time_emb_proj.lora_B.weight": b,
                              "unet.mid_block.resnets.0.conv1.lora_A.weight": a,
                              "unet.mid_block.resnets.0.conv1.lora_B.weight": b}, config)
    assert kohya["lora_unet_mid_block_resnets_0_time_emb_proj.alpha"].item() == 8
    assert kohya["lora_unet_mid_block_resnets_0_conv1.alpha"].item() == 3
    with pytest.raises(KohyaExportError, match="lora_A without a lora_B"):
        kohya_state_dict({"unet.mid_block.resnets.0.conv1.lora_A.weight": a}, config)


def test_converter_on_a_checkpoint_folder_and_a_file(run_dir, tmp_path, capsys):
    checkpoint = tmp_path / "out" / "checkpoint-6"
    checkpoint.mkdir(parents=True)
    shutil.copy(run_dir / "non_ema" / LORA_WEIGHT_NAME, checkpoint / LORA_WEIGHT_NAME)
    (checkpoint / "optimizer.bin").write_bytes(b"not a LoRA")
    written = convert_lora_to_kohya.main([str(checkpoint)])
    assert written == [(checkpoint / KOHYA_WEIGHT_NAME).resolve()]
    assert capsys.readouterr().out.split() == [str(p) for p in written]
    assert load_file(str(written[0])).keys() == load_file(str(run_dir / "non_ema" / KOHYA_WEIGHT_NAME)).keys()
    # A file path: the copy goes beside it, named <stem>_kohya.safetensors.
    renamed = tmp_path / "my_lora.safetensors"
    shutil.copy(run_dir / LORA_WEIGHT_NAME, renamed)
    assert convert_lora_to_kohya.main([str(renamed)]) == [(tmp_path / "my_lora_kohya.safetensors").resolve()]


def bad_paths(root, run_dir):
    (root / "empty").mkdir()
    (root / "text.safetensors").write_text("hello")
    shutil.copy(run_dir / KOHYA_WEIGHT_NAME, root / "already_kohya.safetensors")
    save_file({"text_encoder.foo.lora_A.weight": torch.ones(2, 2)}, str(root / "te.safetensors"))
    return {
        "folder without a LoRA": (root / "empty", "no pytorch_lora_weights.safetensors in it or in its non_ema/"),
        "missing path": (root / "nope", "no such file or folder"),
        "not safetensors": (root / "text.safetensors", "not a readable safetensors file"),
        "already kohya": (root / "already_kohya.safetensors", "already in kohya format"),
        "text encoder LoRA": (root / "te.safetensors", "keys outside the UNet"),
    }


def test_bad_input_is_one_line_exit_2_and_nothing_is_written(run_dir, converted, tmp_path, capsys):
    good = tmp_path / "good"
    good.mkdir()
    shutil.copy(run_dir / LORA_WEIGHT_NAME, good / LORA_WEIGHT_NAME)
    for case, (path, fragment) in bad_paths(tmp_path, run_dir).items():
        with pytest.raises(SystemExit) as exc:
            convert_lora_to_kohya.main([str(good), str(path)])  # the good folder first: still nothing written
        assert exc.value.code == 2, case
        err = capsys.readouterr().err
        lines = [line for line in err.splitlines() if line.strip()]
        assert len(lines) == 1 and lines[0].startswith("convert_lora_to_kohya.py: error: "), (case, err)
        assert str(path) in lines[0] and fragment in lines[0], (case, lines[0])
        assert sorted(p.name for p in good.iterdir()) == [LORA_WEIGHT_NAME], case


def test_script_exit_status_from_the_command_line(tmp_path):
    (tmp_path / "empty").mkdir()
    proc = subprocess.run([sys.executable, str(REPO / "convert_lora_to_kohya.py"), str(tmp_path / "empty")],
                          capture_output=True, text=True, timeout=120, cwd=REPO)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines() == [(
        f"convert_lora_to_kohya.py: error: {tmp_path / 'empty'}: no pytorch_lora_weights.safetensors in it or in its "
        "non_ema/ (give a train_yoso_lora.py --output_dir, a checkpoint-<step> folder or a LoRA file)")]


def test_readme_converter_commands_run(run_dir, tmp_path):
    """docs/training.md's convert_lora_to_kohya.py lines, with yoso-lora-output swapped for a run-shaped folder."""
    import shlex

    text = (REPO / "docs" / "training.md").read_text(encoding="utf-8")
    section = text.split("\n### Kohya format", 1)[1].split("\n#", 1)[0]
    commands = [shlex.split(line, comments=True) for line in section.splitlines() if line.startswith("python convert_lora_to_kohya.py")]
    assert len(commands) == 2
    out = tmp_path / "out"
    shutil.copytree(run_dir, out, ignore=shutil.ignore_patterns("*_kohya.safetensors"))
    (out / "checkpoint-500").mkdir()
    shutil.copy(run_dir / "non_ema" / LORA_WEIGHT_NAME, out / "checkpoint-500" / LORA_WEIGHT_NAME)
    written = []
    for argv in commands:
        argv = [a.replace("yoso-lora-output", str(out)) for a in argv[2:]]
        written += convert_lora_to_kohya.main(argv)
    assert written == [(out / f / KOHYA_WEIGHT_NAME).resolve() for f in ("", "non_ema", "checkpoint-500")]


def test_converter_prints_the_written_files_and_no_library_notices(run_dir, tmp_path):
    """transformers' "requires torchvision" notices (CLIP's and SigLIP's image processors, when diffusers is
    imported) are library noise: the converter prints only the files it wrote."""
    folder = tmp_path / "lora"
    folder.mkdir()
    shutil.copy(run_dir / LORA_WEIGHT_NAME, folder / LORA_WEIGHT_NAME)
    proc = subprocess.run([sys.executable, str(REPO / "convert_lora_to_kohya.py"), str(folder)],
                          capture_output=True, text=True, timeout=300, cwd=REPO)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines() == [str((folder / KOHYA_WEIGHT_NAME).resolve())]
    assert "torchvision" not in proc.stderr and proc.stderr.strip() == "", proc.stderr
