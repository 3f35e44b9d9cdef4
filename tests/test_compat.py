"""Checkpoints written by the previous release (0.1: commit b969211) still load and compute the same.

``tests/fixtures/release-0.1/{clip,blip}-tiny.ckpt`` are the tiny configs' ``last.ckpt`` after 2
steps, as that release wrote them (optimiser and loop state dropped to keep them small);
``expected.json`` holds the image embeddings that release computed from them.
"""

import json
from pathlib import Path

import pytest
import torch
from lightning.pytorch import LightningModule

import lit_vlm.models  # noqa: F401 - the families must be importable for Lightning to rebuild them

FIXTURES = Path(__file__).parent / "fixtures" / "release-0.1"
EXPECTED = json.loads((FIXTURES / "expected.json").read_text())


@pytest.mark.parametrize("family", sorted(EXPECTED))
def test_previous_release_checkpoint_loads_and_computes_the_same(family):
    model = LightningModule.load_from_checkpoint(FIXTURES / f"{family}-tiny.ckpt", map_location="cpu", weights_only=False).eval()
    assert type(model).__name__ == EXPECTED[family]["class"]
    images = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        emb = model.encode_image(images).double()
    assert float(emb.sum()) == pytest.approx(EXPECTED[family]["encode_image_sum"], rel=1e-6, abs=1e-6)
    assert float(emb.abs().sum()) == pytest.approx(EXPECTED[family]["encode_image_abs_sum"], rel=1e-6)


def test_previous_release_blip_names_load_through_init_from_too():
    """BLIP's projections were renamed to the names every family uses (vision_proj -> image_projection);
    init_from maps the old names as load_from_checkpoint does."""
    import copy

    from lit_vlm.weights import load_init_from

    old = torch.load(FIXTURES / "blip-tiny.ckpt", map_location="cpu", weights_only=False)["state_dict"]
    assert any(k.startswith("vision_proj.") for k in old)  # the fixture really uses the old names
    model = LightningModule.load_from_checkpoint(FIXTURES / "blip-tiny.ckpt", map_location="cpu", weights_only=False)
    fresh = copy.deepcopy(model)
    with torch.no_grad():
        for p in fresh.parameters():
            p.zero_()
    load_init_from(fresh, FIXTURES / "blip-tiny.ckpt")
    for key, value in model.state_dict().items():
        torch.testing.assert_close(fresh.state_dict()[key], value, rtol=0, atol=0, msg=key)
