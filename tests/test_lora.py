"""LoRA on Apex: PEFT default targets, expert parameters, merging (in process and to a folder), QLoRA."""

import pytest
import torch
from peft import LoraConfig, get_peft_model
from peft.tuners.lora import LoraLayer, ParamWrapper
from test_hub import run_without_apex_hf
from tiny_configs import VARIANTS, tiny_config
from torch import nn
from transformers.quantizers.quantizers_utils import should_convert_module

from apex_hf import ApexForCausalLM
from apex_hf.posttrain import lora as apex_lora
from apex_hf.posttrain.lora import default_lora_config, merge_lora, quantization_config, trainable_parameter_summary


# The MLA variant reads the refinement memory by cross-attention, which adds query/key/value projections.
REFINEMENT_PROJECTIONS = ["proposal_proj", "review_proj", "refinement_proj", "anchor_proj"]
MEMORY_READ_PROJECTIONS = {"gqa": [], "mla": ["memory_query", "memory_key", "memory_value"], "family_knobs": []}


def tiny_model(variant, **overrides):
    torch.manual_seed(0)
    return ApexForCausalLM(tiny_config(variant, **overrides)).eval()


def ids(batch=2, length=9):
    return torch.randint(3, 97, (batch, length), generator=torch.Generator().manual_seed(0))


def adapted_modules(peft_model):
    """Names (relative to the Apex model) of the modules that carry a LoRA adapter."""
    return {name for name, module in peft_model.base_model.model.named_modules() if isinstance(module, LoraLayer)}


def train_steps(peft_model, steps=3, lr=0.1):
    optimizer = torch.optim.SGD([p for p in peft_model.parameters() if p.requires_grad], lr=lr)
    peft_model.train()
    for _ in range(steps):
        peft_model(ids(), labels=ids()).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    return peft_model.eval()


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_default_targets_are_registered_with_peft(variant):
    model = tiny_model(variant)
    linear = [name for name, module in model.named_modules() if isinstance(module, nn.Linear)]
    peft_model = get_peft_model(model, LoraConfig(task_type="CAUSAL_LM"))
    adapted = adapted_modules(peft_model)

    attention = {name for name in linear if ".self_attn." in name and not name.endswith("output_gate.proj")}
    refinement = {f"model.refinement.{name}" for name in REFINEMENT_PROJECTIONS + MEMORY_READ_PROJECTIONS[variant]}
    shared_experts = {name for name in linear if ".shared_experts." in name}
    assert attention and attention | refinement | shared_experts == adapted
    # the router and the output gates are not Linear-named targets; lm_head and the verifier are left out on purpose
    assert not any(name.endswith(("mlp.gate", "lm_head", "verifier", "output_gate.proj")) for name in adapted)
    # expert parameters are only reached through `target_parameters` (default_lora_config)
    assert not any(isinstance(module, ParamWrapper) for module in peft_model.modules())


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_default_lora_config_reaches_every_experts_layer_and_trains_only_lora(variant):
    model = tiny_model(variant)
    config = default_lora_config(model)
    assert config.task_type == "CAUSAL_LM" and config.target_parameters == apex_lora.APEX_LORA_TARGET_PARAMETERS
    assert config.target_modules == default_lora_config(model.config).target_modules  # from a config alone (meta)
    moe_layers = {name for name, module in model.named_modules() if name.endswith("mlp.experts")}
    peft_model = get_peft_model(model, config)

    wrapped = {
        (name.replace(".base_layer", ""), module.parameter_name)
        for name, module in peft_model.base_model.model.named_modules()
        if isinstance(module, ParamWrapper)
    }
    assert len(moe_layers) == 3
    assert wrapped == {(name, param) for name in moe_layers for param in ("gate_up_proj", "down_proj")}

    lora = {name: p for name, p in peft_model.named_parameters() if "lora_" in name}
    assert all(p.requires_grad for p in lora.values())
    assert not any(p.requires_grad for name, p in peft_model.named_parameters() if name not in lora)

    # rank r per expert on gate_up_proj (H -> 2I) and on down_proj (I -> H): A is in x rE, B is rE x out
    h, i = model.config.hidden_size, model.config.moe_intermediate_size
    per_layer = config.r * model.config.num_experts * ((h + 2 * i) + (i + h))
    summary = trainable_parameter_summary(peft_model)
    assert summary["expert_lora"] == len(moe_layers) * per_layer
    assert summary["trainable"] == sum(p.numel() for p in lora.values())
    assert summary["percent"] == pytest.approx(100 * summary["trainable"] / summary["total"])

    # B starts at zero, so the first backward only reaches B; after one step every A and B has a gradient.
    optimizer = torch.optim.SGD(lora.values(), lr=0.1)
    peft_model.train()
    for step in range(2):
        optimizer.zero_grad()
        peft_model(ids(), labels=ids()).loss.backward()
        for name, p in lora.items():
            if step == 1 or "lora_B" in name:
                assert p.grad is not None and p.grad.abs().sum() > 0, name
        optimizer.step()
    assert all(p.grad is None for name, p in peft_model.named_parameters() if name not in lora)


def test_lora_on_experts_is_the_same_under_apex_grouped_mm():
    """Apex's experts implementation reads the experts' weights as PEFT's `target_parameters` wrap them: output and
    gradients equal the eager loop's (160 tokens: the grouped-GEMM path)."""
    results = []
    for implementation in ["eager", "apex_grouped_mm"]:
        model = tiny_model("gqa")
        model.config._experts_implementation = implementation
        peft_model = get_peft_model(model, default_lora_config(model))
        for name, parameter in peft_model.named_parameters():
            if "lora_B" in name:  # non-zero B, so the adapters change the experts' output
                nn.init.normal_(parameter, std=0.1, generator=torch.Generator().manual_seed(1))
        output = peft_model(ids(batch=4, length=40), labels=ids(batch=4, length=40))
        output.loss.backward()
        grads = {name: p.grad for name, p in peft_model.named_parameters() if p.grad is not None}
        results.append((output.logits, grads))
    (eager_logits, eager_grads), (fast_logits, fast_grads) = results
    torch.testing.assert_close(fast_logits, eager_logits, atol=1e-5, rtol=1e-5)
    assert eager_grads.keys() == fast_grads.keys() and any("experts" in name for name in eager_grads)
    for name, grad in eager_grads.items():
        torch.testing.assert_close(fast_grads[name], grad, atol=1e-6, rtol=1e-4, msg=name)


def test_default_lora_config_options():
    dense = default_lora_config(tiny_config())
    assert dense.target_parameters is None
    assert dense.target_modules == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    assert default_lora_config(tiny_config("gqa"), include_experts=False, lora_dropout=0.1).target_parameters is None
    assert default_lora_config(tiny_config("gqa"), r=4, target_modules=["q_proj"]).target_modules == {"q_proj"}
    with pytest.raises(ValueError, match="include_experts=False"):
        default_lora_config(tiny_config("gqa"), lora_dropout=0.1)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_logits_at_init_after_training_and_merged(variant):
    model = tiny_model(variant)
    base_logits = model(ids()).logits
    base_experts = {
        name: p.detach().clone()
        for name, p in model.named_parameters()
        if name.endswith(("gate_up_proj", "down_proj"))
    }
    peft_model = get_peft_model(model, default_lora_config(model))
    assert torch.equal(peft_model(ids()).logits, base_logits)  # B = 0: the adapter starts as the identity

    train_steps(peft_model)
    lora_logits = peft_model(ids()).logits
    assert not torch.allclose(lora_logits, base_logits, atol=1e-3)

    merged = peft_model.merge_and_unload()
    assert type(merged) is ApexForCausalLM
    assert not any(isinstance(module, LoraLayer) for module in merged.modules())
    for name, weight in merged.named_parameters():
        if name in base_experts:  # the expert deltas were folded into the fused parameters
            assert not torch.allclose(weight, base_experts[name]), name
    torch.testing.assert_close(merged(ids()).logits, lora_logits, atol=1e-5, rtol=0)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_merge_lora_folder_loads_without_apex_hf(tmp_path, variant, tiny_tokenizer):
    tiny_model(variant).save_pretrained(tmp_path / "base")
    # balancing off while training the adapter: the router bias is a buffer the adapter would not carry
    model = ApexForCausalLM.from_pretrained(tmp_path / "base", router_bias_update_rate=0.0).eval()
    peft_model = train_steps(get_peft_model(model, default_lora_config(model)))
    peft_model.save_pretrained(tmp_path / "adapter")
    tiny_tokenizer.save_pretrained(tmp_path / "adapter")

    output = merge_lora(tmp_path / "adapter", tmp_path / "merged")  # base from the adapter's base_model_name_or_path
    assert output == tmp_path / "merged" and (output / "model.safetensors").is_file()
    assert (output / "tokenizer_config.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter", "base", "merged"]  # no temporary folder left

    expected = peft_model.merge_and_unload()(ids()).logits
    result = run_without_apex_hf(tmp_path, output, ids())
    assert torch.equal(result["logits"], expected)  # the same merge of the same weights, run by the same code

    with pytest.raises(FileExistsError, match="merged"):
        merge_lora(tmp_path / "adapter", output)


def test_merge_lora_leaves_nothing_behind_on_failure(tmp_path, monkeypatch):
    with pytest.raises(FileNotFoundError, match="no-such-adapter"):
        merge_lora(tmp_path / "no-such-adapter", tmp_path / "out")
    assert not (tmp_path / "out").exists()

    model = tiny_model("gqa")
    get_peft_model(model, default_lora_config(model)).save_pretrained(tmp_path / "adapter")

    def fail_midway(self, save_directory, **kwargs):
        (save_directory / "model.safetensors").write_bytes(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(ApexForCausalLM, "save_pretrained", fail_midway)
    with pytest.raises(OSError, match="disk full"):
        merge_lora(tmp_path / "adapter", tmp_path / "out", base_model=tiny_model("gqa"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]


def test_qlora_config_needs_cuda_and_bitsandbytes(monkeypatch):
    assert quantization_config(load_in_4bit=False) is None
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(RuntimeError, match="CUDA"):
        quantization_config(load_in_4bit=True)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(apex_lora, "is_bitsandbytes_available", lambda: False)
    with pytest.raises(RuntimeError, match="bitsandbytes") as error:
        quantization_config(load_in_4bit=True)
    assert "CUDA" not in str(error.value)

    monkeypatch.setattr(apex_lora, "is_bitsandbytes_available", lambda: True)
    config = quantization_config(load_in_4bit=True)
    assert config.load_in_4bit and config.bnb_4bit_quant_type == "nf4" and config.bnb_4bit_use_double_quant
    assert config.bnb_4bit_compute_dtype == torch.bfloat16
    # What transformers quantizes: every Linear but lm_head, the verifier and score_embed. The router is no Linear, so
    # it is never quantized, but it is listed in case it ever becomes one; the pattern must not catch `gate_proj`.
    model = tiny_model("mla")
    names = [name for name, module in model.named_modules() if isinstance(module, nn.Linear) or name.endswith(".gate")]
    kept = {name for name in names if not should_convert_module(name, config.llm_int8_skip_modules)}
    unquantized = {"lm_head", "model.refinement.verifier", "model.refinement.score_embed"}
    assert kept == unquantized | {f"model.layers.{i}.mlp.gate" for i in range(3)}


@pytest.mark.gpu
def test_qlora_quantizes_the_linears_keeps_experts_bf16_and_trains(tmp_path):
    bnb = pytest.importorskip("bitsandbytes")
    torch.manual_seed(0)
    # widths where every 4-bit input dimension is a multiple of bitsandbytes' block size (64)
    full = ApexForCausalLM(tiny_config("gqa", hidden_size=256, intermediate_size=256, moe_intermediate_size=64))
    full.save_pretrained(tmp_path)
    model = ApexForCausalLM.from_pretrained(
        tmp_path, quantization_config=quantization_config(load_in_4bit=True), dtype=torch.bfloat16, device_map="cuda"
    )
    assert isinstance(model.model.layers[0].self_attn.q_proj, bnb.nn.Linear4bit)
    assert isinstance(model.model.refinement.proposal_proj, bnb.nn.Linear4bit)
    unquantized = [model.lm_head, model.model.refinement.verifier, model.model.refinement.score_embed]
    assert all(type(module) is nn.Linear for module in unquantized)
    assert model.model.layers[0].mlp.experts.gate_up_proj.dtype == torch.bfloat16

    peft_model = get_peft_model(model, default_lora_config(model))
    summary = trainable_parameter_summary(peft_model)
    assert summary["total"] - summary["trainable"] == sum(p.numel() for p in full.parameters())
    assert summary["expert_lora"] > 0

    tokens = ids().cuda()
    peft_model.train()
    loss = peft_model(tokens, labels=tokens).loss
    loss.backward()
    assert torch.isfinite(loss)
    lora_b = [p for name, p in peft_model.named_parameters() if "lora_B" in name]
    assert lora_b and all(p.grad is not None and p.grad.abs().sum() > 0 for p in lora_b)
