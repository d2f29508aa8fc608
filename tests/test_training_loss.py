"""The training loss without the logits: a training forward with labels computes the next-token loss (and the exit and
MTP losses) in chunks of the hidden states, with the same value and gradients as transformers' loss on whole logits,
and, in more than one chunk, keeps no `[tokens, vocab]` tensor for backward."""

import pytest
import torch
from tiny_configs import VARIANTS, tiny_config
from torch import nn
from transformers.loss.loss_utils import ForCausalLMLoss

from apex_hf import ApexForCausalLM
from apex_hf.modeling import modeling_apex


CASES = {
    "plain": {},
    **{name: {"variant": name} for name in VARIANTS},
    "exit_and_mtp_losses": {"variant": "gqa", "refinement_exit_loss_coef": 1.0, "num_mtp_layers": 2},
}
ROWS_PER_CHUNK = 5  # 24 targets a batch below: five chunks, the last one short


def whole_logits_loss(head, hidden_states, labels, vocab_size, num_items_in_batch=None, shift_labels=None):
    """The reference: transformers' causal-LM loss on the whole logits."""
    return ForCausalLMLoss(
        head(hidden_states), labels, vocab_size, num_items_in_batch=num_items_in_batch, shift_labels=shift_labels
    )


@pytest.fixture
def small_chunks(monkeypatch):
    monkeypatch.setattr(modeling_apex, "TRAINING_LOSS_CHUNK_LOGITS", ROWS_PER_CHUNK * 97)


def build(case: str) -> ApexForCausalLM:
    overrides = dict(CASES[case])
    torch.manual_seed(0)
    model = ApexForCausalLM(tiny_config(overrides.pop("variant", None), **overrides))
    return model.train()


def batch() -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(3)
    input_ids = torch.randint(3, 97, (2, 12), generator=generator)
    labels = input_ids.clone()
    labels[0, :4] = -100  # a prompt
    return {"input_ids": input_ids, "labels": labels}


def loss_and_gradients(model: ApexForCausalLM, **extra) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    model.zero_grad()
    torch.manual_seed(1)
    loss = model(**batch(), **extra).loss
    loss.backward()
    return loss.detach(), {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("rows_per_chunk", [ROWS_PER_CHUNK, None], ids=["chunks", "one_chunk"])
@pytest.mark.parametrize("case", list(CASES))
def test_training_loss_and_gradients_equal_the_whole_logits_loss(case, rows_per_chunk, monkeypatch):
    if rows_per_chunk is not None:
        monkeypatch.setattr(modeling_apex, "TRAINING_LOSS_CHUNK_LOGITS", rows_per_chunk * 97)
    loss, gradients = loss_and_gradients(build(case))
    monkeypatch.setattr(modeling_apex, "chunked_causal_lm_loss", whole_logits_loss)
    # a model of its own: a training forward moves the routers' balancing biases
    reference_loss, reference_gradients = loss_and_gradients(build(case))
    torch.testing.assert_close(loss, reference_loss, rtol=1e-6, atol=1e-6)
    assert gradients.keys() == reference_gradients.keys()
    for name, gradient in gradients.items():
        torch.testing.assert_close(gradient, reference_gradients[name], rtol=1e-5, atol=1e-6, msg=name)


def test_num_items_in_batch_and_shift_labels_as_transformers_loss(small_chunks):
    """Trainer's gradient-accumulation normalisation and pre-shifted labels (context parallelism) mean what they
    mean in `ForCausalLMLoss`; the head is called as a module, so whatever wraps it (a LoRA adapter) takes part."""
    torch.manual_seed(0)
    head = nn.Sequential(nn.Linear(8, 97, bias=False), nn.Tanh())
    head.out_features = 97
    hidden = torch.randn(3, 7, 8, requires_grad=True)
    labels = torch.randint(0, 97, (3, 7))
    labels[1, 2:5] = -100
    for kwargs in ({}, {"num_items_in_batch": torch.tensor(40)}, {"shift_labels": labels}):
        chunked = modeling_apex.chunked_causal_lm_loss(head, hidden, labels, 97, **kwargs)
        (chunked_gradient,) = torch.autograd.grad(chunked, hidden)
        reference = whole_logits_loss(head, hidden, labels, 97, **kwargs)
        (reference_gradient,) = torch.autograd.grad(reference, hidden)
        torch.testing.assert_close(chunked, reference, msg=str(kwargs))
        torch.testing.assert_close(chunked_gradient, reference_gradient, msg=str(kwargs))


def largest_saved_logits(model: ApexForCausalLM) -> int:
    """The most rows of any tensor over the vocabulary kept for backward by a training forward."""
    rows = [0]
    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}  # the head's weight is no logits

    def pack(tensor):
        if tensor.shape[-1:] == (model.config.vocab_size,) and tensor.untyped_storage().data_ptr() not in weights:
            rows.append(tensor.numel() // tensor.shape[-1])
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        model(**batch()).loss.backward()
    return max(rows)


@pytest.mark.parametrize("case", ["plain", "exit_and_mtp_losses"])
def test_training_forward_keeps_no_logits_for_backward(case, small_chunks, monkeypatch):
    model = build(case)
    assert largest_saved_logits(model) == 0
    monkeypatch.setattr(modeling_apex, "chunked_causal_lm_loss", whole_logits_loss)  # the detector sees the logits
    assert largest_saved_logits(model) == 2 * 12


def test_logits_are_returned_except_by_a_training_forward_with_labels():
    model = build("plain")
    inputs = batch()
    assert model(**inputs).logits is None and model(**inputs).loss is not None
    assert model(inputs["input_ids"]).logits.shape == (2, 12, 97)  # no labels
    with torch.no_grad():  # train mode without gradients (a trainer's own no-grad pass): nothing to save memory for
        no_grad = model(**inputs)
    assert no_grad.logits.shape == (2, 12, 97)
    torch.testing.assert_close(no_grad.loss, model(**inputs).loss)
    model.eval()
    evaluated = model(**inputs)
    assert evaluated.logits.shape == (2, 12, 97)
    torch.testing.assert_close(evaluated.loss, ForCausalLMLoss(evaluated.logits, inputs["labels"], 97))
