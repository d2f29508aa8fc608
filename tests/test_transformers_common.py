"""transformers' own common model tests (`ModelTesterMixin`) and `ConfigTester` run against Apex.

The mixins come from the transformers sdist (``make fetch-transformers-tests``; see tests/conftest.py). Two tiny
configurations run the full mixin:

* ``ApexModelTest``: GQA (4 heads / 2 KV heads) with QK-norm and a head-wise attention output gate, sliding-window
  attention, a MoE core (4 experts, top-2, one shared expert) run K=2 times with ``gated_add`` spiral memory, so the
  refinement loop, verifier and memory are exercised (prelude 0 + 2 x core 1 + coda 0 = 2 unrolled layers).
* ``ApexMLAModelTest``: multi-head latent attention with a low-rank query, a sliding prelude layer followed by a
  full-attention MoE core (K=1, sigmoid router with group-limited routing), i.e. a sliding/full mix and a dense/sparse
  mix (prelude 1 + core 1 = 2 unrolled layers).

Tests skipped on purpose are overridden below with `@unittest.skip(reason=...)`; the other skips come from the mixin
itself (no GPU / flash-attention / deepspeed / kernels here, not a composite model, ...) and carry its own reason.
"""

from __future__ import annotations

import unittest

import pytest


pytest.importorskip("transformers_tests.test_modeling_common")

from tiny_configs import COMMON_TESTS_GQA, COMMON_TESTS_MLA  # noqa: E402
from transformers.models.auto import modeling_auto  # noqa: E402
from transformers_tests.generation.test_utils import GenerationTesterMixin  # noqa: E402
from transformers_tests.test_configuration_common import ConfigTester  # noqa: E402
from transformers_tests.test_modeling_common import ModelTesterMixin, ids_tensor, random_attention_mask  # noqa: E402

from apex_hf import ApexConfig, ApexForCausalLM, ApexModel  # noqa: E402


# The Auto registration in apex_hf does not fill the *_MAPPING_NAMES tables that several mixin tests read to find the
# base model class / the causal-LM class.
modeling_auto.MODEL_MAPPING_NAMES["apex"] = "ApexModel"
modeling_auto.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES["apex"] = "ApexForCausalLM"


class ApexModelTester:
    """Local stand-in for transformers' `CausalLMModelTester` (not shipped in the sdist)."""

    def __init__(self, parent, config_kwargs, batch_size=2, seq_length=7, is_training=True, use_input_mask=True):
        self.parent = parent
        self.batch_size = batch_size
        self.seq_length = seq_length
        self.is_training = is_training
        self.use_input_mask = use_input_mask
        self.config_kwargs = dict(config_kwargs)
        config = self.get_config()
        self.vocab_size = config.vocab_size
        self.hidden_size = config.hidden_size
        self.num_attention_heads = config.num_attention_heads
        self.num_hidden_layers = config.num_hidden_layers  # unrolled depth, derived by ApexConfig
        self.pad_token_id = config.pad_token_id

    def get_config(self) -> ApexConfig:
        return ApexConfig(**self.config_kwargs)

    def prepare_config_and_inputs(self):
        input_ids = ids_tensor([self.batch_size, self.seq_length], self.vocab_size)
        attention_mask = random_attention_mask([self.batch_size, self.seq_length]) if self.use_input_mask else None
        return self.get_config(), input_ids, attention_mask

    def prepare_config_and_inputs_for_common(self):
        config, input_ids, attention_mask = self.prepare_config_and_inputs()
        inputs_dict = {"input_ids": input_ids}
        if attention_mask is not None:
            inputs_dict["attention_mask"] = attention_mask
        return config, inputs_dict


class ApexCommonTestBase(ModelTesterMixin, GenerationTesterMixin):
    """Shared settings; subclasses pick the tester configuration."""

    config_class = ApexConfig
    base_model_class = ApexModel
    all_model_classes = (ApexModel, ApexForCausalLM)
    tester_config = COMMON_TESTS_GQA
    # The mixin skips this init-coverage test for models whose config file has no "# Copyright <year>" header (it
    # reads that as "added before 2023"); Apex is new, so check that `_init_weights` covers every weight.
    test_can_init_all_missing_weights_before_2023 = True

    def setUp(self):
        self.model_tester = ApexModelTester(self, self.tester_config)
        # hidden_size=64, not transformers' usual 37: ApexConfig rejects a hidden size its 16 default heads don't
        # divide.
        self.config_tester = ConfigTester(
            self, config_class=ApexConfig, hidden_size=64, common_properties=["hidden_size", "num_attention_heads"]
        )

    def test_config(self):
        self.config_tester.run_common_tests()


class ApexModelTest(ApexCommonTestBase, unittest.TestCase):
    pass


class ApexMLAModelTest(ApexCommonTestBase, unittest.TestCase):
    tester_config = COMMON_TESTS_MLA
