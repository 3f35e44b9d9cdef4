"""Clips with sound: frame samplers and the log-mel front end on hand-computed cases, clips written
with PyAV and read back through the corpus, every audio container, corrupt clips counted by
reason, the synthetic world's clips and the MSR-VTT / ESC-50 converters."""

from __future__ import annotations

import io
import json
import math
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from test_interleaved import _write_tar

from lit_vlm.datamodules import media, world_clips
from lit_vlm.datamodules.media import AudioFrontEnd, FrameSampling, frame_indices
from lit_vlm.datamodules.video_audio import VideoAudioDataModule
from lit_vlm.datamodules.world_clips import encode_flac, encode_mp4

GREY = [10 + 15 * k for k in range(16)]  # frame k of a test video is this grey


def grey_video(num_frames: int, fps: int = 8, size: int = 32) -> bytes:
    frames = np.stack([np.full((size, size, 3), GREY[k], np.uint8) for k in range(num_frames)])
    return encode_mp4(frames, fps)


def tone(freq: float, seconds: float, rate: int, amplitude: float = 0.5) -> np.ndarray:
    return (amplitude * np.sin(2 * np.pi * freq * np.arange(int(seconds * rate)) / rate)).astype(np.float32)


def write_tar(path: Path, samples: list[tuple[str, dict[str, bytes]]]) -> str:
    _write_tar(path, samples)
    return str(path)


def frame_ids(video: torch.Tensor, mask: torch.Tensor) -> list[list[int | None]]:
    """[C, T, 3, H, W] normalised frames -> which grey frame each is (None: padding)."""
    from lit_vlm.datamodules.transforms import CLIP_MEAN, CLIP_STD

    pixels = video * torch.tensor(CLIP_STD)[:, None, None] + torch.tensor(CLIP_MEAN)[:, None, None]  # [C, T, 3, H, W] in 0..1
    grey = (pixels.mean(dim=(2, 3, 4)) * 255).tolist()  # [C, T]
    return [[min(range(16), key=lambda k: abs(GREY[k] - g)) if m else None for g, m in zip(row, ms)]
            for row, ms in zip(grey, mask.tolist())]


# ---- samplers -----------------------------------------------------------------------------------


def test_frame_samplers_pick_the_frames_their_definitions_say():
    uniform = FrameSampling("uniform", num_frames=4, num_clips=1)
    assert frame_indices(16, 8, uniform, False) == [[0, 5, 10, 15]]  # linspace(0, 15, 4) rounded
    # two clips: windows [0, 8) and [8, 16), linspace(0, 7, 4) = 0, 2.33, 4.67, 7 in each
    assert frame_indices(16, 8, FrameSampling("uniform", 4, 2), False) == [[0, 2, 5, 7], [8, 10, 13, 15]]
    # segment: 4 segments of 4 frames; evaluation takes each one's middle (first of the two middles)
    assert frame_indices(16, 8, FrameSampling("segment", 4, 1), False) == [[1, 5, 9, 13]]
    draws = [frame_indices(16, 8, FrameSampling("segment", 4, 1), True, torch.Generator().manual_seed(s))[0] for s in range(20)]
    assert all(4 * j <= i < 4 * j + 4 for d in draws for j, i in enumerate(d))  # one frame inside each segment
    assert len({tuple(d) for d in draws}) > 5  # at random
    # fps: 8 fps video at 2 fps -> every 4th frame, at most num_frames, within the video
    assert frame_indices(16, 8, FrameSampling("fps", 3, 1, fps=2), False) == [[0, 4, 8]]
    assert frame_indices(16, 8, FrameSampling("fps", 8, 1, fps=2), False) == [[0, 4, 8, 12]]
    assert frame_indices(3, 8, uniform, False) == [[0, 1, 2]]  # short: all of them, the rest padding
    with pytest.raises(Exception, match="fps > 0"):
        FrameSampling("fps", 4, 1).check()


def test_clips_written_with_pyav_read_back_through_the_corpus(tmp_path):
    quiet = encode_flac(tone(440, 1.0, 16000), 16000)
    frames = [(f"f{k:03d}", np.full((24, 24, 3), GREY[k], np.uint8)) for k in range(12)]
    jpgs = {}
    for k, (_, frame) in enumerate(frames):
        buf = io.BytesIO()
        from PIL import Image

        Image.fromarray(frame).save(buf, format="PNG")
        jpgs[f"{k:03d}.png"] = buf.getvalue()
    shard = write_tar(tmp_path / "clips.tar", [
        ("long", {"mp4": grey_video(16), "flac": quiet, "txt": b"a long clip"}),
        ("short", {"mp4": grey_video(3), "flac": quiet, "txt": b"a short clip"}),
        ("frames", {**jpgs, "flac": quiet, "json": json.dumps({"captions": ["frames"], "fps": 4}).encode()}),
    ])
    for method, want in (("uniform", [[0, 5, 10, 15], [0, 1, 2, None], [0, 4, 7, 11]]),
                         ("segment", [[1, 5, 9, 13], [0, 1, 2, None], [1, 4, 7, 10]])):
        dm = VideoAudioDataModule(tokenizer="synth", image_size=16, val_shards=shard, eval_batch_size=3, num_workers=0,
                                  sampling={"method": method, "num_frames": 4})
        dm.setup("validate")
        (batch,) = list(dm.val_dataloader())
        assert batch["sample_id"] == ["long", "short", "frames"]
        assert batch["video"].shape == (3, 1, 4, 3, 16, 16) and batch["audio"].shape == (3, 3, 1, 128, 204)
        assert [frame_ids(v, m)[0] for v, m in zip(batch["video"], batch["video_mask"])] == want, method
        assert batch["captions"] == [["a long clip"], ["a short clip"], ["frames"]]


# ---- audio --------------------------------------------------------------------------------------


def test_log_mel_matches_hand_computed_values():
    front = AudioFrontEnd()  # ImageBind's: 16 kHz, 128 bins, 400-sample windows every 160
    two_s = 32000
    assert media.log_mel(np.zeros(two_s), front).shape == (128, 1 + (two_s - 400) // 160) == (128, 198)
    # a constant signal is all DC: every frame is zero after its offset is removed -> log(eps) everywhere;
    # frames 198..203 are ImageBind's zero padding; both then normalised by (x - mean) / std
    clips = front.clips(np.full(two_s, 0.3, np.float32))  # [3, 1, 128, 204]
    assert clips.shape == (3, 1, 128, 204)
    assert torch.allclose(clips[..., :198], torch.tensor((math.log(np.finfo(np.float32).eps) + 4.268) / 9.138))
    assert torch.allclose(clips[..., 198:], torch.tensor(4.268 / 9.138))
    # the mel filters are librosa's HTK triangles: filter m rises from corner m to m + 1 and falls to m + 2
    mel = lambda f: 2595 * np.log10(1 + f / 700)  # noqa: E731
    corners = 700 * (10 ** (np.linspace(mel(20), mel(8000), 130) / 2595) - 1)  # Hz
    bank = media.mel_filters(16000, 512, 128, 20.0)  # [128, 257]
    freqs = np.arange(257) * 16000 / 512
    for m in (40, 100):
        lo, mid, hi = corners[m: m + 3]
        want = np.maximum(0, np.minimum((freqs - lo) / (mid - lo), (hi - freqs) / (hi - mid)))
        assert np.allclose(bank[m], want, atol=1e-5)
    # a 1 kHz tone is loudest in the filter whose centre is nearest 1 kHz
    loud = media.log_mel(tone(1000, 0.5, 16000), front).mean(axis=1)  # [128]
    assert int(loud.argmax()) in {int(np.abs(corners[1:-1] - 1000).argmin()) + d for d in (-1, 0, 1)}
    # one frame by hand: offset removed, pre-emphasis 0.97, symmetric Hann, |FFT 512|^2, filters, log
    x = np.random.default_rng(0).standard_normal(400)
    f = x - x.mean()  # the clip's mean (it is one frame)
    f = f - f.mean()
    f = np.array([f[0] - 0.97 * f[0]] + [f[i] - 0.97 * f[i - 1] for i in range(1, 400)])
    f = f * (0.5 - 0.5 * np.cos(2 * np.pi * np.arange(400) / 399))
    want = np.log(np.maximum(bank @ (np.abs(np.fft.rfft(f, 512)) ** 2), np.finfo(np.float32).eps))
    assert np.allclose(media.log_mel(x, front)[:, 0], want)


def test_audio_decodes_from_every_container_at_the_front_ends_rate(tmp_path):
    import av
    import soundfile

    def peak_hz(wave: np.ndarray) -> float:
        spectrum = np.abs(np.fft.rfft(wave))
        return float(np.argmax(spectrum) * 16000 / len(wave))

    wav = io.BytesIO()
    soundfile.write(wav, np.stack([tone(1000, 1.0, 44100)] * 2, 1), 44100, format="WAV")  # stereo, 44.1 kHz
    m4a = io.BytesIO()
    with av.open(m4a, "w", format="mp4") as out:  # AAC in an mp4 container, as video2dataset's m4a
        stream = out.add_stream("aac", rate=22050)
        samples = tone(1000, 1.0, 22050)[None]
        frame = av.AudioFrame.from_ndarray(samples, format="flt", layout="mono")
        frame.sample_rate = 22050
        for packet in stream.encode(frame):
            out.mux(packet)
        for packet in stream.encode(None):
            out.mux(packet)
    for name, data in (("wav", wav.getvalue()), ("flac", encode_flac(tone(1000, 1.0, 8000), 8000)), ("m4a", m4a.getvalue())):
        wave = media.decode_audio(data, 16000)
        assert abs(len(wave) - 16000) < 2100, name  # AAC adds its priming samples
        assert abs(peak_hz(wave) - 1000) <= 2, name
    with pytest.raises(media.DecodeError) as err:
        media.decode_audio(grey_video(4), 16000)  # an mp4 without an audio stream
    assert err.value.reason == "no_audio_stream"


def test_corrupt_clips_are_skipped_and_counted_by_reason(tmp_path):
    import av

    good, flac = grey_video(8), encode_flac(tone(440, 1.0, 16000), 16000)
    empty = io.BytesIO()
    with av.open(empty, "w", format="matroska") as out:  # a video stream without frames (beside some sound)
        video = out.add_stream("libx264", rate=8)
        video.width, video.height, video.pix_fmt = 32, 32, "yuv420p"
        sound = out.add_stream("aac", rate=16000)
        frame = av.AudioFrame.from_ndarray(np.zeros((1, 1024), np.float32), format="flt", layout="mono")
        frame.sample_rate = 16000
        for packet in [*sound.encode(frame), *sound.encode(None)]:
            out.mux(packet)
    audio_only = io.BytesIO()
    soundfile_like = encode_flac(tone(440, 1.0, 16000), 16000)
    with av.open(audio_only, "w", format="mp4") as out:
        stream = out.add_stream("aac", rate=16000)
        frame = av.AudioFrame.from_ndarray(tone(440, 0.5, 16000)[None], format="flt", layout="mono")
        frame.sample_rate = 16000
        for packet in [*stream.encode(frame), *stream.encode(None)]:
            out.mux(packet)
    shard = write_tar(tmp_path / "bad.tar", [
        ("ok", {"mp4": good, "flac": flac, "txt": b"fine"}),
        ("truncated", {"mp4": good[: len(good) // 2], "flac": flac, "txt": b"cut"}),
        ("no_frames", {"mkv": empty.getvalue(), "flac": flac, "txt": b"empty"}),
        ("silent", {"mp4": good, "flac": encode_flac(np.zeros(16000, np.float32), 16000), "txt": b"silent"}),
        ("no_audio", {"mp4": good, "txt": b"no sound"}),
        ("audio_only", {"mp4": audio_only.getvalue(), "flac": soundfile_like, "txt": b"no picture"}),
        ("short", {"mp4": good, "flac": encode_flac(tone(440, 0.1, 16000), 16000), "txt": b"brief"}),
        ("garbled", {"mp4": good, "flac": b"fLaC not really", "txt": b"noise"}),
        ("no_video", {"flac": flac, "txt": b"sound only"}),
        ("bad_json", {"mp4": good, "flac": flac, "json": b"{oops"}),
        ("ok2", {"mp4": good, "flac": flac, "txt": b"fine too"}),
    ])
    dm = VideoAudioDataModule(tokenizer="synth", image_size=16, val_shards=shard, eval_batch_size=16, num_workers=0,
                              sampling={"num_frames": 2})
    dm.setup("validate")
    batches = list(dm.val_dataloader())
    for b in batches:
        dm.on_after_batch_transfer(b, 0)
    assert [k for b in batches for k in b["sample_id"]] == ["ok", "ok2"]
    counts = {k: v for k, v in dm.skip_counts("val").items() if v}
    assert counts == {"video_decode": 1, "zero_frames": 1, "silent_audio": 1, "missing_audio": 1, "no_video_stream": 1,
                      "too_short": 1, "audio_decode": 1, "missing_video": 1, "bad_json": 1}


# ---- the synthetic world and the converters -----------------------------------------------------


def test_world_clips_stream_with_their_labels_and_classes(tmp_path):
    root = tmp_path / "clips"
    dm = VideoAudioDataModule(tokenizer="synth", image_size=32, root=str(root), batch_size=4, eval_batch_size=6,
                              num_workers=0, sampling={"num_frames": 4}, audio_front_end={"num_clips": 1},
                              clips_config={"num_train": 8, "num_val": 6, "num_test": 2, "shard_size": 4, "image_size": 32})
    dm.prepare_data()
    dm.setup("validate")
    (batch,) = list(dm.val_dataloader())
    assert batch["video"].shape == (6, 1, 4, 3, 32, 32) and bool(batch["video_mask"].all())
    assert batch["audio"].shape == (6, 1, 1, 128, 204)
    assert dm.label_classes("label")["classnames"] == list(world_clips.ACTIONS)
    assert dm.label_classes("audio_label")["classnames"] == list(world_clips.AUDIO_CLASSES)
    records = {}
    with tarfile.open(root / "val" / "shard-000000.tar") as tar:
        for m in tar.getmembers():
            if m.name.endswith(".json"):
                records[m.name.split(".")[0]] = json.loads(tar.extractfile(m).read())
    first = records[batch["sample_id"][0]]
    assert batch["label"][0] == world_clips.ACTIONS.index(first["action"]) and batch["audio_label"][0] == first["audio_label"]
    assert batch["captions"][0] == first["captions"] and batch["audio_captions"][0] == first["audio_captions"]
    assert first["audio_captions"][0].startswith(f"the sound of {'an' if first['objects'][0]['colour'][0] in 'aeiou' else 'a'} "
                                                 f"{first['objects'][0]['colour']} {first['objects'][0]['shape']}")
    assert set(dm.eval_annotations("validate")) == {"vqa_questions", "vqa_annotations"}
    turns = first["conversations"]  # the description and the questions, the clip with the first turn
    assert len(turns) == 2 * (1 + len(first["questions"])) and turns[0]["value"].startswith("<image>\n") and sum("<image>" in t["value"] for t in turns) == 1
    assert {t["value"] for t in turns[1::2]} == {first["captions"][0], *(q["multiple_choice_answer"] for q in first["questions"])}
    # the main shape's sound is there: its fundamental is the loudest frequency of a one-shape clip
    for split, index in (("train", i) for i in range(8)):
        members, record = world_clips.make_sample(world_clips.ClipsConfig(image_size=32), split, index)
        if len(record["objects"]) == 1 and record["objects"][0]["pattern"] == "steady":
            wave = media.decode_audio(members["flac"], 16000)
            peak = np.argmax(np.abs(np.fft.rfft(wave))) * 16000 / len(wave)
            assert abs(peak - world_clips.SOUNDS[record["objects"][0]["shape"]][1]) < 3


def test_msrvtt_and_esc50_layouts_convert_into_clip_shards(tmp_path):
    from lit_vlm.datamodules.convert_clips import convert_audio, convert_videos

    videos = tmp_path / "videos"
    videos.mkdir()
    for name in ("video0", "video1"):
        (videos / f"{name}.mp4").write_bytes(grey_video(4))
    data = {"videos": [{"video_id": "video0", "split": "train"}, {"video_id": "video1", "split": "test"},
                       {"video_id": "video9", "split": "test"}],
            "sentences": [{"video_id": "video0", "caption": "a grey clip", "sen_id": 0},
                          {"video_id": "video0", "caption": "grey frames", "sen_id": 1},
                          {"video_id": "video1", "caption": "another grey clip", "sen_id": 2},
                          {"video_id": "video9", "caption": "no file", "sen_id": 3}]}
    (tmp_path / "MSRVTT_data.json").write_text(json.dumps(data))
    manifest = convert_videos(str(videos), str(tmp_path / "MSRVTT_data.json"), str(tmp_path / "msrvtt"))
    assert manifest["missing"] == 1 and {s: e["num_samples"] for s, e in manifest["splits"].items()} == {"train": 1, "test": 1}
    dm = VideoAudioDataModule(tokenizer="synth", image_size=16, root=str(tmp_path / "msrvtt"), eval_batch_size=4,
                              num_workers=0, decode=["video"], sampling={"num_frames": 2})
    dm.setup("test")
    (batch,) = list(dm.test_dataloader())
    assert batch["captions"] == [["another grey clip"]] and batch["video"].shape == (1, 1, 2, 3, 16, 16)

    clips = tmp_path / "audio"
    clips.mkdir()
    rows = ["filename,fold,target,category,esc10,src_file,take"]
    for n, (fold, target, category) in enumerate([(1, 0, "dog"), (5, 1, "church_bells"), (5, 0, "dog"), (2, 1, "church_bells")]):
        name = f"{fold}-{n}-A-{target}.wav"
        if n != 3:
            import soundfile

            soundfile.write(clips / name, tone(300 + 100 * target, 1.0, 44100), 44100)
        rows.append(f"{name},{fold},{target},{category},False,{n},A")
    (tmp_path / "esc50.csv").write_text("\n".join(rows) + "\n")
    manifest = convert_audio(str(clips), str(tmp_path / "esc50.csv"), str(tmp_path / "esc50"))
    assert manifest["missing"] == 1 and manifest["classes"]["audio_label"]["classnames"] == ["dog", "church bells"]
    dm = VideoAudioDataModule(tokenizer="synth", image_size=16, root=str(tmp_path / "esc50"), eval_batch_size=4,
                              num_workers=0, decode=["audio"])
    dm.setup("test")
    (batch,) = list(dm.test_dataloader())
    assert batch["audio_label"].tolist() == [1, 0] and "video" not in batch and batch["audio"].shape[:2] == (2, 3)
    assert dm.label_classes("audio_label")["classnames"] == ["dog", "church bells"]


# ---- binding (ImageBind / LanguageBind) ---------------------------------------------------------


def _binding(anchor: str = "image", modalities=("audio",), **kwargs):
    from lit_vlm.models import Binding
    from lit_vlm.modules import AudioTransformer, ConvNet, TextTransformer

    torch.manual_seed(0)
    return Binding(ConvNet(channels=[8, 16], strides=[2, 2], convs_per_stage=1, image_size=32),
                   TextTransformer(preset="tiny", vocab_size=50, context_length=8), embed_dim=16, anchor=anchor,
                   modalities=list(modalities),
                   audio=AudioTransformer(num_mel_bins=32, target_frames=48, width=32, layers=1, heads=2), **kwargs)


def test_binding_embeddings_follow_their_definitions():
    model = _binding("text", ("audio", "video")).eval()
    audio = torch.randn(2, 1, 1, 32, 48)
    # several clips: each embedded, the mean re-normalised; two copies of a clip give the clip's embedding
    assert torch.allclose(model.encode_audio(audio.repeat(1, 2, 1, 1, 1)), model.encode_audio(audio), atol=1e-6)
    two = torch.randn(2, 2, 1, 32, 48)
    each = torch.stack([model.encode_audio(two[:, i: i + 1]) for i in range(2)], 1)  # [2, 2, E]
    assert torch.allclose(model.encode_audio(two), torch.nn.functional.normalize(each.mean(1), dim=-1), atol=1e-6)
    # padded frames change nothing (the temporal head masks them)
    video, mask = torch.randn(2, 1, 4, 3, 32, 32), torch.tensor([[[True, True, True, False]], [[True, True, False, False]]])
    other = video.clone()
    other[0, 0, 3], other[1, 0, 2:] = 5.0, -5.0
    assert torch.allclose(model.encode_video(video, mask), model.encode_video(other, mask), atol=1e-5)
    # ImageBind: a video is the mean of its real frames' anchor image embeddings, re-normalised
    image = _binding("image").eval()
    frames = torch.stack([image.encode_image(video[b, 0, :3 - b]).mean(0) for b in range(2)])  # [2, E]
    assert torch.allclose(image.encode_video(video, mask), torch.nn.functional.normalize(frames, dim=-1), atol=1e-5)
    # video not bound (LanguageBind on audio only): the same frame mean, so video callbacks still run
    assert torch.allclose(_binding("text", ("audio",)).eval().encode_video(video, mask), image.encode_video(video, mask))


def test_binding_trains_only_the_bound_towers():
    model = _binding("image")
    frozen = {k: v.clone() for k, v in model.state_dict().items() if k.split(".")[0] in ("vision", "text", "image_projection",
                                                                                         "text_projection")}
    assert frozen and not any(p.requires_grad for n, p in model.named_parameters() if n.split(".")[0] in
                              ("vision", "text", "image_projection", "text_projection"))
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    model.train()
    model.on_train_start()
    assert not model.vision.training  # the locked anchor stays in eval mode (batch-norm statistics kept)
    batch = {"audio": torch.randn(4, 1, 1, 32, 48), "video": torch.randn(4, 1, 2, 3, 32, 32),
             "video_mask": torch.ones(4, 1, 2, dtype=torch.bool)}
    before = model.audio_projection.weight.clone()
    terms = model(batch)
    terms["loss"].backward()
    opt.step()
    assert {"loss", "audio/loss", "audio/acc_i2t", "audio/logit_scale"} <= set(terms)
    assert not torch.equal(before, model.audio_projection.weight)
    after = model.state_dict()
    assert all(torch.equal(after[k], v) for k, v in frozen.items())
    with pytest.raises(Exception, match="anchor: text"):
        _binding("image", ("audio", "video"))


def test_frame_lora_tunes_the_video_path_and_leaves_the_anchor_as_it_was():
    plain, model = _binding("text", ("audio", "video")).eval(), _binding("text", ("audio", "video"), frame_tuning="lora",
                                                                          lora={"rank": 2, "dropout": 0.5}).eval()
    trainable = [n for n, p in model.vision.named_parameters() if p.requires_grad]
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)  # the tower itself stays frozen
    video, images = torch.randn(2, 1, 2, 3, 32, 32), torch.randn(3, 3, 32, 32)
    # B starts at zero: the adapted tower computes what the frozen one did
    assert torch.allclose(model.encode_video(video), plain.encode_video(video), atol=1e-6)
    with torch.no_grad():
        for name, p in model.vision.named_parameters():
            if ".lora_B." in name:
                p.normal_()
    assert not torch.allclose(model.encode_video(video), plain.encode_video(video), atol=1e-3)  # the video path moved,
    assert torch.allclose(model.encode_image(images), plain.encode_image(images), atol=1e-6)  # the anchor did not
    assert all(model.vision.get_parameter(n).requires_grad for n in trainable)  # still trainable after adapters_off
    model.train()
    model.on_train_start()
    modes = {n: m.training for n, m in model.vision.named_modules()}
    assert not any(t for n, t in modes.items() if "norm" in type(model.vision.get_submodule(n)).__name__.lower())
    assert [n for n, t in modes.items() if t] and all(".lora_dropout." in n for n, t in modes.items() if t)
    model.encode_video(video).sum().backward()
    assert all(model.vision.get_parameter(n).grad is not None for n in trainable)


def test_tower_lora_loads_plain_weights_into_its_base_layers(tmp_path):
    from lit_vlm.errors import UserError

    source = _binding("image")
    torch.save(source.state_dict(), tmp_path / "binding.pt")
    parts = ["vision", "text", "image_projection", "text_projection", "audio"]
    model = _binding("image", audio_tuning="lora", init_from=str(tmp_path / "binding.pt"), init_from_parts=parts)
    with torch.no_grad():
        model.audio.transformer.blocks[0].attn.qkv.base_layer.weight.zero_()
    loaded = model.load_initial_weights()
    assert "audio.transformer.blocks.0.attn.qkv.base_layer.weight" in loaded and not any(".lora_" in k for k in loaded)
    assert torch.equal(model.audio.transformer.blocks[0].attn.qkv.base_layer.weight,
                       source.audio.transformer.blocks[0].attn.qkv.weight)
    spectrogram = torch.randn(2, 1, 1, 32, 48)
    assert torch.allclose(model.encode_audio(spectrogram), source.encode_audio(spectrogram), atol=1e-6)
    assert all(".lora_" in n or not n.startswith("audio.") for n, p in model.named_parameters() if p.requires_grad)
    with pytest.raises(UserError, match="audio_tuning: lora adapts a trained audio tower"):
        _binding("image", audio_tuning="lora")  # nothing to adapt: no init_from
    with pytest.raises(UserError, match="frame_tuning: lora adapts the image tower for the video path"):
        _binding("image", frame_tuning="lora")
    with pytest.raises(UserError, match=r"unknown option\(s\) \['r'\]"):
        _binding("text", ("video",), frame_tuning="lora", lora={"r": 4})


@pytest.mark.slow
def test_binding_and_video_chat_tiny_run_through_the_cli(tmp_path):
    import subprocess
    import sys

    configs = Path(__file__).resolve().parents[1] / "configs"
    config = str(configs / "binding" / "tiny.yaml")

    def run(command, *args, config=config):
        proc = subprocess.run([sys.executable, "-m", "lit_vlm", command, "--config", config, *args], capture_output=True,
                              text=True, cwd=tmp_path, timeout=600)
        assert proc.returncode == 0, proc.stderr[-3000:]

    run("fit")
    run("test", "--ckpt_path", "best")
    results = json.loads((tmp_path / "runs/binding-tiny/version_1/results.json").read_text())
    metrics = results["metrics"]
    assert {"test/zeroshot_audio/top1", "test/retrieval_audio_text/a2t_R@1", "test/retrieval_audio_image/a2i_R@1",
            "test/retrieval_video_text/v2t_R@1", "test/zeroshot_video/top1", "test/retrieval_audio_video/a2v_R@1",
            "test/retrieval_audio_video/v2a_R@1"} <= set(metrics)
    assert results["data"]["corpus"]["decoders"]["av"] and results["data"]["corpus"]["sampling"]["num_frames"] == 2
    # the leaderboard knows each section by its callback: chance of 8 audio classes, of 6 clips with 2 audio captions each
    from lit_vlm.report.collect import load_runs
    from lit_vlm.report.leaderboard import build

    sections = {s.task: s for s in build(load_runs([str(tmp_path / "runs/binding-tiny/version_1")]), resamples=20)}
    audio_row = sections["zeroshot_audio"].groups[0].rows[0]
    assert audio_row.baselines["top1"] == pytest.approx(1 / 8)
    text_row = sections["retrieval_audio_text"].groups[0].rows[0]
    assert text_row.baselines["t2a_R@1"] == pytest.approx(1 / 6)
    assert text_row.baselines["a2t_R@1"] == pytest.approx(1 - math.comb(10, 1) / math.comb(12, 1))  # 2 of 12 texts
    # LanguageBind: audio against its captions, video against its captions, through a temporal head; LoRA on the
    # frames' tower and on the audio tower taken from the run above; checkpoints without the frozen weights
    lora = ["--model.init_args.frame_tuning", "lora", "--model.init_args.audio_tuning", "lora",
            "--model.init_args.lora", "{rank: 2}", "--model.init_args.init_from", "runs/binding-tiny",
            "--model.init_args.init_from_parts", "[vision, text, image_projection, text_projection, audio]",
            "--model.init_args.save_frozen", "false"]
    languagebind = ["--model.init_args.anchor", "text", "--model.init_args.modalities", "[audio, video]",
                    "--trainer.logger.init_args.name", "languagebind-tiny", *lora]
    run("fit", *languagebind)
    fit = json.loads((tmp_path / "runs/languagebind-tiny/version_0/fit.json").read_text())
    assert fit["global_step"] == 2 and fit["data"]["train"]["skipped"] == 0
    saved = torch.load(tmp_path / "runs/languagebind-tiny/version_0/checkpoints/last.ckpt", weights_only=True)["state_dict"]
    assert any(".lora_A." in k for k in saved) and not any(".base_layer." in k for k in saved)
    run("test", "--ckpt_path", "best", *languagebind)  # the frozen base layers read again from init_from
    assert "test/retrieval_video_text/v2t_R@1" in json.loads(
        (tmp_path / "runs/languagebind-tiny/version_1/results.json").read_text())["metrics"]
    # Video-ChatGPT on the same clips: their conversations train the projector; video QA with its prior
    from test_bridges import lm_folder

    lm_folder(tmp_path / "models/world-lm-tiny")
    chat = str(configs / "videochat" / "tiny.yaml")
    run("fit", config=chat)
    run("test", "--ckpt_path", "best", config=chat)
    fit = json.loads((tmp_path / "runs/videochat-tiny/version_0/fit.json").read_text())
    assert fit["parameters"]["trainable"] > 0 and fit["data"]["train"]["skipped"] == 0
    metrics = json.loads((tmp_path / "runs/videochat-tiny/version_1/results.json").read_text())["metrics"]
    assert {"test/vqa/overall", "test/vqa/baseline/overall", "test/vqa/question_type/direction"} <= set(metrics)


def test_video_chat_pools_frames_over_time_and_space(tmp_path):
    from test_bridges import lm_folder

    from lit_vlm.models import VideoChat
    from lit_vlm.modules import ConvNet

    torch.manual_seed(0)
    model = VideoChat(ConvNet(channels=[8, 16], strides=[2, 2], convs_per_stage=1, image_size=32), vision_layer=-1,
                      pool_grid=2, language_model=str(lm_folder(tmp_path / "lm")), train_lm="frozen").eval()
    video = torch.randn(2, 1, 3, 3, 32, 32)  # 2 clips of 3 frames
    mask = torch.tensor([[[True, True, True]], [[True, True, False]]])
    with torch.no_grad():
        tokens = model.image_tokens(video, mask)  # [2, 4 + 3, D]
        _, patches = model.vision_tokens(video.flatten(0, 2))  # [6, 4, Dv]
        patches = patches.view(2, 3, 4, -1)
        for b, n in ((0, 3), (1, 2)):  # temporal: each patch's mean over the real frames; spatial: each frame's mean
            spatial = torch.cat([patches[b, :n].mean(1), torch.zeros(3 - n, patches.shape[-1])])
            want = model.projector(torch.cat([patches[b, :n].mean(0), spatial]))
            assert torch.allclose(tokens[b], want, atol=1e-5)
    assert tokens.shape == (2, 4 + 3, model.lm.width)
