"""Where a prompt's images or audio go, the same for both: the places a prompt marks (`<image>` / `<audio>` in a
string, `{"type": "image"}` / `{"type": "audio"}` parts in chat messages) or, unmarked, as many put in front of
its text; after the chat template, each place's single pad token repeated as many times as its features need
(the processor's expansion)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any


class MediaError(ValueError):
    """A prompt's images or audio cannot be placed or read; the message names where."""


@dataclass(frozen=True)
class MediaKind:
    part: str  # the chat part's type, and the noun of one: "image"
    plural: str  # "images"
    marker: str  # where a string prompt puts one: "<image>"
    needs: str  # the subject of "... a user message to go in": "the images need"
    error: type[MediaError]


def with_places(prompt: str | list[dict], count: int, place: str, kind: MediaKind, where: str) -> str | list[dict]:
    """The prompt with `count` places of `kind` (a string prompt's each written as `place`): those it marks, or as
    many put in front of its text."""
    if isinstance(prompt, str):
        marked = prompt.count(kind.marker)
        if marked == 0:
            return place * count + prompt
        if marked != count:
            raise kind.error(f"{where}: the prompt marks {marked} {kind.marker} places for {count} {kind.plural}")
        return prompt.replace(kind.marker, place)
    marked = sum(1 for message in prompt if isinstance(message.get("content"), list)
                 for part in message["content"] if isinstance(part, dict) and part.get("type") == kind.part)
    if marked == 0:
        messages = [dict(message) for message in prompt]
        first_user = next((m for m in messages if m.get("role") == "user"), None)
        if first_user is None:
            raise kind.error(f"{where}: {kind.needs} a user message to go in")
        content = first_user["content"]
        parts = [{"type": "text", "text": content}] if isinstance(content, str) else list(content)
        first_user["content"] = [{"type": kind.part} for _ in range(count)] + parts
        return messages
    if marked != count:
        raise kind.error(f"{where}: the messages hold {marked} {kind.part} parts for {count} {kind.plural}")
    return prompt


def expand_pads(token_ids: list[int], counts: list[int], pad_id: int, kind: MediaKind, where: str) -> list[int]:
    """token_ids with the i-th pad `pad_id` repeated counts[i] times."""
    pads = sum(1 for token in token_ids if token == pad_id)
    if pads != len(counts):
        raise kind.error(f"{where}: the rendered prompt holds {pads} {kind.part} places for {len(counts)} {kind.plural}")
    out: list[int] = []
    repeats = iter(counts)
    for token in token_ids:
        out.extend([token] * next(repeats) if token == pad_id else [token])
    return out


def source_path(source: Any, kind: MediaKind, where: str, root: Path | None) -> Path:
    """The file an image or audio source names (a path, or a dict with one), relative paths under `root`."""
    if isinstance(source, dict) and source.get("path"):
        source = source["path"]
    if not isinstance(source, str) or not source:
        raise kind.error(f"{where}: an {kind.part} must be a file path, got {type(source).__name__} {source!r}")
    path = Path(source)
    return root / path if not path.is_absolute() and root is not None else path
