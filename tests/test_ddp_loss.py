"""CLIP, and binding (LanguageBind with LoRA on the frames' tower), under 2-process CPU DDP (gloo):
loss and gradients equal one process holding the global batch."""

from pathlib import Path

import pytest
import torch
from ddp_procs import run_ranks

from lit_vlm.models import CLIP, Binding
from lit_vlm.modules import AudioTransformer, ConvNet, TextTransformer, VisionTransformer

pytestmark = pytest.mark.ddp

GLOBAL_BATCH = 8


def make_model(tower: str = "vit") -> CLIP | Binding:
    torch.manual_seed(0)
    vision = VisionTransformer("tiny") if tower == "vit" else ConvNet(channels=(8, 16), strides=(2, 2), image_size=32)
    text = TextTransformer("tiny", vocab_size=50, context_length=8)
    if tower == "binding":  # audio and video (LoRA on the frozen ConvNet, whose batch-norm statistics stay fixed)
        audio = AudioTransformer(num_mel_bins=32, target_frames=32, width=32, layers=1, heads=2)
        model = Binding(vision, text, audio, embed_dim=16, anchor="text", modalities=["audio", "video"],
                        frame_tuning="lora", lora={"rank": 2})
        with torch.no_grad():  # B away from zero, so the adapters' A matrices get gradients too
            for name, p in model.named_parameters():
                if ".lora_B." in name:
                    p.normal_(std=0.1)
        return model
    return CLIP(vision, text, embed_dim=16)


def make_batch(tower: str = "vit") -> dict:
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(5, 50, (GLOBAL_BATCH, 8), generator=g)
    mask = torch.ones(GLOBAL_BATCH, 8, dtype=torch.bool)
    mask[::2, 6:] = False  # some padding
    ids[~mask] = 0
    if tower == "binding":
        return {"audio": torch.randn(GLOBAL_BATCH, 2, 1, 32, 32, generator=g),
                "video": torch.randn(GLOBAL_BATCH, 1, 2, 3, 32, 32, generator=g),
                "video_mask": torch.ones(GLOBAL_BATCH, 1, 2, dtype=torch.bool), "text_ids": ids, "text_mask": mask,
                "audio_text_ids": ids.flip(0), "audio_text_mask": mask.flip(0)}
    return {"image": torch.randn(GLOBAL_BATCH, 3, 32, 32, generator=g), "text_ids": ids, "text_mask": mask}


@pytest.mark.parametrize("tower", ["vit", "convnet", "binding"])
def test_clip_ddp_loss_and_grads_equal_global_batch(tmp_path, tower):
    # Two plain processes, one per rank (tests/ddp_worker.py), gloo through a file store in tmp_path;
    # a failing rank ends the other at once (tests/ddp_procs.py), so the suite never hangs.
    # The ConvNet's BatchNorm must use the global batch's statistics (GlobalBatchNorm2d).
    worker = str(Path(__file__).with_name("ddp_worker.py"))
    run_ranks([[worker, str(rank), "2", str(tmp_path), tower] for rank in range(2)])
    got = torch.load(tmp_path / "ddp.pt")

    model = make_model(tower).train()
    loss = model(make_batch(tower))["loss"]
    loss.backward()
    assert got["loss"].item() == pytest.approx(loss.item(), abs=1e-5)
    ref = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert set(ref) == set(got["grads"])
    for name, g in ref.items():
        assert torch.allclose(got["grads"][name], g, atol=1e-5, rtol=1e-5), name
    buffers = {n: b for n, b in model.named_buffers() if b.is_floating_point()}
    assert set(buffers) == set(got["buffers"])
    for name, b in buffers.items():  # BatchNorm running statistics: the global batch's
        assert torch.allclose(got["buffers"][name], b, atol=1e-5, rtol=1e-5), name
    # the test is meaningful: the global batch differs from what one rank sees alone
    model.zero_grad()
    half = {k: v[: GLOBAL_BATCH // 2] for k, v in make_batch(tower).items()}
    assert abs(model(half)["loss"].item() - loss.item()) > 1e-3
