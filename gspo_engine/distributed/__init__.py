"""Training across processes: torchrun launch, FSDP2 sharding, distributed checkpoints, expert-parallel exchange."""
