"""Streaming image-text data: shard specs, rank/worker splitting, epochs, bad input, DataModule."""

from __future__ import annotations

import io
import json
import logging
import re
import tarfile
from collections import Counter
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from PIL import Image

from lit_vlm.datamodules.image_text import IMAGE_TEXT_SKIP_REASONS, ImageTextCollator, ImageTextDataModule, ImageTextDecoder
from lit_vlm.datamodules.stream import (
    STREAM_SKIP_REASONS,
    Source,
    StreamDataset,
    StreamLoader,
    count_samples,
    expand_urls,
    make_sources,
)
from lit_vlm.datamodules.tokenizer import Tokenizer
from lit_vlm.datamodules.transforms import eval_transform, train_transform

SKIP_REASONS = STREAM_SKIP_REASONS + IMAGE_TEXT_SKIP_REASONS

try:
    from lit_vlm.datamodules import synth
except ImportError:  # pragma: no cover - synth.py is written by another engineer
    synth = None

needs_synth = pytest.mark.skipif(synth is None, reason="datamodules/synth.py not available")

WORDS = "a an the red green blue circle square star small big left right of top bottom .".split()

# ------------------------------------------------------------------------------------ shard writing


def jpeg_bytes(color: tuple[int, int, int], size: tuple[int, int] = (40, 30)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, "JPEG", quality=80)
    return buf.getvalue()


def add_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = 0
    tar.addfile(info, io.BytesIO(data))


def write_shard(path: Path, samples: list[tuple[str, dict[str, bytes]]]) -> Path:
    with tarfile.open(path, "w") as tar:
        for key, members in samples:
            for ext, data in members.items():
                add_member(tar, f"{key}.{ext}", data)
    return path


def good_sample(key: str, label: int = 0, n_captions: int = 3) -> tuple[str, dict[str, bytes]]:
    colours = ["red", "green", "blue"]
    captions = [f"a {colours[(label + i) % 3]} circle {i}" for i in range(n_captions)]
    meta = {"key": key, "label": label, "caption": captions[0], "captions": captions}
    return key, {
        "jpg": jpeg_bytes(((label * 37) % 256, 80, 160)),
        "txt": captions[0].encode(),
        "json": json.dumps(meta).encode(),
    }


def write_shards(directory: Path, sizes: list[int], prefix: str = "s") -> tuple[list[str], list[str]]:
    """Shards ``shard-000000.tar``...; returns (paths, all keys in order)."""
    directory.mkdir(parents=True, exist_ok=True)
    paths, keys = [], []
    for shard, size in enumerate(sizes):
        samples = [good_sample(f"{prefix}{shard:02d}_{i:04d}", label=i % 5) for i in range(size)]
        paths.append(str(write_shard(directory / f"shard-{shard:06d}.tar", samples)))
        keys += [k for k, _ in samples]
    return paths, keys


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    return Tokenizer.from_words(WORDS + [str(i) for i in range(10)])


@pytest.fixture(scope="module")
def tokenizer_file(tmp_path_factory, tokenizer) -> str:
    path = tmp_path_factory.mktemp("tok") / "tokenizer.json"
    tokenizer.save(path)
    return str(path)


def make_dataset(
    sources: list[Source],
    tokenizer: Tokenizer,
    *,
    train: bool,
    rank: int = 0,
    world_size: int = 1,
    num_workers: int = 0,
    batch_size: int = 4,
    **kwargs: Any,
) -> StreamDataset:
    transform = train_transform(32) if train else eval_transform(32)
    return StreamDataset(
        sources,
        decode=ImageTextDecoder(transform, train=train),
        collate=ImageTextCollator(tokenizer, 12, train=train),
        batch_size=batch_size,
        split="train" if train else "val",
        train=train,
        rank=rank,
        world_size=world_size,
        num_workers=num_workers,
        **kwargs,
    )


def iterate(dataset: StreamDataset, epoch: int | None = None) -> list[dict[str, Any]]:
    loader = StreamLoader(dataset, num_workers=dataset.num_workers, epoch_fn=None if epoch is None else (lambda: epoch))
    return list(loader)


# ------------------------------------------------------------------------------------ shard specs


def test_expand_urls(tmp_path, caplog):
    paths, _ = write_shards(tmp_path / "d", [2, 2, 2])
    pattern = str(tmp_path / "d" / "shard-{000000..000002}.tar")
    assert expand_urls(pattern) == paths
    assert expand_urls([paths[0], paths[2]]) == [paths[0], paths[2]]
    assert expand_urls(f"{paths[1]}::{paths[0]}") == [paths[1], paths[0]]
    assert expand_urls(str(tmp_path / "d" / "*.tar")) == paths
    assert expand_urls(str(tmp_path / "d")) == paths
    assert expand_urls("file://" + paths[0]) == [paths[0]]
    remote = expand_urls("pipe:curl -s https://example.invalid/shard-{0..2}.tar")
    assert remote == [f"pipe:curl -s https://example.invalid/shard-{i}.tar" for i in range(3)]
    assert expand_urls("https://host/x-{00..01}.tar") == ["https://host/x-00.tar", "https://host/x-01.tar"]
    with caplog.at_level(logging.WARNING, logger="lit_vlm.data"):
        partial = expand_urls(str(tmp_path / "d" / "shard-{000000..000004}.tar"))
    assert partial == paths and "do not exist" in caplog.text
    missing = str(tmp_path / "nowhere" / "shard-{000000..000009}.tar")
    with pytest.raises(FileNotFoundError, match="nowhere"):
        expand_urls(missing)


def test_count_samples_from_img2dataset_stats(tmp_path):
    paths, _ = write_shards(tmp_path, [3, 2])
    assert count_samples(paths) is None
    for path, n in zip(paths, (3, 2)):
        Path(path[: -len(".tar")] + "_stats.json").write_text(json.dumps({"successes": n, "count": n + 1}))
    assert count_samples(paths) == 5
    sources = make_sources([paths[0], paths[1]])
    assert [s.num_samples for s in sources] == [3, 2] and [s.weight for s in sources] == [3.0, 2.0]
    assert count_samples(["pipe:cat x.tar"]) is None


# ------------------------------------------------------------------------------------ evaluation


@pytest.mark.parametrize("world_size", [1, 2, 3])
@pytest.mark.parametrize("num_workers", [0, 2])
def test_eval_every_sample_exactly_once(tmp_path, tokenizer, world_size, num_workers):
    paths, keys = write_shards(tmp_path, [7, 3, 0, 5, 1])  # uneven, one empty shard
    sources = [Source(paths[:2], num_samples=10), Source(paths[2:], num_samples=6)]
    seen: list[str] = []
    for rank in range(world_size):
        dataset = make_dataset(
            sources, tokenizer, train=False, rank=rank, world_size=world_size, num_workers=num_workers
        )
        batches = iterate(dataset)
        assert len(batches) == len(dataset)  # the advertised length is exact
        for batch in batches:
            assert batch["image"].shape[0] == len(batch["sample_id"]) <= 4
            seen += batch["sample_id"]
    assert sorted(seen) == sorted(keys) and len(seen) == len(set(seen)) == 16


@pytest.mark.parametrize("num_workers", [0, 2])
def test_eval_rank_without_samples(tmp_path, tokenizer, num_workers):
    paths, keys = write_shards(tmp_path, [2])
    seen = []
    for rank in range(3):
        dataset = make_dataset(
            [Source(paths, num_samples=2)], tokenizer, train=False, rank=rank, world_size=3, num_workers=num_workers
        )
        batches = iterate(dataset)
        assert len(batches) == len(dataset)
        if rank == 2:
            assert batches == [] and len(dataset) == 0
        seen += [k for b in batches for k in b["sample_id"]]
    assert sorted(seen) == keys


def test_eval_pipe_shard_and_unreadable_shard(tmp_path, tokenizer):
    paths, keys = write_shards(tmp_path, [3, 2])
    urls = [f"pipe:cat {paths[0]}", f"pipe:cat {tmp_path / 'gone.tar'}", paths[1]]
    dataset = make_dataset([Source(urls)], tokenizer, train=False)
    batches = iterate(dataset)
    assert sorted(k for b in batches for k in b["sample_id"]) == keys
    assert batches[-1]["data_stats"]["skipped"]["tar_error"] == 1
    with pytest.raises(TypeError):
        len(dataset)  # unknown sample count: no length


# ------------------------------------------------------------------------------------ training


@pytest.mark.parametrize("world_size", [1, 2, 3])
@pytest.mark.parametrize("num_workers", [0, 2])
def test_train_every_rank_yields_the_same_number_of_batches(tmp_path, tokenizer, world_size, num_workers):
    paths, _ = write_shards(tmp_path, [9, 3, 5, 1, 7])  # 5 uneven shards: shard split or sample split
    counts = []
    for rank in range(world_size):
        dataset = make_dataset(
            [Source(paths)],
            tokenizer,
            train=True,
            rank=rank,
            world_size=world_size,
            num_workers=num_workers,
            batch_size=2,
            epoch_samples=50,
            shuffle_buffer=4,
        )
        batches = iterate(dataset)
        assert all(b["image"].shape == (2, 3, 32, 32) for b in batches)
        counts.append(len(batches))
        assert len(batches) == len(dataset)
    workers = max(1, num_workers)
    assert counts == [max(1, 50 // (world_size * 2 * workers)) * workers] * world_size


def test_train_resampled_yields_the_same_number_of_batches(tmp_path, tokenizer):
    paths, keys = write_shards(tmp_path, [4, 1, 6])
    counts = []
    for rank in range(2):
        dataset = make_dataset(
            [Source(paths)],
            tokenizer,
            train=True,
            rank=rank,
            world_size=2,
            num_workers=2,
            batch_size=3,
            epoch_samples=48,
            resampled=True,
        )
        batches = iterate(dataset)
        counts.append(len(batches))
        assert set(k for b in batches for k in b["sample_id"]) <= set(keys)
    assert counts == [8, 8]


def test_train_epochs_differ_but_are_reproducible(tmp_path, tokenizer):
    paths, keys = write_shards(tmp_path, [6, 6, 6, 6])

    def run(epoch: int) -> tuple[list[str], torch.Tensor]:
        dataset = make_dataset(
            [Source(paths)], tokenizer, train=True, num_workers=2, batch_size=4, epoch_samples=24, shuffle_buffer=8
        )
        batches = iterate(dataset, epoch=epoch)
        assert dataset.epoch == epoch
        return [k for b in batches for k in b["sample_id"]], torch.cat([b["image"] for b in batches])

    ids0, images0 = run(0)
    ids0_again, images0_again = run(0)
    ids1, _ = run(1)
    assert ids0 == ids0_again and torch.equal(images0, images0_again)
    assert ids0 != ids1
    assert set(ids0) <= set(keys) and len(ids0) == 24
    # The shuffle buffer reads ahead into the next pass; without it one epoch is exactly one pass.
    unshuffled = make_dataset([Source(paths)], tokenizer, train=True, num_workers=2, batch_size=4, epoch_samples=24)
    assert sorted(k for b in iterate(unshuffled, epoch=3) for k in b["sample_id"]) == sorted(keys)


def test_train_sample_split_covers_every_sample(tmp_path, tokenizer):
    paths, keys = write_shards(tmp_path, [6])  # 1 shard, 2 ranks x 2 workers: split by sample
    seen = []
    for rank in range(2):
        dataset = make_dataset(
            [Source(paths)],
            tokenizer,
            train=True,
            rank=rank,
            world_size=2,
            num_workers=2,
            batch_size=1,
            epoch_samples=4,
        )
        seen += [k for b in iterate(dataset) for k in b["sample_id"]]
    assert len(seen) == 4 and len(set(seen)) == 4 and set(seen) <= set(keys)


def test_train_weighted_mixing(tmp_path, tokenizer):
    paths_a, keys_a = write_shards(tmp_path / "a", [10, 10], prefix="a")
    paths_b, _ = write_shards(tmp_path / "b", [10, 10], prefix="b")
    sources = make_sources([str(tmp_path / "a"), str(tmp_path / "b")], weights=[3.0, 1.0])
    dataset = make_dataset(sources, tokenizer, train=True, batch_size=20, epoch_samples=600)
    ids = [k for b in iterate(dataset) for k in b["sample_id"]]
    share_a = sum(k.startswith("a") for k in ids) / len(ids)
    assert len(ids) == 600 and 0.69 < share_a < 0.81


def test_train_needs_a_sample_count(tmp_path, tokenizer):
    paths, _ = write_shards(tmp_path, [2])
    with pytest.raises(ValueError, match="train_epoch_samples"):
        make_dataset([Source(paths)], tokenizer, train=True)


def test_loader_checks_worker_count(tmp_path, tokenizer):
    paths, _ = write_shards(tmp_path, [2])
    dataset = make_dataset([Source(paths, num_samples=2)], tokenizer, train=False, num_workers=2)
    with pytest.raises(ValueError, match="num_workers"):
        StreamLoader(dataset, num_workers=0)


# ------------------------------------------------------------------------------------ bad input


def write_bad_world(directory: Path, cut_member: str = "cut_003.jpg") -> tuple[list[str], list[str], dict[str, int]]:
    """One shard with every kind of bad sample between good ones, one truncated shard."""
    directory.mkdir(parents=True, exist_ok=True)
    noise = bytes(range(256)) * 4
    samples = [
        good_sample("bad_000", 0),
        ("bad_001", {"jpg": noise, "txt": b"a red circle"}),  # broken image
        good_sample("bad_002", 1),
        ("bad_003", {"jpg": b"", "txt": b"a red circle"}),  # zero-byte image
        ("bad_004", {"jpg": jpeg_bytes((1, 2, 3)), "txt": b"   \n"}),  # empty caption
        good_sample("bad_005", 2),
        ("bad_006", {"jpg": jpeg_bytes((1, 2, 3)), "txt": b"a red circle", "json": b"{not json"}),  # bad json
        ("bad_007", {"jpg": jpeg_bytes((1, 2, 3)), "json": b'{"label": 3}'}),  # no caption at all
        ("bad_008", {"txt": b"a red circle", "json": b'{"label": 1}'}),  # no image
        ("bad_009", {"jpg": jpeg_bytes((1, 2, 3), size=(120, 100)), "txt": b"a big star"}),  # too many pixels
        ("bad_010", {"jpg": jpeg_bytes((1, 2, 3)), "txt": b"a \xff\xfe circle"}),  # txt is not UTF-8
        ("bad_011", {"jpg": jpeg_bytes((1, 2, 3)), "json": b"[1, 2]", "txt": b"a circle"}),  # json not an object
        good_sample("bad_012", 3),
    ]
    write_shard(directory / "shard-000000.tar", samples)
    full = write_shard(directory / "full.tmp", [good_sample(f"cut_{i:03d}", i) for i in range(4)]).read_bytes()
    # Cut inside the data of a member of the last sample: the 3 complete samples survive.
    with tarfile.open(directory / "full.tmp") as tar:
        cut = tar.getmember(cut_member)
    (directory / "shard-000001.tar").write_bytes(full[: cut.offset_data + cut.size // 2])
    (directory / "full.tmp").unlink()
    good = ["bad_000", "bad_002", "bad_005", "bad_012", "cut_000", "cut_001", "cut_002"]
    expected = {
        **dict.fromkeys(SKIP_REASONS, 0),
        "tar_error": 1,
        "image_decode": 2,
        "image_too_large": 1,
        "missing_image": 1,
        "missing_caption": 1,
        "empty_caption": 1,
        "bad_text": 1,
        "bad_json": 2,
    }
    return [str(directory / "shard-000000.tar"), str(directory / "shard-000001.tar")], good, expected


@pytest.mark.parametrize("cut_member", ["cut_003.jpg", "cut_003.json"])
def test_training_through_bad_input(tmp_path, tokenizer_file, caplog, cut_member):
    shards, good, expected = write_bad_world(tmp_path / "bad", cut_member)
    dm = ImageTextDataModule(
        train_shards=str(tmp_path / "bad" / "shard-{000000..000001}.tar"),
        tokenizer=tokenizer_file,
        image_size=32,
        batch_size=1,
        num_workers=0,
        shuffle_buffer=0,
        max_image_pixels=100 * 100,
        train_epoch_samples=len(good) + 1,  # one pass over the data, plus the first sample of the next
    )
    ids = []
    with caplog.at_level(logging.WARNING, logger="lit_vlm.data"):
        for batch in dm.train_dataloader():
            batch = dm.on_after_batch_transfer(batch, 0)
            assert "data_stats" not in batch
            ids += batch["sample_id"]
    assert len(ids) == len(good) + 1 and sorted(ids[: len(good)]) == sorted(good)
    assert dm.skip_counts() == expected
    assert dm.skip_counts("train") == expected and dm.skip_counts("val") == dict.fromkeys(SKIP_REASONS, 0)
    assert dm.skipped_total == sum(expected.values())
    assert dm.stream_stats["train"]["samples"] == len(good) + 1
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("bad_001" in m and "image_decode" in m and "shard-000000.tar" in m for m in warnings)
    assert len(warnings) == 6  # 5 skips logged, then one "only counted" notice


def test_evaluation_through_bad_input_with_workers(tmp_path, tokenizer_file, caplog):
    shards, good, expected = write_bad_world(tmp_path / "bad")
    dm = ImageTextDataModule(
        val_shards=shards,  # a list of specs: concatenated for evaluation
        tokenizer=tokenizer_file,
        image_size=32,
        eval_batch_size=2,
        num_workers=2,
        max_image_pixels=100 * 100,
    )
    ids = []
    with caplog.at_level(logging.INFO, logger="lit_vlm.data"):
        for batch in dm.val_dataloader():
            ids += dm.on_after_batch_transfer(batch, 0)["sample_id"]
    assert sorted(ids) == sorted(good)
    assert dm.skip_counts("val") == expected
    assert dm.stream_stats["val"]["skipped"] == sum(expected.values())
    logged = [int(m) for m in re.findall(r"val: (\d+) bad samples skipped so far in this pass", caplog.text)]
    assert logged and logged[0] >= 1 and all(b >= 2 * a for a, b in zip(logged, logged[1:]))  # growing, throttled


# ------------------------------------------------------------------------------------ DataModule


def check_train_batch(batch: dict[str, Any], batch_size: int, image_size: int, context_length: int) -> None:
    assert batch["image"].shape == (batch_size, 3, image_size, image_size) and batch["image"].dtype == torch.float32
    assert batch["text_ids"].shape == (batch_size, context_length) and batch["text_ids"].dtype == torch.long
    assert batch["text_mask"].shape == (batch_size, context_length) and batch["text_mask"].dtype == torch.bool
    assert isinstance(batch["sample_id"], list) and len(batch["sample_id"]) == batch_size
    assert batch["text_mask"][:, 0].all()


def read_metadata(paths: list[str]) -> dict[str, dict[str, Any]]:
    meta = {}
    for path in paths:
        with tarfile.open(path) as tar:
            for member in tar.getmembers():
                if member.name.endswith(".json"):
                    meta[member.name[: -len(".json")]] = json.load(tar.extractfile(member))
    return meta


def check_eval_batches(dm: ImageTextDataModule, batches: list[dict[str, Any]], meta: dict[str, dict[str, Any]]) -> None:
    tok = dm.tokenizer
    for batch in batches:
        n = len(batch["sample_id"])
        assert batch["image"].shape == (n, 3, dm.image_size, dm.image_size)
        assert batch["label"].shape == (n,) and batch["label"].dtype == torch.long
        owner = batch["caption_owner"]
        assert owner.dtype == torch.long and batch["caption_ids"].shape == (owner.numel(), dm.context_length)
        assert batch["caption_mask"].dtype == torch.bool and batch["caption_mask"].shape == batch["caption_ids"].shape
        assert owner.tolist() == sorted(owner.tolist()) and set(owner.tolist()) == set(range(n))
        for row, key in enumerate(batch["sample_id"]):
            record = meta[key]
            assert int(batch["label"][row]) == record.get("label", -1)
            mine = batch["caption_ids"][owner == row]
            assert len(mine) == len(record["captions"])
            expected_ids, _ = tok.encode(record["captions"], dm.context_length)
            assert torch.equal(mine, expected_ids)
            assert torch.equal(batch["text_ids"][row], expected_ids[0])  # first caption


def test_datamodule_batch_contract_on_handmade_shards(tmp_path, tokenizer_file):
    train_paths, _ = write_shards(tmp_path / "train", [8, 8])
    val_paths, val_keys = write_shards(tmp_path / "val", [5, 2], prefix="v")
    dm = ImageTextDataModule(
        train_shards=str(tmp_path / "train"),
        val_shards=str(tmp_path / "val" / "shard-{000000..000001}.tar"),
        tokenizer=tokenizer_file,
        image_size=32,
        context_length=10,
        batch_size=4,
        eval_batch_size=3,
        num_workers=2,
        train_epoch_samples=16,
    )
    assert dm.test_dataloader() == [] and dm.predict_dataloader() == []
    train = dm.train_dataloader()
    assert isinstance(train, StreamLoader) and len(train) == 4
    batches = [dm.on_after_batch_transfer(b, 0) for b in train]
    assert len(batches) == 4
    for batch in batches:
        check_train_batch(batch, 4, 32, 10)
    val_batches = [dm.on_after_batch_transfer(b, 0) for b in dm.val_dataloader()]
    assert sorted(k for b in val_batches for k in b["sample_id"]) == sorted(val_keys)
    check_eval_batches(dm, val_batches, read_metadata(val_paths))
    assert dm.state_dict() == {"stream": {"epoch": 0}}


def test_datamodule_caption_sampling_first_and_predict_without_captions(tmp_path, tokenizer_file):
    paths, _ = write_shards(tmp_path / "t", [4])
    write_shard(tmp_path / "p.tar", [("p0", {"jpg": jpeg_bytes((0, 0, 0))}), ("p1", {"png": _png()})])
    dm = ImageTextDataModule(
        train_shards=paths,
        predict_shards=str(tmp_path / "p.tar"),
        tokenizer=tokenizer_file,
        image_size=32,
        batch_size=4,
        num_workers=0,
        caption_sampling="first",
        train_epoch_samples=4,
    )
    meta = read_metadata(paths)
    (batch,) = list(dm.train_dataloader())
    first, _ = dm.tokenizer.encode([meta[k]["captions"][0] for k in batch["sample_id"]], dm.context_length)
    assert torch.equal(batch["text_ids"], first)
    (pred,) = list(dm.predict_dataloader())
    assert pred["sample_id"] == ["p0", "p1"] and pred["caption_ids"].shape == (0, dm.context_length)
    assert pred["label"].tolist() == [-1, -1] and pred["text_mask"].sum(1).tolist() == [2, 2]


def _png() -> bytes:
    buf = io.BytesIO()
    Image.new("RGBA", (20, 20), (0, 0, 0, 0)).save(buf, "PNG")
    return buf.getvalue()


def test_datamodule_rank_from_trainer_and_epoch_fn(tmp_path, tokenizer_file):
    paths, keys = write_shards(tmp_path, [5, 4, 3])
    dm = ImageTextDataModule(
        train_shards=paths,
        val_shards=paths,
        tokenizer=tokenizer_file,
        image_size=32,
        batch_size=2,
        num_workers=0,
        train_epoch_samples=12,
        shuffle_buffer=4,
    )
    seen, orders = [], {}
    for rank in range(2):
        dm.trainer = SimpleNamespace(global_rank=rank, world_size=2, current_epoch=rank)  # stand-in for a Trainer
        seen += [k for b in dm.val_dataloader() for k in b["sample_id"]]
        orders[rank] = [k for b in dm.train_dataloader() for k in b["sample_id"]]
        assert dm.state_dict() == {"stream": {"epoch": rank}}
    assert sorted(seen) == sorted(keys)
    assert len(orders[0]) == len(orders[1]) == 6


def test_datamodule_validation_errors(tmp_path, tokenizer_file):
    paths, _ = write_shards(tmp_path / "d", [2])
    base = {"tokenizer": tokenizer_file}
    with pytest.raises(ValueError, match="caption_sampling"):
        ImageTextDataModule(train_shards=paths, caption_sampling="longest", **base)
    with pytest.raises(ValueError, match="train_weights"):
        ImageTextDataModule(train_shards=[paths[0], paths[0]], train_weights=[1.0], **base)
    with pytest.raises(ValueError, match="val_shards=.*nowhere"):
        ImageTextDataModule(val_shards=str(tmp_path / "nowhere-{0..3}.tar"), **base)
    with pytest.raises(ValueError, match="synthesize"):
        ImageTextDataModule(root=str(tmp_path / "empty"), synthesize=False, **base)
    with pytest.raises(ValueError, match="tokenizer=.*missing.json"):
        ImageTextDataModule(tokenizer=str(tmp_path / "missing.json"))
    with pytest.raises(ValueError, match="zeroshot_file"):
        ImageTextDataModule(zeroshot_file=str(tmp_path / "zs.json"), **base)
    with pytest.raises(ValueError, match="no training data"):
        ImageTextDataModule(**base).train_dataloader()
    assert ImageTextDataModule(**base).val_dataloader() == []


def test_zeroshot_file(tmp_path, tokenizer_file):
    path = tmp_path / "zs.json"
    path.write_text(json.dumps({"classnames": ["cat", "dog"], "templates": ["a photo of a {}."]}))
    dm = ImageTextDataModule(zeroshot_file=str(path), tokenizer=tokenizer_file)
    assert dm.classnames == ["cat", "dog"] and dm.templates == ["a photo of a {}."]
    assert ImageTextDataModule(tokenizer=tokenizer_file).classnames is None


# ------------------------------------------------------------------------------------ synthetic world

TINY_WORLD = {"num_train": 64, "num_val": 24, "num_test": 23, "shard_size": 16, "image_size": 32}


@needs_synth
def test_synthetic_world_end_to_end(tmp_path):
    root = tmp_path / "world"
    dm = ImageTextDataModule(
        root=str(root), synth_config=TINY_WORLD, image_size=32, batch_size=8, num_workers=2, shuffle_buffer=0
    )
    # Known before any data exists.
    assert not root.exists()
    assert dm.vocab_size == 5 + len(synth.vocabulary()) and dm.pad_id == 0
    assert dm.classnames == synth.CLASSNAMES and dm.templates == synth.TEMPLATES
    with pytest.raises(ValueError, match="synth_config has unknown fields"):
        ImageTextDataModule(root=str(root), synth_config={"num_trains": 3})
    dm.prepare_data()
    assert synth.is_generated(root)
    manifest = synth.load_manifest(root)
    dm.prepare_data()  # already there: a no-op
    assert dm.classnames == synth.CLASSNAMES and dm.templates == synth.TEMPLATES

    train = dm.train_dataloader()
    assert len(train) == 64 // (8 * 2) * 2
    batches = [dm.on_after_batch_transfer(b, 0) for b in train]
    assert len(batches) == len(train)
    for batch in batches:
        check_train_batch(batch, 8, 32, 32)
        assert not (batch["text_ids"][batch["text_mask"]] == dm.tokenizer.unk_id).any()
    assert len({k for b in batches for k in b["sample_id"]}) == 64  # 4 shards, 2 workers: one pass

    for split, loader in (("val", dm.val_dataloader()), ("test", dm.test_dataloader())):
        paths = [str(root / s) for s in manifest["splits"][split]["shards"]]
        eval_batches = [dm.on_after_batch_transfer(b, 0) for b in loader]
        ids = [k for b in eval_batches for k in b["sample_id"]]
        assert len(ids) == len(set(ids)) == manifest["splits"][split]["num_samples"]
        assert len(eval_batches) == len(loader)
        check_eval_batches(dm, eval_batches, read_metadata(paths))
    assert dm.skipped_total == 0
    with pytest.raises(ValueError, match="another synth_config"):
        ImageTextDataModule(root=str(root), synth_config={**TINY_WORLD, "num_train": 65}).prepare_data()


@needs_synth
def test_lightning_fit_and_predict(tmp_path):
    import lightning.pytorch as pl

    class Probe(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.layer = torch.nn.Linear(3, 1)
            self.train_ids: dict[int, list[str]] = {}
            self.val_ids: list[str] = []

        def training_step(self, batch, batch_idx):
            assert "data_stats" not in batch and batch["image"].shape[1:] == (3, 32, 32)
            self.train_ids.setdefault(self.current_epoch, []).extend(batch["sample_id"])
            return self.layer(batch["image"].mean((2, 3))).mean()

        def validation_step(self, batch, batch_idx):
            self.val_ids.extend(batch["sample_id"])

        def predict_step(self, batch, batch_idx):
            return batch["sample_id"]

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.01)

    root = tmp_path / "world"
    dm = ImageTextDataModule(
        root=str(root), synth_config=TINY_WORLD, image_size=32, batch_size=16, num_workers=2, shuffle_buffer=8
    )
    model = Probe()
    trainer = pl.Trainer(
        max_epochs=2,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
    )
    trainer.fit(model, datamodule=dm)
    assert [len(model.train_ids[e]) for e in (0, 1)] == [64, 64]
    assert model.train_ids[0] != model.train_ids[1]  # the epoch reached the workers
    val_counts = Counter(model.val_ids)  # validated after each of the 2 epochs
    assert len(val_counts) == 24 and set(val_counts.values()) == {2}
    assert dm.stream_stats["train"]["samples"] == 64 and dm.skipped_total == 0
    predictions = trainer.predict(model, datamodule=dm)
    assert sum(len(p) for p in predictions) == 23

    no_val = ImageTextDataModule(
        train_shards=str(root / "train"),
        tokenizer="synth",
        image_size=32,
        batch_size=16,
        num_workers=0,
        train_epoch_samples=32,
    )
    trainer = pl.Trainer(
        max_epochs=1,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(Probe(), datamodule=no_val)  # val_dataloader() == []: validation is skipped
    assert trainer.global_step == 2


# ------------------------------------------------------------------------------------ real DDP

DDP_SCRIPT = """
import json, sys
import lightning.pytorch as pl
import torch
from lit_vlm.datamodules.image_text import ImageTextDataModule

train_dir, val_dir, tokenizer, out_dir = sys.argv[1:5]


class Probe(pl.LightningModule):
    def __init__(self):
        super().__init__()
        self.layer = torch.nn.Linear(3, 1)
        self.seen = {"train": {}, "val": []}

    def training_step(self, batch, batch_idx):
        self.seen["train"].setdefault(str(self.current_epoch), []).extend(batch["sample_id"])
        return self.layer(batch["image"].mean((2, 3))).mean()

    def validation_step(self, batch, batch_idx):
        self.seen["val"].extend(batch["sample_id"])
        self.log("val/x", batch["image"].mean(), sync_dist=True, batch_size=len(batch["sample_id"]))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)


if __name__ == "__main__":
    dm = ImageTextDataModule(train_shards=train_dir, val_shards=val_dir, tokenizer=tokenizer, image_size=32,
                             batch_size=3, eval_batch_size=2, num_workers=2, shuffle_buffer=4, train_epoch_samples=40)
    model = Probe()
    trainer = pl.Trainer(accelerator="cpu", devices=2, strategy="ddp", max_epochs=2, logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         num_sanity_val_steps=0)
    trainer.fit(model, datamodule=dm)
    with open(f"{out_dir}/rank{trainer.global_rank}.json", "w") as fh:
        json.dump(model.seen, fh)
"""


@pytest.mark.ddp
def test_two_process_ddp_fit(tmp_path, tokenizer_file):
    import subprocess
    import sys

    write_shards(tmp_path / "train", [9, 2, 5])  # 3 uneven shards < 2 ranks x 2 workers: split by sample
    _, val_keys = write_shards(tmp_path / "val", [4, 3], prefix="v")
    script = tmp_path / "ddp_fit.py"
    script.write_text(DDP_SCRIPT)
    proc = subprocess.run(
        [sys.executable, str(script), str(tmp_path / "train"), str(tmp_path / "val"), tokenizer_file, str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    for epoch in ("0", "1"):
        # 40 samples / (2 ranks x 2 workers x batch 3) = 3 batches per worker, 6 per rank, on both ranks.
        assert [len(seen["train"][epoch]) for seen in ranks] == [18, 18]
    assert ranks[0]["train"]["0"] != ranks[0]["train"]["1"]
    val = Counter(k for seen in ranks for k in seen["val"])
    assert set(val) == set(val_keys) and set(val.values()) == {2}  # exactly once per validation run


# ------------------------------------------------------------------------------------ evaluation keys

EVAL_WORLD = {"num_train": 4, "num_val": 6, "num_test": 5, "shard_size": 4, "image_size": 32, "seed": 3}


@pytest.fixture(scope="module")
def eval_world(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("eval_world") / "world"
    synth.generate(root, synth.SynthConfig(**EVAL_WORLD), num_workers=1, progress=False)
    return root


def _eval_dm(**kwargs: Any) -> ImageTextDataModule:
    base = {"image_size": 32, "eval_batch_size": 4, "num_workers": 0}
    return ImageTextDataModule(**{**base, **kwargs})


@needs_synth
def test_eval_keys_on_the_synthetic_world(eval_world):
    root = eval_world
    dm = _eval_dm(root=str(root), synthesize=False)
    manifest = synth.load_manifest(root)
    for split, loader in (("val", dm.val_dataloader()), ("test", dm.test_dataloader())):
        meta = read_metadata([str(root / s) for s in manifest["splits"][split]["shards"]])
        batches = [dm.on_after_batch_transfer(b, 0) for b in loader]
        assert sum(len(b["sample_id"]) for b in batches) == EVAL_WORLD[f"num_{split}"]
        for batch in batches:
            keys = batch["sample_id"]
            assert batch["captions"] == [meta[k]["captions"] for k in keys]
            assert batch["image_id"] == [meta[k]["image_id"] for k in keys]
            expected = [(row, q) for row, k in enumerate(keys) for q in meta[k]["questions"]]
            assert batch["question"] == [q["question"] for _, q in expected]
            assert batch["question_id"] == [q["question_id"] for _, q in expected]
            owner = batch["question_owner"]
            assert owner.dtype == torch.long and owner.tolist() == [row for row, _ in expected]
            # caption_ids still encode exactly the raw captions, image after image
            every = [c for caps in batch["captions"] for c in caps]
            assert torch.equal(batch["caption_ids"], dm.tokenizer.encode(every, dm.context_length)[0])

        # The annotation files describe exactly these shards.
        files = dm.eval_annotations(split)
        assert files == {
            "captions": str(root / "annotations" / f"captions_{split}.json"),
            "vqa_questions": str(root / "annotations" / f"vqa_{split}_questions.json"),
            "vqa_annotations": str(root / "annotations" / f"vqa_{split}_annotations.json"),
            "compositional": str(root / "annotations" / f"compositional_{split}.json"),
            "pope": str(root / "annotations" / f"pope_{split}.json"),
        }
        captions = json.loads(Path(files["captions"]).read_text())
        assert sorted(im["id"] for im in captions["images"]) == sorted(m["image_id"] for m in meta.values())
        questions = json.loads(Path(files["vqa_questions"]).read_text())["questions"]
        assert sorted(q["question_id"] for q in questions) == sorted(
            q["question_id"] for m in meta.values() for q in m["questions"]
        )
    assert dm.eval_annotations("validate") == dm.eval_annotations("fit") == dm.eval_annotations("val")
    assert dm.eval_annotations("predict") == dm.eval_annotations("test")
    assert dm.skipped_total == 0


@needs_synth
def test_eval_annotations_with_explicit_shards_and_files(eval_world, tmp_path):
    root = eval_world
    captions = str(root / "annotations" / "captions_val.json")
    # Explicit shards: root's files do not describe them, so only the explicit files count.
    dm = _eval_dm(
        root=str(root), synthesize=False, val_shards=str(root / "val"), test_annotations={"captions": captions}
    )
    assert dm.eval_annotations("val") == {}
    assert dm.eval_annotations("test")["captions"] == captions  # overrides root's test file
    assert set(dm.eval_annotations("test")) == {"captions", "vqa_questions", "vqa_annotations", "compositional", "pope"}
    dm = _eval_dm(tokenizer="synth", val_shards=str(root / "val"), val_annotations={"vqa_questions": captions})
    assert dm.eval_annotations("val") == {"vqa_questions": captions} and dm.eval_annotations("test") == {}
    with pytest.raises(ValueError, match="stage must be one of"):
        dm.eval_annotations("train")
    with pytest.raises(ValueError, match=r"val_annotations has unknown keys \['caption'\]"):
        _eval_dm(val_annotations={"caption": captions})
    with pytest.raises(ValueError, match=r"test_annotations\['captions'\]=.*nowhere.json.* does not exist"):
        _eval_dm(test_annotations={"captions": str(tmp_path / "nowhere.json")})
    with pytest.raises(ValueError, match="image_root=.*is not a folder"):
        _eval_dm(image_root=str(tmp_path / "no-such-folder"))


def _meta_sample(key: str, meta: dict[str, Any] | None, *, txt: str | None = "a red circle",
                 image: bytes | None = None) -> tuple[str, dict[str, bytes]]:
    members: dict[str, bytes] = {"jpg": image if image is not None else jpeg_bytes((200, 10, 10))}
    if txt is not None:
        members["txt"] = txt.encode()
    if meta is not None:
        members["json"] = json.dumps(meta).encode()
    return key, members


def test_eval_keys_and_malformed_questions_on_handmade_shards(tmp_path, tokenizer_file):
    q = lambda qid, text: {"question_id": qid, "question": text}  # noqa: E731
    samples = [
        _meta_sample("plain", None),  # no JSON: image_id falls back to the key, no questions
        _meta_sample("named", {"image_id": "img-7", "captions": ["a blue star", "a star"]}),
        _meta_sample("asked", {"image_id": 9, "questions": [q(91, "what color is it?"), q(90, " is it red? ")]}),
        _meta_sample("vqa_only", {"image_id": 10, "questions": [q(100, "how many?")]}, txt=None),  # no caption
        _meta_sample("bad_q1", {"questions": {"question_id": 1, "question": "x"}}),  # not a list
        _meta_sample("bad_q2", {"questions": [{"question": "no id?"}]}),
        _meta_sample("bad_q3", {"questions": [q(True, "bool id?")]}),
        _meta_sample("bad_q4", {"questions": [q(4, "")]}),
        _meta_sample("bad_q5", {"questions": ["just a string"]}),
        _meta_sample("bad_q6", {"questions": [q(6, "a?"), q(6, "b?")]}),  # repeated id
        _meta_sample("bad_id", {"image_id": 1.5}),
        _meta_sample("no_text", {"image_id": 11}, txt=None),  # neither caption nor question
    ]
    write_shard(tmp_path / "shard-000000.tar", samples)
    dm = ImageTextDataModule(val_shards=str(tmp_path / "shard-000000.tar"), tokenizer=tokenizer_file,
                             image_size=32, eval_batch_size=8, num_workers=0)
    batches = [dm.on_after_batch_transfer(b, 0) for b in dm.val_dataloader()]
    (batch,) = batches
    assert batch["sample_id"] == ["plain", "named", "asked", "vqa_only"]
    assert batch["image_id"] == ["plain", "img-7", 9, 10]
    assert batch["captions"] == [["a red circle"], ["a blue star", "a star"], ["a red circle"], []]
    assert batch["question"] == ["what color is it?", "is it red?", "how many?"]
    assert batch["question_id"] == [91, 90, 100]
    assert batch["question_owner"].tolist() == [2, 2, 3] and batch["question_owner"].dtype == torch.long
    assert batch["caption_owner"].tolist() == [0, 1, 1, 2]
    counts = dm.skip_counts("val")
    assert counts["bad_json"] == 7 and counts["missing_caption"] == 1 and sum(counts.values()) == 8

    # No question anywhere: empty lists and an empty long tensor.
    dm = ImageTextDataModule(val_shards=str(tmp_path / "shard-000000.tar"), tokenizer=tokenizer_file,
                             image_size=32, eval_batch_size=2, num_workers=0)
    first = dm.on_after_batch_transfer(next(iter(dm.val_dataloader())), 0)
    assert first["question"] == [] and first["question_id"] == []
    assert first["question_owner"].shape == (0,) and first["question_owner"].dtype == torch.long

    # Training batches are unchanged; a sample without a caption is skipped there, and the
    # questions are not even looked at.
    dm = ImageTextDataModule(train_shards=str(tmp_path / "shard-000000.tar"), tokenizer=tokenizer_file,
                             image_size=32, batch_size=1, num_workers=0, shuffle_buffer=0, train_epoch_samples=11)
    train = [dm.on_after_batch_transfer(b, 0) for b in dm.train_dataloader()]
    assert all(set(b) == {"image", "sample_id", "text_ids", "text_mask"} for b in train)
    seen = [b["sample_id"][0] for b in train]
    assert "vqa_only" not in seen and "no_text" not in seen and "bad_q1" in seen
    assert len(seen) == 11 and seen[-1] == "plain"  # one pass over the 10 usable samples, then the next
    assert dm.skip_counts("train")["missing_caption"] == 2 and dm.skip_counts("train")["bad_json"] == 0


def test_samples_with_image_path(tmp_path, tokenizer_file):
    images = tmp_path / "images"
    (images / "sub").mkdir(parents=True)
    picture = jpeg_bytes((10, 120, 240))
    (images / "sub" / "a.jpg").write_bytes(picture)
    (images / "b.jpg").write_bytes(jpeg_bytes((240, 120, 10)))
    (images / "broken.jpg").write_bytes(b"not a jpeg at all")

    def path_sample(key: str, image_path: Any) -> tuple[str, dict[str, bytes]]:
        return key, {"txt": b"a blue circle", "json": json.dumps({"image_path": image_path}).encode()}

    samples = [
        path_sample("rel", "sub/a.jpg"),
        path_sample("abs", str(images / "b.jpg")),
        path_sample("gone", "sub/missing.jpg"),
        path_sample("broken", "broken.jpg"),
        path_sample("not_str", 5),
        ("packed", {"jpg": picture, "txt": b"a blue circle",
                    "json": json.dumps({"image_path": "sub/missing.jpg"}).encode()}),  # bytes win
        ("nothing", {"txt": b"a blue circle"}),
    ]
    write_shard(tmp_path / "paths.tar", samples)

    def run(**kwargs: Any) -> tuple[ImageTextDataModule, dict[str, Any]]:
        dm = ImageTextDataModule(val_shards=str(tmp_path / "paths.tar"), tokenizer=tokenizer_file, image_size=32,
                                 eval_batch_size=16, num_workers=0, **kwargs)
        return dm, dm.on_after_batch_transfer(next(iter(dm.val_dataloader())), 0)

    dm, batch = run(image_root=str(images))
    assert batch["sample_id"] == ["rel", "abs", "packed"]
    assert torch.equal(batch["image"][0], batch["image"][2])  # same JPEG from a file and from the shard
    assert not torch.equal(batch["image"][0], batch["image"][1])
    assert dm.skip_counts("val") == {**dict.fromkeys(SKIP_REASONS, 0), "missing_image": 2, "image_decode": 1,
                                     "bad_json": 1}
    dm, batch = run()  # no image_root: relative paths cannot be resolved
    assert batch["sample_id"] == ["abs", "packed"]
    assert dm.skip_counts("val")["missing_image"] == 4
