"""One command-line convention for every script (docs/training.md, "Errors, exit codes and `--check_only`"): a bad flag
is one line on stderr that starts with the script's name, exit status 2, no traceback; `--help` gives every
flag a help text and shows its default."""

import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# Each script with its required arguments (argparse reports missing ones before unknown ones).
REQUIRED = {
    "train_yoso_lora.py": [],
    "prepare_journeydb.py": ["annotations.jsonl"],
    "precompute_teacher_latents.py": ["--output_dir", "cache"],
    "inference_examples.py": [],
    "evaluate_yoso.py": ["--lora", "out", "--prompts", "prompts.txt", "--reference_dir", "images"],
    "convert_lora_to_kohya.py": ["out"],
}
SCRIPTS = list(REQUIRED)


def run_script(script, *argv):
    return subprocess.run([sys.executable, str(REPO / script), *argv], capture_output=True, text=True, cwd=REPO,
                          env={"PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}, timeout=300)


def option_blocks(help_text):
    """(flag, its help as one line) for each entry of the help's "options:" section."""
    options = help_text.split("\noptions:\n", 1)[1]
    options = re.split(r"\n\S", options, maxsplit=1)[0]  # up to the next section (none, or an epilog)
    blocks = re.split(r"\n(?=  -)", options.strip("\n"))
    return [(re.match(r"\s*(-[-\w]+)", block).group(1), " ".join(block.split())) for block in blocks]


@pytest.mark.parametrize("script", SCRIPTS)
def test_a_bad_flag_is_one_line_that_names_the_script_with_exit_status_2(script):
    proc = run_script(script, *REQUIRED[script], "--no_such_flag")
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"{script}: error: ") and "--no_such_flag" in lines[0], lines
    assert proc.stdout == ""


@pytest.mark.parametrize("script", SCRIPTS)
def test_help_gives_every_flag_a_text_and_its_default(script):
    proc = run_script(script, "--help")
    assert proc.returncode == 0, proc.stderr
    blocks = option_blocks(proc.stdout)
    assert len(blocks) >= 2 or script == "convert_lora_to_kohya.py"  # it takes paths and no flags
    for flag, text in blocks:
        if flag == "-h":
            continue
        signature = re.match(r"(-[-\w]+)( [A-Z_\[\]{}.,\w-]+)*", text).group(0)  # the flag and its metavar
        assert len(text) > len(signature) + 10, f"{script} {flag} has no help text"
        assert re.search(r"\(default\b|\bdefault:|\brequired\b", text, flags=re.I), f"{script} {flag}: no default shown"
