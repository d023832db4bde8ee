"""README.md and docs/*.md against the code they describe (issue 12): the install commands and what
scripts/setup_env.sh installs, the `hf` download command, the text the training uses, the error section, the
code layout, the digits tables, and no references to issue numbers a reader cannot see."""

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
README = (REPO / "README.md").read_text()
DOCS = sorted(str(p.relative_to(REPO)) for p in (REPO / "docs").glob("*.md"))
TORCH_CPU_INDEX = "https://download.pytorch.org/whl/cpu"


def section(title, page="README.md"):
    """The text of ``page`` from the heading ``title`` to the next heading of the same or a higher level
    (lines in fenced code blocks are no headings)."""
    lines, found, level, in_code = [], None, 0, False
    for line in (REPO / page).read_text().splitlines():
        if line.startswith("```"):
            in_code = not in_code
        heading = None if in_code else re.match(r"^(#+) (.*)$", line)
        if found is None:
            if heading and heading.group(2).startswith(title):
                found, level = line, len(heading.group(1))
            continue
        if heading and len(heading.group(1)) <= level:
            break
        lines.append(line)
    assert found, title
    return "\n".join(lines)


def pinned(requirement_file, package):
    text = (REPO / requirement_file).read_text()
    return re.search(rf"^{re.escape(package)}==(\S+)", text, flags=re.M).group(1)


def setup_env_installs(tmp_path, **env):
    """The pip commands scripts/setup_env.sh runs on a machine without the packages, recorded by a stand-in
    python (nothing is installed)."""
    venv, log = tmp_path / "venv", tmp_path / "calls.log"
    (venv / "bin").mkdir(parents=True)
    stub = venv / "bin" / "python"
    # The import check (python -c ...) fails, so the script installs; every call is logged.
    stub.write_text('#!/bin/sh\nif [ "$1" = "-c" ]; then exit 1; fi\necho "$@" >> "$YOSO_TEST_LOG"\n')
    stub.chmod(0o755)
    full_env = {k: v for k, v in os.environ.items() if k != "TORCH_INDEX_URL"}
    full_env.update(VENV=str(venv), YOSO_TEST_LOG=str(log), **env)
    subprocess.run(["bash", "-c", f"source {shlex.quote(str(REPO / 'scripts' / 'setup_env.sh'))}"], check=True,
                   env=full_env, capture_output=True, text=True, timeout=60)
    return [line.split() for line in log.read_text().splitlines() if "install" in line]


def test_setup_env_installs_torch_first_then_dev_requirements_then_open_clip_without_deps(tmp_path):
    torch_pin = pinned("requirements.txt", "torch")
    calls = [call for call in setup_env_installs(tmp_path) if "--upgrade" not in call]
    assert calls[0][-1] == f"torch=={torch_pin}"  # the plain pin: PyPI's default build (CUDA on Linux)
    assert calls[1][-2:] == ["-r", str(REPO / "requirements-dev.txt")]
    assert "--no-deps" in calls[2] and calls[2][-1].startswith("open_clip_torch==")
    assert len(calls) == 3
    # TORCH_INDEX_URL picks the build: PyTorch's CPU index for a CPU-only machine; only torch comes from it.
    calls = [call for call in setup_env_installs(tmp_path / "cpu", TORCH_INDEX_URL=TORCH_CPU_INDEX) if "--upgrade" not in call]
    assert calls[0][-3:] == [f"torch=={torch_pin}", "--index-url", TORCH_CPU_INDEX]
    assert all(TORCH_CPU_INDEX not in " ".join(call) for call in calls[1:])


def test_readme_install_and_quick_start_say_what_is_installed(tmp_path):
    torch_pin = pinned("requirements.txt", "torch")
    install = section("Install")
    commands = [line.split("#")[0].strip() for line in install.split("```bash", 1)[1].split("```", 1)[0].splitlines()]
    assert f"pip install torch=={torch_pin} --index-url {TORCH_CPU_INDEX}" in commands  # CPU-only machines
    assert f"pip install torch=={torch_pin}" in commands  # the CUDA build (PyPI's default on Linux)
    assert "pip install -r requirements.txt" in commands
    assert "CPU" in install and "CUDA" in install
    quick = section("Quick start")
    # What the demo's setup installs, as the script does it.
    open_clip_pin = next(c[-1] for c in setup_env_installs(tmp_path) if c[-1].startswith("open_clip_torch"))
    for claim in (f"torch {torch_pin}", "`requirements-dev.txt`", f"`{open_clip_pin}`", "--no-deps", "TORCH_INDEX_URL",
                  TORCH_CPU_INDEX):
        assert claim in quick, claim
    assert "then `requirements.txt`" not in quick


def test_readme_download_commands_use_hf_and_it_takes_their_flags():
    text = "\n".join((REPO / doc).read_text() for doc in ["README.md", *DOCS])
    assert "huggingface-cli" not in text
    commands = [line.strip() for line in text.replace("\\\n", " ").splitlines() if line.lstrip().startswith("hf download")]
    assert len(commands) >= 2
    hf = Path(sys.executable).parent / "hf"
    assert hf.is_file(), "huggingface_hub's `hf` command is not in the venv"
    result = subprocess.run([str(hf), "download", "--help"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    for flag in ("--repo-type", "--local-dir", "--include"):
        assert all(flag in command for command in commands) and flag in result.stdout, flag


def test_intro_names_the_text_the_training_uses_by_default(tmp_path):
    from prepare_journeydb import parse_args

    intro = README.split("\n## ", 1)[0]
    annotations = tmp_path / "anno.jsonl"
    annotations.write_text('{"prompt": "a red fox"}\n')
    assert parse_args([str(annotations), "--output_file", str(tmp_path / "out.jsonl")]).text_source == "prompt"
    assert "JourneyDB captions" not in intro
    assert "Midjourney prompt" in intro and "--text_source caption" in intro


USER_DOCS = ["README.md", *DOCS, "experiments/digits/README.md", "figures/digits_results.md", "requirements.txt",
             "requirements-dev.txt"]


@pytest.mark.parametrize("doc", USER_DOCS)
def test_user_docs_cite_no_issue_a_reader_cannot_see(doc):
    text = (REPO / doc).read_text()
    found = [line for line in text.splitlines() if re.search(r"\bissues?\b", line, flags=re.I)]
    assert not found, found


def test_readme_error_section_states_the_exit_codes_and_check_only():
    errors = section("Errors, exit codes and `--check_only`", "docs/training.md")
    for claim in ("exit status 2", "exit status 1", "`train_yoso_lora.py`", "`prepare_journeydb.py`",
                  "`inference_examples.py`", "accelerate launch", "first", "--check_only"):
        assert claim in errors, claim


def test_code_layout_names_every_module_of_the_package():
    """docs/development.md's "Code layout" table and yoso/__init__.py's list name every module of yoso/ and
    nothing that is gone."""
    table = section("Code layout", "docs/development.md")
    listed = set(re.findall(r"`yoso/([a-z_]+)(?:\.py|/)`", table))
    modules = {p.stem for p in (REPO / "yoso").glob("*.py") if p.stem != "__init__"}
    modules |= {p.name for p in (REPO / "yoso").iterdir() if (p / "__init__.py").exists()}
    assert listed == modules, (sorted(modules - listed), sorted(listed - modules))
    docstring = (REPO / "yoso" / "__init__.py").read_text()
    in_docstring = set(re.findall(r"^- ``([a-z_]+)``", docstring, flags=re.M))
    assert in_docstring == modules, (sorted(modules - in_docstring), sorted(in_docstring - modules))


def markdown_table(text, header):
    """The lines of the markdown table that starts with ``header`` in ``text``."""
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(header))
    end = start
    while end < len(lines) and lines[end].startswith("|"):
        end += 1
    return lines[start:end]


@pytest.mark.parametrize("figure, header", [("figures/digits_results.md", "| Row | Steps"),
                                            ("figures/digits_seeds.md", "| Run | Seed")])
def test_readme_digits_tables_are_the_committed_results(figure, header):
    """docs/results.md's digits tables are copies of what experiments/digits/run.py wrote, row for row."""
    written = markdown_table((REPO / figure).read_text(), header)
    assert len(written) > 4 and markdown_table(section("Proof on real data", "docs/results.md"), header) == written


def test_readme_results_table_is_rows_of_the_committed_results():
    """The README's one results table: the written table's header and a selection of its rows, each copied
    as written (the reference, the teacher, the base, YOSO-LoRA from the teacher and from real images)."""
    written = markdown_table((REPO / "figures" / "digits_results.md").read_text(), "| Row | Steps")
    shown = markdown_table(section("Results"), "| Row | Steps")
    assert shown[:2] == written[:2] and len(shown) >= 8
    assert all(row in written[2:] for row in shown[2:]), [row for row in shown[2:] if row not in written]
    names = [row.split("|")[1].strip() for row in shown[2:]]
    for name in ("real test images (reference)", "teacher (base, DPM-Solver++, 25 steps)", "YOSO-LoRA EMA, 1 step",
                 "YOSO-LoRA on real images (no teacher), EMA, 1 step"):
        assert name in names, name
    assert any(name.startswith("base,") for name in names)


def test_readme_seed_figures_are_the_committed_ones():
    """The README's sentence on training seeds quotes figures/digits_seeds.md's 1-step Frechet distances."""
    seeds = markdown_table((REPO / "figures" / "digits_seeds.md").read_text(), "| Run | Seed")
    main = [[cell.strip() for cell in row.split("|")[1:-1]] for row in seeds if row.startswith("| YOSO-LoRA |")]
    others = [cells[2] for cells in main if cells[1] not in ("0", "mean ± sd")]
    summary = next(cells[2] for cells in main if cells[1] == "mean ± sd")
    assert len(main) == 6  # seeds 0 to 4 and their summary
    quoted = f"give {', '.join(others[:-1])} and {others[-1]} ({summary} over five seeds"
    assert quoted in " ".join(section("Results").split()), quoted
