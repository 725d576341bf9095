"""One Gated DeltaNet layer (Qwen3-Next's linear attention) forward + backward: ours against transformers'.

Implementations: "gspo_engine" (model/gated_deltanet.py: flash-linear-attention's kernels on CUDA, our
chunked PyTorch rule elsewhere) and "transformers" (Qwen3NextGatedDeltaNet; without the `kernels`
hub package, which an offline machine lacks, it runs its own PyTorch fallbacks, torch_chunk_gated_delta_rule
and causal_conv1d_fn), the baseline. Both hold the same weights and see the same inputs.
FLOPs below count the layer's projections (in_proj and out_proj), forward and backward.
"""

from __future__ import annotations

import torch

from gspo_engine.benchmarks.cases import Case
from gspo_engine.model.args import LINEAR_ATTENTION, NEXT_ARCHITECTURE, ModelArgs
from gspo_engine.model.gated_deltanet import GatedDeltaNet

# (label, batch, tokens per row, hidden, key heads, value heads, head dim): a Qwen3-Next-80B-A3B layer
# on a GPU; on CPU the same head layout at narrow widths; a smoke shape for tests.
SHAPES = {
    "gpu": [("80b-a3b-b4-t4096", 4, 4096, 2048, 16, 32, 128)],
    "cpu": [("cpu-b2-t1024", 2, 1024, 256, 4, 8, 32)],
    "smoke": [("smoke-b2-t70", 2, 70, 32, 2, 4, 8)],
}
IMPLEMENTATIONS = ("gspo_engine", "transformers")
BASELINE = "transformers"


def layer_args(hidden: int, key_heads: int, value_heads: int, head_dim: int) -> ModelArgs:
    return ModelArgs(
        vocab_size=16, hidden_size=hidden, intermediate_size=hidden, num_hidden_layers=1, num_attention_heads=1,
        num_key_value_heads=1, head_dim=head_dim, max_position_embeddings=1 << 16, hf_architecture=NEXT_ARCHITECTURE,
        layer_types=[LINEAR_ATTENTION], linear_conv_kernel_dim=4, linear_key_head_dim=head_dim,
        linear_value_head_dim=head_dim, linear_num_key_heads=key_heads, linear_num_value_heads=value_heads,
    )


def projection_flops(tokens: int, args: ModelArgs) -> int:
    """Forward + backward FLOPs of in_proj_qkvz, in_proj_ba and out_proj: 2*N*H*width forward, twice that backward."""
    key_dim = args.linear_num_key_heads * args.linear_key_head_dim
    value_dim = args.linear_num_value_heads * args.linear_value_head_dim
    width = 2 * key_dim + 2 * value_dim + 2 * args.linear_num_value_heads + value_dim
    return 6 * tokens * args.hidden_size * width


def transformers_layer(ours: GatedDeltaNet, args: ModelArgs) -> torch.nn.Module:
    """transformers' Qwen3NextGatedDeltaNet holding the weights of `ours`."""
    from transformers import Qwen3NextConfig
    from transformers.models.qwen3_next.modeling_qwen3_next import Qwen3NextGatedDeltaNet

    config = Qwen3NextConfig(
        hidden_size=args.hidden_size, num_hidden_layers=1, layer_types=[LINEAR_ATTENTION],
        linear_conv_kernel_dim=args.linear_conv_kernel_dim, linear_key_head_dim=args.linear_key_head_dim,
        linear_value_head_dim=args.linear_value_head_dim, linear_num_key_heads=args.linear_num_key_heads,
        linear_num_value_heads=args.linear_num_value_heads, rms_norm_eps=args.rms_norm_eps,
    )
    layer = Qwen3NextGatedDeltaNet(config, layer_idx=0)
    weight = ours.out_proj.weight
    layer.to(device=weight.device, dtype=weight.dtype)
    layer.load_state_dict(ours.state_dict())
    return layer


def make_layer(batch, seq, hidden, key_heads, value_heads, head_dim, device, dtype, seed=0):
    """Our layer with random weights (init std 0.02, as the checkpoints' scale), an input and an output gradient."""
    args = layer_args(hidden, key_heads, value_heads, head_dim)
    torch.manual_seed(seed)
    layer = GatedDeltaNet(args, fused_projections=True)
    with torch.no_grad():
        for parameter in layer.parameters():
            if parameter.dim() >= 2:
                parameter.normal_(0, 0.02)
    layer.to(device=device, dtype=dtype)
    generator = torch.Generator(device=device).manual_seed(seed)
    x = torch.randn(batch, seq, hidden, generator=generator, device=device).to(dtype).requires_grad_()
    grad_y = torch.randn(batch, seq, hidden, generator=generator, device=device).to(dtype)
    return dict(args=args, layer=layer, x=x, grad_y=grad_y)


def forward_backward_step(setup, implementation):
    layer = setup["layer"] if implementation == "gspo_engine" else transformers_layer(setup["layer"], setup["args"])
    x, grad_y = setup["x"], setup["grad_y"]

    def step():
        layer(x).backward(grad_y)

    return step


def cases(device: torch.device, scale: str) -> list[Case]:
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    result = []
    for label, batch, seq, hidden, key_heads, value_heads, head_dim in SHAPES[scale]:
        def builder(name, shape=(batch, seq, hidden, key_heads, value_heads, head_dim)):
            return lambda: forward_backward_step(make_layer(*shape, device, dtype), name)

        args = layer_args(hidden, key_heads, value_heads, head_dim)
        result.append(Case(
            kernel="gated-deltanet",
            name=(f"{label} H={hidden} heads={key_heads}/{value_heads} d={head_dim} "
                  f"{str(dtype).removeprefix('torch.')}"),
            unit="tokens/s",
            work=batch * seq,
            flops=projection_flops(batch * seq, args),
            builders={name: builder(name) for name in IMPLEMENTATIONS},
            max_rounds=10 if device.type == "cuda" else 3,
            baseline=BASELINE,
        ))
    return result
