"""Training: the loss falls, every trainable parameter gets gradient, auxiliary losses train under TRL, multi-token
prediction stays inside packed documents."""

import copy

import pytest
import torch
import torch.nn.functional as F
from tiny_configs import VARIANTS, tiny_config

from apex_hf import ApexForCausalLM
from apex_hf.modeling import modeling_apex


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
    for _ in range(20):
        loss = model(ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0]
    assert {"verifier_loss", "verifier_error", "verifier_score_pass1", "consistency_loss"} <= set(
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


def test_multi_token_prediction_targets_stay_inside_their_document():
    """A packed row of two documents (as pre-training's `make_batch` builds it: positions restart, the second
    document's first label is -100) next to an unpacked row. The first document's second token is a masked prompt
    token (SFT): that -100 is inside the document and must not cut it."""
    position_ids = torch.tensor([[0, 1, 2, 3, 0, 1, 2, 3, 4], list(range(9))])
    labels = torch.tensor([[-100, -100, 12, 13, -100, 15, 16, 17, 18], list(range(10, 19))])
    depth_1 = modeling_apex.multi_token_prediction_targets(labels, position_ids, depth=1)
    depth_2 = modeling_apex.multi_token_prediction_targets(labels, position_ids, depth=2)
    # Position i predicts token i + depth + 1: 3 -> 5 (depth 1) and 2 -> 5, 3 -> 6 (depth 2) cross the boundary.
    assert depth_1.tolist() == [[12, 13, -100, -100, 16, 17, 18, -100], [12, 13, 14, 15, 16, 17, 18, -100]]
    assert depth_2.tolist() == [[13, -100, -100, -100, 17, 18, -100], [13, 14, 15, 16, 17, 18, -100]]


def test_multi_token_prediction_targets_of_left_padded_rows():
    """Left padding with generation-style positions (cumsum of the mask, padding at 1): every target predicted from
    a real token stays; only predictions made from padding positions are dropped."""
    attention_mask = torch.tensor([[0, 0, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1, 1]])
    position_ids = (attention_mask.cumsum(-1) - 1).masked_fill(attention_mask == 0, 1)
    labels = torch.arange(10, 17).expand(2, -1).masked_fill(attention_mask == 0, -100)
    for depth in (1, 2):
        targets = modeling_apex.multi_token_prediction_targets(labels, position_ids, depth)
        unmasked = F.pad(labels[:, depth + 1 :], (0, 1), value=-100)
        real = attention_mask[:, : targets.shape[1]].bool()
        assert torch.equal(targets[real], unmasked[real])


def _mtp_loss_per_depth(model, ids, **kwargs) -> torch.Tensor:
    """`mtp_loss` is the mean over depths; running the first d depths for each d gives each depth's own loss (a depth
    reads only the depths before it)."""
    predictors, means = model.mtp, []
    try:
        for depth in range(1, len(predictors) + 1):
            model.mtp = predictors[:depth]
            means.append(model(ids, use_cache=False, **kwargs).mtp_loss)
    finally:
        model.mtp = predictors
    sums = torch.stack(means) * torch.arange(1, len(means) + 1)  # sum of the first d depths' losses
    return sums.diff(prepend=sums.new_zeros(1))


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_multi_token_prediction_loss_of_packed_documents(variant):
    """Per depth, the MTP loss of two packed documents is the token-weighted mean of each document's loss alone:
    no target crosses the boundary, and the predictors' attention (sliding and full) stays inside each document."""
    model = build(variant, num_mtp_layers=2).eval()
    generator = torch.Generator().manual_seed(0)
    packed = torch.randint(3, 97, (1, 16), generator=generator)
    first, second = packed[:, :7], packed[:, 7:]
    labels = packed.clone()
    labels[0, 7] = -100  # the second document's first token, as `make_batch` marks it
    position_ids = torch.cat((torch.arange(7), torch.arange(9))).unsqueeze(0)
    with torch.no_grad():
        packed_losses = _mtp_loss_per_depth(model, packed, labels=labels, position_ids=position_ids)
        first_losses = _mtp_loss_per_depth(model, first, labels=first)
        second_losses = _mtp_loss_per_depth(model, second, labels=second)
    for depth in (1, 2):
        first_count, second_count = 7 - depth - 1, 9 - depth - 1  # targets inside each document
        expected = (first_count * first_losses[depth - 1] + second_count * second_losses[depth - 1]) / (
            first_count + second_count
        )
        assert torch.allclose(packed_losses[depth - 1], expected, atol=1e-5), depth


def test_multi_token_prediction_loss_without_packing_is_unchanged(monkeypatch):
    """Contiguous positions (none given, or given explicitly; padding in the attention mask) give the loss of the
    plain shifted targets, i.e. what the MTP loss was before packed documents were told apart."""
    model = build("gqa", num_mtp_layers=2).eval()
    ids = torch.randint(3, 97, (2, 10), generator=torch.Generator().manual_seed(0))
    attention_mask = torch.ones_like(ids)
    attention_mask[1, 7:] = 0
    labels = ids.masked_fill(attention_mask == 0, -100)
    inputs = [
        dict(labels=ids),
        dict(labels=ids, position_ids=torch.arange(10).expand(2, -1)),
        dict(labels=labels, attention_mask=attention_mask),
    ]
    plain_calls = []

    def plain_targets(labels, position_ids, depth):
        plain_calls.append(depth)
        return F.pad(labels[:, depth + 1 :], (0, 1), value=-100)

    with torch.no_grad():
        fixed = [model(ids, **kwargs).mtp_loss for kwargs in inputs]
        monkeypatch.setattr(modeling_apex, "multi_token_prediction_targets", plain_targets)
        plain = [model(ids, **kwargs).mtp_loss for kwargs in inputs]
    assert plain_calls == [1, 2] * len(inputs)
    for value, reference in zip(fixed, plain):
        assert torch.equal(value, reference)


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


def test_verifier_target_is_closeness_of_each_exit_to_the_final_distribution():
    """The verifier's target per token and pass is `exp(-KL(final || pass))` of the next-token distributions the LM
    head gives on the readouts: 1 for the final pass itself, below 1 where a pass still predicts otherwise."""
    torch.manual_seed(0)
    model = build(None, num_refinement_steps=3, refinement_verifier=True)
    final, earlier = torch.randn(2, 5, model.config.hidden_size), torch.randn(2, 5, model.config.hidden_size)
    targets = model.model._closeness_to_final([earlier, final], final, chunk_size=3)  # chunks split the tokens
    final_log_probs = F.log_softmax(model.lm_head(final), -1)
    kl = (final_log_probs.exp() * (final_log_probs - F.log_softmax(model.lm_head(earlier), -1))).sum(-1)
    torch.testing.assert_close(targets[0], torch.exp(-kl))
    torch.testing.assert_close(targets[1], torch.ones(2, 5))


def test_verifier_learns_its_target():
    """Trained on its loss alone (everything else frozen, a sharpened LM head so that the passes' distributions
    differ), the verifier's score must come to follow its target per token: correlated with it, and nearer to it than
    the best constant guess. The exit loss is on, so the targets are the exits read out through the coda."""
    torch.manual_seed(0)
    model = build(None, num_refinement_steps=3, refinement_verifier=True, refinement_exit_loss_coef=1.0).train()
    with torch.no_grad():
        model.lm_head.weight.mul_(30)
    trained = [p for name, p in model.named_parameters() if name.startswith("model.refinement.")]
    for param in model.parameters():
        param.requires_grad_(any(param is p for p in trained))
    optimizer = torch.optim.Adam(trained, lr=1e-2)
    ids = torch.randint(0, model.config.vocab_size, (8, 24))
    targets = []
    closeness = model.model._closeness_to_final
    model.model._closeness_to_final = lambda *args: targets.__setitem__(slice(None), closeness(*args)) or targets
    for _ in range(150):
        out = model(ids, labels=ids)
        out.loss.backward()  # only the verifier's loss reaches the trained parameters
        optimizer.step()
        optimizer.zero_grad()
    scores = torch.stack(out.verifier_scores[:-1]).flatten().detach()
    targets = torch.stack(targets[:-1]).flatten()
    assert targets.std() > 0.1  # a target worth learning
    assert torch.corrcoef(torch.stack((scores, targets)))[0, 1] > 0.5
    assert (scores - targets).abs().mean() < (targets - targets.median()).abs().mean()


@pytest.mark.parametrize("experts", ["eager", "grouped_mm", "apex_grouped_mm"])
def test_experts_under_autocast_compute_in_its_dtype(experts):
    """grouped_mm is no autocast op: with fp32 master weights under bf16 autocast the block must still compute with
    bf16 weights (exactly as a copy whose experts are bf16), while the gradients reach the fp32 weights."""
    from apex_hf.modeling.modeling_apex import ApexSparseMoeBlock

    config = tiny_config("gqa")
    config._experts_implementation = experts
    torch.manual_seed(0)
    block = ApexSparseMoeBlock(config)
    for param in block.parameters():
        torch.nn.init.normal_(param, std=0.05)
    bf16_experts = copy.deepcopy(block)
    bf16_experts.experts.to(torch.bfloat16)
    hidden = torch.randn(2, 8, config.hidden_size)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        output, expected = block(hidden), bf16_experts(hidden)
    torch.testing.assert_close(output, expected, atol=0, rtol=0)
    output.float().sum().backward()
    assert block.experts.gate_up_proj.grad.dtype == torch.float32
    assert block.experts.gate_up_proj.grad.abs().sum() > 0 and block.experts.down_proj.grad.abs().sum() > 0
