"""One fp16/bf16 copy of an fp32 input shared by the layers that read it under autocast
(yoso/utils/precision.py): the same outputs and gradients to the bit, fewer bytes kept for backward."""

import copy

import pytest
import torch

from yoso.method.discriminator import Discriminator
from yoso.method.lora import add_lora
from yoso.method.unet_encoder import FeatureNet
from yoso.testing import _unet
from yoso.utils.precision import share_autocast_casts


def saved_bytes_and_grads(model, run):
    """Run ``run(model)`` under CPU bf16 autocast; return the bytes of distinct storages autograd kept for
    backward, the output, and the gradients of every trainable parameter and of the input."""
    storages = {}

    def pack(t):
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    x = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(1), requires_grad=True)
    text = torch.randn(2, 77, 32, generator=torch.Generator().manual_seed(2))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = run(model, x, text)
    out.float().square().mean().backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad and p.grad is not None] + [x.grad]
    return sum(storages.values()), out.detach(), grads


def lora_unet():
    unet = _unet(0, 16, (32, 64), 32)
    add_lora(unet, rank=4, alpha=4)
    torch.manual_seed(3)
    for name, p in unet.named_parameters():
        if "lora_B" in name:  # B = 0 at init: give the LoRA a gradient path through A too
            torch.nn.init.normal_(p, std=0.02)
    return unet


CASES = {
    "G (LoRA UNet)": (lora_unet, lambda m, x, text: m(x, torch.tensor([10, 500]), text).sample),
    "F (LoRA off, encoder)": (lora_unet, lambda m, x, text: FeatureNet(m)(x, text)),
    "D (UNet encoder)": (lambda: Discriminator(_unet(0, 16, (32, 64), 32), 128, 8).requires_grad_(True),
                         lambda m, x, text: m(x, torch.tensor([10, 500]), text)),
}


@pytest.mark.parametrize("case", list(CASES))
def test_shared_casts_compute_the_same_and_keep_less(case):
    make, run = CASES[case]
    plain = make()
    shared = copy.deepcopy(plain)
    assert share_autocast_casts(shared) > 0
    bytes_plain, out_plain, grads_plain = saved_bytes_and_grads(plain, run)
    bytes_shared, out_shared, grads_shared = saved_bytes_and_grads(shared, run)
    assert torch.equal(out_plain, out_shared)
    assert len(grads_plain) == len(grads_shared) >= 1  # F: the input only (frozen weights)
    for a, b in zip(grads_plain, grads_shared):
        assert torch.equal(a, b)
    # CPU autocast keeps norms in bf16, so only G's LoRA layers (peft's upcast of a bf16 input) save here;
    # the fp32 norm outputs that CUDA autocast makes are tested on one attention module below
    assert bytes_shared < 0.97 * bytes_plain if case.startswith("G") else bytes_shared <= bytes_plain


def test_self_attention_keeps_one_copy_of_an_fp32_input():
    """to_q, to_k and to_v read one fp32 tensor (a norm's output under CUDA autocast): three bf16 copies
    kept for backward without sharing, one with it. With a LoRA on each, the frozen layers keep no input, the
    three lora_A do: again three copies against one."""
    from diffusers.models.attention_processor import Attention
    from peft import LoraConfig, inject_adapter_in_model

    torch.manual_seed(0)
    for lora in (False, True):
        plain = Attention(query_dim=32, heads=4, dim_head=8)
        if lora:
            plain = inject_adapter_in_model(LoraConfig(r=4, target_modules=["to_q", "to_k", "to_v"]), plain)
        shared = copy.deepcopy(plain)
        share_autocast_casts(shared)
        x = torch.randn(2, 64, 32)
        results = []
        for model in (plain, shared):
            storages = {}

            def pack(t):
                storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
                return t

            inp = x.clone().requires_grad_()
            with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
                with torch.autocast("cpu", dtype=torch.bfloat16):
                    out = model(inp * 1.0)  # a non-leaf, as a norm's output (autocast caches leaf casts)
            out.float().sum().backward()
            results.append((sum(storages.values()), out.detach(), inp.grad))
        copy_bytes = x.numel() * 2
        assert results[0][0] - results[1][0] == 2 * copy_bytes
        assert torch.equal(results[0][1], results[1][1]) and torch.equal(results[0][2], results[1][2])


def test_without_autocast_nothing_changes():
    """fp32 (no autocast): no hook touches the inputs, so nothing is saved differently."""
    plain = lora_unet()
    shared = copy.deepcopy(plain)
    share_autocast_casts(shared)
    x = torch.randn(1, 4, 16, 16)
    text = torch.randn(1, 77, 32)
    counts = []
    for model in (plain, shared):
        n = [0]
        with torch.autograd.graph.saved_tensors_hooks(lambda t: n.__setitem__(0, n[0] + 1) or t, lambda t: t):
            out = model(x, torch.tensor([10]), text).sample
        counts.append(n[0])
        out.sum().backward()
    assert counts[0] == counts[1]
    assert torch.equal(plain(x, torch.tensor([10]), text).sample, shared(x, torch.tensor([10]), text).sample)
