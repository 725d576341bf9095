"""Qwen3-Omni prompts with audio: the `audio` column, its errors, the built-in audio task and training tiny-omni."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from scipy.io import wavfile
from transformers import Qwen3OmniMoeForConditionalGeneration

from gspo_engine.audio_prompts import AudioProcessing
from gspo_engine.audio_task import generate_audio_rows
from gspo_engine.config import config_from_dict
from gspo_engine.data import DataError, PromptDataset, read_rows
from gspo_engine.hf_checkpoint import read_config
from gspo_engine.model.audio import audio_token_count
from gspo_engine.tiny import build_tiny_checkpoint
from gspo_engine.tokenizer import load_tokenizer
from gspo_engine.trainer import GSPOTrainer


@pytest.fixture(scope="module")
def tiny_omni(tmp_path_factory):
    return build_tiny_checkpoint("tiny-omni", tmp_path_factory.mktemp("tiny-omni") / "tiny-omni")


def save_wav(path, seconds: float, rate: int = 16000, channels: int = 1):
    """A 440 Hz tone as 16-bit PCM."""
    t = np.arange(int(seconds * rate)) / rate
    wave = (0.3 * np.sin(2 * np.pi * 440 * t) * 32767).astype(np.int16)
    wavfile.write(path, rate, np.stack([wave] * channels, axis=1) if channels > 1 else wave)
    return path


def test_dataset_rows_with_audio(tiny_omni, tmp_path):
    tokenizer = load_tokenizer(tiny_omni)
    args = read_config(tiny_omni)
    processing = AudioProcessing(tiny_omni, args.audio, tokenizer, max_seconds=5)
    (tmp_path / "sounds").mkdir()
    save_wav(tmp_path / "sounds" / "a.wav", 0.5)
    save_wav(tmp_path / "sounds" / "b.wav", 1.3, rate=8000, channels=2)  # resampled to 16 kHz and mixed to mono
    rows = [
        {"prompt": "<pitch>=", "audio": "sounds/a.wav", "answer": "1"},
        {"prompt": "<audio>1<audio>=", "audio": ["sounds/a.wav", "sounds/b.wav"], "answer": "2"},
        {"prompt": "<copy>12=", "answer": "12"},
    ]
    data = tmp_path / "prompts.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in rows))
    dataset = PromptDataset.from_rows(read_rows(data), tokenizer, audio=processing, image_root=tmp_path)
    pad = args.audio.audio_token_id
    first, second, third = dataset.examples
    # 100 mel frames per second; a chunk of 50 frames gives 7 tokens, 130 frames 13 + 4.
    assert audio_token_count(50, args.audio) == 7 and audio_token_count(130, args.audio) == 17
    assert first.token_ids.count(pad) == 7 and second.token_ids.count(pad) == 7 + 17 and pad not in third.token_ids
    assert first.token_ids[0] == args.audio.audio_start_token_id and len(second.audio) == 2
    assert "audio" not in first.columns and first.columns["answer"] == "1"
    assert second.token_ids.index(tokenizer.convert_tokens_to_ids("1")) == 1 + 7 + 1
    features = processing.inputs([processing.open(source, "x", None) for source in second.audio])
    assert features.lengths.tolist() == [50, 130] and features.features.shape == (args.audio.num_mel_bins, 180)


# The audio and text parts of a message as Qwen3-Omni's chat template renders them (its role markers left out).
PARTS_TEMPLATE = (
    "{%- for m in messages %}{%- if m.content is string %}{{ m.content }}{%- else %}{%- for p in m.content %}"
    "{%- if p.type == 'audio' %}<|audio_start|><|audio_pad|><|audio_end|>{%- elif p.type == 'text' %}{{ p.text }}"
    "{%- endif %}{%- endfor %}{%- endif %}{%- endfor %}"
)


def test_chat_messages_with_audio_parts(tiny_omni, tmp_path):
    tokenizer = load_tokenizer(tiny_omni)
    tokenizer.chat_template = PARTS_TEMPLATE
    audio = read_config(tiny_omni).audio
    save_wav(tmp_path / "a.wav", 0.5)
    rows = [
        {"prompt": [{"role": "user", "content": [{"type": "text", "text": "1"}, {"type": "audio"},
                                                 {"type": "text", "text": "<pitch>="}]}], "audio": ["a.wav"]},
        {"prompt": [{"role": "user", "content": "<pitch>="}], "audio": "a.wav"},
    ]
    dataset = PromptDataset.from_rows(rows, tokenizer, audio=AudioProcessing(tiny_omni, audio, tokenizer),
                                      image_root=tmp_path)
    parts, plain = (example.token_ids for example in dataset.examples)
    audio_tokens = [audio.audio_start_token_id] + [audio.audio_token_id] * 7 + [audio.audio_end_token_id]
    one, pitch, equals = (tokenizer.convert_tokens_to_ids(t) for t in ("1", "<pitch>", "="))
    assert parts == [one, *audio_tokens, pitch, equals]
    assert plain == [*audio_tokens, pitch, equals]  # string content: the audio goes in front of the text


def test_bad_audio_is_an_error_naming_file_and_line(tiny_omni, tmp_path):
    tokenizer = load_tokenizer(tiny_omni)
    processing = AudioProcessing(tiny_omni, read_config(tiny_omni).audio, tokenizer, max_seconds=1)
    save_wav(tmp_path / "ok.wav", 0.5)
    save_wav(tmp_path / "long.wav", 1.5)
    (tmp_path / "broken.wav").write_bytes(b"not a sound")
    (tmp_path / "a.mp3").write_bytes(b"ID3")
    data = tmp_path / "prompts.jsonl"

    def error(rows, audio=processing):
        data.write_text("".join(json.dumps(row) + "\n" for row in rows))
        with pytest.raises(DataError) as caught:
            PromptDataset.from_rows(read_rows(data), tokenizer, audio=audio, image_root=tmp_path)
        return str(caught.value)

    ok = {"prompt": "<pitch>=", "audio": "ok.wav"}
    message = error([ok, {"prompt": "<pitch>=", "audio": ["missing.wav"]}])
    assert f"{data}:2" in message and "missing.wav" in message and "does not exist" in message
    message = error([ok, ok, {"prompt": "<pitch>=", "audio": "broken.wav"}])
    assert f"{data}:3" in message and "broken.wav" in message and "cannot be read" in message
    message = error([{"prompt": "<pitch>=", "audio": "long.wav"}])
    assert f"{data}:1" in message and "long.wav" in message and "1.5 s" in message
    assert "data.max_audio_seconds" in message
    assert "unknown audio format '.mp3'" in error([{"prompt": "<pitch>=", "audio": "a.mp3"}])
    (tmp_path / "a.flac").write_bytes(b"fLaC")
    try:
        import soundfile  # noqa: F401
    except ImportError:  # FLAC needs soundfile: said, with the file and line
        message = error([ok, {"prompt": "<pitch>=", "audio": "a.flac"}])
        assert f"{data}:2" in message and "a.flac" in message and "pip install soundfile" in message
    else:
        assert "cannot be read" in error([ok, {"prompt": "<pitch>=", "audio": "a.flac"}])
    assert "2 <audio> places for 1 audios" in error([{"prompt": "<audio><audio>=", "audio": "ok.wav"}])
    assert "no audio encoder" in error([ok], audio=None)


def test_builtin_audio_rows_are_seeded_and_answerable():
    rows = generate_audio_rows(("pitch", "beeps"), 12, seed=3)
    assert [r["answer"] for r in rows] == [r["answer"] for r in generate_audio_rows(("pitch", "beeps"), 12, seed=3)]
    for row in rows:
        wave = row["audio"][0]["array"]
        if row["task"] == "beeps":  # count the bursts of loud samples
            loud = np.convolve(np.abs(wave) > 0.2, np.ones(80), "same") > 0
            assert int(np.sum(loud[1:] & ~loud[:-1])) == int(row["answer"])
        else:
            spectrum = np.abs(np.fft.rfft(wave))
            assert row["answer"] in "1234" and spectrum.argmax() > 0


def test_trainer_trains_the_thinker_and_keeps_the_towers(tiny_omni, tmp_path, monkeypatch):
    config = config_from_dict({
        "model": {"name_or_path": str(tiny_omni)},
        "data": {"dataset": "builtin_audio", "builtin": {"tasks": ["pitch"], "num_rows": 16}},
        "rollout": {"prompts_per_step": 2, "group_size": 4, "max_new_tokens": 3},
        "gspo": {"eps_low": 0.2, "eps_high": 0.28, "num_minibatches": 2},
        "optim": {"learning_rate": 1e-2},
        "train": {"steps": 2},
        "output_dir": str(tmp_path / "run"),
    })
    trainer = GSPOTrainer(config, echo=lambda *a, **k: None)
    model = trainer.model
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    encoded = []
    original = type(model).encode_audio
    monkeypatch.setattr(type(model), "encode_audio",
                        lambda self, audios: encoded.append(torch.is_grad_enabled()) or original(self, audios))
    trainer.train()
    towers = [name for name in before if name.startswith(("visual.", "audio_tower."))]
    changed = [name for name in before if not torch.equal(before[name], model.get_parameter(name))]
    assert changed and not set(changed) & set(towers)
    assert all(id(p) not in {id(q) for q in trainer.optimizer.state} for p in model.audio_tower.parameters())
    assert encoded == [False] * 4  # once per prompt per step: the group, the scoring and the update reuse it
    saved = Qwen3OmniMoeForConditionalGeneration.from_pretrained(tmp_path / "run" / "final", dtype=torch.float32)
    torch.testing.assert_close(saved.thinker.lm_head.weight, model.lm_head.weight, atol=0, rtol=0)


def test_cli_generate_with_audio(tiny_omni, tmp_path):
    from click.testing import CliRunner

    from gspo_engine.cli import main

    save_wav(tmp_path / "a.wav", 0.5)
    result = CliRunner().invoke(main, ["generate", str(tiny_omni), "--prompt", "<pitch>=", "--audio",
                                       str(tmp_path / "a.wav"), "--temperature", "0", "--max-new-tokens", "2"])
    assert result.exit_code == 0, result.output
    assert result.output.startswith("[0] '<pitch>=' -> ")
    result = CliRunner().invoke(main, ["generate", str(tiny_omni), "--prompt", "<pitch>=", "--audio",
                                       str(tmp_path / "missing.wav")])
    assert result.exit_code != 0 and "missing.wav does not exist" in result.output
