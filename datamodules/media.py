"""Video and audio bytes to tensors: decoding (PyAV, soundfile), frame sampling, the audio front end.

PyAV (``av``) and ``soundfile`` work beside the CPU build of torch, where torchvision and
torchaudio do not. Frame sampling and the log-mel front end are configuration
(:class:`FrameSampling`, :class:`AudioFrontEnd`). The frame default is LanguageBind's, 8 frames
evenly spaced over the video (ImageBind's: ``num_clips: 5, num_frames: 2``); the audio default is
ImageBind's: 16 kHz, 128 mel bins, 25 ms windows every 10 ms, 3 clips of 2 s, 204 frames,
normalised by mean -4.268 and std 9.138.

The log-mel spectrogram follows Kaldi's ``fbank`` as ImageBind calls it (``torchaudio.compliance.
kaldi.fbank`` with ``htk_compat``, a Hann window, no dither, no energy): frames of 400 samples
every 160 that lie wholly inside the signal, each with its DC offset removed, pre-emphasis 0.97, a
symmetric Hann window, zero-padded to 512 for the FFT; power spectrum; ``log(max(mel, eps))``. The
mel filters are librosa's (HTK mel scale, 20 Hz to Nyquist, unnormalised): triangles linear in Hz
between mel-spaced corners, where Kaldi draws them linear in mel, so the values are close to, not
equal to, ImageBind's (its normalisation constants still centre them).
"""

from __future__ import annotations

import functools
import io
import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from lit_vlm.errors import UserError

__all__ = [
    "SAMPLING_METHODS",
    "AudioFrontEnd",
    "DecodeError",
    "FrameSampling",
    "clip_starts",
    "decode_audio",
    "decode_video_frames",
    "frame_indices",
    "log_mel",
    "mel_filters",
    "probe_video",
    "versions",
]

SAMPLING_METHODS = ("uniform", "segment", "fps")


class DecodeError(Exception):
    """A stream that cannot be read; ``reason`` says how (``video_decode``, ``no_video_stream``,
    ``audio_decode``, ``no_audio_stream``)."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


def versions() -> dict[str, str]:
    """The decoders and their versions (recorded in ``results.json``)."""
    import av
    import soundfile

    return {"av": av.__version__, "ffmpeg_libavcodec": ".".join(map(str, av.library_versions.get("libavcodec", ()))),
            "soundfile": soundfile.__version__, "libsndfile": soundfile.__libsndfile_version__}


# ---- frames -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class FrameSampling:
    """Which frames of a video make a sample: ``num_clips`` consecutive windows of equal length,
    each giving ``num_frames`` frames.

    Args:
        method: ``uniform`` (evenly spaced over the window, ends included: linspace),
            ``segment`` (the window cut in ``num_frames`` equal segments: a random frame of each in
            training, the middle one in evaluation; TSN's sampling) or ``fps`` (one frame every
            ``1 / fps`` seconds from the window's start, at most ``num_frames``).
        num_frames: Frames per clip (``T``); a window with fewer frames gives all of them and
            the rest is padding (masked out).
        num_clips: Clips per video (``C``).
        fps: Frames per second for ``method: fps``.
    """

    method: str = "uniform"
    num_frames: int = 8
    num_clips: int = 1
    fps: float | None = None

    def check(self) -> None:
        if self.method not in SAMPLING_METHODS:
            raise UserError(f"frame sampling method must be one of {SAMPLING_METHODS}, got {self.method!r}")
        if self.num_frames < 1 or self.num_clips < 1:
            raise UserError(f"num_frames and num_clips must be >= 1, got {self.num_frames} and {self.num_clips}")
        if self.method == "fps" and not (self.fps and self.fps > 0):
            raise UserError(f"frame sampling method fps needs fps > 0, got {self.fps!r}")


def frame_indices(num_available: int, native_fps: float, sampling: FrameSampling, train: bool,
                  generator: torch.Generator | None = None) -> list[list[int]]:
    """The frame indices of each clip (``num_clips`` lists, each of at most ``num_frames``
    increasing indices into ``range(num_available)``)."""
    clips = []
    for c in range(sampling.num_clips):
        start = (c * num_available) // sampling.num_clips
        end = ((c + 1) * num_available) // sampling.num_clips
        n, t = end - start, sampling.num_frames
        if n <= 0:
            clips.append([min(start, num_available - 1)] if num_available else [])
        elif sampling.method == "fps":
            step = native_fps / sampling.fps  # native frames per sampled frame
            clips.append([start + int(math.floor(k * step)) for k in range(t) if math.floor(k * step) < n])
        elif n <= t:
            clips.append(list(range(start, end)))
        elif sampling.method == "uniform":
            clips.append([start + int(round(x)) for x in np.linspace(0, n - 1, t)])
        else:  # segment: t equal segments of the window
            bounds = [start + (k * n) // t for k in range(t + 1)]
            if train:
                offsets = torch.rand(t, generator=generator).tolist()
                clips.append([lo + min(int(u * (hi - lo)), hi - lo - 1) for lo, hi, u in zip(bounds, bounds[1:], offsets)])
            else:
                clips.append([(lo + hi - 1) // 2 for lo, hi in zip(bounds, bounds[1:])])
    return clips


def _open(data: bytes, what: str) -> Any:
    import av

    try:
        return av.open(io.BytesIO(data), mode="r")
    except (av.FFmpegError, OSError, ValueError) as exc:
        raise DecodeError(f"{what}_decode", f"cannot open the {what} container: {exc}") from exc


def probe_video(data: bytes) -> tuple[int, float]:
    """(frame count as the container states it, else estimated from its duration; frames per second)."""
    with _open(data, "video") as container:
        if not container.streams.video:
            raise DecodeError("no_video_stream", "the container has no video stream")
        stream = container.streams.video[0]
        fps = float(stream.average_rate or stream.guessed_rate or 0) or 25.0
        count = int(stream.frames or 0)
        if not count and stream.duration and stream.time_base:
            count = int(round(float(stream.duration * stream.time_base) * fps))
        elif not count and container.duration:
            count = int(round(container.duration / 1_000_000 * fps))
        return count, fps


def decode_video_frames(data: bytes, wanted: set[int] | None = None) -> tuple[dict[int, np.ndarray], int]:
    """Decode the video stream in order, keeping the frames whose index is in ``wanted`` (all when
    ``None``) as RGB ``[H, W, 3]`` uint8 arrays; returns them and the number of frames decoded (it
    stops after the last wanted one)."""
    import av

    kept: dict[int, np.ndarray] = {}
    count = 0
    with _open(data, "video") as container:
        if not container.streams.video:
            raise DecodeError("no_video_stream", "the container has no video stream")
        stream = container.streams.video[0]
        stream.thread_count = 1  # loader workers decode in parallel; codec threads would fight them for the cores
        last = max(wanted) if wanted else None
        try:
            for frame in container.decode(stream):
                if wanted is None or count in wanted:
                    kept[count] = frame.to_ndarray(format="rgb24")
                count += 1
                if last is not None and count > last:
                    break
        except (av.FFmpegError, OSError, ValueError) as exc:
            if not count:
                raise DecodeError("video_decode", f"the video stream does not decode: {exc}") from exc
            # a truncated stream: the frames before the damage are kept
    return kept, count


# ---- audio --------------------------------------------------------------------------------------


def decode_audio(data: bytes, sample_rate: int) -> np.ndarray:
    """Audio bytes (WAV, FLAC, OGG through soundfile; anything else, e.g. m4a or an mp4's audio
    stream, through PyAV) -> mono float32 samples in [-1, 1] at ``sample_rate`` [N] (channels
    averaged)."""
    import soundfile

    try:
        samples, rate = soundfile.read(io.BytesIO(data), dtype="float32", always_2d=True)  # [N, ch]
    except (soundfile.LibsndfileError, RuntimeError, ValueError, TypeError):
        return _decode_audio_av(data, sample_rate)
    mono = samples.mean(axis=1)  # [N]
    if rate != sample_rate and mono.size:
        import librosa

        mono = librosa.resample(mono, orig_sr=rate, target_sr=sample_rate, res_type="soxr_hq")
    return np.ascontiguousarray(mono, dtype=np.float32)


def _decode_audio_av(data: bytes, sample_rate: int) -> np.ndarray:
    import av

    with _open(data, "audio") as container:
        if not container.streams.audio:
            raise DecodeError("no_audio_stream", "the container has no audio stream")
        resampler = av.AudioResampler(format="flt", layout="mono", rate=sample_rate)
        chunks = []
        try:
            for frame in container.decode(container.streams.audio[0]):
                chunks += [f.to_ndarray().reshape(-1) for f in resampler.resample(frame)]
            chunks += [f.to_ndarray().reshape(-1) for f in resampler.resample(None)]
        except (av.FFmpegError, OSError, ValueError) as exc:
            if not chunks:
                raise DecodeError("audio_decode", f"the audio stream does not decode: {exc}") from exc
    return np.concatenate(chunks).astype(np.float32) if chunks else np.zeros(0, np.float32)


@dataclass(frozen=True)
class AudioFrontEnd:
    """Waveform -> normalised log-mel clips ``[A, 1, num_mel_bins, target_frames]`` (see the module
    docstring). Defaults: ImageBind's.

    Args:
        sample_rate: Audio is resampled to this rate (Hz).
        num_mel_bins: Mel filters.
        frame_length_ms: Analysis window.
        frame_shift_ms: Hop between windows.
        clip_duration: Seconds per clip.
        num_clips: Clips per sample (``A``), evenly spaced over the audio, first and last at its ends.
        target_frames: Spectrogram frames per clip: fewer are padded with zeros (after the log,
            before normalisation, as ImageBind pads), more are cut.
        mean: Normalisation: ``(log_mel - mean) / std``.
        std: See ``mean``.
        low_freq: Lowest filter edge (Hz).
    """

    sample_rate: int = 16000
    num_mel_bins: int = 128
    frame_length_ms: float = 25.0
    frame_shift_ms: float = 10.0
    clip_duration: float = 2.0
    num_clips: int = 3
    target_frames: int = 204
    mean: float = -4.268
    std: float = 9.138
    low_freq: float = 20.0

    def check(self) -> None:
        if self.sample_rate < 1000 or self.num_mel_bins < 1 or self.num_clips < 1 or self.target_frames < 1:
            raise UserError(f"audio front end: sample_rate >= 1000, num_mel_bins, num_clips and target_frames >= 1; got {self}")
        if not 0 < self.frame_shift_ms <= self.frame_length_ms or self.clip_duration <= 0 or self.std <= 0:
            raise UserError(f"audio front end: 0 < frame_shift_ms <= frame_length_ms, clip_duration > 0, std > 0; got {self}")

    @property
    def window(self) -> int:
        return int(self.sample_rate * self.frame_length_ms / 1000)

    @property
    def hop(self) -> int:
        return int(self.sample_rate * self.frame_shift_ms / 1000)

    def clips(self, waveform: np.ndarray) -> torch.Tensor:
        """Mono samples [N] -> ``[num_clips, 1, num_mel_bins, target_frames]``."""
        span = int(round(self.clip_duration * self.sample_rate))
        out = []
        for start in clip_starts(len(waveform), span, self.num_clips):
            mel = log_mel(waveform[start: start + span], self)  # [M, F]
            frames = mel.shape[1]
            if frames < self.target_frames:
                mel = np.pad(mel, ((0, 0), (0, self.target_frames - frames)))
            out.append(torch.from_numpy((mel[:, : self.target_frames] - self.mean) / self.std))
        return torch.stack(out).unsqueeze(1).float()  # [A, 1, M, F]


def clip_starts(num_samples: int, span: int, num_clips: int) -> list[int]:
    """Start of each of ``num_clips`` windows of ``span`` samples, evenly spaced so the first starts
    at 0 and the last ends at the end (all at 0 when the audio is shorter than one window)."""
    last = max(num_samples - span, 0)
    if num_clips == 1:
        return [last // 2]
    return [int(round(x)) for x in np.linspace(0, last, num_clips)]


@functools.lru_cache(maxsize=8)
def mel_filters(sample_rate: int, n_fft: int, num_mel_bins: int, low_freq: float) -> np.ndarray:
    """librosa's mel filter bank [M, n_fft // 2 + 1] (HTK mel scale, unnormalised triangles)."""
    import warnings

    from librosa.filters import mel

    with warnings.catch_warnings():  # with 128 bins at 16 kHz the lowest triangles fall between FFT bins, as in Kaldi's
        warnings.filterwarnings("ignore", message="Empty filters detected")
        return mel(sr=sample_rate, n_fft=n_fft, n_mels=num_mel_bins, fmin=low_freq, fmax=sample_rate / 2,
                   htk=True, norm=None).astype(np.float64)


EPSILON = float(np.finfo(np.float32).eps)


def log_mel(waveform: np.ndarray, front: AudioFrontEnd) -> np.ndarray:
    """Mono samples [N] -> log-mel energies [num_mel_bins, F] (Kaldi's framing, see the module
    docstring); F = 1 + (N - window) // hop, 0 when N < window."""
    window, hop = front.window, front.hop
    x = np.asarray(waveform, dtype=np.float64)
    x = x - x.mean() if x.size else x  # ImageBind removes the clip's mean first
    frames = 1 + (len(x) - window) // hop if len(x) >= window else 0
    if frames == 0:
        return np.zeros((front.num_mel_bins, 0))
    idx = np.arange(window)[None, :] + hop * np.arange(frames)[:, None]  # [F, W]
    chunk = x[idx]  # [F, W]
    chunk = chunk - chunk.mean(axis=1, keepdims=True)  # DC offset of each frame
    chunk = np.concatenate([chunk[:, :1] * (1 - 0.97), chunk[:, 1:] - 0.97 * chunk[:, :-1]], axis=1)  # pre-emphasis
    chunk = chunk * np.hanning(window)[None, :]  # symmetric Hann
    n_fft = 1 << (window - 1).bit_length()
    power = np.abs(np.fft.rfft(chunk, n=n_fft, axis=1)) ** 2  # [F, n_fft // 2 + 1]
    mel = power @ mel_filters(front.sample_rate, n_fft, front.num_mel_bins, front.low_freq).T  # [F, M]
    return np.log(np.maximum(mel, EPSILON)).T  # [M, F]
