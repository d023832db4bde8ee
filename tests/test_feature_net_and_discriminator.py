"""F without a second UNet (item 2), the discriminator (item 3), and the gradient-checkpointing trap."""

import pytest
import torch

from yoso.method.discriminator import Discriminator
from yoso.method.lora import AdaptersDisabled, add_lora, lora_named_parameters
from yoso.testing import build_tiny_sd15
from yoso.method.unet_encoder import FeatureNet, UNetEncoder


def load_unet(path):
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel.from_pretrained(path, subfolder="unet")


def randomize_lora(unet, seed=0, std=0.2):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in lora_named_parameters(unet):
            p.copy_(torch.randn(p.shape, generator=g) * std)


def base_mid_block_output(unet, x, c):
    captured = {}
    handle = unet.mid_block.register_forward_hook(lambda m, i, o: captured.setdefault("mid", o))
    unet(x, torch.zeros(x.shape[0], dtype=torch.long), c)
    handle.remove()
    return captured["mid"]


def test_feature_net_equals_base_unet_mid_block_exactly(tiny_base):
    base = load_unet(tiny_base)
    g_unet = add_lora(load_unet(tiny_base), rank=4, alpha=8)
    randomize_lora(g_unet)
    x, c = torch.randn(3, 4, 8, 8), torch.randn(3, 7, 32)
    with torch.no_grad():
        reference = base_mid_block_output(base, x, c)
        features = FeatureNet(g_unet)(x, c)
        with_lora = UNetEncoder(g_unet)(x, torch.zeros(3, dtype=torch.long), c)
    assert torch.equal(features, reference)
    # The LoRA really is active outside F, so the equality above is not trivial.
    assert (with_lora - reference).abs().max() > 1e-3
    # ... and F leaves it enabled.
    assert all(layer.disable_adapters is False for layer in g_unet.modules() if hasattr(layer, "lora_A") and len(layer.lora_A))


def test_feature_net_gradients_reach_input_only(tiny_base):
    g_unet = add_lora(load_unet(tiny_base), rank=4, alpha=8)
    randomize_lora(g_unet)
    x = torch.randn(2, 4, 8, 8, requires_grad=True)
    FeatureNet(g_unet)(x, torch.randn(2, 7, 32)).pow(2).mean().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    assert all(p.grad is None for p in g_unet.parameters())


def test_adapters_disabled_context_restores_on_error(tiny_base):
    unet = add_lora(load_unet(tiny_base), rank=4, alpha=8)
    with pytest.raises(RuntimeError):
        with AdaptersDisabled(unet):
            raise RuntimeError("boom")
    assert all(not layer.disable_adapters for layer in unet.modules() if hasattr(layer, "lora_A") and len(layer.lora_A))


def consistency_grads(tiny_base, checkpointing, make_feature_net=FeatureNet):
    """d L_con / d pred and d L_con / d LoRA, with F on pred (graph) and on the target (no graph) as in the step."""
    from yoso.method.losses import consistency_loss

    torch.manual_seed(0)
    unet = load_unet(tiny_base)
    if checkpointing:
        unet.enable_gradient_checkpointing()
    add_lora(unet, rank=4, alpha=8)
    randomize_lora(unet)
    unet.train()
    x_t, c = torch.randn(2, 4, 8, 8), torch.randn(2, 7, 32)
    t = torch.tensor([700, 300])
    pred = unet(x_t, t, c).sample
    pred.retain_grad()
    with torch.no_grad():
        target = unet(x_t * 0.9, t - 25, c).sample
    feature_net = make_feature_net(unet)
    f_pred = feature_net(pred, c)
    with torch.no_grad():
        f_target = feature_net(target, c)
    consistency_loss(f_pred, f_target, torch.tensor([2.0, 5.0])).backward()
    return pred.grad.clone(), [p.grad.clone() for _, p in lora_named_parameters(unet)]


def test_consistency_gradient_identical_with_and_without_checkpointing(tiny_base):
    pred_grad, lora_grads = consistency_grads(tiny_base, checkpointing=False)
    pred_grad_ckpt, lora_grads_ckpt = consistency_grads(tiny_base, checkpointing=True)
    assert pred_grad.abs().sum() > 0
    torch.testing.assert_close(pred_grad_ckpt, pred_grad, atol=1e-6, rtol=1e-5)
    for a, b in zip(lora_grads, lora_grads_ckpt):
        torch.testing.assert_close(b, a, atol=1e-6, rtol=1e-5)


def test_naive_feature_net_under_checkpointing_breaks(tiny_base):
    """The trap the FeatureNet avoids: F through checkpointed blocks with the LoRA off recomputes with it on."""

    def naive_feature_net(unet):
        encoder = UNetEncoder(unet)

        def run(latents, c):
            with AdaptersDisabled(unet):  # no gradient_checkpointing_disabled here
                return encoder(latents, torch.zeros(latents.shape[0], dtype=torch.long), c)
        return run

    pred_grad, _ = consistency_grads(tiny_base, checkpointing=False)
    try:
        naive_grad, _ = consistency_grads(tiny_base, checkpointing=True, make_feature_net=naive_feature_net)
    except torch.utils.checkpoint.CheckpointError:
        return  # what torch does with peft LoRA on diffusers blocks
    # Where shapes happen to match, no error, but the gradient is wrong.
    assert not torch.allclose(naive_grad, pred_grad, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("resolution", [64, 128])
def test_discriminator_at_two_resolutions(tmp_path, resolution):
    base_path = build_tiny_sd15(tmp_path / f"sd15_{resolution}", resolution=resolution)
    unet = load_unet(base_path)
    d = Discriminator(unet, resolution)
    side = resolution // 8 // 2  # one downsampling in the tiny UNet
    assert d.feature_size == side
    assert d.pool.positional_embedding.shape == (side * side + 1, 64)
    logits = d(torch.randn(3, 4, resolution // 8, resolution // 8), torch.tensor([0, 500, 999]), torch.randn(3, 7, 32))
    assert logits.shape == (3,) and logits.dtype == torch.float32 and torch.isfinite(logits).all()
    with pytest.raises(ValueError, match="resolution"):
        d(torch.randn(1, 4, resolution // 4, resolution // 4), torch.tensor([1]), torch.randn(1, 7, 32))


def test_discriminator_has_no_decoder_and_starts_from_base_weights(tiny_base):
    unet = load_unet(tiny_base)
    d = Discriminator(unet, 64)
    names = [n for n, _ in d.named_parameters()]
    assert not any(n.startswith(("encoder.up_blocks", "encoder.conv_out", "up_blocks")) for n in names)
    encoder_half = [unet.conv_in, unet.time_embedding, unet.down_blocks, unet.mid_block]
    expected = sum(p.numel() for m in encoder_half for p in m.parameters())
    assert sum(p.numel() for p in d.encoder.parameters()) == expected
    assert torch.equal(d.encoder.mid_block.resnets[0].conv1.weight, unet.mid_block.resnets[0].conv1.weight)
    assert d.encoder.mid_block.resnets[0].conv1.weight.data_ptr() != unet.mid_block.resnets[0].conv1.weight.data_ptr()
    assert all(p.requires_grad for p in d.parameters())
    with pytest.raises(ValueError, match="before the LoRA"):
        Discriminator(add_lora(unet, rank=4), 64)
