"""LoRA on a tiny Qwen3-Omni thinker made by transformers: the audio encoder (whose attention projections share the
text layers' names) is never adapted, and the adapter folder loads with PEFT onto transformers' full Omni model,
adapting the thinker's text layers only (not the audio encoder, the talker or code2wav) with our logits."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from tiny_omni_checkpoints import VOCAB, build_hf_omni_model

from gspo_engine.config import LoraConfig
from gspo_engine.hf_checkpoint import load_pretrained
from gspo_engine.lora import adapter_parameter_count, add_lora, save_adapters
from gspo_engine.lora.adapters import named_adapter_parameters

TOLERANCE = 2e-4


def test_audio_encoder_is_never_adapted_and_peft_loads_the_thinker_adapters(tmp_path):
    hf = build_hf_omni_model(seed=5)
    hf.save_pretrained(tmp_path / "base")
    ours = load_pretrained(tmp_path / "base", dtype=torch.float32)
    lora = LoraConfig(rank=4, targets=["q_proj", "k_proj", "v_proj", "o_proj", "out_proj"])
    planned = adapter_parameter_count(ours, lora)
    add_lora(ours, lora)
    names = [name for name, _ in named_adapter_parameters(ours)]
    assert names and not [name for name in names if "audio_tower" in name]
    assert not any(p.requires_grad for p in ours.audio_tower.parameters())
    assert planned == sum(p.numel() for _, p in named_adapter_parameters(ours))
    torch.manual_seed(0)
    with torch.no_grad():  # B = 0 at start: give the adapters an effect to carry over
        for name, parameter in named_adapter_parameters(ours):
            if "lora_B" in name:
                parameter.normal_(0.0, 0.2)
    save_adapters(ours, lora, tmp_path / "adapters")

    from peft import PeftModel

    peft_model = PeftModel.from_pretrained(build_hf_omni_model(seed=5), tmp_path / "adapters").eval()
    adapted = [name for name, module in peft_model.named_modules() if hasattr(module, "lora_A") and module.lora_A]
    assert adapted and all(".thinker." in name and ".layers." in name for name in adapted), adapted
    assert not [name for name in adapted if any(part in name for part in ("audio_tower", "talker", "code2wav"))]
    input_ids = torch.randint(0, VOCAB - 10, (1, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = peft_model.base_model.model.thinker(input_ids=input_ids).logits
        hidden = ours.forward_hidden(input_ids).hidden_states
        got = F.linear(hidden, ours.lm_head_weight)
    torch.testing.assert_close(got, expected, atol=TOLERANCE, rtol=TOLERANCE)
