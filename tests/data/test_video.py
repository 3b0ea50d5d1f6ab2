"""Decoding, frame sampling and preprocessing on tiny videos written with PyAV.

Every test video encodes the frame index in its brightness (frame i is filled with i * step), so
the frames a reader returns can be checked against the indices it claims to have sampled.
"""

from __future__ import annotations

import json
import pickle
import random
from pathlib import Path

import av
import numpy as np
import pytest
import torch

from retrieval.data import video
from retrieval.data.video import (
    Preprocess,
    VideoReadError,
    load_clip,
    read_frames,
    sample_frame_indices,
    video_duration,
)

WIDTH, HEIGHT = 64, 48


def write_video(
    path: Path, num_frames: int, fps: int = 10, codec: str = "libx264", step: int = 8, faststart: bool = False
) -> Path:
    """Write a video whose frame i is uniformly grey with value i * step."""
    options = {"movflags": "faststart"} if faststart else {}
    with av.open(str(path), "w", options=options) as container:
        stream = container.add_stream(codec, rate=fps)
        stream.width, stream.height, stream.pix_fmt = WIDTH, HEIGHT, "yuv420p"
        for index in range(num_frames):
            pixels = np.full((HEIGHT, WIDTH, 3), index * step, np.uint8)
            for packet in stream.encode(av.VideoFrame.from_ndarray(pixels, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


def indices_from_pixels(frames: torch.Tensor, step: int = 8) -> list[int]:
    """Recover each frame's index from its brightness; lossy coding moves it by a few levels."""
    means = frames.float().mean(dim=(1, 2, 3))
    recovered = torch.round(means / step)
    assert torch.all((means - recovered * step).abs() < step / 2 - 1), means
    return recovered.long().tolist()


@pytest.fixture(scope="module")
def videos(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("videos")
    made = {
        "mp4": write_video(root / "twenty.mp4", 20),  # 20 frames at 10 fps = 2 s
        "three": write_video(root / "three.mp4", 3),
        "single": write_video(root / "single.mp4", 1),
        "long": write_video(root / "forty_seconds.mp4", 40, fps=1, step=6),
    }
    # prefer VP9 in webm (the format decord is known to stumble on); fall back to MPEG-4 part 2
    try:
        av.codec.Codec("libvpx-vp9", "w")
        made["other_codec"] = write_video(root / "twenty.webm", 20, codec="libvpx-vp9")
    except av.error.FFmpegError:
        made["other_codec"] = write_video(root / "twenty.avi", 20, codec="mpeg4")
    return made


def test_middle_sampling_takes_each_segment_middle(videos: dict[str, Path]) -> None:
    frames, info = read_frames(videos["mp4"], num_frames=4, sample="middle")
    # 20 frames in 4 segments [0-4], [5-9], [10-14], [15-19]: middles 2, 7, 12, 17
    assert info["indices"] == [2, 7, 12, 17]
    assert indices_from_pixels(frames) == [2, 7, 12, 17]
    assert frames.dtype == torch.uint8 and tuple(frames.shape) == (4, HEIGHT, WIDTH, 3)
    assert info["backend"] == "decord"
    assert info["num_frames_total"] == 20
    assert info["fps"] == pytest.approx(10.0)
    assert info["duration"] == pytest.approx(2.0)
    assert info["times"] == pytest.approx([0.2, 0.7, 1.2, 1.7], abs=1e-4)


def test_segment_indices_match_the_official_formula() -> None:
    # official: intervals = linspace(0, 100, 9).astype(int) = 0 12 25 37 50 62 75 87 100,
    # ranges (0,11) (12,24) (25,36) (37,49) (50,61) (62,74) (75,86) (87,99), middle = (a+b)//2
    assert sample_frame_indices(0, 100, 8, "middle") == [5, 18, 30, 43, 55, 68, 80, 93]


def test_short_video_repeats_frames_evenly(videos: dict[str, Path]) -> None:
    frames, info = read_frames(videos["three"], num_frames=8)
    # linspace(0, 3, 9).astype(int) = 0 0 0 1 1 1 2 2 3: empty segments collapse to their start
    assert info["indices"] == [0, 0, 0, 1, 1, 1, 2, 2]
    assert indices_from_pixels(frames) == [0, 0, 0, 1, 1, 1, 2, 2]


def test_single_frame_video_repeats_its_only_frame(videos: dict[str, Path]) -> None:
    frames, info = read_frames(videos["single"], num_frames=4)
    assert info["indices"] == [0, 0, 0, 0]
    assert tuple(frames.shape) == (4, HEIGHT, WIDTH, 3)


def test_random_sampling_stays_in_segments_and_follows_the_rng(videos: dict[str, Path]) -> None:
    seen: set[tuple[int, ...]] = set()
    for seed in range(6):
        frames, info = read_frames(videos["mp4"], num_frames=4, sample="rand", rng=random.Random(seed))
        for segment, index in enumerate(info["indices"]):
            assert 5 * segment <= index <= 5 * segment + 4
        assert indices_from_pixels(frames) == info["indices"]
        seen.add(tuple(info["indices"]))
    assert len(seen) > 1, "random sampling returned the same frames for every seed"
    again = read_frames(videos["mp4"], num_frames=4, sample="rand", rng=random.Random(3))[1]["indices"]
    first = read_frames(videos["mp4"], num_frames=4, sample="rand", rng=random.Random(3))[1]["indices"]
    assert again == first


def test_window_limits_sampling_to_its_seconds(videos: dict[str, Path]) -> None:
    frames, info = read_frames(videos["mp4"], num_frames=2, window=(0.5, 1.5))
    # 10 fps: frames [5, 15) in 2 segments [5-9], [10-14]: middles 7, 12
    assert info["indices"] == [7, 12]
    assert indices_from_pixels(frames) == [7, 12]


def test_window_end_past_the_video_is_clamped(videos: dict[str, Path]) -> None:
    _, info = read_frames(videos["mp4"], num_frames=2, window=(1.0, 9.0))
    # frames [10, 20): segments [10-14], [15-19]
    assert info["indices"] == [12, 17]


def test_window_starting_after_the_end_is_a_read_error(videos: dict[str, Path]) -> None:
    with pytest.raises(VideoReadError, match="starts after the video ends"):
        read_frames(videos["mp4"], num_frames=2, window=(5.0, 6.0))


def test_invalid_window_is_a_value_error(videos: dict[str, Path]) -> None:
    with pytest.raises(ValueError, match="start < end"):
        read_frames(videos["mp4"], window=(2.0, 1.0))


def test_max_seconds_and_first30_sample_only_the_start(videos: dict[str, Path]) -> None:
    _, info = read_frames(videos["mp4"], num_frames=2, max_seconds=1.0)
    # first second = frames [0, 10): middles of [0-4], [5-9]
    assert info["indices"] == [2, 7]
    frames, info = read_frames(videos["long"], num_frames=3, sample="uniform_first30")
    # 40 frames at 1 fps, first 30 s = frames [0, 30): middles of [0-9], [10-19], [20-29]
    assert info["indices"] == [4, 14, 24]
    assert indices_from_pixels(frames, step=6) == [4, 14, 24]


def test_other_codec_reads_with_both_backends(videos: dict[str, Path]) -> None:
    decord_frames, decord_info = read_frames(videos["other_codec"], num_frames=4, backend="decord")
    pyav_frames, pyav_info = read_frames(videos["other_codec"], num_frames=4, backend="pyav")
    assert decord_info["indices"] == pyav_info["indices"] == [2, 7, 12, 17]
    assert indices_from_pixels(decord_frames) == indices_from_pixels(pyav_frames) == [2, 7, 12, 17]
    assert pyav_info["backend"] == "pyav"
    assert pyav_info["num_frames_total"] == 20


def test_pyav_fallback_when_decord_fails(videos: dict[str, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    reference, _ = read_frames(videos["mp4"], num_frames=4)

    def broken_decord(path, choose_indices):
        raise RuntimeError("seek failed")

    monkeypatch.setattr(video, "_read_with_decord", broken_decord)
    frames, info = read_frames(videos["mp4"], num_frames=4)
    assert info["backend"] == "pyav"
    assert info["indices"] == [2, 7, 12, 17]
    assert info["times"] == pytest.approx([0.2, 0.7, 1.2, 1.7])
    # same bitstream, two FFmpeg builds: pixels agree up to colour-conversion rounding
    assert (frames.int() - reference.int()).abs().max() <= 2


def test_decord_only_backend_reports_decord_failure(
    videos: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken_decord(path, choose_indices):
        raise RuntimeError("seek failed")

    monkeypatch.setattr(video, "_read_with_decord", broken_decord)
    with pytest.raises(VideoReadError, match="decord: RuntimeError: seek failed"):
        read_frames(videos["mp4"], backend="decord")


def _zero_bytes(tmp_path: Path, videos: dict[str, Path]) -> Path:
    path = tmp_path / "empty.mp4"
    path.write_bytes(b"")
    return path


def _truncated(tmp_path: Path, videos: dict[str, Path]) -> Path:
    data = videos["mp4"].read_bytes()
    path = tmp_path / "truncated.mp4"
    path.write_bytes(data[: len(data) // 2])
    return path


def _truncated_faststart(tmp_path: Path, videos: dict[str, Path]) -> Path:
    # the index (moov) comes first, so the file opens but its frame data is cut off
    whole = write_video(tmp_path / "whole.mp4", 20, faststart=True)
    path = tmp_path / "truncated_faststart.mp4"
    path.write_bytes(whole.read_bytes()[: whole.stat().st_size // 2])
    return path


def _text_file(tmp_path: Path, videos: dict[str, Path]) -> Path:
    path = tmp_path / "notes.mp4"
    path.write_text("this is not a video\n" * 20)
    return path


def _missing(tmp_path: Path, videos: dict[str, Path]) -> Path:
    return tmp_path / "does_not_exist.mp4"


def _audio_only(tmp_path: Path, videos: dict[str, Path]) -> Path:
    path = tmp_path / "sound.wav"
    with av.open(str(path), "w") as container:
        stream = container.add_stream("pcm_s16le", rate=8000)
        samples = np.zeros((1, 800), np.int16)
        frame = av.AudioFrame.from_ndarray(samples, format="s16", layout="mono")
        frame.sample_rate = 8000
        for packet in stream.encode(frame):
            container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


@pytest.mark.parametrize(
    ("make_file", "reason"),
    [
        (_zero_bytes, "empty file"),
        (_truncated, ""),
        (_truncated_faststart, ""),
        (_text_file, ""),
        (_missing, "file not found"),
        (_audio_only, "no video stream"),
    ],
    ids=["zero-bytes", "truncated", "truncated-faststart", "text-file", "missing", "audio-only"],
)
def test_bad_files_raise_video_read_error(tmp_path: Path, videos, make_file, reason: str) -> None:
    path = make_file(tmp_path, videos)
    with pytest.raises(VideoReadError) as caught:
        read_frames(path, num_frames=4)
    assert caught.value.path == str(path)
    assert str(path) in str(caught.value)
    assert reason in caught.value.reason
    assert caught.value.reason in str(caught.value)


def test_video_read_error_survives_pickling() -> None:
    # DataLoader workers pickle exceptions to hand them to the main process
    error = pickle.loads(pickle.dumps(VideoReadError("/data/a.mp4", "empty file (0 bytes)")))
    assert (error.path, error.reason) == ("/data/a.mp4", "empty file (0 bytes)")
    assert str(error) == "cannot read video /data/a.mp4: empty file (0 bytes)"


def test_video_duration_from_metadata(videos: dict[str, Path], tmp_path: Path) -> None:
    assert video_duration(videos["mp4"]) == pytest.approx(2.0, abs=0.05)
    assert video_duration(videos["other_codec"]) == pytest.approx(2.0, abs=0.05)
    assert video_duration(videos["long"]) == pytest.approx(40.0, abs=0.05)
    with pytest.raises(VideoReadError, match="empty file"):
        video_duration(_zero_bytes(tmp_path, videos))


def test_preprocess_normalises_constant_frames_exactly() -> None:
    preprocess = Preprocess(size=32)
    frames = torch.full((2, HEIGHT, WIDTH, 3), 128, dtype=torch.uint8)
    frames[1] = 255
    out = preprocess(frames)
    assert out.dtype == torch.float32 and tuple(out.shape) == (3, 2, 32, 32)
    mean = torch.tensor(preprocess.mean)
    std = torch.tensor(preprocess.std)
    # a constant image stays constant under any resize: (v / 255 - mean) / std per channel
    torch.testing.assert_close(out[:, 0, 5, 7], (128 / 255 - mean) / std)
    torch.testing.assert_close(out[:, 1, 31, 0], (1.0 - mean) / std)


def test_preprocess_resize_matches_torchvision_on_uint8() -> None:
    functional = pytest.importorskip("torchvision.transforms.functional")
    from torchvision.transforms import InterpolationMode

    generator = torch.Generator().manual_seed(0)
    frames = torch.randint(0, 256, (2, 40, 56, 3), dtype=torch.uint8, generator=generator)
    ours = Preprocess(size=24, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))(frames)
    # the official pipeline: Resize(bicubic) on uint8 [T, C, H, W] without antialias, then / 255
    resized = functional.resize(
        frames.permute(0, 3, 1, 2), [24, 24], interpolation=InterpolationMode.BICUBIC, antialias=False
    )
    expected = (resized.float() / 255).permute(1, 0, 2, 3)
    torch.testing.assert_close(ours, expected, atol=1 / 255 + 1e-6, rtol=0)
    assert (ours - expected).abs().gt(1e-6).float().mean() < 0.01


def test_preprocess_config_round_trip_and_validation() -> None:
    preprocess = Preprocess(size=160, num_frames=16, sample="uniform_first30")
    restored = Preprocess.from_dict(json.loads(json.dumps(preprocess.to_dict())))
    assert restored == preprocess
    assert Preprocess.from_dict({}) == Preprocess()
    with pytest.raises(ValueError, match="unknown preprocess keys \\['frames'\\]"):
        Preprocess.from_dict({"frames": 8})
    with pytest.raises(ValueError, match="interpolation"):
        Preprocess(interpolation="lanczos")
    with pytest.raises(ValueError, match="sample mode"):
        Preprocess(sample="every_other")


def test_load_clip_returns_model_input(videos: dict[str, Path]) -> None:
    preprocess = Preprocess(size=16, num_frames=4)
    clip = load_clip(videos["mp4"], preprocess)
    assert tuple(clip.shape) == (3, 4, 16, 16)
    # frame 17 (brightness 136) is the last sampled one; the red channel is normalised with 0.485/0.229
    assert clip[0, 3].mean().item() == pytest.approx((136 / 255 - 0.485) / 0.229, abs=0.03)
    train_clip = load_clip(videos["mp4"], preprocess, train=True, rng=random.Random(0), window=(0.0, 1.0))
    assert tuple(train_clip.shape) == (3, 4, 16, 16)


@pytest.mark.parametrize(
    "corrupt",
    [
        lambda a: a[..., :2],  # two channels
        lambda a: a.astype(np.float32),  # not uint8
        lambda a: a[:-1],  # a frame missing
        lambda a: a[:, :0],  # no rows
        lambda a: a[0],  # not a stack of frames
        lambda a: np.concatenate([a, a[..., :1]], axis=-1),  # four channels
    ],
)
def test_malformed_decord_output_falls_back_to_pyav(videos: dict[str, Path], monkeypatch, corrupt) -> None:
    import decord

    real = decord.VideoReader.get_batch

    def get_batch(self, indices):
        return corrupt(real(self, indices).asnumpy())

    expected, _ = read_frames(videos["mp4"], num_frames=4, backend="pyav")
    monkeypatch.setattr(decord.VideoReader, "get_batch", get_batch)
    frames, info = read_frames(videos["mp4"], num_frames=4)
    assert info["backend"] == "pyav"
    assert frames.dtype == torch.uint8 and tuple(frames.shape) == (4, HEIGHT, WIDTH, 3)
    assert torch.equal(frames, expected)
    with pytest.raises(VideoReadError, match="uint8 frames"):
        read_frames(videos["mp4"], num_frames=4, backend="decord")


def test_malformed_output_of_both_decoders_is_a_read_error(videos: dict[str, Path], monkeypatch) -> None:
    real_decord, real_pyav = video._read_with_decord, video._read_with_pyav

    def grey(real):
        return lambda path, choose: (real(path, choose)[0][..., :1], *real(path, choose)[1:])

    monkeypatch.setattr(video, "_read_with_decord", grey(real_decord))
    monkeypatch.setattr(video, "_read_with_pyav", grey(real_pyav))
    with pytest.raises(VideoReadError, match=r"PyAV returned .*\(4, 48, 64, 1\).*decord returned"):
        read_frames(videos["mp4"], num_frames=4)


_FORK_CHECK = """
import os, sys, time
import av, numpy as np
from retrieval.data import video
path = sys.argv[1]
with av.open(path, "w") as c:
    s = c.add_stream("libx264", rate=8)
    s.width, s.height, s.pix_fmt = 320, 240, "yuv420p"
    for i in range(8):
        frame = np.random.default_rng(i).integers(0, 255, (240, 320, 3), dtype=np.uint8)
        for p in s.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
            c.mux(p)
    for p in s.encode():
        c.mux(p)
video.read_frames(path, 4, backend="pyav")          # the parent converts frames first
pid = os.fork()
if pid == 0:                                         # as a DataLoader worker would
    video.read_frames(path, 4, backend="pyav")
    os._exit(0)
start = time.time()
while time.time() - start < 20:
    done, status = os.waitpid(pid, os.WNOHANG)
    if done:
        print("child finished", os.waitstatus_to_exitcode(status))
        break
    time.sleep(0.1)
else:
    os.kill(pid, 9)
    os.waitpid(pid, 0)
    print("child hung")
"""


def test_a_process_forked_after_decoding_decodes(tmp_path: Path) -> None:
    """PyAV's default frame conversion (PyAV 18) keeps a pool of swscale threads that a forked child
    (a loader worker) waits on forever once the parent has converted a frame; vtr converts on one
    thread, so a child decodes after its parent did (with PyAV's default the child hangs here)."""
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[2]
    proc = subprocess.run([sys.executable, "-c", _FORK_CHECK, str(tmp_path / "v.mp4")], check=False, capture_output=True,
                          text=True, timeout=120, cwd=root, env={**__import__("os").environ, "PYTHONPATH": str(root)})
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip() == "child finished 0", proc.stdout
