"""Bad inputs, as a user makes them: nonsense configs, model calls that misuse the inputs, recipe and command-line
mistakes. Each is refused before anything runs, with an error of a known class whose message names the field, the
file or the value; on the command line, in one line on stderr with exit status 2 and no file written.

The cases are tables: `CONFIG_CASES` (ApexConfig), `MODEL_CASES` (a forward call), `RECIPE_CASES` (a recipe file and
its command-line overrides, parsed) and `CLI_CASES` (a whole `apex-hf` command)."""

from pathlib import Path

import pytest
import torch
import yaml
from huggingface_hub.errors import StrictDataclassClassValidationError, StrictDataclassFieldValidationError
from tiny_configs import GQA_ALL_FEATURES, MLA_SIZES, tiny_config

from apex_hf import ApexConfigError, ApexForCausalLM
from apex_hf.cli import main
from apex_hf.posttrain.config import load_recipe
from apex_hf.pretrain.config import load_pretrain_config


REPO_ROOT = Path(__file__).resolve().parent.parent
TINY_RECIPES = REPO_ROOT / "recipes" / "apex-tiny"


# --------------------------------------------------------------------------------------------------------------------
# ApexConfig: (overrides of the tiny config, fragments the message names)

YARN = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64, "rope_theta": 1e4}
LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0, "rope_theta": 1e4}
LLAMA3["original_max_position_embeddings"] = 64
PER_TYPE_ROPE = {"full_attention": {"rope_theta": 1e4}, "sliding_attention": {"rope_theta": -1.0}}

CONFIG_CASES = [
    (dict(vocab_size=0), ["vocab_size=0", ">= 1"]),
    (dict(hidden_size=-32), ["hidden_size=-32", ">= 1"]),
    (dict(intermediate_size=0), ["intermediate_size=0", ">= 1"]),
    (dict(num_attention_heads=0), ["num_attention_heads=0", ">= 1"]),
    (dict(num_key_value_heads=-2), ["num_key_value_heads=-2", ">= 1"]),
    (dict(head_dim=0), ["head_dim=0", ">= 1"]),
    (dict(max_position_embeddings=0), ["max_position_embeddings=0", ">= 1"]),
    (dict(rms_norm_eps=0.0), ["rms_norm_eps=0.0", "> 0"]),
    (dict(rms_norm_eps=float("inf")), ["rms_norm_eps=inf", "> 0"]),
    (dict(rms_norm_eps=float("nan")), ["rms_norm_eps=nan"]),
    (dict(initializer_range=-0.02), ["initializer_range=-0.02", ">= 0"]),
    (dict(attention_dropout=1.0), ["attention_dropout=1.0", "in [0, 1)"]),
    (dict(partial_rotary_factor=1.5), ["partial_rotary_factor=1.5", "in (0, 1]"]),
    (dict(embedding_multiplier=-1.0), ["embedding_multiplier=-1.0", "> 0"]),
    (dict(sliding_window=-4), ["sliding_window=-4", ">= 1"]),
    (dict(sliding_window=4, full_attention_interval=0), ["full_attention_interval=0", ">= 1"]),
    (dict(query_pre_attn_scalar=0), ["query_pre_attn_scalar=0", "> 0"]),
    (dict(moe_layer_freq=0, num_experts=4), ["moe_layer_freq=0", ">= 1"]),
    (dict(first_k_dense_replace=-1), ["first_k_dense_replace=-1", ">= 0"]),
    (dict(num_experts=-4), ["num_experts=-4", ">= 0"]),
    (dict(num_experts=4, moe_intermediate_size=0), ["moe_intermediate_size=0", ">= 1"]),
    (dict(num_experts=4, num_shared_experts=-1), ["num_shared_experts=-1", ">= 0"]),
    (dict(num_experts=4, routed_scaling_factor=0.0), ["routed_scaling_factor=0.0", "> 0"]),
    (dict(num_experts=4, n_group=0), ["n_group=0", ">= 1"]),
    (dict(num_experts=4, topk_group=0), ["topk_group=0", ">= 1"]),
    (dict(num_experts=4, swiglu_alpha=-1.0), ["swiglu_alpha=-1.0", "> 0"]),
    (dict(router_bias_update_rate=-0.1), ["router_bias_update_rate=-0.1", ">= 0"]),
    (dict(mtp_loss_coef=-1.0), ["mtp_loss_coef=-1.0", ">= 0"]),
    (dict(consistency_loss_coef=float("nan")), ["consistency_loss_coef=nan"]),
    (dict(num_prelude_layers=-1), ["num_prelude_layers=-1", ">= 0"]),
    (dict(num_core_layers=0), ["num_core_layers=0", ">= 1"]),
    (dict(num_coda_layers=-1), ["num_coda_layers=-1", ">= 0"]),
    (dict(num_refinement_steps=-1), ["num_refinement_steps=-1", ">= 1"]),
    (dict(refinement_dim=0), ["refinement_dim=0", ">= 1"]),
    (dict(refinement_sampling_min=0), ["refinement_sampling_min=0", ">= 1"]),
    (dict(refinement_backprop_steps=0), ["refinement_backprop_steps=0", ">= 1"]),
    (dict(num_mtp_layers=-1), ["num_mtp_layers=-1", ">= 0"]),
    (dict(attention_type="mla", **{**MLA_SIZES, "q_lora_rank": 0}), ["q_lora_rank=0", ">= 1"]),
    (dict(attention_type="mla", **{**MLA_SIZES, "v_head_dim": -8}), ["v_head_dim=-8", ">= 1"]),
    (dict(rope_parameters={"rope_type": "default", "rope_theta": -1.0}), ["rope_parameters.rope_theta=-1.0", "> 0"]),
    (dict(rope_parameters={"rope_type": "default", "rope_theta": 0}), ["rope_parameters.rope_theta=0", "> 0"]),
    (dict(rope_parameters={"rope_type": "linear", "factor": -2.0, "rope_theta": 1e4}), ["factor=-2.0", "> 0"]),
    (dict(rope_parameters={"rope_type": "linear", "factor": 0, "rope_theta": 1e4}), ["factor=0", "> 0"]),
    (dict(rope_parameters={"rope_type": "dynamic", "factor": "2", "rope_theta": 1e4}), ["factor='2'", "a number"]),
    (dict(rope_parameters={**YARN, "original_max_position_embeddings": 0}), ["original_max_position_embeddings=0"]),
    (dict(rope_parameters={**YARN, "beta_fast": -32.0}), ["beta_fast=-32.0", "> 0"]),
    (dict(rope_parameters={**YARN, "attention_factor": 0.0}), ["attention_factor=0.0", "> 0"]),
    (dict(rope_parameters={**LLAMA3, "low_freq_factor": -1.0}), ["low_freq_factor=-1.0", "> 0"]),
    (dict(rope_parameters={"rope_type": "default", "rope_thta": 1e4}), ["'rope_thta'", "did you mean 'rope_theta'"]),
    (dict(rope_parameters={"rope_type": "yarns", "rope_theta": 1e4}), ["rope_type='yarns'", "did you mean 'yarn'"]),
    (
        dict(sliding_window=3, full_attention_interval=2, rope_parameters=PER_TYPE_ROPE),
        ["rope_parameters['sliding_attention'].rope_theta=-1.0"],
    ),
    (dict(memory_injection="gated-add"), ["memory_injection='gated-add'", "did you mean 'gated_add'"]),
    (dict(attention_type="GQA"), ["attention_type='GQA'", "one of ('gqa', 'mla')"]),
    (dict(hidden_act="gelu_tanh"), ["hidden_act='gelu_tanh'", "did you mean 'gelu_pytorch_tanh'"]),
    (dict(refinement_sampling="uniformly"), ["refinement_sampling='uniformly'", "did you mean 'uniform'"]),
    (dict(hidden_size="32"), ["hidden_size", "expected int, got str"]),
    (dict(rms_norm_eps=1), ["rms_norm_eps", "expected float, got int"]),
]


@pytest.mark.parametrize("overrides,fragments", CONFIG_CASES, ids=[f[0] for _, f in CONFIG_CASES])
def test_config_refuses_nonsense(overrides, fragments):
    with pytest.raises(ApexConfigError) as error:
        tiny_config(**overrides)
    assert_names(str(error.value), fragments)
    assert "\n" not in str(error.value)


def test_config_error_is_a_value_error_and_huggingface_hubs_strict_errors():
    for cls in (ValueError, StrictDataclassClassValidationError, StrictDataclassFieldValidationError):
        assert issubclass(ApexConfigError, cls)


def test_config_mutated_out_of_range_is_refused_on_save_and_on_assignment(tmp_path):
    config = tiny_config()
    config.moe_layer_freq = 0
    with pytest.raises(ApexConfigError, match="moe_layer_freq=0 is invalid: must be >= 1"):
        config.save_pretrained(tmp_path)
    assert not (tmp_path / "config.json").exists()
    with pytest.raises(ApexConfigError, match="hidden_size"):
        config.hidden_size = "wide"


# --------------------------------------------------------------------------------------------------------------------
# Model calls: (what to pass, the error class, fragments the message names). `ids` is a (2, 5) batch.

VOCAB, HIDDEN, MAX_POSITIONS = 97, 32, 128


def ids_batch() -> torch.Tensor:
    return torch.randint(3, VOCAB, (2, 5), generator=torch.Generator().manual_seed(0))


MODEL_CASES = {
    "float input_ids": (lambda ids: dict(input_ids=ids.float()), TypeError, ["input_ids", "integer", "float32"]),
    "bool input_ids": (lambda ids: dict(input_ids=ids > 50), TypeError, ["input_ids", "torch.bool"]),
    "1-D input_ids": (lambda ids: dict(input_ids=ids[0]), ValueError, ["input_ids must be 2-D", "(5,)"]),
    "3-D input_ids": (lambda ids: dict(input_ids=ids[None]), ValueError, ["input_ids must be 2-D", "(1, 2, 5)"]),
    "token id past the vocabulary": (
        lambda ids: dict(input_ids=ids.index_fill(1, torch.tensor([2]), VOCAB)),
        IndexError,
        ["token id 97", "[0, 97)"],
    ),
    "negative token id": (lambda ids: dict(input_ids=-ids), IndexError, ["input_ids contains token id -"]),
    "attention_mask too short": (
        lambda ids: dict(input_ids=ids, attention_mask=torch.ones(2, 4, dtype=torch.long)),
        ValueError,
        ["attention_mask has shape (2, 4)", "tokens=5"],
    ),
    "attention_mask too long": (
        lambda ids: dict(input_ids=ids, attention_mask=torch.ones(2, 6, dtype=torch.long)),
        ValueError,
        ["attention_mask has shape (2, 6)"],
    ),
    "attention_mask of another batch": (
        lambda ids: dict(input_ids=ids, attention_mask=torch.ones(3, 5, dtype=torch.long)),
        ValueError,
        ["attention_mask has shape (3, 5)", "batch=2"],
    ),
    "negative position_ids": (
        lambda ids: dict(input_ids=ids, position_ids=torch.arange(-2, 3)[None]),
        ValueError,
        ["position -2"],
    ),
    "position_ids of another length": (
        lambda ids: dict(input_ids=ids, position_ids=torch.arange(4)[None]),
        ValueError,
        ["position_ids has shape (1, 4)"],
    ),
    "float position_ids": (
        lambda ids: dict(input_ids=ids, position_ids=torch.arange(5.0)[None]),
        TypeError,
        ["position_ids must be an integer tensor"],
    ),
    "labels past the vocabulary": (
        lambda ids: dict(input_ids=ids, labels=ids.index_fill(1, torch.tensor([0]), VOCAB + 3)),
        ValueError,
        ["labels contains 100", "-100", "[0, 97)"],
    ),
    "labels below -100": (lambda ids: dict(input_ids=ids, labels=ids - 200), ValueError, ["labels contains -1"]),
    "labels of another length": (
        lambda ids: dict(input_ids=ids, labels=ids[:, :4]),
        ValueError,
        ["labels has shape (2, 4)", "(2, 5)"],
    ),
    "float labels": (lambda ids: dict(input_ids=ids, labels=ids.float()), TypeError, ["labels must be an integer"]),
    "inputs_embeds of another hidden size": (
        lambda ids: dict(inputs_embeds=torch.randn(2, 5, HIDDEN + 1)),
        ValueError,
        ["inputs_embeds must have shape", f"hidden_size={HIDDEN}", "(2, 5, 33)"],
    ),
    "2-D inputs_embeds": (
        lambda ids: dict(inputs_embeds=torch.randn(5, HIDDEN)),
        ValueError,
        ["inputs_embeds must have shape", "(5, 32)"],
    ),
    "integer inputs_embeds": (
        lambda ids: dict(inputs_embeds=torch.ones(2, 5, HIDDEN, dtype=torch.long)),
        TypeError,
        ["inputs_embeds must be floating point"],
    ),
    "both input_ids and inputs_embeds": (
        lambda ids: dict(input_ids=ids, inputs_embeds=torch.randn(2, 5, HIDDEN)),
        ValueError,
        ["exactly one of input_ids or inputs_embeds"],
    ),
    "num_refinement_steps above the maximum": (
        lambda ids: dict(input_ids=ids, num_refinement_steps=4),
        ValueError,
        ["num_refinement_steps=4", "1..3"],
    ),
}


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return ApexForCausalLM(tiny_config(**GQA_ALL_FEATURES)).eval()


@pytest.fixture
def embedding_calls(model):
    """How many times the embedding ran: a refused call must stop before any compute."""
    calls = []
    handle = model.model.embed_tokens.register_forward_pre_hook(lambda module, args: calls.append(1))
    yield calls
    handle.remove()


@pytest.mark.parametrize("case", list(MODEL_CASES))
def test_model_call_refuses_misuse_before_any_compute(case, model, embedding_calls):
    make_inputs, error_class, fragments = MODEL_CASES[case]
    with pytest.raises(error_class) as error:
        model(**make_inputs(ids_batch()))
    assert_names(str(error.value), fragments)
    assert embedding_calls == []


@pytest.mark.parametrize("continued_with", [1, 3])
def test_cache_continued_with_another_number_of_passes_names_both(model, continued_with):
    ids = ids_batch()
    cache = model(input_ids=ids, use_cache=True, num_refinement_steps=2).past_key_values
    with pytest.raises(ValueError) as error:
        model(input_ids=ids[:, :1], past_key_values=cache, num_refinement_steps=continued_with)
    assert_names(str(error.value), ["num_refinement_steps=2", f"num_refinement_steps={continued_with}"])


def test_good_calls_still_run(model):
    """The checks refuse only misuse: a padded batch with positions, labels and a continued cache runs."""
    ids = ids_batch()
    mask = torch.ones(2, 5, dtype=torch.long)
    mask[0, 0] = 0
    labels = ids.masked_fill(mask == 0, -100)
    assert model(input_ids=ids, attention_mask=mask, labels=labels).loss.isfinite()
    out = model(input_ids=ids, attention_mask=mask, use_cache=True, num_refinement_steps=2)
    step = model(
        input_ids=ids[:, :1],
        attention_mask=torch.cat([mask, torch.ones(2, 1, dtype=torch.long)], dim=1),
        past_key_values=out.past_key_values,
        num_refinement_steps=2,
    )
    assert step.logits.shape == (2, 1, VOCAB)


# --------------------------------------------------------------------------------------------------------------------
# Recipes, parsed: (recipe, command-line overrides, error class, fragments). Recipes are the apex-tiny ones.

RECIPE_CASES = [
    ("pretrain", ["--max_steps", "-3"], ValueError, ["pretrain.yaml", "max_steps=-3"]),
    ("pretrain", ["--max_steps", "abc"], ValueError, ["pretrain.yaml", "max_steps='abc'", "an integer"]),
    ("pretrain", ["--max_steps", "2.5"], ValueError, ["max_steps=2.5", "an integer"]),
    ("pretrain", ["--seq_len", "-5"], ValueError, ["seq_len=-5"]),
    ("pretrain", ["--learning_rate", "fast"], ValueError, ["learning_rate='fast'", "a number"]),
    ("pretrain", ["--learning_rate", ".inf"], ValueError, ["learning_rate=inf", "finite"]),
    ("pretrain", ["--torch_compile", "sometimes"], ValueError, ["torch_compile='sometimes'", "true, false or auto"]),
    (
        "pretrain",
        ["--checkpoint_staging_dir", "no/such/folder"],
        ValueError,
        ["checkpoint_staging_dir='no/such/folder'", "an existing folder"],
    ),
    ("pretrain", ["--max_step", "3"], ValueError, ["'max_step'", "did you mean 'max_steps'"]),
    ("pretrain", ["--tokenizer.train_vocab_size", "many"], ValueError, ["[tokenizer]", "train_vocab_size='many'"]),
    (
        "pretrain",
        ["--model.overrides.num_refinment_steps", "2"],
        ValueError,
        ["[model]", "model.overrides", "'num_refinment_steps'", "did you mean 'num_refinement_steps'"],
    ),
    ("pretrain", ["--model.overrides.moe_layer_freq", "0"], ValueError, ["model.overrides", "moe_layer_freq=0"]),
    (
        "pretrain",
        ["--model.overrides.rope_parameters", "{rope_type: linear, factor: -2.0, rope_theta: 10000.0}"],
        ValueError,
        ["model.overrides", "rope_parameters.factor=-2.0", "> 0"],
    ),
    (
        "pretrain",
        ["--model.overrides.rope_parameters", "{rope_type: default, rope_theta: -1.0}"],
        ValueError,
        ["rope_parameters.rope_theta=-1.0"],
    ),
    ("pretrain", ["--model.overrides", "7"], ValueError, ["model.overrides must be a mapping", "7"]),
    ("pretrain", ["--model.dtype", "float8"], ValueError, ["model.dtype='float8'"]),
    ("pretrain", ["--data.datasets", "[{path: text, data_files: empty.txt}]"], ValueError, ["empty.txt is empty"]),
    ("pretrain", ["--data.datasets", "[{path: text, data_files: blank.txt}]"], ValueError, ["blank.txt is empty"]),
    ("pretrain", ["--data.datasets", "[{path: text, data_files: nowhere.txt}]"], FileNotFoundError, ["nowhere.txt"]),
    ("pretrain", ["--data.datasets", "[{path: text, data_files: x.txt, weight: heavy}]"], ValueError, ["weight"]),
    ("pretrain", ["--seq_len", "[1"], ValueError, ["--seq_len", "not a YAML value"]),
    ("pretrain", ["--data.datasets", "[{path: text, data_files: 5}]"], ValueError, ["[data]", "data_files=5"]),
    (
        "sft",
        ["--data.datasets", "[{path: json, data_files: [a.jsonl, 7]}]"],
        ValueError,
        ["data_files=['a.jsonl', 7]"],
    ),
    ("sft", ["--max_steps", "-3"], ValueError, ["sft.yaml", "max_steps=-3", "-1 (train for num_train_epochs)"]),
    ("sft", ["--max_steps", "0"], ValueError, ["max_steps=0"]),
    ("sft", ["--learning_rate", "fast"], ValueError, ["sft.yaml", "learning_rate='fast'", "a number"]),
    ("sft", ["--learning_rate", "-1e-3"], ValueError, ["learning_rate=-0.001", "> 0"]),
    ("sft", ["--per_device_train_batch_size", "0"], ValueError, ["per_device_train_batch_size=0", ">= 1"]),
    ("sft", ["--gradient_accumulation_steps", "-2"], ValueError, ["gradient_accumulation_steps=-2"]),
    ("sft", ["--num_train_epochs", "0"], ValueError, ["num_train_epochs=0", "> 0"]),
    ("sft", ["--warmup_steps", "-1"], ValueError, ["warmup_steps=-1", ">= 0"]),
    ("sft", ["--adam_beta1", "1.5"], ValueError, ["adam_beta1=1.5", "in [0, 1)"]),
    ("sft", ["--max_length", "0"], ValueError, ["max_length=0", ">= 1"]),
    ("sft", ["--seed", "-1"], ValueError, ["seed=-1"]),
    ("sft", ["--bf16", "maybe"], ValueError, ["bf16='maybe'", "true or false"]),
    ("sft", ["--max_lenght", "64"], ValueError, ["'max_lenght'", "did you mean 'max_length'"]),
    ("sft", ["--model.dtype", "float8"], ValueError, ["model.dtype", "float8"]),
    ("sft", ["--data.datasets", "[{path: json, data_files: empty.jsonl}]"], ValueError, ["empty.jsonl is empty"]),
    ("dpo", ["--beta", "-0.1"], ValueError, ["dpo.yaml", "beta=-0.1", ">= 0"]),
    ("dpo", ["--max_steps", "-3"], ValueError, ["dpo.yaml", "max_steps=-3"]),
    ("grpo", ["--temperature", "0"], ValueError, ["grpo.yaml", "temperature=0", "> 0"]),
    ("grpo", ["--top_p", "1.5"], ValueError, ["top_p=1.5", "in (0, 1]"]),
    ("grpo", ["--num_iterations", "0"], ValueError, ["num_iterations=0"]),
]


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    """A working folder with the apex-tiny recipes, the repository's data (linked) and empty data files; the
    recipes' relative paths resolve here. Returns the folder and a snapshot of its files, to show none was added."""
    (tmp_path / "data").symlink_to(REPO_ROOT / "data")
    for name in ("pretrain", "sft", "dpo", "grpo"):
        (tmp_path / f"{name}.yaml").write_text((TINY_RECIPES / f"{name}.yaml").read_text())
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "blank.txt").write_text("\n  \n\n")
    (tmp_path / "empty.jsonl").write_text("")
    (tmp_path / "x.txt").write_text("a document\n")
    (tmp_path / "broken.yaml").write_text("model:\n  preset: apex-tiny\ndata: [\n  {path: text\n")
    (tmp_path / "list.yaml").write_text("- model\n- data\n")
    (tmp_path / "config.json").write_text('{"model_type": "apex", "num_experts": 2, "num_experts_per_tok": 4}')
    (tmp_path / "freq.json").write_text('{"model_type": "apex", "num_experts": 2, "moe_layer_freq": 0}')
    (tmp_path / "rope.json").write_text('{"model_type": "apex", "rope_parameters": {"rope_theta": -1.0}}')
    for name, stages in PIPELINES.items():
        (tmp_path / f"{name}.yaml").write_text(f"output_dir: out\nstages: {stages}\n")
    monkeypatch.chdir(tmp_path)
    return tmp_path


# Pipeline files with one mistake each: name -> their `stages`
PIPELINES = {
    "stages-not-a-list": "3",
    "stage-misspelt": "[{stage: sftt, config: sft.yaml}]",
    "stage-field-misspelt": "[{stage: sft, config: sft.yaml, overides: {max_steps: 2}}]",
    "stage-overrides-not-a-mapping": "[{stage: sft, config: sft.yaml, overrides: 5}]",
    "stage-override-out-of-range": "[{stage: sft, config: sft.yaml, overrides: {max_steps: -3}}]",
    "stage-file-missing": "[{stage: sft, config: gone.yaml}]",
}


def files_under(folder: Path) -> set[Path]:
    return {path for path in folder.rglob("*") if "data" not in path.relative_to(folder).parts[:1]}


@pytest.mark.parametrize(
    "stage,overrides,error_class,fragments", RECIPE_CASES, ids=[f"{c[0]} {' '.join(c[1])}" for c in RECIPE_CASES]
)
def test_recipe_mistake_is_refused_naming_file_and_field(workdir, stage, overrides, error_class, fragments):
    before = files_under(workdir)
    overrides = [*overrides, "--output_dir", "out"]
    with pytest.raises(error_class) as error:
        if stage == "pretrain":
            load_pretrain_config(f"{stage}.yaml", overrides)
        else:
            load_recipe(f"{stage}.yaml", stage, overrides)
    assert_names(str(error.value), fragments)
    assert files_under(workdir) == before


# --------------------------------------------------------------------------------------------------------------------
# The command line: (argv, fragments of the one line on stderr)

CLI_CASES = [
    (["info", "apex-tiny", "--seq-len", "-5"], ["--seq-len", "-5 is invalid", ">= 1"]),
    (["info", "apex-tiny", "--seq-len", "long"], ["--seq-len", "'long' is not an integer"]),
    (["info", "apex-tiny", "--dtype-bytes", "0"], ["--dtype-bytes", "0 is invalid"]),
    (["demo", "--threads", "0"], ["--threads", "0 is invalid", ">= 1"]),
    (["info", "apex-tiny", "--bogus"], ["unrecognized arguments: --bogus"]),
    ([], ["the following arguments are required: command"]),
    (["sft"], ["the following arguments are required: --config"]),
    (["trian"], ["invalid choice: 'trian'"]),
    (["info", "apex-tni"], ["unknown preset 'apex-tni'"]),
    (["info", "nowhere/config.json"], ["no such file or folder: nowhere/config.json"]),
    (["info", "config.json"], ["num_experts_per_tok=4", "num_experts=2"]),
    (["info", "freq.json"], ["moe_layer_freq=0", ">= 1"]),
    (["info", "rope.json"], ["rope_parameters.rope_theta=-1.0", "> 0"]),
    (["info", "pretrain.yaml"], ["pretrain.yaml is not a JSON config"]),
    (["pretrain", "--config", "missing.yaml"], ["missing.yaml not found"]),
    (["pretrain", "--config", "broken.yaml"], ["broken.yaml:", "not valid YAML"]),
    (["pretrain", "--config", "list.yaml"], ["list.yaml", "a recipe must be a YAML mapping"]),
    (["pretrain", "--config", "pretrain.yaml", "--max_steps", "-3"], ["pretrain.yaml", "max_steps=-3"]),
    (["pretrain", "--config", "pretrain.yaml", "--max_steps", "ten"], ["max_steps='ten'", "an integer"]),
    (["pretrain", "--config", "pretrain.yaml", "--seq_len", "-5"], ["seq_len=-5"]),
    (["pretrain", "--config", "pretrain.yaml", "--seq_len", "100000"], ["seq_len=100000", "max_position_embeddings"]),
    (
        ["pretrain", "--config", "pretrain.yaml", "--model.overrides.num_refinment_steps", "2"],
        ["[model]", "'num_refinment_steps'", "did you mean 'num_refinement_steps'"],
    ),
    (
        ["pretrain", "--config", "pretrain.yaml", "--model.overrides.moe_layer_freq", "0"],
        ["model.overrides", "moe_layer_freq=0"],
    ),
    (
        [
            "pretrain",
            "--config",
            "pretrain.yaml",
            "--model.overrides.rope_parameters",
            "{factor: -2.0, rope_type: linear}",
        ],
        ["rope_parameters.factor=-2.0"],
    ),
    (
        ["pretrain", "--config", "pretrain.yaml", "--data.datasets", "[{path: text, data_files: empty.txt}]"],
        ["pretrain.yaml [data]", "empty.txt is empty"],
    ),
    (
        ["pretrain", "--config", "pretrain.yaml", "--data.datasets", "[{path: text, data_files: gone.txt}]"],
        ["gone.txt not found"],
    ),
    (["pretrain", "--config", "pretrain.yaml", "--lr_scheduler_type", "cosin"], ["lr_scheduler_type='cosin'"]),
    (["pretrain", "--config", "pretrain.yaml", "--mixed_precision", "fp8"], ["mixed_precision='fp8'"]),
    (["pretrain", "--config", "pretrain.yaml", "--report_to", "wandbb"], ["report_to='wandbb'"]),
    (["sft", "--config", "sft.yaml", "--max_steps", "-3"], ["sft.yaml", "max_steps=-3"]),
    (["sft", "--config", "sft.yaml", "--learning_rate", "fast"], ["learning_rate='fast'"]),
    (
        ["sft", "--config", "sft.yaml", "--data.datasets", "[{path: json, data_files: empty.jsonl}]"],
        ["sft.yaml [data]", "empty.jsonl is empty"],
    ),
    (["sft", "--config", "sft.yaml", "--per_device_train_batch_size", "-4"], ["per_device_train_batch_size=-4"]),
    (["sft", "--config", "sft.yaml", "--max_lenght", "64"], ["did you mean 'max_length'"]),
    (["sft", "--config", "sft.yaml", "--learning_rate", "[1"], ["--learning_rate", "not a YAML value"]),
    (["dpo", "--config", "dpo.yaml", "--beta", "-1"], ["dpo.yaml", "beta=-1"]),
    (["grpo", "--config", "grpo.yaml", "--reward_funcs", "[acuracy]"], ["acuracy"]),
    (["grpo", "--config", "grpo.yaml", "--temperature", "-1"], ["temperature=-1"]),
    (["pipeline", "missing-pipeline.yaml"], ["missing-pipeline.yaml not found"]),
    (["pipeline", "stages-not-a-list.yaml"], ["stages-not-a-list.yaml", "stages must be a list", "3"]),
    (["pipeline", "stage-misspelt.yaml"], ["stages[0]", "unknown stage 'sftt'", "did you mean 'sft'"]),
    (["pipeline", "stage-field-misspelt.yaml"], ["stages[0]", "'overides'", "did you mean 'overrides'"]),
    (["pipeline", "stage-overrides-not-a-mapping.yaml"], ["stages[0]", "overrides must be a mapping", "5"]),
    (["pipeline", "stage-override-out-of-range.yaml"], ["sft.yaml", "max_steps=-3"]),
    (["pipeline", "stage-file-missing.yaml"], ["gone.yaml not found"]),
    (["upcycle", "nowhere", "out", "--experts", "-1"], ["--experts", "-1 is invalid"]),
    (["upcycle", "nowhere", "out", "--refinement-steps", "0"], ["--refinement-steps", "0 is invalid"]),
    (["upcycle", "nowhere", "out", "--prelude-layers", "-1"], ["--prelude-layers", "-1 is invalid"]),
    (["convert", "nowhere", "out"], ["nowhere"]),
    (["preprocess", "x.txt", "--output", "pp", "--workers", "0"], ["workers=0", ">= 1"]),
    (["preprocess", "x.txt", "--output", "pp", "--filters", "c5"], ["filters: unknown", "c5"]),
    (["preprocess", "nowhere.txt", "--output", "pp"], ["nowhere.txt does not exist"]),
]


@pytest.mark.parametrize("argv,fragments", CLI_CASES, ids=[" ".join(argv) or "(nothing)" for argv, _ in CLI_CASES])
def test_cli_mistake_is_one_line_with_status_2_and_writes_nothing(workdir, capsys, argv, fragments):
    before = files_under(workdir)
    with pytest.raises(SystemExit) as exit_info:
        main([*argv, *(["--output_dir", "out"] if "--config" in argv else [])])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert len(err.splitlines()) == 1, err
    assert err.startswith((f"apex-hf {argv[0] if argv else ''}: error: ", "apex-hf: error: ")), err
    assert_names(err, fragments)
    assert files_under(workdir) == before


def test_debug_shows_the_traceback_of_bad_input(workdir):
    """With --debug the error propagates (Python prints its traceback) instead of exiting with one line."""
    with pytest.raises(ValueError, match="max_steps=-3"):
        main(["sft", "--config", "sft.yaml", "--max_steps", "-3", "--debug"])


def test_a_bug_keeps_its_traceback(monkeypatch):
    """Only user errors become one line: anything else (here a KeyError from inside a command) propagates."""
    import apex_hf.cli as cli

    def broken(args, overrides):
        raise KeyError("a bug")

    command = cli.COMMANDS["presets"]
    monkeypatch.setitem(cli.COMMANDS, "presets", cli.Command(command.help, command.add_arguments, broken))
    with pytest.raises(KeyError, match="a bug"):
        main(["presets"])


def assert_names(message: str, fragments: list[str]) -> None:
    missing = [fragment for fragment in fragments if fragment not in message]
    assert not missing, f"{missing} not in: {message}"


# --------------------------------------------------------------------------------------------------------------------
# What the checks must still let through


@pytest.mark.parametrize("stage", ["pretrain", "sft", "dpo", "grpo"])
def test_the_repositorys_recipes_still_pass(workdir, stage):
    overrides = ["--output_dir", "out"]
    if stage == "pretrain":
        max_steps = load_pretrain_config("pretrain.yaml", overrides).max_steps
    else:
        max_steps = load_recipe(f"{stage}.yaml", stage, overrides).args.max_steps
    assert max_steps == yaml.safe_load((TINY_RECIPES / f"{stage}.yaml").read_text())["max_steps"]


def test_number_like_strings_in_model_overrides_are_numbers(workdir):
    """YAML 1.1 reads `1e4` as a string; in the free-form model.overrides it means the number, as in typed fields."""
    overrides = [
        "--output_dir",
        "out",
        "--model.overrides",
        "{rms_norm_eps: 1e-5, rope_parameters: {rope_theta: 1e4}}",
    ]
    config = load_pretrain_config("pretrain.yaml", overrides).model_config()
    assert config.rms_norm_eps == 1e-5 and config.rope_parameters["rope_theta"] == 1e4
