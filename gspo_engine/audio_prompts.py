"""Prompts with audio for the Qwen3-Omni thinker: reading the audio, placing it in the prompt, the log-mel features.

A dataset row names its audio in the `audio` column (a path or a list of paths, relative to the dataset
file: WAV, read with scipy, or FLAC, read with soundfile when it is installed; waveforms made in memory
by the built-in audio task work too, as {"array", "sampling_rate"} like datasets' Audio feature gives).
They take the places the prompt marks for them: chat message parts `{"type": "audio"}`, or `<audio>` in a
string prompt; a prompt that marks none gets them in front of its text. Each place becomes the model's
audio start, audio pad and audio end tokens (their ids from config.json, their text from the tokenizer),
and the pad is repeated once per audio token, as the model's processor does.

The log-mel features come from the model's own feature extractor (transformers' WhisperFeatureExtractor,
read from the model folder's preprocessor_config.json); audio is mixed down to mono and resampled to its
sampling rate first. An audio longer than `data.max_audio_seconds` is an error naming it.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np

from gspo_engine.media_places import MediaError, MediaKind, expand_pads, source_path, with_places
from gspo_engine.model.audio import AudioInputs, audio_token_count
from gspo_engine.model.audio_args import AudioArgs

AUDIO_MARKER = "<audio>"  # where a string prompt puts an audio
READERS = {".wav": "scipy", ".flac": "soundfile"}


class AudioError(MediaError):
    """An audio that cannot be used, with the dataset row that names it."""


AUDIOS = MediaKind("audio", "audios", AUDIO_MARKER, "the audio needs", AudioError)


class AudioProcessing:
    """The model's feature extractor, the run's longest audio, and the audio tokens of the model's tokenizer."""

    def __init__(self, folder: str | Path, audio: AudioArgs, tokenizer, max_seconds: float | None = None):
        from transformers import AutoFeatureExtractor

        folder = Path(folder)
        if not (folder / "preprocessor_config.json").is_file():
            raise AudioError(f"{folder} has no preprocessor_config.json: the model's feature extractor is needed for "
                             "prompts with audio")
        self.extractor = AutoFeatureExtractor.from_pretrained(folder)
        self.sampling_rate = int(self.extractor.sampling_rate)
        self.audio = audio
        self.max_seconds = max_seconds
        start, pad, end = tokenizer.convert_ids_to_tokens(
            [audio.audio_start_token_id, audio.audio_token_id, audio.audio_end_token_id])
        self.place = start + pad + end  # one audio's place in a string prompt

    def open(self, source: Any, where: str, root: Path | None) -> np.ndarray:
        """The waveform `source` names (a path, or {"array", "sampling_rate"}) as mono float32 at the extractor's
        sampling rate; AudioError naming it when it cannot be read or is too long."""
        if isinstance(source, dict) and source.get("array") is not None:
            what = f"{where}: audio {source.get('path') or 'array'}"
            samples, rate = np.asarray(source["array"]), source.get("sampling_rate")
            if not isinstance(rate, (int, float)) or rate <= 0:
                raise AudioError(f"{what}: an audio array needs a positive sampling_rate, got {rate!r}")
        else:
            path = source_path(source, AUDIOS, where, root)
            what = f"{where}: audio file {path}"
            if not path.is_file():
                raise AudioError(f"{what} does not exist")
            samples, rate = _read(path, what)
        return self._prepared(samples, int(rate), what)

    def _prepared(self, samples: np.ndarray, rate: int, what: str) -> np.ndarray:
        if samples.ndim == 2:
            samples = samples.mean(axis=1)
        if samples.ndim != 1 or samples.size == 0:
            raise AudioError(f"{what} holds no audio samples")
        seconds = samples.size / rate
        if self.max_seconds is not None and seconds > self.max_seconds:
            raise AudioError(f"{what} lasts {seconds:.1f} s, longer than data.max_audio_seconds "
                             f"({self.max_seconds:g} s)")
        if np.issubdtype(samples.dtype, np.integer):
            samples = samples.astype(np.float32) / float(np.iinfo(samples.dtype).max)
        samples = samples.astype(np.float32)
        if rate != self.sampling_rate:
            resample_poly = _scipy(what, "resampling audio").signal.resample_poly
            common = math.gcd(rate, self.sampling_rate)
            samples = resample_poly(samples, self.sampling_rate // common, rate // common).astype(np.float32)
        return samples

    def inputs(self, waves: list[np.ndarray]) -> AudioInputs:
        """The log-mel features of the waveforms, from the model's feature extractor."""
        out = self.extractor(waves, sampling_rate=self.sampling_rate, padding=True, truncation=False,
                             return_attention_mask=True, return_tensors="pt")
        return AudioInputs.from_extractor(out["input_features"], out["attention_mask"])

    def token_counts(self, inputs: AudioInputs) -> list[int]:
        return [audio_token_count(int(frames), self.audio) for frames in inputs.lengths.tolist()]


def audio_sources(value: Any, where: str) -> list[Any]:
    """The `audio` column of a row as a list (one path or waveform, or a list of them)."""
    if value is None:
        return []
    if isinstance(value, (list, tuple)):
        return list(value)
    if isinstance(value, (str, dict)):
        return [value]
    raise AudioError(f"{where}: audio must be a path or a list of paths, got {type(value).__name__}")


def with_audio_places(prompt: str | list[dict], count: int, place: str, where: str) -> str | list[dict]:
    """The prompt with `count` audio places (each `place` in a string prompt): those it marks, or as many put in
    front of its text."""
    return with_places(prompt, count, place, AUDIOS, where)


def expand_audio_pads(token_ids: list[int], counts: list[int], audio: AudioArgs, where: str) -> list[int]:
    """token_ids with the i-th audio pad repeated counts[i] times (the processor's expansion)."""
    return expand_pads(token_ids, counts, audio.audio_token_id, AUDIOS, where)


def _scipy(what: str, purpose: str):
    try:
        import scipy.io.wavfile
        import scipy.signal
    except ImportError as error:
        raise AudioError(f"{what}: {purpose} needs the scipy package (pip install scipy, or the omni extra)") from error
    return scipy


def _read(path: Path, what: str) -> tuple[np.ndarray, int]:
    reader = READERS.get(path.suffix.lower())
    if reader is None:
        raise AudioError(f"{what}: unknown audio format {path.suffix.lower()!r}; use one of {', '.join(READERS)}")
    if reader == "soundfile":
        try:
            import soundfile
        except ImportError as error:
            raise AudioError(f"{what}: reading FLAC needs the soundfile package (pip install soundfile, or the omni "
                             "extra)") from error
        try:
            samples, rate = soundfile.read(str(path), dtype="float32", always_2d=False)
        except RuntimeError as error:  # libsndfile's errors for a damaged or non-FLAC file
            raise AudioError(f"{what} cannot be read as audio: {error}") from error
        return samples, rate
    wavfile = _scipy(what, "reading WAV").io.wavfile
    try:
        rate, samples = wavfile.read(path)
    except (ValueError, OSError, EOFError) as error:  # scipy's errors for a damaged or non-WAV file
        raise AudioError(f"{what} cannot be read as audio: {error}") from error
    return samples, rate
