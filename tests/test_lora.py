"""LoRA: merged == unmerged, and PEFT (the reference implementation) loads our adapters with equal logits."""

from __future__ import annotations

import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM

from lmforge import LLM
from lmforge.formats.peft import load_adapter, save_adapter
from lmforge.lora import LoRAConfig, inject_lora, lora_layers, merge_lora

from .conftest import tiny_llm


def _train_adapters_a_little(llm: LLM) -> None:
    """Give B non-zero values (it starts at zero, which would make every comparison trivial)."""
    with torch.no_grad():
        for layer in lora_layers(llm.model).values():
            layer.lora_B.weight.normal_(0, 0.05)


def test_only_adapters_train(tiny_tokenizer):
    llm = tiny_llm("tiny-llama", tiny_tokenizer)
    names = inject_lora(llm.model, LoRAConfig(rank=4, targets=["q_proj", "v_proj", "down_proj"]))
    assert len(names) == 3 * llm.config.n_layer
    trainable = {n for n, p in llm.model.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_" in n for n in trainable)


def test_fresh_adapter_changes_nothing_and_merge_equals_unmerged(tiny_tokenizer):
    llm = tiny_llm("tiny-qwen2", tiny_tokenizer)
    ids = torch.randint(0, 512, (2, 24))
    with torch.no_grad():
        before = llm.model(ids)[0]
        inject_lora(llm.model, LoRAConfig(rank=8, alpha=16, targets=["q_proj", "k_proj", "v_proj", "o_proj"]))
        assert torch.allclose(llm.model(ids)[0], before)
        _train_adapters_a_little(llm)
        unmerged = llm.model(ids)[0]
        assert (unmerged - before).abs().max() > 1e-3
        merged = merge_lora(llm.model)(ids)[0]
    assert not lora_layers(llm.model)
    assert (merged - unmerged).abs().max().item() <= 1e-5


def test_peft_loads_our_adapter_with_equal_logits(tiny_tokenizer, tmp_path):
    llm = tiny_llm("tiny-llama", tiny_tokenizer)
    base_dir = llm.save(tmp_path / "base")
    inject_lora(llm.model, LoRAConfig(rank=4, alpha=8, targets=["q_proj", "v_proj", "gate_proj"]))
    _train_adapters_a_little(llm)
    adapter_dir = save_adapter(llm.model, tmp_path / "adapter", base_model=str(base_dir))
    hf = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    peft_model = PeftModel.from_pretrained(hf, adapter_dir).eval()
    ids = torch.randint(0, 512, (2, 20))
    with torch.no_grad():
        ours, theirs = llm.model(ids)[0], peft_model(input_ids=ids).logits
    assert (ours - theirs).abs().max().item() <= 1e-4
    # and back: our loader attaches the same adapter to a fresh copy of the base model
    fresh = LLM.load(base_dir, dtype="float32")
    load_adapter(fresh.model, adapter_dir)
    with torch.no_grad():
        assert (fresh.model(ids)[0] - ours).abs().max().item() <= 1e-6
