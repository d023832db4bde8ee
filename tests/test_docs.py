"""The docs as a reader meets them: README.md is short (<= 250 lines), every relative link of README.md,
docs/*.md and experiments/digits/README.md points to a file that exists (and each `#anchor` to a heading of
that page, by GitHub's slug rules), and docs/training.md's multi-node `accelerate` config and launch line
describe N nodes x 8 GPUs that accelerate and train_yoso_lora.py accept."""

import re
import shlex
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
README_MAX_LINES = 250
LINKED_DOCS = ["README.md", *sorted(str(p.relative_to(REPO)) for p in (REPO / "docs").glob("*.md")),
               "experiments/digits/README.md"]

FENCE = re.compile(r"^```.*?^```[^\n]*$", flags=re.S | re.M)
LINK = re.compile(r"!?\[((?:[^\[\]]|\[[^\]]*\])*)\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")


def github_slug(heading):
    """The anchor GitHub gives a heading: the rendered text (links reduced to their text, code marks dropped),
    lowercased, every character that is not a letter, digit, space, hyphen or underscore removed, spaces
    made hyphens."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading.strip())
    return re.sub(r"[^\w\- ]", "", text.lower()).replace(" ", "-")


def anchors(markdown):
    """The anchors of a page's headings; a repeated slug gets -1, -2, ... as on GitHub."""
    seen, found = {}, set()
    for match in re.finditer(r"^#{1,6} +(.+?) *#*$", FENCE.sub("", markdown), flags=re.M):
        slug = github_slug(match.group(1))
        count = seen.get(slug, 0)
        seen[slug] = count + 1
        found.add(slug if count == 0 else f"{slug}-{count}")
    return found


def broken_links(page, markdown):
    """Each relative link of ``markdown`` (a file at ``page``) whose file or heading does not exist, with why."""
    broken = []
    for match in LINK.finditer(FENCE.sub("", markdown)):
        target = match.group(2)
        if re.match(r"^[a-z][a-z0-9+.-]*:", target):  # https:, mailto:: not checked offline
            continue
        path, _, anchor = target.partition("#")
        file = (page.parent / path).resolve() if path else page
        if not file.exists():
            broken.append(f"{target}: no such file")
        elif anchor and file.suffix == ".md" and anchor not in anchors(file.read_text(encoding="utf-8")):
            broken.append(f"{target}: no heading with that anchor in {file.name}")
    return broken


def test_readme_is_short():
    lines = (REPO / "README.md").read_text(encoding="utf-8").splitlines()
    assert len(lines) <= README_MAX_LINES, len(lines)


def test_the_docs_pages_are_there():
    assert {"training.md", "data.md", "method.md", "inference.md", "evaluation.md", "performance.md",
            "results.md", "development.md"} <= {p.name for p in (REPO / "docs").glob("*.md")}


@pytest.mark.parametrize("doc", LINKED_DOCS)
def test_relative_links_point_to_existing_files_and_headings(doc):
    page = REPO / doc
    text = page.read_text(encoding="utf-8")
    assert LINK.search(FENCE.sub("", text)), f"{doc} links nowhere"
    assert not broken_links(page, text), broken_links(page, text)


def test_every_docs_page_is_linked_from_the_readme():
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    linked = {m.group(2).partition("#")[0] for m in LINK.finditer(FENCE.sub("", readme))}
    pages = {str(p.relative_to(REPO)) for p in (REPO / "docs").glob("*.md")}
    assert pages <= linked, sorted(pages - linked)


def test_link_checker_catches_a_missing_file_and_a_missing_heading(tmp_path):
    """Negative control: the checker is not blind."""
    (tmp_path / "other.md").write_text("# Other page\n\n## Errors, exit codes and `--check_only`\n\n## A\n\n## A\n")
    page = tmp_path / "page.md"
    text = ("[ok](other.md) [ok](other.md#errors-exit-codes-and---check_only) [ok](other.md#a-1) [ok](#title)\n"
            "[web](https://example.com/missing.md) ![img](other.md)\n"
            "[gone](missing.md) [bad](other.md#no-such-heading) [bad](#nothing) [bad](other.md#a-2)\n"
            "# Title\n```\n[in code](not-checked.md)\n```\n")
    page.write_text(text)
    assert broken_links(page, text) == ["missing.md: no such file",
                                        "other.md#no-such-heading: no heading with that anchor in other.md",
                                        "#nothing: no heading with that anchor in page.md",
                                        "other.md#a-2: no heading with that anchor in other.md"]


def test_github_slugs():
    assert github_slug("What a run leaves in `--output_dir`") == "what-a-run-leaves-in---output_dir"
    assert github_slug("SDXL-Turbo (or another latent space) as the teacher") == \
        "sdxl-turbo-or-another-latent-space-as-the-teacher"
    assert github_slug("Kohya format: AUTOMATIC1111, ComfyUI") == "kohya-format-automatic1111-comfyui"
    assert github_slug("Step order, D's update in pieces, and memory") == "step-order-ds-update-in-pieces-and-memory"


def test_readme_test_command_is_the_one_ci_runs():
    """The README's Tests block is .ci/run's pytest line (its python is setup_env.sh's .venv/bin/python)
    with the environment .ci/run exports."""
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    block = readme.split("\n## Tests\n", 1)[1].split("```bash\n", 1)[1].split("```", 1)[0].splitlines()
    ci = (REPO / ".ci" / "run").read_text()
    pytest_line = next(line for line in ci.splitlines() if " -m pytest " in line)
    assert block[1] == pytest_line.replace('"$PY"', ".venv/bin/python").replace(' "$@"', "")
    assert block[0].startswith("export ")
    exported = set(block[0].split()[1:])
    ci_env = set(re.search(r"^export (HF_HUB_OFFLINE.*)$", ci, flags=re.M).group(1).split())
    assert ci_env | {"OMP_NUM_THREADS=1"} == exported and 'OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"' in ci


# --------------------------------------------------------------------------------------------------
# docs/training.md: several GPUs and several nodes

GPUS_PER_NODE = 8
RECIPE_GLOBAL_BATCH = 256


def several_nodes_section():
    text = (REPO / "docs" / "training.md").read_text(encoding="utf-8")
    return text.split("\n## Several GPUs and several nodes\n", 1)[1].split("\n## ", 1)[0]


def launch_commands():
    """Each `accelerate launch` command of the section: (accelerate's parsed launch args, the script's args)."""
    from accelerate.commands.launch import launch_command_parser

    commands = []
    for block in re.findall(r"^```bash\n(.*?)^```", several_nodes_section(), flags=re.S | re.M):
        for line in block.replace("\\\n", " ").splitlines():
            if line.startswith("accelerate launch"):
                words = [w for w in shlex.split(line.replace("$NODE_RANK", "1"))[2:] if w != "..."]
                launch = launch_command_parser().parse_args(words)
                launch.num_machines = launch.num_machines or 1  # accelerate's default: one machine
                commands.append(launch)
    return commands


def test_multi_gpu_and_multi_node_launch_lines_keep_the_recipe_batch():
    from train_yoso_lora import parse_args

    one_node, nodes = launch_commands()
    for launch in (one_node, nodes):
        assert launch.multi_gpu and launch.training_script == "train_yoso_lora.py"
        assert launch.num_processes // launch.num_machines == GPUS_PER_NODE  # accelerate's processes per node
        assert launch.num_processes % launch.num_machines == 0
        flags = dict(re.findall(r"--(train_batch_size|gradient_accumulation_steps)=(\d+)",
                                " ".join(launch.training_script_args)))
        batch, accumulation = int(flags["train_batch_size"]), int(flags["gradient_accumulation_steps"])
        assert batch * accumulation * launch.num_processes == RECIPE_GLOBAL_BATCH  # as the text says
    assert one_node.num_machines == 1
    assert nodes.num_machines >= 2 and nodes.machine_rank == 1 and nodes.main_process_ip and nodes.main_process_port
    args = parse_args(nodes.training_script_args)  # the multi-node line is a full training command
    assert args.pretrained_model_name_or_path == "runwayml/stable-diffusion-v1-5" and args.use_ema
    assert args.max_train_steps == 5000 and args.learning_rate == 2e-5


def test_multi_node_accelerate_config_loads_and_matches_the_launch_line(tmp_path):
    from accelerate.commands.config.config_args import ClusterConfig
    from accelerate.utils import DistributedType

    block = re.search(r"^```yaml\n(.*?)^```", several_nodes_section(), flags=re.S | re.M).group(1)
    (tmp_path / "multi_node.yaml").write_text(block)
    config = ClusterConfig.from_yaml_file(str(tmp_path / "multi_node.yaml"))  # accelerate's own reader
    assert config.distributed_type == DistributedType.MULTI_GPU and not config.use_cpu
    assert config.num_machines >= 2 and config.num_processes == GPUS_PER_NODE * config.num_machines
    assert config.machine_rank == 0 and config.main_process_ip and config.main_process_port
    nodes = launch_commands()[1]
    assert (config.num_machines, config.num_processes, config.main_process_ip, config.main_process_port) == \
        (nodes.num_machines, nodes.num_processes, nodes.main_process_ip, nodes.main_process_port)
    assert str(config.mixed_precision) == nodes.mixed_precision == "fp16"


def test_method_page_states_the_defaults_that_differ_from_the_release():
    """docs/method.md names the release's learning rate and resume defaults beside ours, and ours are the code's."""
    import sys

    sys.path.insert(0, str(REPO))
    import train_yoso_lora

    defaults = train_yoso_lora.build_parser().parse_args(["--output_dir", "x"])
    text = (REPO / "docs" / "method.md").read_text()
    section = text[text.index("Defaults that differ from the released script's"):]
    section = section[: section.index("Decisions where")]
    assert defaults.learning_rate == 2e-5 and "ours is 2e-5" in section and "is 1e-4" in section
    assert defaults.resume_from_checkpoint is None and "defaults to `latest`" in section
    assert "D_final_loss = errD_real" in section
