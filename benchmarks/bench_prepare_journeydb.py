"""Records per second of prepare_journeydb.py, end to end, on synthetic JourneyDB-shaped annotations.

What is timed is one ``yoso.data.journeydb.prepare`` call in this process: read the file, parse every JSON
line, clean, filter, dedupe, count CLIP tokens of the kept prompts, write the output and the summary.
The figure is records per CPU second of that one thread (the fastest of ``--repeat`` runs), i.e. the
rate on one core; the wall-clock rate and the share of a core the run got are printed beside it.
Making the synthetic data is not timed. The records have JourneyDB's shape and size (``img_path``,
``Task1`` tags, ``Task2.Caption``, ``Task3`` questions, about 1-2 KB a line) and its repetition: about
2.7 records per distinct prompt (4.4 M records, 1.6 M prompts), most prompts raw Midjourney input.

    python benchmarks/bench_prepare_journeydb.py                       # 200,000 records
    python benchmarks/bench_prepare_journeydb.py --num_records 50000 --skip_tgz --stdlib_json
    python benchmarks/bench_prepare_journeydb.py --skip_tgz --token_counter tokenizers   # the library's encode
"""

import argparse
import json
import os
import random
import sys
import tarfile
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from yoso.data.journeydb import load_clip_token_counter, prepare, readers

JOURNEYDB_RECORDS = 4_429_295
RECORDS_PER_PROMPT = JOURNEYDB_RECORDS / 1_643_375  # JourneyDB: images per distinct prompt

SUBJECTS = [
    "a beautiful woman with long flowing hair", "an old lighthouse on a cliff", "a bowl of ramen",
    "a cyberpunk street at night", "a snowy mountain village", "a portrait of a medieval knight",
    "a tiny robot watering plants", "a field of sunflowers", "a koi pond in a japanese garden",
    "a desert caravan at sunset", "an astronaut riding a horse", "a cozy cabin in the woods",
    "a steampunk airship", "a dragon sleeping on gold", "a cat wearing a wizard hat", "a futuristic city skyline",
    "an underwater temple", "a street market in marrakech", "a fox in a misty forest", "a vintage sports car",
]
DETAILS = [
    "cinematic lighting", "highly detailed", "octane render", "8k", "trending on artstation", "volumetric fog",
    "golden hour", "soft focus", "ultra realistic", "unreal engine 5", "studio ghibli style", "intricate",
    "dramatic clouds", "bokeh", "hyperrealistic", "concept art", "matte painting", "vibrant colors",
    "by greg rutkowski", "by alphonse mucha", "by wes anderson", "shot on 35mm film", "symmetrical", "moody",
    "pastel palette", "neon glow", "watercolor", "oil on canvas", "isometric", "low poly", "depth of field",
]
PARAMETER_TAILS = [
    "--ar 16:9", "--v 5.2", "--ar 2:3 --v 5", "--q 2 --s 750", "--niji 5 --style raw", "--chaos 20 --ar 3:2",
    "--ar 9:16 --v 5.1 --style raw --s 250", "--no text, watermark, signature --ar 4:5", "--seed 123456 --tile",
    "--stylize 1000 --v 6", "—ar 9:16 —v 5", "--iw 0.5 --ar 1:1", "",
]
UNICODE_WORDS = ["café", "東京の夜", "ночной город", "🌸", "naïve", "Straße", "한옥 마을"]
STYLE_TAGS = ["digital art", "photography", "illustration", "anime", "3d render", "oil painting", "fantasy", "surreal"]
CONTENT_TAGS = ["woman", "city", "forest", "robot", "animal", "building", "food", "vehicle", "landscape", "water"]


def synthetic_prompt(rng):
    # Mostly short prompts, one in five long enough that CLIP truncates some (as in JourneyDB).
    detail_count = rng.randint(2, 10) if rng.random() < 0.8 else rng.randint(10, len(DETAILS))
    words = [rng.choice(SUBJECTS)] + rng.sample(DETAILS, detail_count)
    if rng.random() < 0.05:
        words.insert(1, rng.choice(UNICODE_WORDS))
    prompt = ", ".join(words) + f", {rng.randrange(10**6)}"  # a number keeps generated prompts distinct
    roll = rng.random()
    if roll < 0.06:
        prompt = f"https://s.mj.run/{rng.randrange(16**8):08x} {prompt}"
    elif roll < 0.10:
        head, _, tail = prompt.partition(", ")
        prompt = f"{head}::2 {tail}::1"
    if rng.random() < 0.75:
        prompt += " " + rng.choice(PARAMETER_TAILS)
    return prompt


def _question(rng, topic, answers):
    options = dict(zip("ABCD", rng.sample(answers, 4)))
    return {"Question": f"What best describes the {topic} of the image?", "Options": options,
            "Answer": rng.choice("ABCD")}


def synthetic_record(rng, prompt, index):
    """One JourneyDB-shaped annotation record, 1-2 KB as a JSON line."""
    record = {
        "img_path": f"./{index % 200:03d}/{rng.getrandbits(128):032x}.jpg",
        "Task1": {
            "Style": rng.sample(STYLE_TAGS, rng.randint(1, 4)),
            "Content": rng.sample(CONTENT_TAGS, rng.randint(2, 6)),
            "Atmosphere": rng.sample(["serene", "mysterious", "gloomy", "joyful", "epic", "calm"], 2),
        },
        "Task2": {"Caption": f"An image showing {prompt.split(',')[0].split('--')[0].strip()} with {rng.choice(DETAILS)}."},
        "Task3": {
            "Style": [_question(rng, "style", STYLE_TAGS) for _ in range(rng.randint(1, 3))],
            "Content": [_question(rng, "content", CONTENT_TAGS) for _ in range(rng.randint(1, 4))],
        },
        "prompt": prompt,
    }
    if rng.random() < 0.05:
        del record["Task2"]  # captions are sometimes missing in JourneyDB
    return record


def write_synthetic_jsonl(path, num_records, seed=0, malformed_every=20_000):
    """Write ``num_records`` JourneyDB-shaped lines (every ``malformed_every``-th one cut short); return bytes."""
    rng = random.Random(seed)
    prompts = [synthetic_prompt(rng) for _ in range(max(1, round(num_records / RECORDS_PER_PROMPT)))]
    with open(path, "w", encoding="utf-8") as out:
        for index in range(num_records):
            line = json.dumps(synthetic_record(rng, rng.choice(prompts), index), ensure_ascii=False)
            if malformed_every and index % malformed_every == malformed_every - 1:
                line = line[: len(line) // 2]  # a truncated line, as a broken download leaves
            out.write(line + "\n")
    return os.path.getsize(path)


def pack_tgz(jsonl_path, tgz_path, member_name="train_anno_realease_repath.jsonl"):
    with tarfile.open(tgz_path, "w:gz", compresslevel=6) as archive:
        archive.add(jsonl_path, arcname=member_name)
    return os.path.getsize(tgz_path)


class TokenizersLibraryCounter:
    """CLIP token counts from the ``tokenizers`` library's own encode (``--token_counter tokenizers``): the
    plain alternative to ``ClipTokenCounter``, timed here to compare the two end to end."""

    def __init__(self, tokenizer):
        from tokenizers import Tokenizer

        self._backend = Tokenizer.from_str(tokenizer.backend_tokenizer.to_str())
        self._backend.no_truncation()  # the count is before truncation, as ClipTokenCounter's
        self._backend.no_padding()
        self._cache, self._piece_cache = {}, {}  # nothing cached: the same interface as ClipTokenCounter

    def count(self, text):
        return len(self._backend.encode(text).ids)


def load_token_counter(kind):
    if kind == "tokenizers":
        from yoso.data.clip_bpe import make_clip_tokenizer

        return TokenizersLibraryCounter(make_clip_tokenizer())
    return load_clip_token_counter()


def write_half_the_images(jsonl_path, image_root):
    """An empty file under ``image_root`` for every other record's ``img_path`` (the rest are missing)."""
    for index, line in enumerate(Path(jsonl_path).read_text(encoding="utf-8").splitlines()):
        if index % 2:
            continue
        try:
            img_path = json.loads(line)["img_path"]
        except (ValueError, KeyError):
            continue  # the cut-short lines
        path = Path(image_root) / img_path
        path.parent.mkdir(parents=True, exist_ok=True)
        path.touch()


def timed_prepare(inputs, folder, token_counter, image_root=None):
    """One end-to-end run: (summary, wall seconds, CPU seconds of this process)."""
    started, cpu_started = time.perf_counter(), time.process_time()
    summary = prepare(inputs, Path(folder) / "out.jsonl", token_counter=token_counter, progress=False,
                      image_root=image_root)
    return summary, time.perf_counter() - started, time.process_time() - cpu_started


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--num_records", type=int, default=200_000)
    parser.add_argument("--repeat", type=int, default=3, help="timed runs of each case; the fastest counts")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--skip_tgz", action="store_true", help="time the .jsonl input only")
    parser.add_argument("--output_json", default=None, help="also write the figures here")
    parser.add_argument("--stdlib_json", action="store_true", help="parse with json only, even if orjson is installed")
    parser.add_argument(
        "--token_counter", choices=("cached", "tokenizers"), default="cached",
        help="count CLIP tokens with yoso's ClipTokenCounter (what prepare_journeydb.py uses) or with the "
        "tokenizers library's own encode, for comparison (default: cached)",
    )
    parser.add_argument(
        "--with_images", action="store_true",
        help="also time --image_root (metadata.jsonl, an image lookup a record) with half the images present",
    )
    args = parser.parse_args(argv)
    if args.stdlib_json:
        readers._fast_loads_line = readers._stdlib_loads_line

    results = {
        "json_parser": "json" if readers._fast_loads_line is readers._stdlib_loads_line else "orjson",
        "token_counter": args.token_counter,
        "num_records": args.num_records,
        "cpu_count": os.cpu_count(),
        "load_average_before": round(os.getloadavg()[0], 2),
    }
    with tempfile.TemporaryDirectory() as folder:
        jsonl = Path(folder) / "train_anno.jsonl"
        size = write_synthetic_jsonl(jsonl, args.num_records, args.seed)
        results["bytes_per_record"] = round(size / args.num_records)
        counter = load_token_counter(args.token_counter)
        cases = [("jsonl, no CLIP count", [jsonl], None, None), ("jsonl", [jsonl], counter, None)]
        if not args.skip_tgz:
            tgz = Path(folder) / "train_anno.jsonl.tgz"
            pack_tgz(jsonl, tgz)
            cases.append(("jsonl.tgz", [tgz], counter, None))
        if args.with_images:
            image_root = Path(folder) / "imgs"
            write_half_the_images(jsonl, image_root)
            cases.append(("jsonl, --image_root", [jsonl], counter, image_root))
        for name, inputs, token_counter, image_root in cases:
            runs = []
            for _ in range(args.repeat):
                # A fresh counter cache for each timed run, so no run profits from an earlier one.
                if token_counter is not None:
                    token_counter._cache.clear()
                    token_counter._piece_cache.clear()
                runs.append(timed_prepare(inputs, folder, token_counter, image_root))
            # The work is one thread, so its CPU time is its time on one core: records per CPU second is
            # the rate on one core even while other processes share the machine (then it reads low, as
            # they also share the core's caches). Wall time shows what the run got: cpu/wall is the share.
            summary, seconds, cpu_seconds = min(runs, key=lambda run: run[2])
            rate = args.num_records / cpu_seconds
            results[name] = {
                "records_per_second": round(rate),
                "records_per_wall_second": round(args.num_records / seconds),
                "cpu_seconds": round(cpu_seconds, 2),
                "wall_seconds": round(seconds, 2),
                "core_share": round(cpu_seconds / seconds, 2),
                "records_read": summary["records_read"],
                "malformed": summary["malformed"]["count"],
                "written": summary["written"]["train"],
                "clip_truncated": (summary["clip_truncated"] or {}).get("count"),
                "image_missing": summary["dropped"].get("image_missing"),
                "full_journeydb_minutes": round(JOURNEYDB_RECORDS / rate / 60, 2),
            }
            print(f"{name:22s} {rate:10,.0f} records/s on one core ({cpu_seconds:.2f} s CPU, {seconds:.2f} s wall), "
                  f"{summary['written']['train']:,} prompts written; 4.4 M records: {JOURNEYDB_RECORDS / rate / 60:.1f} min",
                  flush=True)
    results["load_average_after"] = round(os.getloadavg()[0], 2)
    if args.output_json:
        Path(args.output_json).write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(results, indent=2))
    return results


if __name__ == "__main__":
    main()
