"""Load and save Hugging Face Qwen3 / Qwen3-MoE checkpoints (config.json + safetensors) without transformers.

Loading builds the model on the meta device, checks every tensor's key, shape and dtype against
the safetensors headers before reading any data, then fills each parameter tensor by tensor into
its final storage on the target device, so the weights never exist twice in memory. Released
checkpoints hold one tensor per expert (`mlp.experts.{j}.{gate,up,down}_proj.weight`); they are
copied into the grouped `gate_up [E, 2I, H]` and `down [E, H, I]` tensors, and split back on save.
transformers' own grouped layout (`mlp.experts.gate_up_proj`, saved with
save_original_format=False) loads as well. A checkpoint that does not fit the model is refused,
never partly re-initialised, except for tensors the model has no use for but a server does
(CARRIED_PREFIXES: the multi-token-prediction `mtp.*` of Qwen3-Next and Qwen3.5, and a `model.visual.*`
tower of a model built without one): those are copied unchanged from the source folder into every checkpoint
saved from the model. Image-text models (Qwen3-VL, Qwen3.5) hold their vision tower (`model.visual.*`, read
and written like the rest, their language model under `model.language_model.`); Qwen3-VL-MoE checkpoints hold fused experts transposed (`gate_up_proj [E, H, 2I]`), transformers'
saves hold them untransposed: the orientation is told by shape on load, and saves write the released one.
A Qwen3-Omni checkpoint's thinker is the model (`thinker.model.*`, `thinker.lm_head.weight`, its towers under
`thinker.visual.*` and `thinker.audio_tower.*`, model/qwen3_omni.py); its `talker.*` and `code2wav.*` are carried.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from gspo_engine.model import ModelArgs, Qwen3Model, build_model
from gspo_engine.model.fla_backend import require as require_flash_linear_attention
from gspo_engine.model.qwen3_omni import omni_tower_key
from gspo_engine.model.args import DTYPES
from gspo_engine.tokenizer import VOCABULARY_FILES, TokenizerError, eos_token_ids, load_tokenizer

CONFIG_FILE = "config.json"
SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
GENERATION_FILE = "generation_config.json"
# Files next to the weights that a saved folder needs to be used like the released one.
COPIED_FILES = (
    "tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt", "special_tokens_map.json",
    "added_tokens.json", "chat_template.jinja", "generation_config.json",
    # An image-text model's processor: image (and video) processor settings, the processor's chat template.
    "preprocessor_config.json", "video_preprocessor_config.json", "processor_config.json", "chat_template.json",
)
SAFETENSORS_DTYPES = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16}
DEFAULT_MAX_SHARD_BYTES = 5 * 2**30
CARRIED_PREFIXES = ("mtp.", "model.visual.", "talker.", "code2wav.")
MAPPED_WINDOW_BYTES = 64 * 2**20


class CheckpointError(ValueError):
    """A checkpoint folder that cannot be loaded into the model as it is."""


@dataclass(frozen=True)
class Piece:
    """One Hugging Face tensor and where it sits inside one of our tensors (index () = the whole tensor).

    transposed: the Hugging Face tensor is ours with dimensions 1 and 2 swapped (the fused experts of released
    Qwen3-VL-MoE checkpoints: gate_up_proj [E, H, 2I], down_proj [E, I, H]).
    """

    hf_key: str
    index: tuple
    transposed: bool = False

    def shape(self, tensor: torch.Tensor) -> list[int]:
        """The Hugging Face tensor's shape, for our tensor `tensor`."""
        shape = list(tensor[self.index].shape)
        if self.transposed:
            shape[1], shape[2] = shape[2], shape[1]
        return shape

    def to_hf(self, tensor: torch.Tensor) -> torch.Tensor:
        """Our tensor's part as the Hugging Face tensor (a view)."""
        part = tensor[self.index]
        return part.transpose(1, 2) if self.transposed else part

    def from_hf(self, value: torch.Tensor) -> torch.Tensor:
        return value.transpose(1, 2) if self.transposed else value


_GROUPED_EXPERTS = re.compile(r"layers\.(\d+)\.mlp\.(gate_up|down)")


def hf_pieces(name: str, tensor: torch.Tensor, args: ModelArgs, grouped_experts: bool = False) -> list[Piece]:
    """The Hugging Face tensors that make up our tensor `name` (shape taken from `tensor`, meta is fine)."""
    if args.audio is not None and name.startswith(("visual.", "audio_tower.")):  # a Qwen3-Omni thinker's towers
        return [Piece(omni_tower_key(name), ())]
    if name.startswith("visual."):  # the vision tower of a Qwen3-VL model
        return [Piece(f"model.{name}", ())]
    match = _GROUPED_EXPERTS.fullmatch(name)
    if match is None:
        hf = name.replace(".mlp.router.", ".mlp.gate.")
        return [Piece(args.hf_lm_head_key if hf == "lm_head.weight" else f"{args.hf_prefix}{hf}", ())]
    layer, kind = match.groups()
    prefix = f"{args.hf_prefix}layers.{layer}.mlp.experts"
    if grouped_experts:
        return [Piece(f"{prefix}.{kind}_proj", ())]
    if args.vision is not None and not args.is_hybrid and args.audio is None:
        # Released Qwen3-VL-MoE checkpoints hold fused experts, transposed against transformers' runtime layout.
        return [Piece(f"{prefix}.{kind}_proj", (), transposed=True)]
    inter = args.moe_intermediate_size
    pieces = []
    for expert in range(tensor.shape[0]):
        if kind == "gate_up":
            pieces.append(Piece(f"{prefix}.{expert}.gate_proj.weight", (expert, slice(0, inter))))
            pieces.append(Piece(f"{prefix}.{expert}.up_proj.weight", (expert, slice(inter, 2 * inter))))
        else:
            pieces.append(Piece(f"{prefix}.{expert}.down_proj.weight", (expert,)))
    return pieces


def read_config(path: str | os.PathLike) -> ModelArgs:
    config_path = Path(path) / CONFIG_FILE
    if not config_path.is_file():
        raise CheckpointError(f"{config_path} not found")
    return ModelArgs.from_hf_config(json.loads(config_path.read_text()))


def _weight_files(folder: Path) -> dict[str, Path]:
    """HF key -> the safetensors file that holds it, from the index or the single file's header."""
    index_path = folder / INDEX_FILE
    if index_path.is_file():
        weight_map = json.loads(index_path.read_text())["weight_map"]
        files = {name: folder / name for name in sorted(set(weight_map.values()))}
        for name, file in files.items():
            if not file.is_file():
                raise CheckpointError(f"missing shard file {name} (listed in {INDEX_FILE}) in {folder}")
        return {key: files[name] for key, name in weight_map.items()}
    single = folder / SINGLE_FILE
    if not single.is_file():
        raise CheckpointError(f"no {SINGLE_FILE} or {INDEX_FILE} in {folder}")
    with safe_open(single, framework="pt") as f:
        return {key: single for key in f.keys()}


@dataclass
class _Header:
    shape: list[int]
    dtype: str


def _headers(weight_files: dict[str, Path]) -> dict[str, _Header]:
    """Shape and dtype of every tensor, read from the safetensors headers only."""
    headers: dict[str, _Header] = {}
    for file in sorted(set(weight_files.values())):
        with safe_open(file, framework="pt") as f:
            for key in f.keys():
                tensor_slice = f.get_slice(key)
                headers[key] = _Header(list(tensor_slice.get_shape()), tensor_slice.get_dtype())
    for key, file in weight_files.items():
        if key not in headers:
            raise CheckpointError(f"tensor {key} is listed in {INDEX_FILE} but missing from {file.name}")
    return headers


def _pieces_by_parameter(model: Qwen3Model, headers: dict[str, _Header]) -> dict[str, list[Piece]]:
    """Our tensor name -> its pieces, with every key, shape and dtype checked against the headers."""
    args = model.args
    plan: dict[str, list[Piece]] = {}
    for name, tensor in model.state_dict().items():
        pieces = hf_pieces(name, tensor, args)
        grouped = hf_pieces(name, tensor, args, grouped_experts=True)
        if len(pieces) > 1 and grouped[0].hf_key in headers:
            pieces = grouped
        elif pieces[0].transposed and pieces[0].hf_key in headers:
            # Fused experts in either orientation, told apart by shape; a square one reads as released.
            found = headers[pieces[0].hf_key].shape
            if found != pieces[0].shape(tensor) and found == grouped[0].shape(tensor):
                pieces = grouped
        for piece in pieces:
            header = headers.get(piece.hf_key)
            if header is None:
                raise CheckpointError(f"missing tensor {piece.hf_key}")
            expected = piece.shape(tensor)
            if header.shape != expected:
                raise CheckpointError(f"shape mismatch for {piece.hf_key}: expected {expected}, found {header.shape}")
            if header.dtype not in SAFETENSORS_DTYPES:
                raise CheckpointError(
                    f"unsupported dtype {header.dtype} for {piece.hf_key}; supported: {', '.join(SAFETENSORS_DTYPES)}"
                )
        plan[name] = pieces
    used = {piece.hf_key for pieces in plan.values() for piece in pieces}
    # A tied checkpoint may still carry a copy of the embedding as lm_head; transformers ignores it too.
    ignored = {args.hf_lm_head_key} if args.tie_word_embeddings else set()
    args.carried_keys = sorted(key for key in set(headers) - used if key.startswith(CARRIED_PREFIXES))
    unexpected = sorted(set(headers) - used - ignored - set(args.carried_keys))
    if unexpected:
        shown = ", ".join(unexpected[:5]) + (f" and {len(unexpected) - 5} more" if len(unexpected) > 5 else "")
        raise CheckpointError(f"unexpected tensor {shown} in the checkpoint")
    return plan


def _read_windows(
    pieces_by_parameter: dict[str, list[Piece]], weight_files: dict[str, Path], headers: dict[str, _Header]
) -> list[tuple[Path, list[tuple[str, Piece]]]]:
    """The pieces to copy, grouped by file and cut into windows of about MAPPED_WINDOW_BYTES.

    Pages of a memory-mapped file that have been read stay resident (and count in RSS) until the
    file is closed; reopening the file for each window keeps them to one window instead of a
    whole shard, so loading peaks at about the model's size plus one window.
    """
    by_file: dict[Path, list[tuple[str, Piece]]] = {}
    for name, pieces in pieces_by_parameter.items():
        for piece in pieces:
            by_file.setdefault(weight_files[piece.hf_key], []).append((name, piece))
    windows: list[tuple[Path, list[tuple[str, Piece]]]] = []
    for file, items in sorted(by_file.items()):
        window: list[tuple[str, Piece]] = []
        window_bytes = 0
        for name, piece in items:
            header = headers[piece.hf_key]
            nbytes = math.prod(header.shape) * SAFETENSORS_DTYPES[header.dtype].itemsize
            if window and window_bytes + nbytes > MAPPED_WINDOW_BYTES:
                windows.append((file, window))
                window, window_bytes = [], 0
            window.append((name, piece))
            window_bytes += nbytes
        windows.append((file, window))
    return windows


def _set_tensor(model: torch.nn.Module, name: str, value: torch.Tensor) -> None:
    module_name, _, leaf = name.rpartition(".")
    module = model.get_submodule(module_name)
    setattr(module, leaf, torch.nn.Parameter(value))


def load_pretrained(
    path: str | os.PathLike,
    dtype: torch.dtype | None = None,
    device: str | torch.device | None = None,
) -> Qwen3Model:
    """A Qwen3Model with the weights of a Hugging Face checkpoint folder.

    dtype defaults to the one in config.json (torch_dtype / dtype), device to the CPU. Raises
    CheckpointError naming the file or tensor when the folder does not fit the config, and
    ValueError for a config this model does not support.
    """
    folder = Path(path)
    args = read_config(folder)
    dtype = args.dtype if dtype is None else dtype
    if dtype not in DTYPES.values():
        raise CheckpointError(f"unsupported dtype {dtype}; supported: {', '.join(DTYPES)}")
    device = torch.device(device or "cpu")
    if args.is_hybrid and device.type == "cuda":
        require_flash_linear_attention()  # said now, before gigabytes are read, rather than at the first forward
    args.dtype = dtype
    args.source_path = str(folder)

    with torch.device("meta"):
        model = build_model(args)
    weight_files = _weight_files(folder)
    headers = _headers(weight_files)
    pieces = _pieces_by_parameter(model, headers)

    # Every tensor is allocated in its final place first (its pages are only touched as it is
    # filled), then filled piece by piece from the memory-mapped files.
    targets = {
        name: torch.empty(tensor.shape, dtype=dtype, device=device) for name, tensor in model.state_dict().items()
    }
    for file, window in _read_windows(pieces, weight_files, headers):
        with safe_open(file, framework="pt") as f:
            for name, piece in window:
                targets[name][piece.index].copy_(piece.from_hf(f.get_tensor(piece.hf_key)))
    for name, tensor in targets.items():
        _set_tensor(model, name, tensor)
    return model


def hf_state_dict(model: Qwen3Model) -> dict[str, torch.Tensor]:
    """HF key -> tensor (views into the model's tensors, per-expert keys split out), in key order."""
    out: dict[str, torch.Tensor] = {}
    for name, tensor in model.state_dict().items():
        for piece in hf_pieces(name, tensor, model.args):
            out[piece.hf_key] = piece.to_hf(tensor)
    return dict(sorted(out.items()))


def _shards(tensors: dict[str, torch.Tensor], max_shard_bytes: int) -> list[list[str]]:
    """Keys split into consecutive shards of at most max_shard_bytes (a larger single tensor gets its own)."""
    shards: list[list[str]] = [[]]
    size = 0
    for key, tensor in tensors.items():
        nbytes = tensor.numel() * tensor.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(key)
        size += nbytes
    return shards


def save_pretrained(
    model: Qwen3Model,
    path: str | os.PathLike,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
) -> None:
    """Write `model` as a Hugging Face checkpoint folder that transformers and vLLM load like a released one.

    config.json in the released key spelling, safetensors shards of at most max_shard_bytes (one
    model.safetensors when everything fits, else model-0000i-of-0000n.safetensors plus
    model.safetensors.index.json), tokenizer and generation files copied from the folder the model
    was loaded from. The folder is written next to `path` and renamed into place, so a reader
    never sees half a checkpoint; an existing folder at `path` is replaced.
    """
    target = Path(path).resolve()
    target.parent.mkdir(parents=True, exist_ok=True)
    tensors = hf_state_dict(model)
    # The dtype the weights are in now, which may differ from the one they were loaded in.
    dtype = next(iter(tensors.values())).dtype  # the weights' dtype now, which may differ from the loaded one
    tensors = dict(sorted({**tensors, **carried_tensors(model.args)}.items()))
    shards = _shards(tensors, max_shard_bytes)
    if len(shards) == 1:
        names = [SINGLE_FILE]
    else:
        names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]

    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    staging.chmod(0o755)  # mkdtemp makes it private to this user; a checkpoint is meant to be shared
    try:
        write_model_files(model.args, dtype, staging)
        for name, keys in zip(names, shards):
            # Copies on the CPU, one shard at a time: safetensors refuses views that share storage.
            shard = {key: tensors[key].detach().to("cpu", copy=True).contiguous() for key in keys}
            save_file(shard, staging / name, metadata={"format": "pt"})
        if len(shards) > 1:
            index = {
                "metadata": {"total_size": sum(t.numel() * t.element_size() for t in tensors.values())},
                "weight_map": {key: name for name, keys in zip(names, shards) for key in keys},
            }
            (staging / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
        _replace_folder(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def carried_tensors(args: ModelArgs) -> dict[str, torch.Tensor]:
    """The tensors of args.carried_keys, read from the folder the model was loaded from, unchanged."""
    if not args.carried_keys:
        return {}
    if args.source_path is None:
        raise CheckpointError(f"cannot carry {args.carried_keys[0]} ...: the model has no source folder")
    weight_files = _weight_files(Path(args.source_path))
    missing = [key for key in args.carried_keys if key not in weight_files]
    if missing:
        raise CheckpointError(f"{missing[0]} is no longer in {args.source_path}, which the model was loaded from")
    out = {}
    for key in args.carried_keys:
        with safe_open(weight_files[key], framework="pt") as f:
            out[key] = f.get_tensor(key)
    return out


def write_model_files(args: ModelArgs, dtype: torch.dtype, folder: Path) -> None:
    """config.json for weights in `dtype`, and the tokenizer and generation files of the folder the model came from.

    A source without generation_config.json gets one from its tokenizer's special tokens, and
    config.json its eos id: transformers' generate stops at eos only when one of them names it.
    """
    config = dataclasses.replace(args, dtype=dtype).to_hf_config()
    source = Path(args.source_path) if args.source_path else None
    for name in COPIED_FILES if source is not None else ():
        if (source / name).is_file():
            shutil.copy2(source / name, folder / name)
    if not (folder / GENERATION_FILE).is_file() and any((folder / name).is_file() for name in VOCABULARY_FILES):
        try:
            generation = special_token_ids(folder)
        except TokenizerError:  # no usable eos: nothing to tell generate
            generation = None
        if generation is not None:
            (folder / GENERATION_FILE).write_text(json.dumps(generation, indent=2) + "\n")
            config.setdefault("eos_token_id", generation["eos_token_id"])
    (folder / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")


def special_token_ids(folder: Path) -> dict:
    """generation_config.json's token ids from the tokenizer in `folder`: every eos id, bos, pad."""
    tokenizer = load_tokenizer(folder)
    eos = eos_token_ids(folder, tokenizer)
    generation = {"eos_token_id": eos[0] if len(eos) == 1 else eos}
    if tokenizer.bos_token_id is not None:
        generation["bos_token_id"] = tokenizer.bos_token_id
    if tokenizer.pad_token_id is not None:
        generation["pad_token_id"] = tokenizer.pad_token_id
    return generation


def _replace_folder(staging: Path, target: Path) -> None:
    if not target.exists():
        os.rename(staging, target)
        return
    # rename() cannot replace a non-empty folder: move the old one aside first, delete it after.
    old = Path(tempfile.mkdtemp(prefix=f".{target.name}.old.", dir=target.parent))
    os.rename(target, old / target.name)
    os.rename(staging, target)
    shutil.rmtree(old, ignore_errors=True)
