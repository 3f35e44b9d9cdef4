"""Fuzz: 60 shards, most of them carrying randomly chosen bad samples and some of them broken as
files (truncated inside a member, random bytes, empty). One evaluation pass must yield exactly the
good samples and count every bad one under its reason; a training run over the same shards must
finish."""

from __future__ import annotations

import io
import random
import tarfile
from collections import Counter
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from PIL import Image

from lit_vlm.datamodules.image_text import IMAGE_TEXT_SKIP_REASONS, ImageTextDataModule
from lit_vlm.datamodules.stream import STREAM_SKIP_REASONS
from lit_vlm.datamodules.tokenizer import Tokenizer

SKIP_REASONS = STREAM_SKIP_REASONS + IMAGE_TEXT_SKIP_REASONS

WORDS = "a an the red green blue circle square star small big left right of top bottom .".split()
MAX_PIXELS = 64 * 64


def image_bytes(rng: random.Random, fmt: str = "JPEG", mode: str = "RGB", size: tuple[int, int] = (24, 20)) -> bytes:
    buf = io.BytesIO()
    if mode == "P":  # palette with a transparent entry
        img = Image.new("P", size, 1)
        img.putpalette([rng.randrange(256) for _ in range(768)])
        img.save(buf, "PNG", transparency=0)
    elif mode == "I;16":
        img = Image.new("I;16", size)
        img.putdata([rng.randrange(65536) for _ in range(size[0] * size[1])])
        img.save(buf, "PNG")
    else:
        colour = tuple(rng.randrange(256) for _ in range(len(mode)))
        Image.new(mode, size, colour).save(buf, fmt)
    return buf.getvalue()


def bomb_png(rng: random.Random) -> bytes:
    """A small PNG whose header claims 100000 x 100000 pixels (a decompression bomb)."""
    import struct
    import zlib

    data = bytearray(image_bytes(rng, "PNG", "RGB", (8, 8)))
    data[16:24] = struct.pack(">II", 100_000, 100_000)  # IHDR width, height
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))
    return bytes(data)


def caption(rng: random.Random) -> bytes:
    return " ".join(rng.choice(WORDS[3:-1]) for _ in range(rng.randint(2, 6))).encode()


# kind -> (members builder, the skip reason or None for a good sample)
def sample_kinds(rng: random.Random) -> dict:
    jpg = lambda: image_bytes(rng)  # noqa: E731
    return {
        "good": (lambda: {"jpg": jpg(), "txt": caption(rng)}, None),
        "good_json": (lambda: {"jpg": jpg(), "txt": caption(rng), "json": b'{"label": 2, "extra": [1, 2]}'}, None),
        "palette_png": (lambda: {"png": image_bytes(rng, "PNG", "P"), "txt": caption(rng)}, None),
        "cmyk_jpeg": (lambda: {"jpg": image_bytes(rng, "JPEG", "CMYK"), "txt": caption(rng)}, None),
        "png16": (lambda: {"png": image_bytes(rng, "PNG", "I;16"), "txt": caption(rng)}, None),
        "long_caption": (lambda: {"jpg": jpg(), "txt": b"a red circle " * 400}, None),  # truncated, kept
        "truncated_jpeg": (lambda: (lambda b: {"jpg": b[: len(b) // 2], "txt": caption(rng)})(jpg()), "image_decode"),
        "zero_byte_image": (lambda: {"jpg": b"", "txt": caption(rng)}, "image_decode"),
        "noise_image": (lambda: {"jpg": rng.randbytes(300), "txt": caption(rng)}, "image_decode"),
        "huge_image": (lambda: {"png": image_bytes(rng, "PNG", "RGB", (100, 90)), "txt": caption(rng)}, "image_too_large"),
        "bomb_header": (lambda: {"png": bomb_png(rng), "txt": caption(rng)}, "image_too_large"),
        "empty_caption": (lambda: {"jpg": jpg(), "txt": b""}, "empty_caption"),
        "blank_caption": (lambda: {"jpg": jpg(), "txt": b" \t\n "}, "empty_caption"),
        "not_utf8": (lambda: {"jpg": jpg(), "txt": b"a \xff\xfe red circle"}, "bad_text"),
        "malformed_json": (lambda: {"jpg": jpg(), "txt": caption(rng), "json": b'{"label": 1,'}, "bad_json"),
        "json_not_object": (lambda: {"jpg": jpg(), "txt": caption(rng), "json": b'["label"]'}, "bad_json"),
        "json_wrong_label": (lambda: {"jpg": jpg(), "txt": caption(rng), "json": b'{"label": "cat"}'}, "bad_json"),
        "json_wrong_captions": (lambda: {"jpg": jpg(), "json": b'{"captions": "a red circle"}'}, "bad_json"),
        "no_caption": (lambda: {"jpg": jpg(), "json": b'{"label": 1}'}, "missing_caption"),
        "no_image": (lambda: {"txt": caption(rng)}, "missing_image"),
    }


def add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mtime = len(data), 0
    tar.addfile(info, io.BytesIO(data))


def write_fuzz_world(directory: Path, n_shards: int = 60, per_shard: int = 6, seed: int = 0):
    """Returns (shard paths, the good keys, the expected skip counts, the number of broken shards)."""
    rng = random.Random(seed)
    kinds = sample_kinds(rng)
    names = sorted(kinds)
    directory.mkdir(parents=True, exist_ok=True)
    good: list[str] = []
    expected = Counter()
    paths = []
    broken_shards = 0
    for s in range(n_shards):
        path = directory / f"fuzz-{s:06d}.tar"
        paths.append(str(path))
        damage = rng.choices(["none", "truncate", "garbage", "empty"], weights=[8, 2, 1, 1])[0]
        if damage in ("garbage", "empty"):  # not a tar at all: nothing in it counts but the shard
            path.write_bytes(rng.randbytes(rng.randint(100, 5000)) if damage == "garbage" else b"")
            expected["tar_error"] += 1
            broken_shards += 1
            continue
        buf = io.BytesIO()
        shard_good: list[str] = []
        shard_skips: list[tuple[str, str]] = []  # (key, reason)
        with tarfile.open(fileobj=buf, mode="w") as tar:
            for i in range(per_shard):
                key = f"s{s:03d}_{i:02d}"
                kind = "good" if damage == "truncate" else rng.choice(names + ["good"] * 6 + ["duplicate"])
                if kind == "duplicate" and i > 0:  # repeat an earlier key of this shard (not adjacent)
                    earlier = f"s{s:03d}_{rng.randrange(i):02d}"
                    for ext, data in kinds["good"][0]().items():
                        add(tar, f"{earlier}.{ext}", data)
                    shard_skips.append((earlier, "duplicate_key"))
                    kind = "good"
                elif kind == "duplicate":
                    kind = "good"
                build, reason = kinds[kind]
                for ext, data in build().items():
                    add(tar, f"{key}.{ext}", data)
                (shard_good.append(key) if reason is None else shard_skips.append((key, reason)))
        data = buf.getvalue()
        if damage == "truncate":  # cut inside the data of a random member (size > 1)
            with tarfile.open(fileobj=io.BytesIO(data)) as written:  # offsets as stored
                members = [(m.name.rsplit(".", 1)[0], m) for m in written.getmembers()]
            candidates = [(k, m) for k, m in members if m.size > 1]
            key, member = rng.choice(candidates)
            cut = member.offset_data + rng.randint(1, member.size - 1)
            data = data[:cut]
            keys_in_order = list(dict.fromkeys(k for k, _ in members))
            survivors = set(keys_in_order[: keys_in_order.index(key)])
            shard_good = [k for k in shard_good if k in survivors]
            expected["tar_error"] += 1
            broken_shards += 1
        good += shard_good
        expected.update(reason for _, reason in shard_skips)
        path.write_bytes(data)
    return paths, good, {r: expected.get(r, 0) for r in SKIP_REASONS}, broken_shards


@pytest.fixture(scope="module")
def tokenizer_file(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("tok") / "tokenizer.json"
    Tokenizer.from_words(WORDS).save(path)
    return str(path)


def datamodule(tokenizer_file, **kwargs) -> ImageTextDataModule:
    return ImageTextDataModule(
        tokenizer=tokenizer_file, image_size=16, context_length=16, max_image_pixels=MAX_PIXELS, **kwargs
    )


@pytest.mark.parametrize("num_workers", [0, 2])
def test_fuzzed_shards_one_pass_counts_add_up(tmp_path, tokenizer_file, num_workers):
    paths, good, expected, broken = write_fuzz_world(tmp_path / "fuzz")
    assert len(paths) >= 50 and broken >= 5
    assert all(expected[r] > 0 for r in SKIP_REASONS)  # every reason occurs
    dm = datamodule(tokenizer_file, val_shards=paths, eval_batch_size=7, num_workers=num_workers)
    seen = []
    for batch in dm.val_dataloader():
        batch = dm.on_after_batch_transfer(batch, 0)
        assert torch.isfinite(batch["image"]).all() and batch["image"].shape[1:] == (3, 16, 16)
        seen += batch["sample_id"]
    assert sorted(seen) == sorted(good)  # every good sample once, nothing else
    assert dm.skip_counts("val") == expected
    assert dm.stream_stats["val"]["samples"] == len(good)


def test_training_over_fuzzed_shards_finishes(tmp_path, tokenizer_file):
    from lit_vlm.models import CLIP
    from lit_vlm.modules import TextTransformer, VisionTransformer

    paths, good, expected, _ = write_fuzz_world(tmp_path / "fuzz")
    pattern = str(tmp_path / "fuzz" / f"fuzz-{{000000..{len(paths) - 1:06d}}}.tar")  # one source
    dm = datamodule(tokenizer_file, train_shards=pattern, batch_size=8, num_workers=2, shuffle_buffer=16,
                    train_epoch_samples=len(good))
    model = CLIP(VisionTransformer("tiny", image_size=16, patch_size=8), TextTransformer("tiny", vocab_size=dm.vocab_size,
                 context_length=16), embed_dim=16)
    trainer = pl.Trainer(accelerator="cpu", max_epochs=1, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(model, dm)
    assert trainer.global_step == len(good) // (2 * 8) * 2
    counts = dm.skip_counts("train")
    assert sum(counts.values()) > 0 and set(counts) == set(SKIP_REASONS)
    assert torch.isfinite(torch.cat([p.flatten() for p in model.parameters()])).all()
