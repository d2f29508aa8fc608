"""Training: the loss falls, every trainable parameter gets gradient, auxiliary losses train under TRL."""

import pytest
import torch
from tiny_configs import VARIANTS, tiny_config

from apex_hf import ApexForCausalLM


def build(variant, **overrides):
    torch.manual_seed(0)
    return ApexForCausalLM(tiny_config(variant, **overrides))


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_every_trainable_parameter_gets_gradient(variant):
    model = build(variant, num_mtp_layers=1, output_router_logits=True).train()
    ids = torch.randint(3, 97, (4, 16))
    out = model(ids, labels=ids)
    assert out.aux_loss is not None and out.mtp_loss is not None
    out.loss.backward()
    missing = [name for name, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert missing == []


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_a_few_steps_on_a_repeated_batch_lower_the_loss(variant):
    model = build(variant).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    ids = torch.randint(3, 97, (4, 16), generator=torch.Generator().manual_seed(0))
    losses = []
    for _ in range(15):
        loss = model(ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0]
    assert {"verifier_loss", "verifier_accuracy", "verifier_score_pass1", "consistency_loss"} <= set(
        model.model.aux_losses
    )


def test_auxiliary_losses_reach_the_backbone_without_the_head():
    """What TRL does: run only the backbone, project `last_hidden_state` itself. The verifier, which no LM loss
    reaches, must still get gradient through the attached auxiliary loss."""
    model = build("gqa").train()
    ids = torch.randint(3, 97, (2, 12))
    hidden = model.model(ids).last_hidden_state
    torch.nn.functional.cross_entropy(model.lm_head(hidden[:, :-1]).flatten(0, 1), ids[:, 1:].flatten()).backward()
    verifier = model.model.refinement.verifier.weight
    assert verifier.grad is not None and verifier.grad.abs().sum() > 0
    router = model.model.layers[1].mlp.gate.weight
    assert router.grad.abs().sum() > 0


def test_loss_kwargs_num_items_in_batch_and_shift_labels():
    model = build(None).eval()
    ids = torch.randint(3, 97, (2, 10))
    mean_loss = model(ids, labels=ids).loss  # 2 x 9 predicted tokens
    # Trainer passes the token count of the whole (accumulated, multi-process) batch; the loss is a sum over it.
    assert torch.allclose(model(ids, labels=ids, num_items_in_batch=torch.tensor(9)).loss, 2 * mean_loss, rtol=1e-5)
    # Sequence parallelism passes labels already shifted.
    shift = torch.nn.functional.pad(ids[:, 1:], (0, 1), value=-100)
    assert torch.allclose(model(ids, labels=ids, shift_labels=shift).loss, mean_loss, atol=1e-6)


def test_activation_checkpointing_gives_the_same_gradients():
    ids = torch.randint(3, 97, (2, 12))
    grads = []
    for checkpointing in (False, True):
        model = build("gqa", router_bias_update_rate=0.0).train()
        if checkpointing:
            enable = getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
            enable()
        model(ids, labels=ids).loss.backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None]))
    assert torch.allclose(grads[0], grads[1], atol=1e-6)


def test_sft_trainer_step_trains_router_memory_and_verifier(tmp_path, tiny_tokenizer):
    datasets = pytest.importorskip("datasets")
    trl = pytest.importorskip("trl")
    tokenizer = tiny_tokenizer
    config = tiny_config(
        "gqa",
        vocab_size=len(tokenizer),
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        output_router_logits=True,
    )
    torch.manual_seed(0)
    model = ApexForCausalLM(config)
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    texts = [f"The number {i} is followed by {i + 1}." for i in range(32)]
    args = trl.SFTConfig(
        output_dir=str(tmp_path),
        max_steps=2,
        per_device_train_batch_size=4,
        learning_rate=1e-2,
        report_to=[],
        logging_steps=1,
        save_strategy="no",
        max_length=32,
        use_cpu=True,
    )
    trainer = trl.SFTTrainer(
        model=model, args=args, processing_class=tokenizer, train_dataset=datasets.Dataset.from_dict({"text": texts})
    )
    trainer.train()
    moved = {name for name, p in model.named_parameters() if not torch.equal(before[name], p.detach())}
    for must_train in (
        "model.refinement.verifier.weight",
        "model.refinement.memory_update.weight",
        "model.layers.1.mlp.gate.weight",
        "model.layers.1.mlp.experts.gate_up_proj",
    ):
        assert must_train in moved, must_train
    assert "verifier_loss" in model.model.aux_losses
    assert any("aux_loss" in entry for entry in trainer.state.log_history)


def test_verifier_separates_easy_from_hard_tokens_after_training():
    """Sequences alternate a random token (unpredictable: hard) and a fixed function of it (predictable: easy). After
    a short training the verifier, whose target is "this pass already predicts what the final pass predicts", must
    be confident on the easy next tokens and not on the hard ones — already after the first pass."""
    torch.manual_seed(0)
    vocab = 32
    model = ApexForCausalLM(
        tiny_config(
            None, vocab_size=vocab, num_refinement_steps=3, memory_injection="gated_add", verifier_loss_coef=1.0
        )
    ).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)

    def batch(rows):
        random_tokens = torch.randint(3, vocab, (rows, 12))
        return torch.stack((random_tokens, (random_tokens * 7 + 3) % (vocab - 3) + 3), dim=-1).view(rows, 24)

    for _ in range(200):
        ids = batch(16)
        model(ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()
    with torch.no_grad():
        first_pass_score = model(batch(64)).verifier_scores[0]
    next_is_easy, next_is_hard = first_pass_score[:, 0::2].mean(), first_pass_score[:, 1::2].mean()
    # The hard score stays above zero: on a random next token the first pass agrees with the final guess by chance.
    assert next_is_easy > 0.8 and next_is_easy - next_is_hard > 0.3, (next_is_easy, next_is_hard)
