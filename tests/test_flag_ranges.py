"""Every numeric flag of every script has its valid range in one table (yoso.training.cli.NUMERIC_FLAG_RANGES), checked
by the parser: a value outside it is one line naming the flag, the value and the range, exit status 2, before
anything is read, loaded or created (issue 20)."""

import argparse
import math

import pytest

import convert_lora_to_kohya
import evaluate_yoso
import inference_examples
import precompute_teacher_latents
import prepare_journeydb
import train_yoso_lora
from yoso.training.cli import NUMERIC_FLAG_RANGES, Range

# Each script's parser and the arguments it requires.
SCRIPTS = {
    "train_yoso_lora.py": (train_yoso_lora.build_parser, []),
    "precompute_teacher_latents.py": (precompute_teacher_latents.build_parser, ["--output_dir", "cache"]),
    "prepare_journeydb.py": (prepare_journeydb.build_parser, ["annotations.jsonl"]),
    "evaluate_yoso.py": (evaluate_yoso.build_parser, ["--lora", "l", "--prompts", "p.txt", "--reference_dir", "r"]),
    "inference_examples.py": (inference_examples.build_parser, []),
    "convert_lora_to_kohya.py": (convert_lora_to_kohya.build_parser, ["lora_dir"]),
}


def is_numeric(action):
    default_is_number = isinstance(action.default, (int, float)) and not isinstance(action.default, bool)
    return action.type in (int, float) or (default_is_number and not isinstance(action, argparse._StoreConstAction))


def numeric_flags():
    """(script, flag, dest, its type) for every numeric flag of every script."""
    found = []
    for script, (build, _) in SCRIPTS.items():
        for action in build()._actions:
            if is_numeric(action) and action.help != argparse.SUPPRESS:  # a hidden former name: its new one is here
                kind = float if action.type is float or isinstance(action.default, float) else int
                found.append((script, action.option_strings[-1], action.dest, kind))
    return found


NUMERIC_FLAGS = numeric_flags()


def test_every_numeric_flag_of_every_script_is_in_the_table():
    assert len(NUMERIC_FLAGS) >= 60  # train alone has 40
    missing = sorted({f"{script} {flag}" for script, flag, dest, _ in NUMERIC_FLAGS if dest not in NUMERIC_FLAG_RANGES})
    assert not missing, f"numeric flags with no range in yoso.training.cli.NUMERIC_FLAG_RANGES: {missing}"
    unused = set(NUMERIC_FLAG_RANGES) - {dest for _, _, dest, _ in NUMERIC_FLAGS}
    assert not unused, f"ranges of flags no script has: {unused}"


def boundary_cases(valid, kind):
    """(value text, in range?) at each finite end of ``valid``, plus non-finite floats."""
    cases = []
    step = (lambda x, d: x + d) if kind is int else (lambda x, d: math.nextafter(x, d * math.inf))
    for end, is_open, inward in ((valid.low, valid.low_open, 1), (valid.high, valid.high_open, -1)):
        if not math.isfinite(end):
            continue
        end = kind(end)
        cases.append((end, not is_open))
        cases.append((step(end, inward), True))
        cases.append((step(end, -inward), False))
    if not cases:  # no finite end: any finite value
        cases += [(kind(-3.5) if kind is float else -3, True), (kind(1e6), True)]
    if kind is float:
        cases += [(math.nan, False), (math.inf, False), (-math.inf, False)]
    return [(repr(value), ok) for value, ok in cases]


CASES = [pytest.param(script, flag, dest, kind, text, ok, id=f"{script}-{flag}={text}-{'ok' if ok else 'bad'}")
         for script, flag, dest, kind in NUMERIC_FLAGS if dest in NUMERIC_FLAG_RANGES
         for text, ok in boundary_cases(NUMERIC_FLAG_RANGES[dest], kind)]


@pytest.mark.parametrize("script,flag,dest,kind,text,ok", CASES)
def test_each_numeric_flag_at_its_boundaries(script, flag, dest, kind, text, ok, capsys):
    build, required = SCRIPTS[script]
    parser = build()
    argv = [*required, f"{flag}={text}"]  # the = form: argparse takes "-5e-324" alone for an option
    if ok:
        args = parser.parse_args(argv)
        value = getattr(args, dest)
        value = value[0] if isinstance(value, list) else value
        assert value == kind(text) and type(value) is kind
        return
    with pytest.raises(SystemExit) as exit_info:
        parser.parse_args(argv)
    assert exit_info.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1, lines
    assert lines[0].startswith(f"{script}: error: ") and flag in lines[0], lines[0]
    valid = NUMERIC_FLAG_RANGES[dest]
    if dest != "discriminator_chunks":  # its own type refuses 0 first, naming the flag and the value
        assert f"{flag} {kind(text)}: out of range, use a value {valid}" in lines[0], lines[0]


def test_defaults_are_in_range():
    for script, (build, required) in SCRIPTS.items():
        parser = build()
        args = parser.parse_args(required)  # would exit 2 on a default out of range
        for action in parser._actions:
            valid = NUMERIC_FLAG_RANGES.get(action.dest)
            if valid is not None and getattr(args, action.dest) is not None:
                assert getattr(args, action.dest) in valid, (script, action.dest)


def test_range_texts():
    assert str(Range(1)) == ">= 1"
    assert str(Range(0, low_open=True)) == "> 0"
    assert str(Range(0, 1, high_open=True)) == "in [0, 1)"
    assert str(Range(0, 2**32 - 1)) == "in [0, 4294967295]"
    assert str(Range()) == "any finite number"
    assert 0.5 in Range(0, 1) and 1.0 not in Range(0, 1, high_open=True) and math.nan not in Range()


# The values the issue found passing --check_only: each stops at the parser, the output folder never made.
ISSUE_VALUES = [("--lora_rank", "0"), ("--learning_rate", "-1"), ("--checkpointing_steps", "0"),
                ("--max_train_steps", "0"), ("--ema_decay", "1.5"), ("--lora_alpha", "0"),
                ("--discriminator_learning_rate", "-1"), ("--adam_beta2", "2"), ("--coop_gap", "-5"),
                ("--checkpoints_total_limit", "0")]


@pytest.mark.parametrize("flag,value", ISSUE_VALUES)
@pytest.mark.parametrize("check_only", [False, True])
def test_issue_values_stop_before_anything_is_created(tmp_path, capsys, flag, value, check_only):
    output_dir = tmp_path / "out"
    argv = ["--output_dir", str(output_dir), "--max_train_steps", "2", flag, value] + (["--check_only"] * check_only)
    with pytest.raises(SystemExit) as exit_info:
        train_yoso_lora.main(argv)
    assert exit_info.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and f"{flag} {float(value) if '.' in value else value}" in lines[0], lines
    assert "out of range, use a value" in lines[0]
    assert not output_dir.exists() and list(tmp_path.iterdir()) == []


# ---- one flag vocabulary (issue 21 item 3) -------------------------------------------------------------------

# Flags that two scripts share with another default, and why; anything else shared must agree in type and default.
DIFFERENT_DEFAULTS = {
    "--pretrained_model_name_or_path": "inference_examples.py defaults to the release's base (Realistic Vision, the "
                                       "authors' demo); prepare_journeydb.py takes it only for the tokenizer (default: "
                                       "SD1.5's rebuilt offline)",
    "--output_dir": "each script's own output (a run, a cache that must be named, an evaluation, samples)",
    "--seed": "inference_examples.py uses the release's demo seed, 318",
    "--num_train_epochs": "precompute_teacher_latents.py: epochs of latents to cache (1); train_yoso_lora.py: none "
                          "unless given (--max_train_steps is the other way to say how long)",
    "--lora": "evaluate_yoso.py requires one or more LoRAs; inference_examples.py defaults to the released one",
}


# Flags that take one value in one script and several in another (evaluation compares several).
SEVERAL_VALUES = {
    "--lora": "evaluate_yoso.py compares several LoRAs",
    "--latent_stats": "evaluate_yoso.py: one statistics file per --lora",
    "--steps": "evaluate_yoso.py evaluates several step counts",
}


def shared_flags():
    seen = {}
    for script, (build, _) in SCRIPTS.items():
        for action in build()._actions:
            if action.help == argparse.SUPPRESS:
                continue
            for option in action.option_strings:
                if option.startswith("--") and option != "--help":
                    seen.setdefault(option, []).append((script, action))
    return {flag: uses for flag, uses in seen.items() if len(uses) > 1}


def test_a_flag_shared_by_two_scripts_has_one_type_and_default():
    shared = shared_flags()
    assert {"--pretrained_model_name_or_path", "--seed", "--resolution", "--train_batch_size"} <= set(shared)
    for flag, uses in shared.items():
        kinds = {(type(action).__name__, getattr(action.type, "__name__", None),
                  None if flag in SEVERAL_VALUES else action.nargs) for _, action in uses}
        assert len(kinds) == 1, (flag, kinds)
        defaults = {repr(action.default) for _, action in uses}
        assert len(defaults) == 1 or flag in DIFFERENT_DEFAULTS, (flag, [(s, a.default) for s, a in uses])
    assert set(DIFFERENT_DEFAULTS) | set(SEVERAL_VALUES) <= set(shared)  # no stale reasons


def test_former_flag_names_still_work_hidden():
    args = inference_examples.build_parser().parse_args(["--base_model", "some/base"])
    assert args.pretrained_model_name_or_path == "some/base"
    args = evaluate_yoso.build_parser().parse_args(SCRIPTS["evaluate_yoso.py"][1] + ["--base_model", "b/c"])
    assert args.pretrained_model_name_or_path == "b/c"
    args = precompute_teacher_latents.build_parser().parse_args(["--output_dir", "c", "--num_epochs", "3"])
    assert args.num_train_epochs == 3
    for build, _ in SCRIPTS.values():
        assert "--base_model" not in build().format_help() and "--num_epochs" not in build().format_help()
