"""Image decoding (every Pillow mode, EXIF, bombs) and the torchvision-free transforms."""

from __future__ import annotations

import io
import math

import numpy as np
import pytest
import torch
from PIL import Image

from lit_vlm.datamodules.transforms import (
    CLIP_MEAN,
    CLIP_STD,
    BadSample,
    CenterCrop,
    Compose,
    Normalize,
    RandomResizedCrop,
    Resize,
    ToTensor,
    decode_image,
    eval_transform,
    train_transform,
)


def encode(img: Image.Image, fmt: str, **kwargs) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kwargs)
    return buf.getvalue()


def close(a: tuple[int, ...], b: tuple[int, ...], tol: int = 6) -> bool:
    return all(abs(x - y) <= tol for x, y in zip(a, b))


# ------------------------------------------------------------------------------------ decoding


def test_decode_rgb_jpeg_and_png():
    img = Image.new("RGB", (40, 30), (10, 200, 30))
    for fmt in ("JPEG", "PNG", "WEBP"):
        out = decode_image(encode(img, fmt))
        assert out.mode == "RGB" and out.size == (40, 30)
        assert close(out.getpixel((5, 5)), (10, 200, 30))


def test_decode_greyscale_and_bilevel():
    grey = Image.new("L", (8, 8), 77)
    assert decode_image(encode(grey, "PNG")).getpixel((1, 1)) == (77, 77, 77)
    bilevel = Image.new("1", (2, 1))
    bilevel.putpixel((1, 0), 1)
    out = decode_image(encode(bilevel, "PNG"))
    assert out.mode == "RGB"
    assert [out.getpixel((i, 0)) for i in range(2)] == [(0, 0, 0), (255, 255, 255)]


def test_decode_alpha_composited_on_white():
    rgba = Image.new("RGBA", (4, 4), (0, 0, 0, 0))
    rgba.putpixel((1, 1), (255, 0, 0, 255))
    rgba.putpixel((2, 2), (0, 0, 0, 128))
    out = decode_image(encode(rgba, "PNG"))
    assert out.mode == "RGB"
    assert out.getpixel((0, 0)) == (255, 255, 255)  # fully transparent -> white, not black
    assert out.getpixel((1, 1)) == (255, 0, 0)
    assert close(out.getpixel((2, 2)), (127, 127, 127), tol=2)  # half-transparent black on white

    la = Image.new("LA", (3, 3), (0, 0))
    la.putpixel((1, 1), (40, 255))
    out = decode_image(encode(la, "PNG"))
    assert out.getpixel((0, 0)) == (255, 255, 255)
    assert out.getpixel((1, 1)) == (40, 40, 40)


def test_decode_palette_with_and_without_transparency():
    pal = Image.new("P", (4, 4), 0)
    pal.putpalette([0, 0, 0, 255, 0, 0, 0, 0, 255] + [0] * (256 * 3 - 9))
    pal.putpixel((1, 1), 1)
    pal.putpixel((2, 2), 2)
    out = decode_image(encode(pal, "PNG", transparency=0))
    assert out.getpixel((0, 0)) == (255, 255, 255)  # index 0 is transparent
    assert out.getpixel((1, 1)) == (255, 0, 0)
    assert out.getpixel((2, 2)) == (0, 0, 255)
    opaque = decode_image(encode(pal, "PNG"))
    assert opaque.getpixel((0, 0)) == (0, 0, 0)
    gif = decode_image(encode(pal, "GIF", transparency=0))
    assert gif.getpixel((0, 0)) == (255, 255, 255) and gif.getpixel((1, 1)) == (255, 0, 0)


def test_decode_cmyk_jpeg():
    cmyk = Image.new("CMYK", (16, 16), (0, 255, 255, 0))  # pure red in CMYK
    data = encode(cmyk, "JPEG")
    assert Image.open(io.BytesIO(data)).mode == "CMYK"
    out = decode_image(data)
    assert out.mode == "RGB"
    assert close(out.getpixel((8, 8)), (255, 0, 0), tol=8)


def test_decode_16_bit_png_is_scaled_down():
    arr = np.array([[0, 257 * 128, 65535]], dtype=np.uint16)
    data = encode(Image.fromarray(arr), "PNG")
    assert Image.open(io.BytesIO(data)).mode.startswith("I")
    out = decode_image(data)
    assert out.mode == "RGB"
    assert [out.getpixel((i, 0))[0] for i in range(3)] == [0, 128, 255]


def test_decode_32_bit_integer_tiff():
    img = Image.new("I", (3, 1))
    for x, v in enumerate((0, 32768, 70000)):
        img.putpixel((x, 0), v)
    out = decode_image(encode(img, "TIFF"))
    assert [out.getpixel((i, 0))[0] for i in range(3)] == [0, 128, 255]  # clipped at 16 bits


def test_decode_applies_exif_orientation():
    img = Image.new("RGB", (40, 20), (0, 0, 255))
    img.paste((255, 0, 0), (0, 0, 20, 20))  # left half red, right half blue
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display"
    out = decode_image(encode(img, "JPEG", exif=exif.tobytes()))
    assert out.size == (20, 40)
    assert close(out.getpixel((10, 5)), (255, 0, 0))  # the left half is now on top
    assert close(out.getpixel((10, 35)), (0, 0, 255))


def test_decode_bad_data_raises_bad_sample():
    with pytest.raises(BadSample) as info:
        decode_image(b"")
    assert info.value.reason == "image_decode"
    with pytest.raises(BadSample) as info:
        decode_image(np.random.default_rng(0).bytes(300))
    assert info.value.reason == "image_decode"
    truncated = encode(Image.new("RGB", (64, 64), (1, 2, 3)), "PNG")[:-40]
    with pytest.raises(BadSample) as info:
        decode_image(truncated)
    assert info.value.reason == "image_decode"


def test_decode_bomb_guard(monkeypatch):
    data = encode(Image.new("RGB", (50, 40)), "PNG")
    with pytest.raises(BadSample) as info:
        decode_image(data, max_pixels=50 * 40 - 1)
    assert info.value.reason == "image_too_large" and "50x40" in str(info.value)
    assert decode_image(data, max_pixels=50 * 40).size == (50, 40)
    assert decode_image(data, max_pixels=None).size == (50, 40)
    # Pillow's own global limit also ends up as image_too_large.
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 500)
    with pytest.raises(BadSample) as info:
        decode_image(data, max_pixels=None)
    assert info.value.reason == "image_too_large"


def test_decode_draft_downscales_big_jpegs_only_by_powers_of_two():
    data = encode(Image.new("RGB", (256, 192), (9, 9, 9)), "JPEG")
    assert decode_image(data, draft_size=64).size == (128, 96)  # both sides stay >= 64
    assert decode_image(data, draft_size=200).size == (256, 192)


def test_bad_sample_pickles():
    import pickle

    err = pickle.loads(pickle.dumps(BadSample("bad_json", "oops")))
    assert (err.reason, err.message) == ("bad_json", "oops")


# ------------------------------------------------------------------------------------ transforms


def gradient(width: int, height: int) -> Image.Image:
    arr = np.zeros((height, width, 3), dtype=np.uint8)
    arr[..., 0] = np.arange(width)[None, :] * 4  # x in red
    arr[..., 1] = np.arange(height)[:, None] * 4  # y in green
    return Image.fromarray(arr)


def test_random_resized_crop_size_and_determinism():
    img = gradient(50, 40)
    crop = RandomResizedCrop(32, scale=(0.5, 1.0))
    out = crop(img, torch.Generator().manual_seed(0))
    assert out.size == (32, 32)
    assert RandomResizedCrop((24, 16))(img).size == (16, 24)  # (height, width)
    again = crop(img, torch.Generator().manual_seed(0))
    assert np.array_equal(np.asarray(out), np.asarray(again))
    params = {crop.get_params(50, 40, torch.Generator().manual_seed(s)) for s in range(20)}
    assert len(params) > 10  # seeds matter


def test_random_resized_crop_params_respect_scale_and_ratio():
    crop = RandomResizedCrop(16, scale=(0.3, 0.6), ratio=(0.5, 2.0))
    gen = torch.Generator().manual_seed(1)
    for _ in range(200):
        top, left, h, w = crop.get_params(100, 80, gen)
        assert 0 <= top and top + h <= 80 and 0 <= left and left + w <= 100
        area = h * w / (100 * 80)
        assert 0.3 - 0.03 <= area <= 0.6 + 0.03
        assert 0.5 - 0.05 <= w / h <= 2.0 + 0.1


def test_random_resized_crop_falls_back_to_centre():
    # A 40x20 image cannot hold a square window of the full area: every attempt fails.
    crop = RandomResizedCrop(8, scale=(1.0, 1.0), ratio=(1.0, 1.0))
    assert crop.get_params(40, 20, torch.Generator().manual_seed(0)) == (0, 10, 20, 20)
    tall = RandomResizedCrop(8, scale=(1.0, 1.0), ratio=(0.75, 1.0))
    assert tall.get_params(10, 40, torch.Generator().manual_seed(0)) == (13, 0, 13, 10)


def test_resize_shorter_side():
    assert Resize(10)(Image.new("RGB", (40, 20))).size == (20, 10)
    assert Resize(10)(Image.new("RGB", (20, 45))).size == (10, 22)
    same = Image.new("RGB", (10, 30))
    assert Resize(10)(same) is same


def test_center_crop_maths():
    img = gradient(10, 7)
    assert CenterCrop.offsets(10, 7, 4, 4) == (2, 3)  # round(1.5) = 2, round(3.0) = 3
    out = np.asarray(CenterCrop(4)(img))
    assert out.shape == (4, 4, 3)
    assert out[0, 0, 0] == 3 * 4 and out[0, 0, 1] == 2 * 4  # top-left pixel is (x=3, y=2)
    padded = np.asarray(CenterCrop((9, 12))(img))  # larger than the image: zero padding
    assert padded.shape == (9, 12, 3)
    assert padded[0].sum() == 0 and padded[:, 0].sum() == 0


def test_to_tensor_normalize_compose():
    img = Image.new("RGB", (5, 4), (255, 0, 51))
    tensor = ToTensor()(img)
    assert tensor.shape == (3, 4, 5) and tensor.dtype == torch.float32
    assert torch.allclose(tensor[:, 0, 0], torch.tensor([1.0, 0.0, 0.2]))
    norm = Normalize(CLIP_MEAN, CLIP_STD)(tensor)
    expected = (torch.tensor([1.0, 0.0, 0.2]) - torch.tensor(CLIP_MEAN)) / torch.tensor(CLIP_STD)
    assert torch.allclose(norm[:, 2, 3], expected, atol=1e-6)
    pipeline = Compose([RandomResizedCrop(8), ToTensor()])
    a = pipeline(gradient(30, 20), torch.Generator().manual_seed(3))
    b = pipeline(gradient(30, 20), torch.Generator().manual_seed(3))
    assert torch.equal(a, b) and a.shape == (3, 8, 8)
    with pytest.raises(ValueError):
        Normalize((0.5, 0.5), (0.5, 0.0))


def test_train_and_eval_builders():
    img = gradient(48, 40)
    train = train_transform(32)
    out = train(img, torch.Generator().manual_seed(0))
    assert out.shape == (3, 32, 32) and out.dtype == torch.float32
    assert not any(type(t).__name__.lower().endswith("flip") for t in train.transforms)
    evaluated = eval_transform(32)(img)
    assert evaluated.shape == (3, 32, 32)
    assert torch.equal(evaluated, eval_transform(32)(img))  # deterministic
    # The white corner of a padded-free eval crop maps to (1 - mean) / std.
    white = eval_transform(16)(Image.new("RGB", (20, 16), (255, 255, 255)))
    assert math.isclose(float(white[0, 0, 0]), (1 - CLIP_MEAN[0]) / CLIP_STD[0], rel_tol=1e-5)
