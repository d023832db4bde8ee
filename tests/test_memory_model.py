"""The memory model (benchmarks/memory_model.py): exact bytes on hand-computable cases, CUDA autocast's casting
rules, attention counted as the flash kernel holds it, and the tiny configuration's step moving the right way."""
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import memory_model as mm  # noqa: E402

MIB = 1 << 20


def test_one_linear_forward_backward_peak_is_hand_computed():
    counter = mm.MemoryCounter()
    with counter:
        x = torch.empty(64, 1024, device="meta", requires_grad=True)   # 256 KiB
        w = torch.empty(1024, 1024, device="meta", requires_grad=True)  # 4 MiB
        y = x @ w.t()                                                  # 256 KiB
        loss = y.sum()                                                 # 4 bytes -> one 512-byte block
        assert counter.live == 256 * 1024 + 4 * MIB + 256 * 1024 + 512
        loss.backward()  # ones for the loss's grad (512), dW (4 MiB), dx (256 KiB)
        assert w.grad.shape == w.shape and x.grad.shape == x.shape
        assert counter.peak == 2 * (256 * 1024 + 4 * MIB) + 256 * 1024 + 2 * 512
        del y
        assert counter.live == 2 * (256 * 1024 + 4 * MIB) + 512  # y freed; the ones freed after backward


def test_storage_counted_once_for_views_and_rounded_to_blocks():
    counter = mm.MemoryCounter()
    with counter:
        a = torch.empty(10, device="meta")  # 40 bytes -> 512
        b = a.view(2, 5)
        c = a[3:]
        assert counter.live == 512 and b.shape == (2, 5) and c.shape == (7,)
        a.add_(1)  # in place: no new storage
        assert counter.live == 512
    assert mm.storage_bytes(513) == 1024 and mm.storage_bytes(0) == 0


def test_cuda_autocast_rules():
    x = torch.empty(8, 16, 4, 4, device="meta", dtype=torch.float16)
    w = torch.empty(16, 16, 3, 3, device="meta", dtype=torch.float32)
    lin = torch.empty(32, 16, device="meta", dtype=torch.float32)
    with mm.CudaAutocast():
        assert F.conv2d(x, w, padding=1).dtype == torch.float16
        assert F.linear(torch.empty(4, 16, device="meta"), lin).dtype == torch.float16
        assert F.group_norm(x, 4).dtype == torch.float32  # normalisations run in fp32 under CUDA autocast
        assert torch.softmax(x, dim=1).dtype == torch.float32
        assert F.silu(x).dtype == torch.float16  # not on a list: the input's dtype
        with mm.meta_aware_autocast("meta", enabled=False):
            assert F.linear(torch.empty(4, 16, device="meta"), lin).dtype == torch.float32
    assert F.linear(torch.empty(4, 16, device="meta"), lin).dtype == torch.float32  # outside: no autocast


def test_autocast_caches_a_trainable_weights_fp16_copy_within_a_region():
    w = torch.empty(256, 256, device="meta", requires_grad=True)  # fp32 trainable: 256 KiB; its fp16 copy 128 KiB
    x = torch.empty(4, 256, device="meta", dtype=torch.float16)
    counter = mm.MemoryCounter()
    with counter, mm.CudaAutocast():
        y1, y2 = F.linear(x, w), F.linear(x, w)  # one copy, reused
        assert counter.live == 128 * 1024 + 2 * mm.storage_bytes(4 * 256 * 2)
        with torch.no_grad():
            F.linear(x, w)  # under no_grad a copy is made and dropped, never cached
        assert counter.live == 128 * 1024 + 2 * mm.storage_bytes(4 * 256 * 2)
    assert counter.live == 2 * mm.storage_bytes(4 * 256 * 2)  # the region ended: its cache is gone
    assert y1.requires_grad and y2.requires_grad


def test_attention_is_counted_as_the_flash_kernel_holds_it():
    b, h, n, d = 2, 8, 4096, 40
    q = torch.empty(b, h, n, d, device="meta", dtype=torch.float16)
    counter = mm.MemoryCounter()
    with counter, mm.CudaAutocast():
        out = F.scaled_dot_product_attention(q, q, q)
    assert out.shape == (b, h, n, d)
    flash = mm.storage_bytes(b * h * n * d * 2) + mm.storage_bytes(b * h * n * 4)  # output + fp32 logsumexp
    assert counter.peak == flash
    scores = b * h * n * n * 2
    assert counter.peak < scores / 50  # far below a materialised score matrix...
    math_path = mm.MemoryCounter()
    with math_path:  # ...which the meta device's own SDPA (the math path) would count
        F.scaled_dot_product_attention(q, q, q)
    assert math_path.peak >= scores


@pytest.fixture(scope="module")
def tiny_results():
    from harness import fresh_accelerator

    # Another test's Accelerator in this worker (here one with fp16) must not stop the model from starting.
    fresh_accelerator(mixed_precision="fp16")
    runs = {}
    for name, kwargs in {"b2": dict(batch_size=2), "b4": dict(batch_size=4),
                         "b4_gc": dict(batch_size=4, gradient_checkpointing=True),
                         "b4_cache": dict(batch_size=4, teacher_latent_cache=True),
                         "b4_unshared": dict(batch_size=4, share_autocast_casts=False)}.items():
        kwargs.setdefault("gradient_checkpointing", False)
        runs[name] = mm.model_step("tiny", **kwargs)
    return runs


def test_tiny_step_moves_the_right_way(tiny_results):
    r = tiny_results
    assert r["b4"]["peak_bytes"] > r["b2"]["peak_bytes"] > r["b2"]["resident_bytes"]
    # weights and states do not depend on the batch (a few small blocks do: the step's flags and counters)
    assert abs(r["b4"]["resident_bytes"] - r["b2"]["resident_bytes"]) <= 8 * 512
    assert r["b4_gc"]["peak_bytes"] < r["b4"]["peak_bytes"]  # checkpointing saves activations
    teacher = [v for k, v in r["b4"]["resident"].items() if k.startswith("weights: teacher")]
    freed = r["b4"]["resident_bytes"] - r["b4_cache"]["resident_bytes"]
    assert teacher and sum(teacher) <= freed <= sum(teacher) + 64 * 1024  # the cache frees the teacher (and its buffers)
    assert set(r["b4"]["phases"]) >= {"generator", "discriminator", "backward", "optimizer"}
    assert max(r["b4"]["phases"].values()) == r["b4"]["peak_bytes"]
    # one fp16 copy per fp32 input shared by its readers (yoso/utils/precision.py) keeps less for backward
    assert r["b4"]["peak_bytes"] < r["b4_unshared"]["peak_bytes"]
    assert r["b4"]["resident_bytes"] == r["b4_unshared"]["resident_bytes"]


def test_committed_calibration_rows():
    import json

    report = json.loads((mm.RESULTS.with_suffix(".json")).read_text())
    calibration = [r for r in report["rows"] if "measured_peak_bytes" in r]
    assert len(calibration) == 8
    for row in report["rows"]:
        assert set(row) >= {"name", "batch_size", "gradient_checkpointing", "teacher_latent_cache", "flags",
                            "modeled_peak_bytes"}
    for row in calibration:
        assert row["modeled_over_measured"] == round(row["modeled_peak_bytes"] / row["measured_peak_bytes"], 4)
    assert {c["card_gb"] for c in report["cards"]} == set(mm.CARDS_GB)
    # the calibration models the code measured; every other row today's step
    assert all(not r["staged_backward"] and not r["share_autocast_casts"] for r in calibration)
    assert all(r["staged_backward"] and r["share_autocast_casts"] for r in report["rows"] if r not in calibration)
    assert {(c["configuration"], c["flags"]) for c in report["cards"]} == {
        (name, mm.flag_text(flags)) for name, _, flags in mm.CARD_CONFIGS}
    # issue 19's goal on the model: batch 16, teacher on the card, the recommended memory flags, <= 0.70x the
    # authors' measured peaks (48.35 GiB without gradient checkpointing, 28.59 with it)
    rows = {r["name"]: r for r in report["rows"]}
    for gc, authors in (("off", 48.35), ("on", 28.59)):
        row = rows[f"goal-bs16-gc_{gc}-cache_off-memory_flags"]
        assert row["flags"] == mm.flag_text(mm.MEMORY_FLAGS[gc == "on"])
        assert row["modeled_peak_bytes"] <= 0.70 * authors * mm.GIB, (gc, row["modeled_peak_bytes"] / mm.GIB)
    for card in report["cards"]:
        if card["micro_batch"]:
            assert card["micro_batch"] * card["gradient_accumulation_steps"] == 256
            assert mm.fits(card["modeled_peak_bytes"], card["card_gb"], report["fit_ratio"])
    # the users' table in README and docs/performance.md is the committed one
    repo = Path(__file__).resolve().parents[1]
    table = mm.card_table(report)
    assert table in (repo / "README.md").read_text()
    assert table in (repo / "docs/performance.md").read_text()
