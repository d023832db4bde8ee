"""prepare_journeydb.py: every input kind, every cleaning rule, dedupe, text sources, summary counts,
atomic output and bad input, checked with exact numbers and files that load."""

import gzip
import io
import json
import os
import random
import re
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

import prepare_journeydb
from yoso.data import journeydb
from yoso.data.journeydb import (
    MAX_LISTED_PROBLEMS,
    ClipTokenCounter,
    InputError,
    clean_prompt,
    filters,
    prepare,
    readers,
)

REPO = Path(__file__).resolve().parents[1]

# Raw Midjourney prompts as JourneyDB has them, and what a CLIP text encoder should get.
MIDJOURNEY_PROMPTS = [
    ("a beautiful woman with long flowing hair, cinematic lighting --ar 16:9 --v 5.2 --q 2 --s 750",
     "a beautiful woman with long flowing hair, cinematic lighting"),
    ("portrait of a cyberpunk samurai, neon rain --stylize 1000 --chaos 20 --seed 123456789",
     "portrait of a cyberpunk samurai, neon rain"),
    ("cute shiba inu in a bamboo forest --niji 5 --style raw", "cute shiba inu in a bamboo forest"),
    ("cute shiba inu in a bamboo forest --niji --style cute --ar 3:4", "cute shiba inu in a bamboo forest"),
    ("old fisherman, wrinkled skin, 85mm lens --no text, watermark, blurry hands --ar 2:3",
     "old fisherman, wrinkled skin, 85mm lens"),
    ("old fisherman, 85mm lens --no text, watermark", "old fisherman, 85mm lens"),
    ("a koi pond in autumn --sref https://s.mj.run/Zx9Ab 1234567::2 --sw 200 --v 6",
     "a koi pond in autumn"),
    ("a koi pond in autumn --cref https://cdn.discordapp.com/attachments/1/2/ref.png --cw 50",
     "a koi pond in autumn"),
    ("seamless pattern of lemons --tile --iw 0.5 --q .5", "seamless pattern of lemons"),
    ("isometric tiny house --testp --upbeta --hd", "isometric tiny house"),
    ("a snowy village at dusk --foo 3 --bar --baz 1.25", "a snowy village at dusk"),
    ("a red panda eating bamboo --v5 --ar16:9", "a red panda eating bamboo"),
    ("a red panda eating bamboo --AR 16:9 --V 5", "a red panda eating bamboo"),
    ("a lighthouse in a storm --ar 16:9 --p m7123abc --personalize --weird 250",
     "a lighthouse in a storm"),
    # Phone keyboards turn "--" into an em dash (or an en dash).
    ("cyberpunk city at night —ar 9:16 —v 5", "cyberpunk city at night"),
    ("cyberpunk city at night –ar 9:16 –q 2 —no people, cars", "cyberpunk city at night"),
    ("cyberpunk city at night —-ar 9:16", "cyberpunk city at night"),
    # URLs: image prompts, Discord links, bare ones.
    ("https://s.mj.run/AbC123xyz a red fox in the snow --iw 2", "a red fox in the snow"),
    ("<https://s.mj.run/AbC123> <https://cdn.discordapp.com/attachments/10/20/img.png> a red fox",
     "a red fox"),
    ("https://i.imgur.com/abc.jpg, a red fox, www.example.com/pic.png, watercolor", "a red fox, watercolor"),
    ("s.mj.run/QwErTy a red fox", "a red fox"),
    # Multi-prompt weights.
    ("castle::2 fog::-0.5 dragons:: --niji 5", "castle fog dragons"),
    ("hot dog::1.5 bun::.5", "hot dog bun"),
    ("space:: ship", "space ship"),
    # Stray separators and whitespace.
    ("a koi pond , , watercolor , ", "a koi pond, watercolor"),
    (", ; a koi pond,, watercolor;; --ar 1:1 ,", "a koi pond, watercolor"),
    ("a   cat\n\n on a\tmat\r\n", "a cat on a mat"),
    ("a\u3000cat\u00a0on a mat", "a cat on a mat"),
    ("/imagine prompt: a koi pond, watercolor", "a koi pond, watercolor"),
    ("A koi pond, watercolor --ar 16:9 -", "A koi pond, watercolor"),
    # Words kept: hyphens, times, ratios in prose, prose dashes, unicode.
    ("mid--century modern living room, ukiyo-e, x-ray, 12:30 pm, 3:2 ratio poster",
     "mid--century modern living room, ukiyo-e, x-ray, 12:30 pm, 3:2 ratio poster"),
    ("Kyoto—no tourists, a quiet street — at dawn, a cat —black and white",
     "Kyoto—no tourists, a quiet street — at dawn, a cat —black and white"),
    ("东京的街道, 霓虹灯, 雨夜 --ar 16:9 --niji", "东京的街道, 霓虹灯, 雨夜"),
    ("café naïve Straße 🌸 ночной город", "café naïve Straße 🌸 ночной город"),
    ("A Cat In A Hat", "A Cat In A Hat"),
    # Nothing but parameters and links: empty.
    ("--ar 16:9 --v 5", ""),
    ("https://s.mj.run/abc --iw 1.5", ""),
    ("   ", ""),
]


@pytest.mark.parametrize("raw,expected", MIDJOURNEY_PROMPTS, ids=[raw[:40] for raw, _ in MIDJOURNEY_PROMPTS])
def test_clean_prompt(raw, expected):
    assert clean_prompt(raw) == expected


def test_clean_prompt_drops_lone_surrogates_so_the_prompt_can_be_written():
    raw = json.loads('"a fox \\ud83d in snow"')  # half an emoji, as broken exports have it
    cleaned = clean_prompt(raw)
    assert cleaned == "a fox in snow"
    assert cleaned.encode("utf-8").decode("utf-8") == cleaned


def test_clean_prompt_is_idempotent():
    for raw, expected in MIDJOURNEY_PROMPTS:
        assert clean_prompt(expected) == expected, raw


# --------------------------------------------------------------------------------------------------
# helpers


def record(prompt, caption=None, index=0):
    """A JourneyDB-shaped annotation record."""
    rec = {
        "img_path": f"./{index % 100:03d}/{index:032x}.jpg",
        "Task1": {"Style": ["digital art", "fantasy"], "Content": ["woman", "forest"]},
        "Task3": {
            "Style": [{"Question": "What is the style?", "Options": {"A": "photo", "B": "painting"}, "Answer": "B"}],
            "Content": [{"Question": "What is shown?", "Options": {"A": "a fox", "B": "a car"}, "Answer": "A"}],
        },
        "prompt": prompt,
    }
    if caption is not None:
        rec["Task2"] = {"Caption": caption}
    return rec


def write_jsonl(path, records):
    with open(path, "w", encoding="utf-8") as out:
        for rec in records:
            out.write((rec if isinstance(rec, str) else json.dumps(rec, ensure_ascii=False)) + "\n")
    return path


def read_prompts(path):
    lines = Path(path).read_text(encoding="utf-8").splitlines()
    if str(path).endswith(".jsonl"):
        rows = [json.loads(line) for line in lines]
        assert all(list(row) == ["prompt"] for row in rows)
        return [row["prompt"] for row in rows]
    return lines


def add_member(archive, name, data):
    info = tarfile.TarInfo(name)
    info.size = len(data)
    archive.addfile(info, io.BytesIO(data))


def run_cli(argv, capsys):
    """``prepare_journeydb.main`` in this process: (exit code, stdout, stderr)."""
    try:
        prepare_journeydb.main([str(arg) for arg in argv])
        code = 0
    except SystemExit as exit_:
        code = exit_.code
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def run_script(argv, cwd):
    """The script as users run it: (exit code, stdout, stderr)."""
    result = subprocess.run(
        [sys.executable, str(REPO / "prepare_journeydb.py"), *map(str, argv)],
        cwd=cwd, capture_output=True, text=True, timeout=120, check=False,
    )
    return result.returncode, result.stdout, result.stderr


def assert_one_line_error(code, err, *needles):
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("prepare_journeydb.py: error: ")
    assert "Traceback" not in err
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])


def only(folder):
    return sorted(path.name for path in Path(folder).iterdir())


@pytest.fixture(scope="module")
def clip_tokenizer():
    from yoso.testing import make_clip_tokenizer

    return make_clip_tokenizer()


# --------------------------------------------------------------------------------------------------
# input kinds

PROMPTS_A = [
    "a red fox in the snow --ar 16:9 --v 5.2",
    "an old lighthouse on a cliff, oil painting --q 2",
    "a bowl of ramen, studio photo --niji 5",
]
PROMPTS_B = ["a tiny robot watering plants --ar 2:3", "a field of sunflowers at dawn"]
CLEAN_A = ["a red fox in the snow", "an old lighthouse on a cliff, oil painting", "a bowl of ramen, studio photo"]
CLEAN_B = ["a tiny robot watering plants", "a field of sunflowers at dawn"]


def test_jsonl_input(tmp_path):
    source = write_jsonl(tmp_path / "train_anno.jsonl", [record(p, index=i) for i, p in enumerate(PROMPTS_A)])
    summary = prepare([source], tmp_path / "out.jsonl", progress=False)
    assert read_prompts(tmp_path / "out.jsonl") == CLEAN_A
    assert summary["records_read"] == 3 and summary["written"] == {"train": 3, "validation": 0}
    assert summary["inputs"] == [{"path": str(source), "kind": "jsonl", "records": 3, "malformed": 0}]


def test_jsonl_gz_input(tmp_path):
    source = tmp_path / "train_anno.jsonl.gz"
    with gzip.open(source, "wt", encoding="utf-8") as out:
        for i, prompt in enumerate(PROMPTS_A):
            out.write(json.dumps(record(prompt, index=i)) + "\n")
    summary = prepare([source], tmp_path / "out.jsonl", progress=False)
    assert read_prompts(tmp_path / "out.jsonl") == CLEAN_A
    assert summary["inputs"][0]["kind"] == "jsonl.gz" and summary["records_read"] == 3


@pytest.mark.parametrize("name,mode", [("train_anno.jsonl.tgz", "w:gz"), ("anno.tar.gz", "w:gz"), ("anno.tar", "w")])
def test_archive_input_streams_jsonl_members(tmp_path, name, mode):
    source = tmp_path / "in" / name
    source.parent.mkdir()
    lines_a = "".join(json.dumps(record(p, index=i)) + "\n" for i, p in enumerate(PROMPTS_A)).encode()
    lines_b = "".join(json.dumps(record(p, index=i)) + "\n" for i, p in enumerate(PROMPTS_B)).encode()
    with tarfile.open(source, mode) as archive:
        folder = tarfile.TarInfo("data/train")
        folder.type = tarfile.DIRTYPE
        archive.addfile(folder)
        add_member(archive, "data/train/README.md", b"# JourneyDB\n")
        add_member(archive, "data/train/train_anno_part1.jsonl", lines_a)
        add_member(archive, "data/train/._train_anno_part2.jsonl", b"\x00\x05\x16\x07 macOS metadata")
        add_member(archive, "data/train/img/000.jpg", b"\xff\xd8\xff\xe0 not an image")
        add_member(archive, "data/train/train_anno_part2.jsonl", lines_b)

    summary = prepare([source], tmp_path / "out.jsonl", progress=False)

    assert read_prompts(tmp_path / "out.jsonl") == CLEAN_A + CLEAN_B
    entry = summary["inputs"][0]
    assert entry["kind"] == "tar" and entry["records"] == 5 and entry["malformed"] == 0
    assert entry["jsonl_members"] == ["data/train/train_anno_part1.jsonl", "data/train/train_anno_part2.jsonl"]
    assert entry["skipped_members"] == [
        "data/train/README.md", "data/train/._train_anno_part2.jsonl", "data/train/img/000.jpg",
    ]
    # Streamed: nothing was unpacked next to the archive or in the working folder.
    assert only(source.parent) == [name]
    assert only(tmp_path) == ["in", "out.jsonl", "out.summary.json"]


def test_json_list_input_of_records_and_strings(tmp_path):
    source = tmp_path / "anno.json"
    source.write_text(json.dumps([record(PROMPTS_A[0]), PROMPTS_A[1], {"prompt": PROMPTS_A[2]}, 7]))
    summary = prepare([source], tmp_path / "out.jsonl", progress=False)
    assert read_prompts(tmp_path / "out.jsonl") == CLEAN_A
    assert summary["records_read"] == 3
    assert summary["malformed"] == {
        "count": 1, "first": [{"file": str(source), "item": 4, "error": "a JSON int, not a record"}],
    }


def test_json_input_that_is_not_a_list_is_reported(tmp_path):
    good = write_jsonl(tmp_path / "good.jsonl", [record(p) for p in PROMPTS_A])
    bad = tmp_path / "one.json"
    bad.write_text(json.dumps(record("a fox")))
    broken = tmp_path / "broken.json"
    broken.write_text('[{"prompt": "a fox"},\n {"prompt": ')
    summary = prepare([good, bad, broken], tmp_path / "out.jsonl", progress=False)
    assert summary["malformed"]["count"] == 2
    assert summary["malformed"]["first"][0] == {
        "file": str(bad), "line": 1, "error": "a JSON dict, expected a list of records",
    }
    assert summary["malformed"]["first"][1]["file"] == str(broken)
    assert summary["malformed"]["first"][1]["line"] == 2
    assert summary["written"]["train"] == 3


def test_txt_input_is_one_prompt_a_line(tmp_path):
    source = tmp_path / "prompts.txt"
    source.write_bytes(("\ufeff" + "\n".join(PROMPTS_A) + "\n\n   \n" + PROMPTS_B[0] + "\r\n").encode())
    summary = prepare([source], tmp_path / "out.jsonl", progress=False)
    assert read_prompts(tmp_path / "out.jsonl") == CLEAN_A + CLEAN_B[:1]
    assert summary["records_read"] == 4 and summary["malformed"]["count"] == 0


def test_several_inputs_of_different_kinds_in_order(tmp_path):
    first = write_jsonl(tmp_path / "a.jsonl", [record(p) for p in PROMPTS_A])
    second = tmp_path / "b.txt"
    second.write_text("\n".join(PROMPTS_B + PROMPTS_A[:1]) + "\n")  # the last one repeats a.jsonl's first
    summary = prepare([first, second], tmp_path / "out.jsonl", progress=False)
    assert read_prompts(tmp_path / "out.jsonl") == CLEAN_A + CLEAN_B
    assert [entry["records"] for entry in summary["inputs"]] == [3, 3]
    assert summary["dropped"]["duplicate"] == 1


def test_demo_records_from_yoso_testing(tmp_path):
    from yoso.testing import sample_journeydb_records

    records = sample_journeydb_records(64)
    source = write_jsonl(tmp_path / "demo.jsonl", records)
    summary = prepare([source], tmp_path / "out.jsonl", progress=False)
    prompts = read_prompts(tmp_path / "out.jsonl")
    expected = list(dict.fromkeys(clean_prompt(rec["prompt"]).casefold() for rec in records))
    assert [p.casefold() for p in prompts] == expected
    assert summary["written"]["train"] == len(expected)
    assert not any("--" in p or "http" in p or "::" in p for p in prompts)


# --------------------------------------------------------------------------------------------------
# dedupe, filters, text sources


def test_dedupe_folds_case_and_whitespace_and_keeps_the_first_form(tmp_path):
    prompts = [
        "A Red Fox in the snow --ar 16:9",
        "a red fox in the snow --v 5",  # same after cleaning, other case
        "a  red fox\tin the   SNOW",  # same after whitespace folding
        "A Red Fox in the snow --ar 16:9",  # exact raw repeat (skips cleaning)
        "a red fox in the snow, watercolor",  # different
        "Straße at night",
        "STRASSE AT NIGHT",  # casefold folds ß
    ]
    source = write_jsonl(tmp_path / "a.jsonl", [record(p) for p in prompts])
    summary = prepare([source], tmp_path / "out.jsonl", progress=False)
    assert read_prompts(tmp_path / "out.jsonl") == [
        "A Red Fox in the snow", "a red fox in the snow, watercolor", "Straße at night",
    ]
    assert summary["dropped"]["duplicate"] == 4
    assert summary["texts_considered"] == 7


def test_exact_raw_repeats_of_kept_prompts_are_not_cleaned_again(tmp_path, monkeypatch):
    cleaned = []
    real_clean = filters.clean_prompt
    monkeypatch.setattr(filters, "clean_prompt", lambda text: cleaned.append(text) or real_clean(text))
    prompts = [PROMPTS_A[0], PROMPTS_A[1], PROMPTS_A[0], PROMPTS_A[0], "fox", "fox", PROMPTS_A[1]]
    source = write_jsonl(tmp_path / "a.jsonl", [record(p) for p in prompts])
    summary = prepare([source], tmp_path / "out.jsonl", min_words=2, progress=False)
    # Repeats of kept prompts skip cleaning; a repeat of a dropped one is cleaned (and dropped) again.
    assert cleaned == [PROMPTS_A[0], PROMPTS_A[1], "fox", "fox"]
    assert summary["dropped"]["duplicate"] == 3 and summary["dropped"]["too_few_words"] == 2


def test_word_limits_and_empty_prompts_are_counted_by_reason(tmp_path):
    prompts = [
        "fox --ar 1:1",  # 1 word
        "fox --ar 1:1",  # the same again: still too few words, not a duplicate
        "red fox",  # 2 words
        "a red fox in snow",  # 5 words
        "a red fox in the deep snow at dawn",  # 9 words
        "--ar 16:9 --v 5",  # empty
        "https://s.mj.run/x",  # empty
    ]
    source = write_jsonl(tmp_path / "a.jsonl", [record(p) for p in prompts])
    summary = prepare([source], tmp_path / "out.jsonl", min_words=2, max_words=5, progress=False)
    assert read_prompts(tmp_path / "out.jsonl") == ["red fox", "a red fox in snow"]
    assert summary["dropped"] == {
        "missing_text": 0, "empty": 2, "too_few_words": 2, "too_many_words": 1, "duplicate": 0,
        "over_max_samples": 0,
    }


def _source_records():
    return [
        record("a red fox --ar 16:9", caption="A red fox stands in the snow."),
        record("an old lighthouse --v 5", caption=None),  # no Task2: the caption is missing
        {**record("a bowl of ramen"), "Task2": {"Caption": ""}},  # an empty caption counts as missing
        {**record("same text"), "Task2": {"Caption": "Same  TEXT"}},  # caption equals the prompt
        {"img_path": "./x.jpg", "Task2": {"Caption": "A caption without a prompt."}},
        {"img_path": "./y.jpg", "Task1": {}},  # neither
    ]


@pytest.mark.parametrize(
    "text_source,expected,missing_text,duplicates,caption_missing",
    [
        ("prompt", ["a red fox", "an old lighthouse", "a bowl of ramen", "same text"], 2, 0, 0),
        ("caption", ["A red fox stands in the snow.", "an old lighthouse", "a bowl of ramen", "Same TEXT",
                     "A caption without a prompt."], 1, 0, 3),
        ("both", ["a red fox", "A red fox stands in the snow.", "an old lighthouse", "a bowl of ramen",
                  "same text", "A caption without a prompt."], 1, 1, 3),
    ],
)
def test_text_sources(tmp_path, text_source, expected, missing_text, duplicates, caption_missing):
    source = write_jsonl(tmp_path / "a.jsonl", _source_records())
    summary = prepare([source], tmp_path / "out.jsonl", text_source=text_source, progress=False)
    assert read_prompts(tmp_path / "out.jsonl") == expected
    assert summary["dropped"]["missing_text"] == missing_text
    assert summary["dropped"]["duplicate"] == duplicates
    assert summary["caption_missing"] == caption_missing
    assert summary["texts_considered"] == len(expected) + missing_text + duplicates


def test_text_source_cli_choice_is_checked(tmp_path, capsys):
    source = write_jsonl(tmp_path / "a.jsonl", [record("a fox")])
    code, _, err = run_cli([source, "--text_source", "captions", "--output_file", tmp_path / "o.jsonl"], capsys)
    assert_one_line_error(code, err, "--text_source", "captions", "prompt", "caption", "both")


# --------------------------------------------------------------------------------------------------
# summary counts and bad lines


def test_summary_counts_every_kind_of_bad_record(tmp_path, capsys):
    source = tmp_path / "train_anno.jsonl"
    good = [record(f"prompt number {i} of a red fox --ar 16:9") for i in range(6)]
    not_utf8 = json.dumps(good[2]).encode().replace(b"red", b"r\xffd")
    lines = [
        json.dumps(good[0]),
        json.dumps(good[1]),
        '{"img_path": "./1.jpg", "prompt": "cut short',  # line 3: truncated
        "",  # blank lines are skipped, not counted
        not_utf8,  # line 5: not UTF-8
        "[1, 2, 3]",  # line 6: not a record
        json.dumps({"img_path": "./2.jpg", "Task1": {}}),  # line 7: no prompt field
        json.dumps(record(42)),  # line 8: prompt is not text
        json.dumps(record("--ar 16:9 --v 5")),  # line 9: empty after cleaning
        json.dumps(good[0]),  # line 10: duplicate
        json.dumps(good[3]) + " trailing",  # line 11: extra data
        json.dumps(good[4]),
        "   " + json.dumps(good[5]),  # leading spaces are fine
    ]
    with open(source, "wb") as out:
        for line in lines:
            out.write((line if isinstance(line, bytes) else line.encode()) + b"\n")
    code, out, err = run_cli([source, "--output_file", tmp_path / "out.jsonl", "--skip_truncation_count",
                              "--no_progress"], capsys)
    assert code == 0, err
    summary = json.loads(out)
    assert summary == json.loads((tmp_path / "out.summary.json").read_text())
    assert summary["records_read"] == 8
    assert summary["malformed"]["count"] == 4
    assert [(m["line"], m["error"].split(" (")[0]) for m in summary["malformed"]["first"]] == [
        (3, "not JSON"), (5, "not UTF-8"), (6, "a JSON list, not a record"), (11, "not JSON"),
    ]
    column = not_utf8.index(b"\xff") + 1
    assert summary["malformed"]["first"][1]["error"] == f"not UTF-8 (byte 0xff at column {column})"
    assert all(m["file"] == str(source) for m in summary["malformed"]["first"])
    assert summary["dropped"] == {
        "missing_text": 2, "empty": 1, "too_few_words": 0, "too_many_words": 0, "duplicate": 1,
        "over_max_samples": 0,
    }
    assert summary["written"] == {"train": 4, "validation": 0}
    assert summary["texts_considered"] == summary["records_read"]
    # Lines 5 and 11 held prompts 2 and 3.
    assert read_prompts(tmp_path / "out.jsonl") == [f"prompt number {i} of a red fox" for i in (0, 1, 4, 5)]
    assert "skipped 4 malformed lines" in err and "line 3" in err


def test_orjson_and_the_standard_library_give_the_same_results(tmp_path, monkeypatch):
    import orjson

    lines = [
        json.dumps(record("a red fox --ar 16:9")),
        '{"prompt": "a koi pond", "score": NaN}',  # json reads NaN, orjson does not
        '{"prompt": "a fox \\ud83d in snow"}',  # a lone surrogate escape: json reads it, orjson does not
        "\ufeff" + json.dumps(record("a bowl of ramen")),  # a byte-order mark
        '{"prompt": "a big number", "id": 123456789012345678901234567890}',  # orjson: a float, json: an int
        '{"prompt": "dup", "prompt": "the last key wins"}',
        "[" * 100_000 + "]" * 100_000,  # nested too deeply for either
        '{"prompt": "cut',
        json.dumps(record("東京の夜 --niji 5"), ensure_ascii=False),
    ]
    refused_by_orjson = 0
    for line in lines[1:4]:
        with pytest.raises(orjson.JSONDecodeError):
            orjson.loads(line.encode())
        refused_by_orjson += 1
    source = write_jsonl(tmp_path / "a.jsonl", lines)
    assert readers._fast_loads_line is orjson.loads
    with_orjson = prepare([source], tmp_path / "orjson.jsonl", progress=False)
    monkeypatch.setattr(readers, "_fast_loads_line", readers._stdlib_loads_line)
    with_json = prepare([source], tmp_path / "json.jsonl", progress=False)

    assert read_prompts(tmp_path / "orjson.jsonl") == read_prompts(tmp_path / "json.jsonl") == [
        "a red fox", "a koi pond", "a fox in snow", "a bowl of ramen", "a big number", "the last key wins", "東京の夜",
    ]
    for summary in (with_orjson, with_json):
        summary.pop("seconds"), summary.pop("output_file"), summary.pop("summary_file")
    assert with_orjson == with_json
    assert with_json["records_read"] == 7 and refused_by_orjson == 3
    assert [(m["line"], m["error"]) for m in with_json["malformed"]["first"]] == [
        (7, "not JSON (nested too deeply)"), (8, "not JSON (Unterminated string starting at column 12)"),
    ]


def test_summary_lists_the_first_malformed_lines_and_counts_all(tmp_path):
    lines = []
    for i in range(30):
        lines.append(json.dumps(record(f"a fox number {i}")))
        if i % 2 == 0:
            lines.append("{not json")
    source = write_jsonl(tmp_path / "a.jsonl", lines)
    summary = prepare([source], tmp_path / "out.jsonl", progress=False)
    assert summary["malformed"]["count"] == 15
    assert [m["line"] for m in summary["malformed"]["first"]] == [2 + 3 * k for k in range(MAX_LISTED_PROBLEMS)]
    assert summary["written"]["train"] == 30


def test_strict_stops_at_the_first_malformed_line(tmp_path, capsys):
    source = write_jsonl(tmp_path / "a.jsonl", [record("a fox"), record("a cat"), "{oops", "{again"])
    out = tmp_path / "out.jsonl"
    code, _, err = run_cli([source, "--output_file", out, "--strict", "--skip_truncation_count", "--no_progress"],
                           capsys)
    assert_one_line_error(code, err, f"{source} line 3", "not JSON", "--strict")
    assert only(tmp_path) == ["a.jsonl"]


def test_strict_names_the_archive_member_and_line(tmp_path):
    source = tmp_path / "anno.tgz"
    with tarfile.open(source, "w:gz") as archive:
        add_member(archive, "train/anno.jsonl", (json.dumps(record("a fox")) + "\n" + '{"prompt": 1,,}\n').encode())
    with pytest.raises(InputError, match="^" + re.escape(f"{source}:train/anno.jsonl line 2: not JSON")):
        prepare([source], tmp_path / "out.jsonl", strict=True, progress=False)
    assert only(tmp_path) == ["anno.tgz"]


def test_archive_without_jsonl_member_is_reported(tmp_path, capsys):
    good = write_jsonl(tmp_path / "good.jsonl", [record(p) for p in PROMPTS_A])
    images = tmp_path / "imgs.tgz"
    with tarfile.open(images, "w:gz") as archive:
        add_member(archive, "000/a.jpg", b"\xff\xd8")
        add_member(archive, "000/b.jpg", b"\xff\xd8")
    out = tmp_path / "out.jsonl"
    code, stdout, err = run_cli([good, images, "--output_file", out, "--skip_truncation_count"], capsys)
    assert code == 0, err
    summary = json.loads(stdout)
    assert summary["problems"] == [f"{images}: the archive has no .jsonl member (it holds 2 other files)"]
    assert summary["inputs"][1]["skipped_members"] == ["000/a.jpg", "000/b.jpg"]
    assert f"warning: {images}: the archive has no .jsonl member" in err
    assert read_prompts(out) == CLEAN_A

    out.unlink()
    code, _, err = run_cli([good, images, "--output_file", out, "--skip_truncation_count", "--strict",
                            "--no_progress"], capsys)
    assert_one_line_error(code, err, str(images), "no .jsonl member", "train_anno_realease_repath.jsonl.tgz")
    assert not out.exists()

    code, _, err = run_cli([images, "--output_file", out, "--skip_truncation_count", "--no_progress"], capsys)
    assert_one_line_error(code, err, "no training prompts left", "0 records read", "nothing was written")
    assert not out.exists()


def test_truncated_archive_keeps_what_was_read_and_reports_it(tmp_path):
    lines = "".join(json.dumps(record(f"a red fox number {i}")) + "\n" for i in range(5000))  # ~2.3 MB
    full = tmp_path / "full.tgz"
    with tarfile.open(full, "w:gz") as archive:
        add_member(archive, "anno.jsonl", lines.encode())
    cut = tmp_path / "cut.tgz"
    cut.write_bytes(full.read_bytes()[: full.stat().st_size // 2])  # an interrupted download
    summary = prepare([cut], tmp_path / "out.jsonl", progress=False)
    read = summary["inputs"][0]["records"]
    assert 1000 < read < 5000
    assert summary["written"]["train"] == read == summary["records_read"]
    assert len(summary["problems"]) == 1 and summary["problems"][0].startswith(f"{cut}: stopped reading after {read}")
    assert read_prompts(tmp_path / "out.jsonl") == [f"a red fox number {i}" for i in range(read)]
    with pytest.raises(InputError, match="download the file again"):
        prepare([cut], tmp_path / "strict.jsonl", strict=True, progress=False)


def _gzip_tar_of(lines):
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as archive:
        add_member(archive, "anno.jsonl", "".join(json.dumps(record(p)) + "\n" for p in lines).encode())
    return buffer.getvalue()


BROKEN_BEFORE_THE_FIRST_RECORD = [
    # (file name, its bytes, the reason the messages give)
    ("data.tgz", b"a red fox in the snow\nan old lighthouse\n", "not a gzip file"),
    ("data.tar.gz", b"{\"prompt\": \"a red fox\"}\n", "not a gzip file"),
    ("data.tar", b"a red fox in the snow\n" * 40, "not a tar file"),
    ("data.jsonl.gz", b"{\"prompt\": \"a red fox\"}\n", "not a gzip file"),
    ("data.tgz", b"", "the file is empty"),
    ("data.tgz", _gzip_tar_of(PROMPTS_A)[:30], "its gzip data ends early or is corrupt"),
    ("data.jsonl.gz", gzip.compress(b'{"prompt": "a red fox"}\n' * 50)[:25], "its gzip data ends early or is corrupt"),
    ("data.tgz", gzip.compress(b"a red fox in the snow\n" * 40), "the gzip file holds no tar archive"),
]


@pytest.mark.parametrize("name,data,reason", BROKEN_BEFORE_THE_FIRST_RECORD,
                         ids=[f"{name}:{reason}" for name, _, reason in BROKEN_BEFORE_THE_FIRST_RECORD])
def test_input_broken_before_its_first_record_is_named(tmp_path, capsys, name, data, reason):
    broken = tmp_path / name
    broken.write_bytes(data)
    out = tmp_path / "out.jsonl"
    cause = f"{broken} could not be read ({reason}"
    # Alone: the one-line error says why nothing is left.
    code, _, err = run_cli([broken, "--output_file", out, "--skip_truncation_count", "--no_progress"], capsys)
    assert_one_line_error(code, err, f"no training prompts left: {cause}", "0 records read", "nothing was written")
    assert not out.exists()
    # Beside a good input: the summary JSON and a warning name it, and the good input is used.
    good = write_jsonl(tmp_path / "good.jsonl", [record(p) for p in PROMPTS_A])
    code, stdout, err = run_cli([good, broken, "--output_file", out, "--skip_truncation_count", "--no_progress"],
                                capsys)
    assert code == 0, err
    summary = json.loads(stdout)
    assert len(summary["problems"]) == 1 and summary["problems"][0].startswith(cause)
    assert summary["inputs"][1]["error"] == summary["problems"][0] and summary["inputs"][1]["records"] == 0
    assert f"warning: {cause}" in err
    assert read_prompts(out) == CLEAN_A
    # --strict: the same cause, as the error.
    code, _, err = run_cli([good, broken, "--output_file", tmp_path / "strict.jsonl", "--skip_truncation_count",
                            "--no_progress", "--strict"], capsys)
    assert_one_line_error(code, err, cause, "download the file again")


def test_non_utf8_txt_line_is_counted(tmp_path):
    source = tmp_path / "p.txt"
    source.write_bytes(b"a red fox\n\xe9t\xe9 en provence\na koi pond\n")
    summary = prepare([source], tmp_path / "out.txt", progress=False)
    assert read_prompts(tmp_path / "out.txt") == ["a red fox", "a koi pond"]
    assert summary["malformed"] == {
        "count": 1, "first": [{"file": str(source), "line": 2, "error": "not UTF-8 (byte 0xe9 at column 1)"}],
    }


# --------------------------------------------------------------------------------------------------
# command-line errors: one line, no traceback, nothing written


def test_missing_input_is_one_line_error_from_the_script(tmp_path):
    code, out, err = run_script(["missing.jsonl.tgz", "--output_file", "out.jsonl"], cwd=tmp_path)
    assert_one_line_error(code, err, "missing.jsonl.tgz", "does not exist")
    assert out == "" and only(tmp_path) == []


def test_unwritable_output_is_one_line_error_from_the_script(tmp_path):
    source = write_jsonl(tmp_path / "a.jsonl", [record("a fox")])
    code, _, err = run_script([source, "--output_file", tmp_path / "no_such_dir" / "out.jsonl"], cwd=tmp_path)
    assert_one_line_error(code, err, "--output_file", "no_such_dir", "does not exist", "create it first")
    code, _, err = run_script([source, "--output_file", tmp_path / "a.jsonl" / "out.jsonl"], cwd=tmp_path)
    assert_one_line_error(code, err, "--output_file", "is a file, not a folder")
    assert only(tmp_path) == ["a.jsonl"]


@pytest.mark.parametrize(
    "extra,needles",
    [
        (["--output_file", "{tmp}/out.csv"], ["--output_file", "out.csv", ".jsonl or .txt"]),
        (["--output_file", "{tmp}"], ["--output_file", "is a directory"]),
        (["--output_file", "{tmp}/a.jsonl"], ["--output_file", "is also an input"]),
        (["--val_count", "2", "--val_file", "{tmp}/out.jsonl", "--output_file", "{tmp}/out.jsonl"],
         ["--val_file", "same file"]),
        (["--min_words", "-1"], ["--min_words -1"]),
        (["--min_words", "4", "--max_words", "3"], ["--max_words 3", "--min_words (4)"]),
        (["--max_samples", "0"], ["--max_samples 0"]),
        (["--val_count", "-2"], ["--val_count -2"]),
        (["--val_file", "{tmp}/v.txt"], ["--val_file", "--val_count"]),
        (["--max_samples", "many"], ["--max_samples", "invalid int value"]),
        (["--pretrained_model_name_or_path", "{tmp}/no_model"], ["--pretrained_model_name_or_path",
                                                              "--skip_truncation_count"]),
    ],
)
def test_bad_flags_are_one_line_errors(tmp_path, capsys, extra, needles):
    source = write_jsonl(tmp_path / "a.jsonl", [record("a fox")])
    before = only(tmp_path)
    code, _, err = run_cli([source, *[arg.format(tmp=tmp_path) for arg in extra]], capsys)
    assert_one_line_error(code, err, *needles)
    assert only(tmp_path) == before


def test_unknown_input_type_and_folder_input_are_one_line_errors(tmp_path, capsys):
    csv = tmp_path / "anno.csv"
    csv.write_text("prompt\na fox\n")
    code, _, err = run_cli([csv, "--output_file", tmp_path / "o.jsonl"], capsys)
    assert_one_line_error(code, err, "anno.csv", "unknown file type", ".jsonl", ".tgz", ".txt")
    code, _, err = run_cli([tmp_path, "--output_file", tmp_path / "o.jsonl"], capsys)
    assert_one_line_error(code, err, "is not a file")


# --------------------------------------------------------------------------------------------------
# atomic output


def test_output_is_written_under_a_temporary_name_and_renamed_at_the_end(tmp_path):
    source = write_jsonl(tmp_path / "a.jsonl", [record(p) for p in PROMPTS_A + PROMPTS_B])
    out = tmp_path / "out.jsonl"
    out.write_text('{"prompt": "the previous run"}\n')
    seen_during_run = []

    class SpyCounter:
        """Looks at the folder while prompts are being written."""

        def count(self, prompt):
            seen_during_run.append((out.read_text(), sorted(p.name for p in tmp_path.glob(".out.jsonl.*.tmp"))))
            return 3

    summary = prepare([source], out, token_counter=SpyCounter(), progress=False)
    assert len(seen_during_run) == 5
    assert all(text == '{"prompt": "the previous run"}\n' for text, _ in seen_during_run)
    assert all(len(temps) == 1 for _, temps in seen_during_run)
    assert read_prompts(out) == CLEAN_A + CLEAN_B
    assert only(tmp_path) == ["a.jsonl", "out.jsonl", "out.summary.json"]
    assert summary["clip_truncated"] == {"max_tokens": 77, "count": 0, "of_train_prompts": 5}
    mask = os.umask(0)
    os.umask(mask)
    assert out.stat().st_mode & 0o777 == 0o666 & ~mask


def test_interrupted_run_leaves_previous_outputs_whole_and_no_temporary_files(tmp_path, monkeypatch, capsys):
    source = write_jsonl(tmp_path / "a.jsonl", [record(f"a red fox number {i}") for i in range(50)])
    out = tmp_path / "out.jsonl"
    out.write_text('{"prompt": "old"}\n')
    (tmp_path / "out_val.txt").write_text("old validation prompt\n")
    (tmp_path / "out.summary.json").write_text("{}\n")
    before = {name: (tmp_path / name).read_bytes() for name in only(tmp_path)}
    calls = []
    real_clean = filters.clean_prompt

    def interrupted_clean(text):
        calls.append(text)
        if len(calls) == 30:
            raise KeyboardInterrupt  # Ctrl-C in the middle of the stream
        return real_clean(text)

    monkeypatch.setattr(filters, "clean_prompt", interrupted_clean)
    code, _, err = run_cli([source, "--output_file", out, "--val_count", "3", "--skip_truncation_count"], capsys)
    assert code == 130 and "interrupted; no output file was changed" in err and "Traceback" not in err
    assert {name: (tmp_path / name).read_bytes() for name in only(tmp_path)} == before


def test_ctrl_c_on_the_running_script_leaves_no_file(tmp_path):
    import signal
    import time

    source = tmp_path / "prompts.txt"
    source.write_text("".join(f"a red fox number {i} --ar 16:9\n" for i in range(2_000_000)))  # ~20 s of work
    (tmp_path / "out.jsonl").write_text('{"prompt": "old"}\n')
    process = subprocess.Popen(
        [sys.executable, str(REPO / "prepare_journeydb.py"), str(source), "--output_file", "out.jsonl",
         "--skip_truncation_count", "--no_progress"],
        cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        # Ctrl-C as in a terminal: a child inherits an ignored SIGINT (a test runner's worker may ignore it), and
        # Python then installs no KeyboardInterrupt handler at all.
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    deadline = time.monotonic() + 60
    while not list(tmp_path.glob(".out.jsonl.*.tmp")) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert list(tmp_path.glob(".out.jsonl.*.tmp")), "the run never started writing"
    time.sleep(0.3)  # well inside the run
    process.send_signal(signal.SIGINT)
    _, err = process.communicate(timeout=60)
    assert process.returncode == 130, err
    assert err.strip() == "prepare_journeydb.py: error: interrupted; no output file was changed"
    assert only(tmp_path) == ["out.jsonl", "prompts.txt"]
    assert (tmp_path / "out.jsonl").read_text() == '{"prompt": "old"}\n'


def test_write_failure_is_one_line_error_and_leaves_no_temporary_file(tmp_path, monkeypatch, capsys):
    source = write_jsonl(tmp_path / "a.jsonl", [record(p) for p in PROMPTS_A])

    def disk_full(self, text):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(journeydb.AtomicTextFile, "write", disk_full)
    code, _, err = run_cli([source, "--output_file", tmp_path / "out.jsonl", "--skip_truncation_count",
                            "--no_progress"], capsys)
    assert code == 1 and "No space left on device" in err and len(err.strip().splitlines()) == 1
    assert only(tmp_path) == ["a.jsonl"]


# --------------------------------------------------------------------------------------------------
# shuffle, max_samples, validation prompts, output formats

MANY = [f"a red fox number {i}, watercolor --ar 16:9" for i in range(40)]
MANY_CLEAN = [f"a red fox number {i}, watercolor" for i in range(40)]


def test_shuffle_is_seeded_and_keeps_the_same_prompts(tmp_path):
    source = write_jsonl(tmp_path / "a.jsonl", [record(p) for p in MANY])
    orders = {}
    for name, seed in (("s0", 0), ("s0_again", 0), ("s1", 1)):
        prepare([source], tmp_path / f"{name}.jsonl", shuffle=True, seed=seed, progress=False)
        orders[name] = read_prompts(tmp_path / f"{name}.jsonl")
    assert orders["s0"] == orders["s0_again"]
    assert orders["s0"] != orders["s1"] and orders["s0"] != MANY_CLEAN
    assert sorted(orders["s0"]) == sorted(orders["s1"]) == sorted(MANY_CLEAN)


def test_max_samples_without_shuffle_takes_the_first_and_stops_reading(tmp_path):
    source = write_jsonl(tmp_path / "a.jsonl", [record(p) for p in MANY])
    summary = prepare([source], tmp_path / "out.jsonl", max_samples=7, progress=False)
    assert read_prompts(tmp_path / "out.jsonl") == MANY_CLEAN[:7]
    assert summary["stopped_at_max_samples"] is True
    assert summary["records_read"] == 7 and summary["dropped"]["over_max_samples"] == 0


def test_max_samples_with_shuffle_counts_the_rest(tmp_path):
    source = write_jsonl(tmp_path / "a.jsonl", [record(p) for p in MANY])
    summary = prepare([source], tmp_path / "out.jsonl", shuffle=True, max_samples=7, val_count=5, progress=False)
    train, val = read_prompts(tmp_path / "out.jsonl"), read_prompts(tmp_path / "out_val.txt")
    assert len(train) == 7 and len(val) == 5 and not set(train) & set(val)
    assert set(train) | set(val) < set(MANY_CLEAN)
    assert summary["records_read"] == 40 and summary["dropped"]["over_max_samples"] == 28
    assert summary["stopped_at_max_samples"] is False


def test_val_count_writes_held_out_prompts_one_a_line(tmp_path, capsys):
    source = write_jsonl(tmp_path / "a.jsonl", [record(p) for p in MANY])
    code, out, err = run_cli([source, "--output_file", tmp_path / "train.jsonl", "--val_count", "4",
                              "--skip_truncation_count"], capsys)
    assert code == 0, err
    summary = json.loads(out)
    val_lines = (tmp_path / "train_val.txt").read_text(encoding="utf-8").splitlines()
    assert val_lines == MANY_CLEAN[:4]
    assert read_prompts(tmp_path / "train.jsonl") == MANY_CLEAN[4:]
    assert summary["written"] == {"train": 36, "validation": 4}
    assert summary["val_file"] == str(tmp_path / "train_val.txt")

    code, out, err = run_cli([source, "--output_file", tmp_path / "t2.jsonl", "--val_count", "4", "--shuffle",
                              "--seed", "3", "--val_file", tmp_path / "held_out.txt", "--skip_truncation_count"],
                             capsys)
    assert code == 0, err
    val, train = read_prompts(tmp_path / "held_out.txt"), read_prompts(tmp_path / "t2.jsonl")
    assert len(val) == 4 and val != MANY_CLEAN[:4]
    assert sorted(val + train) == sorted(MANY_CLEAN)


def test_val_count_larger_than_the_data_is_an_error_and_writes_nothing(tmp_path):
    source = write_jsonl(tmp_path / "a.jsonl", [record(p) for p in PROMPTS_A])
    with pytest.raises(InputError, match="no training prompts left .* 3 held out for validation"):
        prepare([source], tmp_path / "out.jsonl", val_count=3, progress=False)
    assert only(tmp_path) == ["a.jsonl"]


def test_txt_output_and_unicode_round_trip(tmp_path):
    prompts = ["东京的街道, 霓虹灯 --ar 16:9", "café naïve 🌸\nsecond line", 'a "quoted" word \\ backslash']
    source = write_jsonl(tmp_path / "a.jsonl", [record(p) for p in prompts])
    prepare([source], tmp_path / "out.txt", progress=False)
    prepare([source], tmp_path / "out.jsonl", progress=False)
    expected = ["东京的街道, 霓虹灯", "café naïve 🌸 second line", 'a "quoted" word \\ backslash']
    assert read_prompts(tmp_path / "out.txt") == expected
    assert read_prompts(tmp_path / "out.jsonl") == expected
    assert "东京" in (tmp_path / "out.jsonl").read_text(encoding="utf-8")  # written as text, not \\u escapes


def test_outputs_load_with_the_training_scripts_reader(tmp_path):
    from yoso.data.prompts import read_prompts as training_read_prompts

    prompts = MANY + ["东京的街道, 霓虹灯 --ar 16:9", 'a "quoted" word \\ backslash', "café 🌸\nnew line"]
    source = write_jsonl(tmp_path / "a.jsonl", [record(p) for p in prompts])
    prepare([source], tmp_path / "train.jsonl", val_count=3, progress=False)
    prepare([source], tmp_path / "train.txt", progress=False)
    expected = [clean_prompt(p) for p in prompts]
    assert training_read_prompts(tmp_path / "train.jsonl") == expected[3:]
    assert training_read_prompts(tmp_path / "train_val.txt") == expected[:3]
    assert training_read_prompts(tmp_path / "train.txt") == expected


# --------------------------------------------------------------------------------------------------
# an imagefolder metadata.jsonl for the images (--image_root)


def _write_png(path, color):
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (4, 4), color).save(path)


def _image_folder_case(tmp_path):
    """An image root with a few tiny PNGs, and JourneyDB-like records in a .tgz: some images missing."""
    root = tmp_path / "imgs"
    colors = {"000/a.png": (255, 0, 0), "000/b.png": (0, 255, 0), "001/c.png": (0, 0, 255),
              "001/d.png": (255, 255, 0), "002/e.png": (0, 255, 255), "002/f.png": (255, 0, 255)}
    for name, color in colors.items():
        _write_png(root / name, color)
    records = [
        {**record("a red fox --ar 16:9", caption="A red fox in snow."), "img_path": "./000/a.png"},
        {**record("an old lighthouse --v 5", caption="A lighthouse."), "img_path": "./000/b.png"},
        {**record("a snowy village", caption="A village."), "img_path": "./001/gone.png"},  # image missing
        {**record("A Red Fox", caption="Another fox."), "img_path": "./001/d.png"},  # duplicate prompt
        {**record("a koi pond", caption="A pond."), "img_path": "./002/lost.png"},  # image missing ...
        {**record("a koi pond", caption="A pond again."), "img_path": "./002/e.png"},  # ... a repeat has it
        {**record("a bowl of ramen"), "img_path": "001/c.png"},  # no "./", no caption
        {**record("--ar 16:9 --v 5", caption="Empty prompt."), "img_path": "./002/f.png"},  # empty prompt
        record("a tiny robot"),  # the usual ./NNN/<hex>.jpg path, not under the root
        {"prompt": "no image path at all"},
        {**record("a way out"), "img_path": "../outside.png"},
    ]
    records[8]["img_path"] = "./003/" + "0" * 32 + ".jpg"
    source = tmp_path / "train_anno.jsonl.tgz"
    with tarfile.open(source, "w:gz") as archive:
        add_member(archive, "train_anno.jsonl", "".join(json.dumps(r) + "\n" for r in records).encode())
    return root, colors, source


def _load_image_folder(root, cache):
    import datasets

    rows = datasets.load_dataset("imagefolder", data_dir=str(root), split="train", cache_dir=str(cache))
    return [(row["text"], row["image"].convert("RGB").getpixel((0, 0))) for row in rows], rows.column_names


def test_image_root_writes_an_imagefolder_that_datasets_loads(tmp_path, capsys):
    root, colors, source = _image_folder_case(tmp_path)
    out = tmp_path / "train.jsonl"
    code, stdout, err = run_cli([source, "--output_file", out, "--image_root", root, "--val_count", "1",
                                 "--skip_truncation_count", "--no_progress"], capsys)
    assert code == 0, err
    summary = json.loads(stdout)
    # "a red fox" is held out for validation; its image is in no training row.
    expected = [("an old lighthouse", "000/b.png"), ("a koi pond", "002/e.png"), ("a bowl of ramen", "001/c.png")]
    rows = [json.loads(line) for line in (root / "metadata.jsonl").read_text(encoding="utf-8").splitlines()]
    assert rows == [{"file_name": name, "text": text} for text, name in expected]
    assert read_prompts(out) == [text for text, _ in expected]
    assert (tmp_path / "train_val.txt").read_text().splitlines() == ["a red fox"]
    assert summary["image_folder"] == {
        "image_root": str(root), "metadata_file": str(root / "metadata.jsonl"),
        "image_column_name": "file_name", "caption_column_name": "text", "rows": 3,
        "image_missing": {"count": 3, "first": ["001/gone.png", "002/lost.png", "003/" + "0" * 32 + ".jpg"]},
        "no_img_path": 2,
    }
    assert summary["dropped"] == {
        "missing_text": 0, "empty": 1, "too_few_words": 0, "too_many_words": 0, "duplicate": 1,
        "over_max_samples": 0, "no_img_path": 2, "image_missing": 3,
    }
    assert summary["records_read"] == summary["texts_considered"] == 11
    assert "left out 3 records whose image is not under" in err and "001/gone.png, 002/lost.png" in err
    assert "left out 2 records without a usable img_path" in err
    assert f"3 image rows to {root / 'metadata.jsonl'} (3 records left out: image missing)" in err

    loaded, columns = _load_image_folder(root, tmp_path / "cache")
    assert columns == ["image", "text"]
    assert loaded == [(text, colors[name]) for text, name in expected]  # each caption with its own image

    # Captions instead of prompts, into the same folder: the file is replaced whole.
    code, stdout, err = run_cli([source, "--output_file", out, "--image_root", root, "--text_source", "caption",
                                 "--skip_truncation_count", "--no_progress"], capsys)
    assert code == 0, err
    loaded, _ = _load_image_folder(root, tmp_path / "cache2")
    assert loaded == [("A red fox in snow.", colors["000/a.png"]), ("A lighthouse.", colors["000/b.png"]),
                      ("Another fox.", colors["001/d.png"]), ("A pond again.", colors["002/e.png"]),
                      ("a bowl of ramen", colors["001/c.png"]), ("Empty prompt.", colors["002/f.png"])]
    assert json.loads(stdout)["caption_missing"] == 1
    assert sorted(path.name for path in root.iterdir()) == ["000", "001", "002", "metadata.jsonl"]


def test_image_root_with_no_image_found_writes_nothing(tmp_path, capsys):
    root, _, source = _image_folder_case(tmp_path)
    empty_root = tmp_path / "other_imgs"
    empty_root.mkdir()
    (empty_root / "metadata.jsonl").write_text('{"file_name": "x.png", "text": "the previous run"}\n')
    code, _, err = run_cli([source, "--output_file", tmp_path / "train.jsonl", "--image_root", empty_root,
                            "--skip_truncation_count", "--no_progress"], capsys)
    assert_one_line_error(code, err, f"no training prompts left: 9 records have no image under {empty_root} "
                          "(first: 000/a.png)", "11 records read", "9 image_missing", "2 no_img_path",
                          "nothing was written", "--image_root")
    assert only(empty_root) == ["metadata.jsonl"]
    assert (empty_root / "metadata.jsonl").read_text() == '{"file_name": "x.png", "text": "the previous run"}\n'
    assert not (tmp_path / "train.jsonl").exists()


def test_image_file_name_resolution():
    from yoso.data.journeydb import image_file_name

    assert image_file_name("./000/abc.jpg") == "000/abc.jpg"
    assert image_file_name("000/abc.jpg") == "000/abc.jpg"
    assert image_file_name(".\\000\\abc.jpg") == "000/abc.jpg"
    assert image_file_name("./000/../001/./abc.jpg") == "001/abc.jpg"
    for unusable in ("", ".", "./", "../abc.jpg", "000/../../abc.jpg", "/data/abc.jpg", "C:/data/abc.jpg",
                     "https://example.com/abc.jpg", None, 7):
        assert image_file_name(unusable) is None, unusable


@pytest.mark.parametrize(
    "extra,needles",
    [
        (["--image_root", "{tmp}/no_such_dir"], ["--image_root", "no_such_dir", "does not exist"]),
        (["--image_root", "{tmp}/a.jsonl"], ["--image_root", "is a file, not a folder"]),
        (["--image_root", "{tmp}", "--text_source", "both"], ["--text_source both", "--image_root"]),
        (["--image_root", "{tmp}", "--image_column_name", "image"],
         ["--image_column_name image", "file_name", "_file_name"]),
        (["--image_root", "{tmp}", "--caption_column_name", "file_name"], ["--caption_column_name file_name"]),
        (["--image_root", "{tmp}", "--image_column_name", "photo_file_name", "--caption_column_name", "photo"],
         ["--caption_column_name photo", "image column"]),
        (["--image_column_name", "file_name"], ["--image_column_name", "--image_root"]),
        (["--caption_column_name", "prompt"], ["--caption_column_name", "--image_root"]),
        (["--image_root", "{tmp}", "--output_file", "{tmp}/metadata.jsonl"], ["same file", "metadata.jsonl"]),
    ],
)
def test_bad_image_root_flags_are_one_line_errors(tmp_path, capsys, extra, needles):
    source = write_jsonl(tmp_path / "a.jsonl", [record("a fox")])
    before = only(tmp_path)
    code, _, err = run_cli([source, *[arg.format(tmp=tmp_path) for arg in extra]], capsys)
    assert_one_line_error(code, err, *needles)
    assert only(tmp_path) == before


def test_image_root_metadata_that_is_an_input_is_refused(tmp_path, capsys):
    metadata = write_jsonl(tmp_path / "metadata.jsonl", [record("a fox")])
    code, _, err = run_cli([metadata, "--image_root", tmp_path, "--output_file", tmp_path / "o.jsonl"], capsys)
    assert_one_line_error(code, err, "--image_root", "is also an input")


# --------------------------------------------------------------------------------------------------
# CLIP truncation counts

TOKEN_PROMPTS = [
    "a photo of a cat",
    "A Photo Of A CAT",
    "",
    "a highly detailed portrait of a woman with long flowing hair, cinematic lighting, octane render, 8k",
    "don't stop; it's the cat's toy, isn't it? we'll see... they've gone!!! I'm here, you'd know",
    "numbers 1234567890 and 3.14159 and 16:9 and 1/2 and #1 and $100 and 50%",
    "café naïve Straße résumé façade Ångström",
    "东京的街道, 霓虹灯, 雨夜",
    "ночной город в дождь",
    "emoji 🌸🌸 🚀 👩‍👩‍👧 ❤️ and ™ © ® symbols",
    "mixed-case CamelCaseWords and snake_case_words and kebab-case-words",
    "tabs\tand\nnew lines   and   spaces",
    "Σίσυφος ΟΔΥΣΣΕΥΣ",
    "combining: e\u0301 cafe\u0301 n\u0303",
    "superscripts x² y³ ½ ⅓ Ⅻ",
    "'''quotes''' \"double\" «guillemets» „low“",
    " ".join(["masterpiece"] * 80),
    ", ".join(f"detail{i}" for i in range(60)),
]


def test_clip_token_counter_matches_the_tokenizer(clip_tokenizer):
    from benchmarks.bench_prepare_journeydb import synthetic_prompt

    counter = ClipTokenCounter(clip_tokenizer)
    rng = random.Random(0)
    prompts = TOKEN_PROMPTS + [synthetic_prompt(rng) for _ in range(150)]
    prompts += [clean_prompt(p) for p in prompts]
    expected = [len(ids) for ids in clip_tokenizer(prompts).input_ids]
    assert [counter.count(p) for p in prompts] == expected
    assert max(expected) > 77 and min(expected) == 2
    # Again from a cache that keeps starting over.
    counter.max_cached_chunks = 3
    assert [counter.count(p) for p in prompts] == expected


def test_truncation_count_in_summary_matches_the_tokenizer(tmp_path, clip_tokenizer):
    long_prompts = [" ".join(f"word{i}" for i in range(n)) for n in (10, 20, 30, 40, 50)]
    source = write_jsonl(tmp_path / "a.jsonl", [record(p) for p in TOKEN_PROMPTS + long_prompts])
    summary = prepare([source], tmp_path / "out.jsonl", token_counter=ClipTokenCounter(clip_tokenizer),
                      progress=False)
    written = read_prompts(tmp_path / "out.jsonl")
    over = sum(len(ids) > 77 for ids in clip_tokenizer(written).input_ids)
    assert over >= 4
    assert summary["clip_truncated"] == {"max_tokens": 77, "count": over, "of_train_prompts": len(written)}


def test_cli_counts_truncation_with_a_model_folder_tokenizer(tmp_path, capsys, clip_tokenizer):
    model = tmp_path / "sd15"
    clip_tokenizer.save_pretrained(model / "tokenizer")
    prompts = ["a red fox", " ".join(["masterpiece"] * 90), ", ".join(f"detail{i}" for i in range(40))]
    source = write_jsonl(tmp_path / "a.jsonl", [record(p) for p in prompts])
    code, out, err = run_cli([source, "--output_file", tmp_path / "out.jsonl", "--pretrained_model_name_or_path",
                              model, "--no_progress"], capsys)
    assert code == 0, err
    expected = sum(len(ids) > 77 for ids in clip_tokenizer(prompts).input_ids)
    assert expected == 2
    assert json.loads(out)["clip_truncated"]["count"] == expected


def test_cli_default_tokenizer_and_progress_bar(tmp_path, capsys):
    source = write_jsonl(tmp_path / "a.jsonl", [record(p) for p in MANY + [" ".join(["masterpiece"] * 90)]])
    code, out, err = run_cli([source, "--output_file", tmp_path / "out.jsonl"], capsys)
    assert code == 0, err
    assert json.loads(out)["clip_truncated"] == {"max_tokens": 77, "count": 1, "of_train_prompts": 41}
    assert "reading: 100%" in err and "41 records" in err


# --------------------------------------------------------------------------------------------------
# the benchmark stays runnable


def test_benchmark_runs_on_a_small_synthetic_set(tmp_path):
    from benchmarks.bench_prepare_journeydb import main as bench_main
    from benchmarks.bench_prepare_journeydb import write_synthetic_jsonl

    path = tmp_path / "synthetic.jsonl"
    size = write_synthetic_jsonl(path, 3000, malformed_every=1000)
    lines = path.read_text(encoding="utf-8").splitlines()
    assert len(lines) == 3000 and 1000 <= size / 3000 <= 2000  # JourneyDB-sized records
    parsed = [json.loads(line) for line in lines[:5]]
    assert all({"img_path", "Task1", "Task3", "prompt"} <= set(rec) for rec in parsed)

    results = bench_main(["--num_records", "3000", "--repeat", "1", "--output_json", str(tmp_path / "bench.json")])
    assert json.loads((tmp_path / "bench.json").read_text()) == results
    for run in ("jsonl, no CLIP count", "jsonl", "jsonl.tgz"):
        assert results[run]["records_read"] + results[run]["malformed"] == 3000
        assert results[run]["records_per_second"] > 0 and 0 < results[run]["core_share"] <= 1.05
    assert results["jsonl"]["written"] == results["jsonl.tgz"]["written"] == results["jsonl, no CLIP count"]["written"]


# --------------------------------------------------------------------------------------------------
# production code and test machinery stay apart


def test_production_code_does_not_import_the_test_machinery():
    import ast

    importers = []
    for path in [REPO / "prepare_journeydb.py", *sorted((REPO / "yoso").rglob("*.py"))]:
        if path.name == "testing.py":
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            names = []
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
            if "yoso.testing" in names:
                importers.append(str(path.relative_to(REPO)))
    assert importers == []


def test_one_clip_byte_table_serves_the_tiny_models_and_the_token_counter(clip_tokenizer):
    from yoso.data import clip_bpe
    from yoso import testing

    table = clip_bpe.bytes_to_unicode()
    assert sorted(table) == list(range(256)) and len(set(table.values())) == 256
    assert testing.make_clip_tokenizer is clip_bpe.make_clip_tokenizer
    vocab = clip_tokenizer.get_vocab()
    # Token ids 0..255 are the byte characters in the table's order (printable bytes first).
    assert [vocab[char] for char in table.values()] == list(range(256))
    assert table[ord("a")] == "a" and table[ord(" ")] == "Ġ" and table[0] == "Ā"


def test_the_benchmarks_tokenizers_library_counter_gives_the_same_counts(clip_tokenizer):
    from benchmarks.bench_prepare_journeydb import TokenizersLibraryCounter

    library, cached = TokenizersLibraryCounter(clip_tokenizer), ClipTokenCounter(clip_tokenizer)
    expected = [len(ids) for ids in clip_tokenizer(TOKEN_PROMPTS).input_ids]
    assert [library.count(p) for p in TOKEN_PROMPTS] == [cached.count(p) for p in TOKEN_PROMPTS] == expected


def test_benchmark_times_the_image_root_case(tmp_path):
    from benchmarks.bench_prepare_journeydb import main as bench_main

    results = bench_main(["--num_records", "1000", "--repeat", "1", "--skip_tgz", "--with_images"])
    with_images, plain = results["jsonl, --image_root"], results["jsonl"]
    assert with_images["records_read"] == plain["records_read"] == 1000 and with_images["records_per_second"] > 0
    # Every other record's image exists; a prompt is kept when any of its records has its image.
    assert with_images["image_missing"] == 500 and plain["image_missing"] is None
    assert 0 < with_images["written"] < plain["written"]


def _complete_lines_before(data, member_size):
    """How many whole lines of a one-member .tgz's jsonl survive in ``data`` (cut anywhere): decompress
    what is there (zlib, no tarfile), skip the 512-byte header, count the newlines."""
    import zlib

    decompressor = zlib.decompressobj(16 + zlib.MAX_WBITS)
    try:
        tar_bytes = decompressor.decompress(data)
    except zlib.error:
        return 0
    return tar_bytes[512 : 512 + member_size].count(b"\n")


@pytest.mark.parametrize("num_records", [3, 60, 2000])
def test_small_truncated_archives_keep_every_record_before_the_break(tmp_path, num_records):
    """A cut .tgz of any size (a few records to ~1 MB of jsonl) keeps every whole record before the cut,
    with the warning naming it; tarfile's member reader would drop the whole last read (all of a small one)."""
    prompts = [f"a red fox number {i}" for i in range(num_records)]
    lines = "".join(json.dumps(record(p)) + "\n" for p in prompts).encode()
    full = tmp_path / "full.tgz"
    with tarfile.open(full, "w:gz") as archive:
        add_member(archive, "anno.jsonl", lines)
    data = full.read_bytes()
    kept_counts = []
    for fraction in (0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.98):
        cut = tmp_path / f"cut-{fraction}.tgz"
        cut.write_bytes(data[: int(len(data) * fraction)])
        expected = _complete_lines_before(cut.read_bytes(), len(lines))
        assert expected <= num_records
        out = tmp_path / f"out-{fraction}.jsonl"
        if expected == 0:  # nothing decodable: the one-line "could not be read" error
            with pytest.raises(InputError, match="could not be read"):
                prepare([cut], out, progress=False)
            continue
        summary = prepare([cut], out, progress=False)
        assert summary["inputs"][0]["records"] == summary["written"]["train"] == expected
        assert read_prompts(out) == prompts[:expected]
        if expected < num_records:  # (a cut in the tar's end blocks or the gzip trailer loses no record)
            assert len(summary["problems"]) == 1
            assert summary["problems"][0].startswith(f"{cut}: stopped reading after {expected}")
        kept_counts.append(expected)
    assert len(kept_counts) >= 2 and kept_counts == sorted(kept_counts)  # more kept the later the cut
    assert 0 < kept_counts[0] < num_records  # a cut that loses records, yet keeps some
