"""train_yoso_lora.py's command line before any model loads: help texts, flag forms, prompt files, the
global batch, the Hub when it cannot be reached, exit codes and --check_only (issue 12)."""

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from harness import REPO, launch, tiny_train_args, write_prompts
from yoso.method.lora import DEFAULT_TARGET_MODULES


def run_main(argv, capsys):
    """train_yoso_lora.main in this process: (exit status, stdout, stderr lines)."""
    from train_yoso_lora import main

    with pytest.raises(SystemExit) as exit_info:
        main([str(a) for a in argv])
    captured = capsys.readouterr()
    code = exit_info.value.code
    return (0 if code is None else code), captured.out, [line for line in captured.err.splitlines() if line.strip()]


def one_line_error(argv, capsys, *fragments):
    code, _, lines = run_main(argv, capsys)
    assert code == 2 and len(lines) == 1, (code, lines)
    assert lines[0].startswith("train_yoso_lora.py: error: "), lines
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])
    return lines[0]


@pytest.fixture(scope="module")
def prompts_file(tmp_path_factory):
    return write_prompts(tmp_path_factory.mktemp("data") / "prompts.jsonl")  # 48 prompts


# ---- help (item 6) ---------------------------------------------------------------------------------


def test_every_flag_has_help_and_its_default(capsys):
    code, out, _ = run_main(["--help"], capsys)
    assert code == 0
    options = out.split("\noptions:\n", 1)[1]
    # One block per flag: its line starts with two spaces and a dash; the help follows on that line or the next ones.
    blocks = re.split(r"\n(?=  -)", options.strip("\n"))
    flags = [re.match(r"\s*(-[-\w]+)", block).group(1) for block in blocks]
    assert len(flags) > 70 and "--learning_rate" in flags and "--lora_rank" in flags
    for flag, block in zip(flags, blocks):
        if flag == "-h":
            continue
        text = " ".join(block.split())
        signature = re.match(r"(-[-\w]+)( [A-Z_\[\]{}.,\w-]+)*", text).group(0)  # flag and metavar
        assert len(text) > len(signature) + 10, f"{flag} has no help text"
        assert re.search(r"\(default\b|\bdefault:", text, flags=re.I), f"{flag}: its help shows no default"
    assert "(default: 2e-05)" in options.split("--learning_rate", 1)[1].split("\n  -", 1)[0].replace("\n", " ")


# ---- --lora_target_modules with commas (item 7) -------------------------------------------------------


def test_lora_target_modules_take_commas_as_well_as_spaces():
    from train_yoso_lora import parse_args

    expected = ["to_q", "to_k", "to_v", "to_out.0"]
    assert parse_args(["--lora_target_modules", "to_q,to_k,to_v,to_out.0"]).lora_target_modules == expected
    assert parse_args(["--lora_target_modules", "to_q", "to_k", "to_v", "to_out.0"]).lora_target_modules == expected
    assert parse_args(["--lora_target_modules", "to_q,to_k", "to_v,", "to_out.0"]).lora_target_modules == expected
    assert parse_args([]).lora_target_modules == list(DEFAULT_TARGET_MODULES)


def test_comma_separated_targets_reach_the_preflight(tiny_base, tiny_teacher, prompts_file, tmp_path, capsys):
    args = tiny_train_args(tiny_base, tiny_teacher, prompts_file, tmp_path / "out", lora_target_modules="to_q,to_qq")
    one_line_error(args, capsys, "--lora_target_modules: to_qq match no module")


# ---- prompt files: .json lists, JSON never read as prompts (item 4) --------------------------------


def test_json_list_of_records_or_of_strings(tmp_path):
    from yoso.data.prompts import read_prompts

    records = tmp_path / "anno.json"
    records.write_text(json.dumps([{"prompt": "a red fox", "id": 1}, {"prompt": " a koi pond "}, {"prompt": ""}]))
    assert read_prompts(records) == ["a red fox", "a koi pond"]
    assert read_prompts(records, max_samples=1) == ["a red fox"]
    captions = tmp_path / "captions.json"
    captions.write_text(json.dumps([{"caption": "a lighthouse"}, {"caption": "ramen"}], indent=2))
    assert read_prompts(captions, "caption") == ["a lighthouse", "ramen"]
    strings = tmp_path / "strings.json"
    strings.write_text(json.dumps(["a tiny robot", "a bowl of ramen"], indent=1))
    assert read_prompts(strings) == ["a tiny robot", "a bowl of ramen"]


JSON_REFUSALS = {
    "object": ('{"prompt": "a red fox"}', ".json", ["holds an object, not a JSON list"]),
    "malformed": ('[{"prompt": "a"},\n{"prompt": ', ".json", ["malformed JSON at line 2"]),
    "records without the column": ('[{"caption": "a"}]', ".json", ["item 1: no 'prompt' field", "--caption_column"]),
    "a list in a .txt": ('[\n  {"prompt": "a red fox"}\n]\n', ".txt", ["line 1 is JSON", ".jsonl", ".json"]),
    "records in a .txt": ('{"prompt": "a red fox"}\n{"prompt": "a koi"}\n', ".txt", ["line 1 is JSON"]),
    "records without extension": ('\n{"prompt": "a red fox"}\n', "", ["line 2 is JSON"]),
}


@pytest.mark.parametrize("case", sorted(JSON_REFUSALS))
def test_json_is_never_trained_on_as_text(case, tiny_base, tiny_teacher, tmp_path, capsys):
    text, suffix, fragments = JSON_REFUSALS[case]
    path = tmp_path / f"anno{suffix}"
    path.write_text(text)
    args = tiny_train_args(tiny_base, tiny_teacher, path, tmp_path / "out")
    one_line_error(args, capsys, f"--train_data {path}", *fragments)
    assert not (tmp_path / "out").exists()


def test_text_prompts_that_merely_start_with_a_bracket_are_kept(tmp_path):
    from yoso.data.prompts import read_prompts

    path = tmp_path / "prompts.txt"
    path.write_text("[cat] on a mat\n{surreal} city\n")
    assert read_prompts(path) == ["[cat] on a mat", "{surreal} city"]


# ---- fewer prompts than one global batch (item 2) -------------------------------------------------------


def test_too_few_prompts_for_one_global_batch_stop_the_preflight(tiny_base, tiny_teacher, prompts_file, tmp_path,
                                                                 capsys, monkeypatch):
    out = tmp_path / "out"
    args = tiny_train_args(tiny_base, tiny_teacher, prompts_file, out)
    one_line_error(args + ["--train_batch_size", "64"], capsys, "48 prompts, fewer than one global batch (64 x 1 processes)")
    one_line_error(args + ["--train_batch_size", "16", "--max_train_samples", "10"], capsys, "10 prompts")
    monkeypatch.setenv("WORLD_SIZE", "4")  # what accelerate launch sets in each of 4 processes
    one_line_error(args + ["--train_batch_size", "16"], capsys, "(16 x 4 processes)")
    assert not out.exists()


def test_too_few_prompts_under_accelerate_launch_with_two_processes(tiny_base, tiny_teacher, prompts_file, tmp_path):
    out = tmp_path / "out"
    # 32 x 1 would fit the 48 prompts; 32 x 2 does not.
    result = launch(tiny_train_args(tiny_base, tiny_teacher, prompts_file, out, train_batch_size=32), num_processes=2,
                    timeout=300)
    assert result.returncode != 0
    errors = [line for line in result.stderr.splitlines() if line.startswith("train_yoso_lora.py: error:")]
    assert errors and all("48 prompts, fewer than one global batch (32 x 2 processes)" in line for line in errors)
    assert 'train_yoso_lora.py", line' not in result.stderr  # no traceback of the script (accelerate's own follows)
    assert not out.exists()


# ---- --resume_from_checkpoint by name inside --output_dir (item 5) ---------------------------------------


def test_resume_names_resolve_inside_the_output_dir_an_existing_path_first(tmp_path, monkeypatch):
    from yoso.training.checkpoint import resolve_checkpoint

    out = tmp_path / "out"
    (out / "checkpoint-20").mkdir(parents=True)
    (out / "checkpoint-40").mkdir()
    monkeypatch.chdir(tmp_path)
    assert resolve_checkpoint("checkpoint-20", out)[0] == out / "checkpoint-20"
    assert resolve_checkpoint(str(out / "checkpoint-20"), "elsewhere")[0] == out / "checkpoint-20"
    assert resolve_checkpoint("latest", out)[0] == out / "checkpoint-40"
    (tmp_path / "checkpoint-20").mkdir()  # a folder of that name in the current directory is taken first
    assert resolve_checkpoint("checkpoint-20", out)[0] == Path("checkpoint-20")
    path, tried = resolve_checkpoint("checkpoint-60", out)
    assert path is None and tried == [Path("checkpoint-60"), out / "checkpoint-60"]


def test_missing_resume_checkpoint_names_both_places(tiny_base, tiny_teacher, prompts_file, tmp_path, capsys):
    out = tmp_path / "out"
    args = tiny_train_args(tiny_base, tiny_teacher, prompts_file, out, resume_from_checkpoint="checkpoint-7")
    one_line_error(args, capsys, "--resume_from_checkpoint checkpoint-7: no such checkpoint folder",
                   f"{out / 'checkpoint-7'}")


# ---- model ids when the Hub cannot be reached (item 8) ------------------------------------------------


def test_offline_mode_says_so_at_once(tiny_base, tiny_teacher, prompts_file, tmp_path, capsys):
    for model in ("someone/not-cached", "models/sd15"):  # a hub id, and a relative folder that does not exist
        args = tiny_train_args(model, tiny_teacher, prompts_file, tmp_path / "out")
        start = time.monotonic()
        one_line_error(args, capsys, f"--pretrained_model_name_or_path {model}: not a local folder, and not in the "
                                     "Hub cache (offline mode: HF_HUB_OFFLINE=1)")
        assert time.monotonic() - start < 5


TIMED_MAIN = """
import sys, time
sys.path.insert(0, sys.argv[1])
import train_yoso_lora
from diffusers import AutoencoderKL, UNet2DConditionModel  # imported before the clock starts
start = time.monotonic()
try:
    train_yoso_lora.main(sys.argv[2:])
except SystemExit as exit:
    print(f"{exit.code} {time.monotonic() - start:.2f}")
"""


def test_unreachable_hub_is_named_in_seconds_not_after_retries(tiny_teacher, prompts_file, tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")}
    # Nothing listens on port 9 of this machine: the Hub is unreachable at once, and the hub client's own
    # retries (1 + 2 + 4 + 8 + 8 s) are all that would make the check slow.
    env.update(HF_ENDPOINT="http://127.0.0.1:9", HF_HUB_CACHE=str(tmp_path / "empty_cache"), CUDA_VISIBLE_DEVICES="")
    args = tiny_train_args("someone/sd15", tiny_teacher, prompts_file, tmp_path / "out") + ["--check_only"]
    result = subprocess.run([sys.executable, "-c", TIMED_MAIN, str(REPO), *map(str, args)], capture_output=True,
                            text=True, timeout=180, cwd=REPO, env=env)
    code, seconds = result.stdout.split()
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert code == "2" and len(lines) == 1, result.stderr[-2000:]
    assert lines[0].startswith("train_yoso_lora.py: error: --pretrained_model_name_or_path someone/sd15: not a local "
                               "folder, and the Hub is unreachable (http://127.0.0.1:9")
    assert float(seconds) < 8, seconds
    assert not (tmp_path / "out").exists()


# ---- exit codes (item 11) and --check_only (item 14) ------------------------------------------------------


def test_argparse_errors_are_one_line_with_status_2(capsys):
    one_line_error(["--lora_rank", "eight"], capsys, "--lora_rank", "invalid int value")
    one_line_error(["--no_such_flag"], capsys, "unrecognized arguments: --no_such_flag")
    one_line_error(["--push_to_hub", "--hub_token", "x", "--report_to", "wandb"], capsys, "--hub_token")


def test_check_only_validates_everything_and_creates_nothing(tiny_base, tiny_teacher, prompts_file, tmp_path, capsys):
    out = tmp_path / "out"
    args = tiny_train_args(tiny_base, tiny_teacher, prompts_file, out, lora_target_modules="to_q,to_v") + ["--check_only"]
    result = subprocess.run([sys.executable, str(REPO / "train_yoso_lora.py"), *map(str, args)], capture_output=True,
                            text=True, timeout=120, cwd=REPO, env=dict(os.environ, CUDA_VISIBLE_DEVICES=""))
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip().splitlines() == [
        f"train_yoso_lora.py: checks passed (48 prompts, base {tiny_base}, teacher {tiny_teacher}, 1 process); "
        "no model was loaded"]
    assert result.stderr.strip() == ""
    assert not out.exists()
    # A bad value still fails in one line with --check_only.
    one_line_error(args + ["--resolution", "72"], capsys, "--resolution 72")


# ---- library notices (item 12) -----------------------------------------------------------------------------


def test_only_the_listed_library_notices_are_dropped(caplog):
    import logging

    from yoso.utils.library_noise import quiet_library_notices

    quiet_library_notices()
    quiet_library_notices()  # idempotent
    transformers_log = logging.getLogger("transformers.utils.import_utils")
    diffusers_log = logging.getLogger("diffusers.configuration_utils")
    assert sum(type(f).__name__ == "_DropNotices" for f in transformers_log.filters) == 1
    messages = {
        transformers_log: ["`CLIPImageProcessor` requires torchvision (not installed); falling back to `X`",
                           "transformers: an unrelated warning"],
        diffusers_log: ["The config attributes {'skip_prk_steps': True} were passed to LCMScheduler, but are not expected "
                        "and will be ignored.",
                        "The config attributes {'skip_prk_steps': True, 'foo': 1} were passed to LCMScheduler, but are "
                        "not expected and will be ignored.",
                        "diffusers: an unrelated warning"],
    }
    for logger, texts in messages.items():
        logger.propagate, was = True, logger.propagate  # let caplog see what passes the filter
        try:
            with caplog.at_level(logging.WARNING, logger=logger.name):
                for text in texts:
                    logger.warning(text)
        finally:
            logger.propagate = was
    kept = [record.getMessage() for record in caplog.records]
    assert kept == [messages[transformers_log][1], *messages[diffusers_log][1:]]


def test_too_few_images_for_one_global_batch_exit_2_and_leave_no_output_folder(tiny_base, tmp_path):
    """An image folder's row count is known only once datasets prepares it (when the data opens, after the
    preflight but before any model loads): the run still stops with the one error line, status 2, no folder."""
    from PIL import Image

    folder = tmp_path / "images"
    folder.mkdir()
    rows = []
    for i in range(3):
        Image.new("RGB", (16, 16), (40 * i, 0, 0)).save(folder / f"{i}.png")
        rows.append(json.dumps({"file_name": f"{i}.png", "text": f"red square {i}"}))
    (folder / "metadata.jsonl").write_text("\n".join(rows) + "\n")
    out = tmp_path / "out"
    args = ["--pretrained_model_name_or_path", tiny_base, "--train_data_dir", folder, "--resolution", "64",
            "--output_dir", out, "--train_batch_size", "4", "--max_train_steps", "2", "--report_to", "none",
            "--cache_dir", tmp_path / "datasets_cache"]
    result = subprocess.run([sys.executable, str(REPO / "train_yoso_lora.py"), *map(str, args)], capture_output=True,
                            text=True, timeout=180, cwd=REPO, env=dict(os.environ, CUDA_VISIBLE_DEVICES=""))
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == 2, result.stderr[-2000:]
    assert lines[-1] == (f"train_yoso_lora.py: error: --train_data_dir {folder} holds 3 samples, fewer than one global "
                         "batch (4 x 1 processes): lower --train_batch_size or add images")
    assert "Traceback" not in result.stderr and "Loading weights" not in result.stderr
    assert not out.exists()
