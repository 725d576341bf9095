"""The Qwen3-Omni audio encoder: log-mel frames -> convolutional downsampling -> windowed attention -> LLM width.

features [mel, F] hold every audio's log-mel frames one after the other (transformers' Whisper feature
extractor computes them; lengths [A] gives each audio's frame count).

- Each audio is cut into chunks of 2 * n_window frames (the last one shorter); all chunks of a call are
  zero-padded to the longest and run through three 3x3 stride-2 convolutions with GELU (time and mel
  each shrink 8x), flattened over channels x mel and projected to d_model; a sinusoidal position table
  is added, counting from 0 in every chunk; the padded frames are then dropped.
- Pre-LayerNorm blocks whose attention stays inside windows of n_window_infer / (2 * n_window) chunks'
  worth of frames (the longest chunk's frame count sets the window), each audio windowed on its own.
- LayerNorm, Linear-GELU-Linear into the language model's width: one token per encoder frame.

Module names are the checkpoints' (`conv2d1`, `layers.0.self_attn.q_proj`, `ln_post`, `proj2`, ...).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from gspo_engine.model.audio_args import AudioArgs


@dataclass
class AudioInputs:
    """The feature extractor's output for a set of audios: features [mel, F] (all frames, audio after audio) and
    lengths [A] (int64, each audio's frames)."""

    features: torch.Tensor
    lengths: torch.Tensor

    def to(self, device: torch.device | str) -> "AudioInputs":
        return AudioInputs(self.features.to(device), self.lengths.to(device))

    @staticmethod
    def from_extractor(input_features: torch.Tensor, feature_attention_mask: torch.Tensor) -> "AudioInputs":
        """From the extractor's padded input_features [A, mel, frames] and feature_attention_mask [A, frames]."""
        mask = feature_attention_mask.bool()
        return AudioInputs(input_features.permute(0, 2, 1)[mask].T.contiguous(), mask.sum(-1).long())

    @staticmethod
    def concat(parts: list["AudioInputs"]) -> "AudioInputs":
        return AudioInputs(torch.cat([p.features for p in parts], dim=1), torch.cat([p.lengths for p in parts]))


def conv_output_length(frames: int) -> int:
    """Encoder frames of a chunk of `frames` mel frames after the three stride-2 convolutions."""
    for _ in range(3):
        frames = (frames - 1) // 2 + 1
    return frames


def chunk_lengths(frames: int, chunk: int) -> list[int]:
    """An audio of `frames` mel frames cut into chunks of `chunk` frames, the last one shorter."""
    full, tail = divmod(frames, chunk)
    return [chunk] * full + ([tail] if tail else [])


def audio_token_count(frames: int, args: AudioArgs) -> int:
    """Tokens (encoder frames) the encoder gives an audio of `frames` mel frames."""
    return sum(conv_output_length(n) for n in chunk_lengths(frames, args.chunk_frames))


def sinusoid_positions(length: int, channels: int, device: torch.device) -> torch.Tensor:
    """[length, channels] fp32: sines over the first half of the channels, cosines over the second."""
    half = channels // 2
    increment = math.log(10000) / (half - 1)
    inv_timescales = torch.exp(-increment * torch.arange(half, device=device).float())
    scaled = torch.arange(length, device=device)[:, None] * inv_timescales[None, :]
    return torch.cat((scaled.sin(), scaled.cos()), dim=1)


class AudioAttention(nn.Module):
    def __init__(self, args: AudioArgs):
        super().__init__()
        self.num_heads = args.encoder_attention_heads
        self.q_proj = nn.Linear(args.d_model, args.d_model, bias=True)
        self.k_proj = nn.Linear(args.d_model, args.d_model, bias=True)
        self.v_proj = nn.Linear(args.d_model, args.d_model, bias=True)
        self.out_proj = nn.Linear(args.d_model, args.d_model, bias=True)

    def forward(self, x: torch.Tensor, windows: list[int]) -> torch.Tensor:
        """x [N, D]; windows: frame counts of the attention windows, in order (they sum to N)."""
        n = x.shape[0]
        q, k, v = (proj(x).view(n, self.num_heads, -1).transpose(0, 1)[None]
                   for proj in (self.q_proj, self.k_proj, self.v_proj))
        outputs = [
            F.scaled_dot_product_attention(q_i, k_i, v_i)
            for q_i, k_i, v_i in zip(*(t.split(windows, dim=2) for t in (q, k, v)))
        ]
        return self.out_proj(torch.cat(outputs, dim=2)[0].transpose(0, 1).reshape(n, -1))


class AudioEncoderLayer(nn.Module):
    def __init__(self, args: AudioArgs):
        super().__init__()
        self.self_attn = AudioAttention(args)
        self.self_attn_layer_norm = nn.LayerNorm(args.d_model)
        self.fc1 = nn.Linear(args.d_model, args.encoder_ffn_dim)
        self.fc2 = nn.Linear(args.encoder_ffn_dim, args.d_model)
        self.final_layer_norm = nn.LayerNorm(args.d_model)

    def forward(self, x: torch.Tensor, windows: list[int]) -> torch.Tensor:
        x = x + self.self_attn(self.self_attn_layer_norm(x), windows)
        return x + self.fc2(F.gelu(self.fc1(self.final_layer_norm(x))))


class AudioEncoder(nn.Module):
    """features [mel, F], lengths [A] -> [M, output_dim], M = sum of audio_token_count over the audios."""

    def __init__(self, args: AudioArgs):
        super().__init__()
        self.args = args
        channels = args.downsample_hidden_size
        self.conv2d1 = nn.Conv2d(1, channels, 3, 2, padding=1)
        self.conv2d2 = nn.Conv2d(channels, channels, 3, 2, padding=1)
        self.conv2d3 = nn.Conv2d(channels, channels, 3, 2, padding=1)
        mel_after = conv_output_length(args.num_mel_bins)
        self.conv_out = nn.Linear(channels * mel_after, args.d_model, bias=False)
        self.layers = nn.ModuleList(AudioEncoderLayer(args) for _ in range(args.encoder_layers))
        self.ln_post = nn.LayerNorm(args.d_model)
        self.proj1 = nn.Linear(args.d_model, args.d_model)
        self.proj2 = nn.Linear(args.d_model, args.output_dim)
        # Set by the trainer's activation checkpointing switch (as ModelArgs.activation_checkpointing is).
        self.activation_checkpointing = False

    def forward(self, features: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        args = self.args
        frames = [int(n) for n in lengths.tolist()]
        if features.dim() != 2 or features.shape[0] != args.num_mel_bins or features.shape[1] != sum(frames):
            raise ValueError(
                f"audio features must be [{args.num_mel_bins}, {sum(frames)}] for audio lengths {frames}, "
                f"got shape {tuple(features.shape)}"
            )
        if any(n < 1 for n in frames):
            raise ValueError(f"every audio needs at least one frame, got lengths {frames}")
        per_audio = [chunk_lengths(n, args.chunk_frames) for n in frames]
        chunks = [n for audio in per_audio for n in audio]
        padded = nn.utils.rnn.pad_sequence(features.T.split(chunks), batch_first=True)  # [C, longest, mel]
        x = padded.transpose(1, 2)[:, None].to(self.conv2d1.weight.dtype)  # [C, 1, mel, longest]
        for conv in (self.conv2d1, self.conv2d2, self.conv2d3):
            x = F.gelu(conv(x))
        count, channels, mel, time = x.shape
        x = self.conv_out(x.permute(0, 3, 1, 2).reshape(count, time, channels * mel))
        x = x + sinusoid_positions(time, args.d_model, x.device).to(x.dtype)
        kept = [conv_output_length(n) for n in chunks]
        x = torch.cat([x[i, :n] for i, n in enumerate(kept)])

        window = max(kept) * (args.n_window_infer // args.chunk_frames)
        windows = []
        for audio in per_audio:
            total = sum(conv_output_length(n) for n in audio)
            windows += [window] * (total // window) + ([total % window] if total % window else [])
        for layer in self.layers:
            if self.activation_checkpointing and torch.is_grad_enabled():
                x = torch.utils.checkpoint.checkpoint(layer, x, windows, use_reentrant=False)
            else:
                x = layer(x, windows)
        return self.proj2(F.gelu(self.proj1(self.ln_post(x))))
