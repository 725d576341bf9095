"""Built-in audio tasks for the tiny-omni model (`data.dataset: builtin_audio`), synthesised with numpy from a seed.

- pitch: half a second of one tone, at one of PITCHES' frequencies (far apart on the mel scale), with a
  random loudness and a little noise; the answer is the tone's digit: `<audio><pitch>=` -> `3`.
- beeps: one to four short 1 kHz beeps at random places in a second of quiet noise; the answer is how many.

Rows are `{"prompt", "audio": [{"array", "sampling_rate"}], "answer", "task"}`, rewarded by digit_match like the
digit tasks; the waveforms go through the model's feature extractor like a dataset's files.
"""

from __future__ import annotations

import random

import numpy as np

from gspo_engine.audio_prompts import AUDIO_MARKER
from gspo_engine.builtin_tasks import SEPARATOR
from gspo_engine.config import AUDIO_TASKS

SAMPLING_RATE = 16000
PITCHES = {"1": 250.0, "2": 700.0, "3": 1800.0, "4": 4500.0}  # Hz
PITCH_SECONDS = 0.5
BEEP_SECONDS, BEEPS_SECONDS, BEEP_HERTZ = 0.1, 1.0, 1000.0


def audio_prompt(task: str) -> str:
    return f"{AUDIO_MARKER}<{task}>{SEPARATOR}"


def _noise(rng: random.Random, samples: int, level: float) -> np.ndarray:
    return np.random.default_rng(rng.getrandbits(32)).normal(0.0, level, samples)


def synth_pitch(rng: random.Random) -> tuple[np.ndarray, str]:
    answer = rng.choice(sorted(PITCHES))
    t = np.arange(int(PITCH_SECONDS * SAMPLING_RATE)) / SAMPLING_RATE
    wave = rng.uniform(0.2, 0.8) * np.sin(2 * np.pi * PITCHES[answer] * t + rng.uniform(0, 2 * np.pi))
    return (wave + _noise(rng, t.size, 0.01)).astype(np.float32), answer


def synth_beeps(rng: random.Random) -> tuple[np.ndarray, str]:
    count = rng.randint(1, 4)
    total, beep = int(BEEPS_SECONDS * SAMPLING_RATE), int(BEEP_SECONDS * SAMPLING_RATE)
    wave = _noise(rng, total, 0.01)
    slot = total // 4
    t = np.arange(beep) / SAMPLING_RATE
    for quarter in sorted(rng.sample(range(4), count)):  # one beep per quarter second, so none overlap
        start = quarter * slot + rng.randint(0, slot - beep)
        wave[start:start + beep] += rng.uniform(0.3, 0.8) * np.sin(2 * np.pi * BEEP_HERTZ * t)
    return wave.astype(np.float32), str(count)


SYNTH = {"pitch": synth_pitch, "beeps": synth_beeps}


def generate_audio_rows(tasks: tuple[str, ...], count: int, seed: int) -> list[dict]:
    """`count` rows, the same for the same tasks and seed."""
    unknown = sorted(set(tasks) - set(AUDIO_TASKS))
    if not tasks or unknown:
        raise ValueError(f"audio tasks must be some of {', '.join(AUDIO_TASKS)}, got {list(tasks)}")
    rng = random.Random(seed)
    rows = []
    for _ in range(count):
        task = rng.choice(tasks)
        wave, answer = SYNTH[task](rng)
        rows.append({"prompt": audio_prompt(task), "audio": [{"array": wave, "sampling_rate": SAMPLING_RATE}],
                     "answer": answer, "task": task})
    return rows
