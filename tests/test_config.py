"""Config files, overrides and error messages that name the field and the value."""

import math
import re

import pytest
import torch

from refine.config import dump_config, load_config, validate_config
from refine.config_parsing import ConfigError


def test_defaults_are_the_paper_defaults():
    config = load_config()
    r = config.refine
    assert (r.rollout_len, r.num_chunks, r.num_samples, r.temperature) == (5, 8, 1, 1.0)
    assert (r.lambda_ntp, r.lambda_nsp, r.reward) == (1.0, 0.2, "cosine")
    assert (config.optim.lr, config.optim.weight_decay, config.optim.grad_clip) == (1e-6, 0.01, 1.0)
    assert config.model.model_type == "delta_net"


def test_yaml_file_and_overrides(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("model:\n  model_type: gated_deltanet\n  hidden_size: 64\n  num_heads: 2\n  head_dim: 32\n"
                    "refine:\n  num_samples: 4\n")
    config = load_config(path, ["model.hidden_size=128", "refine.reward=hybrid", "train.mode=onepass"])
    assert config.model.model_type == "gated_deltanet"
    assert config.model.hidden_size == 128 and config.model.head_dim == 32
    assert config.refine.num_samples == 4 and config.refine.reward == "hybrid"
    again = tmp_path / "again.yaml"
    again.write_text(dump_config(config))
    assert load_config(again) == config


def test_stream_takeover_waits_out_the_orchestrators_restart():
    # A live consumer takes a silent one's entries over only after the orchestrator, which acts after
    # one heartbeat timeout, had its chance to replace it and release them (no race for the batch).
    service = load_config(None, ["service.heartbeat_timeout_s=3"]).service
    assert service.reclaim_idle_ms == 6000
    assert "reclaim_idle_ms" not in dump_config(load_config())  # derived, not a setting


@pytest.mark.parametrize("override,field,value", [
    ("refine.num_chunks=0", "refine.num_chunks", "0"),
    ("train.mode=turbo", "train.mode", "turbo"),
    ("model.hidden_size=abc", "model", "abc"),
    ("train.device=tpu", "train.device", "tpu"),
    ("optim.lr=-1", "optim.lr", "-1"),
    ("refine.unknown=1", "refine.unknown", "1"),
    ("service.heartbeat_timeout_s=1", "service.heartbeat_timeout_s", "1"),
    ("service.key_ttl_s=0", "service.key_ttl_s", "0"),
    ("service.key_ttl_s=-60", "service.key_ttl_s", "-60"),
    ("service.key_ttl_s=inf", "service.key_ttl_s", "inf"),
    ("service.key_ttl_s=soon", "service.key_ttl_s", "soon"),
])
def test_wrong_values_name_field_and_value(override, field, value):
    with pytest.raises(ConfigError) as err:
        load_config(None, [override])
    message = str(err.value)
    assert field in message and value in message


def test_too_short_documents_for_the_chunks_are_refused():
    with pytest.raises(ConfigError, match="data.seq_len=40"):
        load_config(None, ["data.seq_len=40"])


def test_a_minimum_document_length_below_what_rollouts_need_is_refused():
    # margin 40 and k = 5 need documents of 80 tokens; the default data.min_length of 64 would let
    # shorter ones through to the rollout workers, which would fail on them.
    with pytest.raises(ConfigError, match="data.min_length=64 .*margin=40 .*>= 80 tokens"):
        load_config(None, ["refine.margin=40"])
    assert load_config(None, ["refine.margin=40", "data.min_length=80"]).data.min_length == 80
    assert load_config(None, ["refine.margin=40", "train.mode=ntp"]).train.mode == "ntp"  # no rollouts


@pytest.mark.parametrize("tasks, words", [("[]", "at least 1 item"), ("[niah,niah]", "names a task twice")])
def test_the_main_jobs_eval_tasks_are_each_named_once(tasks, words):
    with pytest.raises(ConfigError, match=rf"demo.eval_tasks: .*{words}"):
        load_config(None, [f"demo.eval_tasks={tasks}"])


def test_grpo_groups_follow_the_paper_code_unless_set():
    # The paper's code groups a document's c rollouts when n = 1 and each position's n samples when n > 1.
    assert load_config().refine.groups == "document"
    assert load_config(None, ["refine.num_samples=4"]).refine.groups == "position"
    assert load_config(None, ["refine.num_samples=4", "refine.group_by=document"]).refine.groups == "document"
    with pytest.raises(ConfigError, match="group_by='position' with num_samples=1"):
        load_config(None, ["refine.group_by=position"])
    # One chunk and one sample: a document's group is its one rollout, whose advantage is 0 (a silent NTP-only run).
    with pytest.raises(ConfigError, match="num_chunks=1 with num_samples=1 gives each document one rollout"):
        load_config(None, ["refine.num_chunks=1"])
    assert load_config(None, ["refine.num_chunks=1", "refine.num_samples=2"]).refine.groups == "position"


def test_a_top_p_that_keeps_only_the_likeliest_token_is_greedy_and_refused_with_position_groups():
    # The likeliest of 260 tokens has probability at least 1/260: top_p=1e-3 keeps it alone, whatever the logits.
    with pytest.raises(ConfigError, match=r"refine.top_p=0.001 keeps only the likeliest of model.vocab_size=260 "):
        load_config(None, ["refine.num_samples=4", "refine.top_p=1e-3"])
    assert load_config(None, ["refine.num_samples=4", "refine.top_p=0.01"]).refine.top_p == 0.01
    assert load_config(None, ["refine.top_p=1e-3"]).refine.groups == "document"  # n = 1: groups span positions


@pytest.mark.parametrize("greedy", ["refine.temperature=0", "refine.top_k=1"])
def test_greedy_samples_of_a_position_in_groups_of_their_own_are_refused(greedy):
    # The n greedy rollouts of a position are one rollout repeated: per-position advantages would all be 0.
    setting = greedy.removeprefix("refine.")
    with pytest.raises(ConfigError, match=re.escape(f"{setting} decodes greedily, so the num_samples=4 rollouts")):
        load_config(None, [greedy, "refine.num_samples=4"])
    assert load_config(None, [greedy, "refine.num_samples=4", "refine.group_by=document"]).refine.groups == "document"
    assert load_config(None, [greedy]).refine.num_samples == 1


@pytest.mark.parametrize("greedy", ["refine.temperature=0", "refine.top_k=1", "refine.top_p=0.001"])
def test_greedy_samples_of_a_document_of_one_chunk_are_refused(greedy):
    """With num_chunks=1 a document's group holds one position's rollouts: greedy ones are one rollout repeated, and
    every advantage was 0 without a word."""
    with pytest.raises(ConfigError, match="num_chunks=1") as refusal:
        load_config(None, [greedy, "refine.num_samples=4", "refine.group_by=document", "refine.num_chunks=1"])
    assert "every advantage" in str(refusal.value)
    assert load_config(None, [greedy, "refine.num_samples=4", "refine.group_by=document"]).refine.num_chunks == 8


def test_a_loss_of_zero_weights_is_refused_outside_ntp():
    """lambda_ntp=0 with lambda_nsp=0 gave loss 0 every step (the weights only decayed), exit 0."""
    with pytest.raises(ConfigError, match=re.escape("refine.lambda_ntp=0 and refine.lambda_nsp=0 make the loss of "
                                                    "train.mode='onepass' 0")):
        load_config(None, ["refine.lambda_ntp=0", "refine.lambda_nsp=0", "train.mode=onepass"])
    assert load_config(None, ["refine.lambda_ntp=0", "refine.lambda_nsp=0", "train.mode=ntp"]).train.mode == "ntp"
    assert load_config(None, ["refine.lambda_ntp=0"]).refine.lambda_nsp == 0.2


@pytest.mark.parametrize("settings, named", [
    (["refine.selection=argmax", "refine.selection_temperature=50"], "selection_temperature=50.0 shapes"),
    (["refine.selection=uniform", "refine.selection_temperature=0.5"], "selection='uniform' does not read it"),
    (["refine.temperature=0", "refine.top_k=5"], "top_k=5 narrows the tokens"),
    (["refine.temperature=0", "refine.top_p=0.3"], "top_p=0.3 narrows the tokens"),
])
def test_a_rollout_setting_the_others_leave_unread_is_refused(settings, named):
    with pytest.raises(ConfigError, match=re.escape(named)):
        load_config(None, settings)
    # A run's config.yaml states every setting: its defaults are read back.
    config = load_config(None, [settings[0]])
    assert validate_config(config.model_dump(mode="json")) == config


@pytest.mark.parametrize("setting, instead", [("train.steps=5", "demo.pretrain_steps and demo.branch_steps"),
                                              ("optim.lr=0.1", "demo.pretrain_lr and demo.branch_lr")])
def test_the_main_job_refuses_a_step_count_or_rate_its_stages_would_not_read(setting, instead):
    from refine.config import DEMO_DEFAULTS

    with pytest.raises(ConfigError, match=re.escape(f"{setting} is not read by the main job")) as refusal:
        load_config(None, [setting], defaults=DEMO_DEFAULTS)
    assert instead in str(refusal.value) and "--set demo=null" in str(refusal.value)
    assert load_config(None, [setting, "demo=null"], defaults=DEMO_DEFAULTS).demo is None


def test_malformed_override_and_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="section.field=value"):
        load_config(None, ["refine.num_chunks"])
    with pytest.raises(ConfigError, match=r"nope.yaml does not exist$"):
        load_config(tmp_path / "nope.yaml")


def test_an_example_config_missing_outside_a_checkout_names_the_command_that_copies_them(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # as after a `pip install .`, elsewhere
    with pytest.raises(ConfigError, match=r"^config file configs/demo.yaml does not exist \(the example configs ship "
                                          r"with the package: `refine configs` copies them into ./configs/\)$"):
        load_config("configs/demo.yaml")
    # A name no example has (a typo, the user's own file): copying the examples would not make it.
    with pytest.raises(ConfigError, match=r"^config file configs/dmeo.yaml does not exist$"):
        load_config("configs/dmeo.yaml")


def test_demo_file_spells_out_the_embedded_main_job():
    from pathlib import Path

    from refine.config import DEMO_DEFAULTS

    demo_file = Path(__file__).resolve().parents[1] / "configs" / "demo.yaml"
    assert load_config(demo_file) == load_config(None, defaults=DEMO_DEFAULTS)


def test_a_run_from_a_checkpoint_takes_its_model_section(tmp_path):
    import torch

    from refine.models import build_model, save_model

    torch.manual_seed(0)
    save_model(build_model(dict(model_type="gated_deltanet", vocab_size=300, hidden_size=32, num_heads=2,
                                num_hidden_layers=1, head_dim=16)), tmp_path / "ckpt")
    config = load_config(None, [f"train.init_from={tmp_path / 'ckpt'}"])
    assert (config.model.model_type, config.model.vocab_size, config.model.hidden_size) == ("gated_deltanet", 300, 32)
    # A model setting beside it would be dropped without a word: refused, naming both.
    with pytest.raises(ConfigError, match=r"--set model.vocab_size: train.init_from='.*ckpt' supplies the model"):
        load_config(None, [f"train.init_from={tmp_path / 'ckpt'}", "model.vocab_size=260"])
    with pytest.raises(ConfigError, match=r"train\.init_from='.*nowhere' does not exist"):
        load_config(None, [f"train.init_from={tmp_path / 'nowhere'}"])
    with pytest.raises(ConfigError, match=r"\n  train\.init_from='.*' has no config\.json: give a model directory"):
        load_config(None, [f"train.init_from={tmp_path}"])  # the message alone, without pydantic's wrapping
    # An OSError of the file system named no setting (pydantic passes it on as it is).
    with pytest.raises(ConfigError, match=r"train\.init_from='a{300}': cannot read config\.json: File name too long"):
        load_config(None, [f"train.init_from={'a' * 300}"])


def test_the_model_agrees_with_the_tokenizer(tmp_path):
    import torch

    from refine.config import fit_to_tokenizer
    from refine.models import build_model, save_model
    from refine.tokenizer import ByteTokenizer

    byte = ByteTokenizer()
    # From scratch: the model takes the tokenizer's special ids (gated_deltanet's own defaults are 1 and 2).
    scratch = fit_to_tokenizer(load_config(None, ["model.model_type=gated_deltanet"]), byte)
    assert (scratch.model.bos_token_id, scratch.model.eos_token_id, scratch.model.pad_token_id) == (
        byte.bos_id, byte.eos_id, byte.pad_id)
    with pytest.raises(ValueError, match=r"model has vocab_size=200, smaller than the vocabulary of tokenizer "
                                         r"'byte-level' \(260\): set model\.vocab_size to at least 260"):
        fit_to_tokenizer(load_config(None, ["model.vocab_size=200"]), byte)
    # From a checkpoint: its EOS must be the tokenizer's.
    torch.manual_seed(0)
    save_model(build_model(dict(model_type="delta_net", vocab_size=260, hidden_size=32, num_heads=2,
                                num_hidden_layers=1, eos_token_id=2)), tmp_path / "ckpt")
    with pytest.raises(ValueError, match=r"has eos_token_id=2 but tokenizer 'byte-level' ends documents with id 258"):
        fit_to_tokenizer(load_config(None, [f"train.init_from={tmp_path / 'ckpt'}"]), byte)
    save_model(build_model(dict(model_type="delta_net", vocab_size=200, hidden_size=32, num_heads=2,
                                num_hidden_layers=1, eos_token_id=258)), tmp_path / "small")
    with pytest.raises(ValueError, match=rf"^train\.init_from='{tmp_path / 'small'}' has vocab_size=200, smaller than "
                                         r"the vocabulary of tokenizer 'byte-level' \(260\): give the checkpoint's own "
                                         r"tokenizer \(--set tokenizer=DIR\)$"):
        fit_to_tokenizer(load_config(None, [f"train.init_from={tmp_path / 'small'}"]), byte)


def test_the_vllm_engine_serves_every_output_gate():
    # vLLM's gated norm has sigmoid as well as silu (swish); the plugin passes the activation through.
    sets = ["model.model_type=gated_deltanet", "model.head_dim=64", "model.expand_v=1", "rollout.engine=vllm"]
    for gate in ("swish", "silu", "sigmoid"):
        config = load_config(None, sets + [f"model.output_gate_activation={gate}"])
        assert config.model.output_gate_activation == gate


def test_home_relative_paths_are_expanded_once_for_every_reader(tmp_path, monkeypatch):
    import torch

    from refine.models import build_model, save_model

    monkeypatch.setenv("HOME", str(tmp_path))
    torch.manual_seed(0)
    save_model(build_model(dict(model_type="delta_net", vocab_size=300, hidden_size=32, num_heads=2,
                                num_hidden_layers=1)), tmp_path / "ckpt")
    config = load_config(None, ["train.init_from=~/ckpt", "train.out_dir=~/runs/x", "tokenizer=~/ckpt",
                                "data.source=~/docs.jsonl", "data.eval_source=~/heldout.jsonl"])
    assert (config.train.init_from, config.tokenizer) == (str(tmp_path / "ckpt"),) * 2
    assert config.train.out_dir == str(tmp_path / "runs" / "x") and config.model.vocab_size == 300
    # The data sources too: a run's source record read "~/docs.jsonl" as a relative path, and failed.
    assert (config.data.source, config.data.eval_source) == (str(tmp_path / "docs.jsonl"),
                                                             str(tmp_path / "heldout.jsonl"))


@pytest.mark.parametrize("override,field", [
    ("optim.lr=.inf", "optim.lr"),
    ("optim.weight_decay=.inf", "optim.weight_decay"),
    ("refine.lambda_nsp=.inf", "refine.lambda_nsp"),
    ("refine.temperature=.inf", "refine.temperature"),
    ("refine.kl_coef=.nan", "refine.kl_coef"),
    ("demo.pretrain_lr=.inf", "demo.pretrain_lr"),
    ("model.norm_eps=.inf", "model.norm_eps"),
])
def test_infinite_and_nan_floats_are_refused(override, field):
    # inf passes bounds such as ge=0, and then fails late or skips every step.
    with pytest.raises(ConfigError, match=rf"{field}: Input should be a finite number \(got (inf|nan)\)"):
        load_config(None, [override])


@pytest.mark.parametrize("override,field", [
    ("train.steps=true", "train.steps"),
    ("optim.lr=false", "optim.lr"),
    ("data.seq_len=true", "data.seq_len"),
    ("model.num_hidden_layers=true", "model.num_hidden_layers"),
    ("model.hidden_ratio=true", "model.hidden_ratio"),  # int | None
    ("rollout.vllm.max_num_seqs=true", "rollout.vllm.max_num_seqs"),
    ("model.inter_multi=true", "model.inter_multi"),  # LaCT's int | float
])
def test_booleans_are_refused_for_numbers(override, field):
    # pydantic's lax mode would read true as 1 and false as 0.0: a run of one step, a zero learning rate.
    lact = ["model.model_type=lact_swiglu", "model.hidden_size=32", "model.num_lact_heads=2", "model.num_heads=2"]
    with pytest.raises(ConfigError, match=rf"{field}: must be a number, got the boolean (True|False)"):
        load_config(None, [*(lact if "inter_multi" in field else []), override])


def test_booleans_stay_booleans():
    config = load_config(None, ["refine.norm_adv_by_std=false", "model.tie_word_embeddings=false"])
    assert config.refine.norm_adv_by_std is False and config.model.tie_word_embeddings is False


@pytest.mark.parametrize("betas,error", [
    ("[1.5, -1]", r"optim\.betas\.0: Input should be less than 1 \(got 1\.5\)\n"
                  r"  optim\.betas\.1: Input should be greater than or equal to 0 \(got -1\)"),
    ("[.nan, .nan]", r"optim\.betas\.0: Input should be a finite number \(got nan\)"),
    ("[0.9, 1.0]", r"optim\.betas\.1: Input should be less than 1 \(got 1\.0\)"),
])
def test_adam_betas_are_in_zero_one(betas, error):
    with pytest.raises(ConfigError, match=error):
        load_config(None, [f"optim.betas={betas}"])
    assert load_config(None, ["optim.betas=[0, 0.95]"]).optim.betas == (0.0, 0.95)


def test_unreadable_and_empty_config_files_name_the_file(tmp_path):
    with pytest.raises(ConfigError, match=rf"^config file {tmp_path} cannot be read: Is a directory$"):
        load_config(tmp_path)
    latin = tmp_path / "latin.yaml"
    latin.write_bytes(b"train:\n  out_dir: caf\xe9\n")
    with pytest.raises(ConfigError, match=rf"^config file {latin} is not UTF-8 text \(byte 21"):
        load_config(latin)
    for text in ("", "# nothing set yet\n"):  # would run the defaults unnoticed
        empty = tmp_path / "empty.yaml"
        empty.write_text(text)
        with pytest.raises(ConfigError, match=rf"^config file {empty} is empty: it holds no settings$"):
            load_config(empty)


def test_a_misspelt_model_field_is_refused_other_extras_are_kept():
    with pytest.raises(ConfigError, match=r"model\.hiden_size: not a field of delta_net: did you mean hidden_size\? "
                                          r"\(got 256\)"):
        load_config(None, ["model.hiden_size=256"])
    with pytest.raises(ConfigError, match=r"model\.head_dimm: not a field of gated_deltanet: did you mean head_dim\?"):
        load_config(None, ["model.model_type=gated_deltanet", "model.head_dimm=64"])
    with pytest.raises(ConfigError, match=r"model\.window_sise: not a field of lact_swiglu: did you mean window_size\?"):
        load_config(None, ["model.model_type=lact_swiglu", "model.window_sise=64"])
    # The libraries' own keys stay extras, near misses of a field or not (a config.json round-trips); other
    # keys are refused in a hand-written section (test_a_hand_written_model_section_holds_fields_only).
    extras = ["model.fuse_norm=true", "model.fuse_linear_cross_entropy=true", "model.sep_token_id=null"]
    assert load_config(None, extras).model.model_extra == {
        "fuse_norm": True, "fuse_linear_cross_entropy": True, "sep_token_id": None}


def test_every_config_json_the_libraries_write_still_loads():
    fla_models = pytest.importorskip("fla.models", reason="flash-linear-attention is a dev dependency")
    transformers = pytest.importorskip("transformers", reason="a dev dependency")

    from refine.models import config_from_dict
    from refine.models.lact import LaCTConfig

    bookkeeping = transformers.PretrainedConfig().to_dict()
    # transformers 4.x wrote its generation defaults too; sep_token_id is a letter from pad_token_id.
    bookkeeping.update(sep_token_id=None, torch_dtype="float32", decoder_start_token_id=None, top_k=50, top_p=1.0,
                       max_length=20, min_length=0, num_beams=1, temperature=1.0)
    written = [fla_models.DeltaNetConfig().to_dict(), fla_models.GatedDeltaNetConfig().to_dict(),
               LaCTConfig().to_json_dict()]
    for values in written:
        values = {**bookkeeping, **values}
        config = config_from_dict(values)
        assert set(config.model_dump()) == set(values) | {"num_heads"}  # nothing refused, nothing dropped


def test_the_minimum_document_length_fits_the_truncation():
    # Documents are cut to seq_len tokens: a longer minimum drops all of them, found only after a whole pass.
    with pytest.raises(ConfigError, match=r"data\.min_length=600 is larger than data\.seq_len=512"):
        load_config(None, ["data.min_length=600"])
    with pytest.raises(ConfigError, match=r"data\.min_length=64 is larger than data\.seq_len=48"):
        load_config(None, ["data.seq_len=48", "train.mode=ntp"])
    assert load_config(None, ["data.min_length=512"]).data.min_length == 512  # documents cut to 512 are kept


def test_a_minimum_document_length_below_two_is_refused():
    # One token (an empty text's BOS) has nothing to predict: NTP would fail on it far from the setting.
    for value in (0, 1):
        with pytest.raises(ConfigError, match=rf"data\.min_length: data\.min_length={value} keeps documents with "
                                              rf"nothing to train on: .* must be >= 2"):
            load_config(None, [f"data.min_length={value}", "train.mode=ntp"])
    assert load_config(None, ["data.min_length=2", "train.mode=ntp"]).data.min_length == 2


def test_the_seed_is_one_torch_accepts():
    import torch

    for seed in (2**64 - 1, -2**63):
        torch.Generator().manual_seed(load_config(None, [f"train.seed={seed}"]).train.seed)
    for seed in (2**64, -2**63 - 1, 99999999999999999999):
        with pytest.raises(ConfigError, match=rf"train\.seed: .* \(got {seed}\)"):
            load_config(None, [f"train.seed={seed}"])


@pytest.mark.parametrize("field", ["train.out_dir", "train.init_from", "tokenizer", "data.source",
                                   "service.metrics_discovery_dir", "data.text_column"])
def test_an_empty_path_or_column_is_refused(field):
    # "" would be the current directory: a run written into it, or a tokenizer looked for there.
    with pytest.raises(ConfigError, match=rf"{field}: String should have at least 1 character \(got ''\)"):
        load_config(None, [f"{field}="])


def test_devices_are_cpu_cuda_or_cuda_n():
    for device in ("cpu", "cuda", "cuda:1"):
        assert load_config(None, [f"train.device={device}"]).train.device == device
    for device in ("cudax", "cuda:x", "cuda:-1", "CPU", "mps"):
        with pytest.raises(ConfigError, match=rf"train\.device: .*got '{device}'"):
            load_config(None, [f"train.device={device}"])


def test_a_misspelt_field_or_section_names_the_closest_and_lists_what_exists():
    with pytest.raises(ConfigError, match=r"\n  train.step=5: no such field \(did you mean train.steps\? train has mode, "
                                          r"steps, batch_size, "):
        load_config(None, ["train.step=5"])
    with pytest.raises(ConfigError, match=r"\n  service.num_workers=2: no such field \(did you mean "
                                          r"service.num_rollout_workers\? service has mode, "):
        load_config(None, ["service.num_workers=2"])
    with pytest.raises(ConfigError, match=r"\n  demo.pretrain_step=2: no such field \(did you mean demo.pretrain_steps\?"):
        load_config(None, ["demo.pretrain_step=2"])  # an optional section
    with pytest.raises(ConfigError, match=r"\n  trian: no such section \(did you mean train\? the run config has "):
        load_config(None, ["trian.steps=5"])
    with pytest.raises(ConfigError, match=r"\n  train.zzz=5: no such field \(train has mode, steps, "):
        load_config(None, ["train.zzz=5"])  # nothing close: the list alone


def test_unknown_sections_and_empty_keys_name_what_was_typed():
    with pytest.raises(ConfigError, match=r"\n  foo: no such section \(the run config has model, tokenizer, data, "):
        load_config(None, ["foo.bar=1"])
    for item in ("=5", "train.=5", "train..steps=5"):
        with pytest.raises(ConfigError, match=rf"override '{item}' has an empty name in its key"):
            load_config(None, [item])


def test_the_data_format_is_a_setting():
    assert load_config(None, ["data.format=jsonl"]).data.format == "jsonl"
    with pytest.raises(ConfigError, match=r"data\.format: Input should be 'auto', 'parquet', 'jsonl', 'text' or 'hf' "
                                          r"\(got 'csv'\)"):
        load_config(None, ["data.format=csv"])


GATED_64 = ["model.model_type=gated_deltanet", "model.head_dim=64", "model.expand_v=1"]


@pytest.mark.parametrize("sets, error", [
    # check_servable's model checks
    (["model.use_short_conv=false"], r"rollout.engine='vllm' cannot serve model.use_short_conv=False \(vLLM's layer"),
    (["model.qk_norm=sum"], r"cannot serve model.qk_norm='sum'"),
    (GATED_64 + ["model.allow_neg_eigval=true"], r"cannot serve model.allow_neg_eigval=True"),
    # vLLM's CPU kernels: equal key and value head dims of 64 or 128, bfloat16
    (["model.model_type=gated_deltanet", "model.head_dim=64"],
     r"train.device='cpu'.* head_k_dim=64 != head_v_dim=128 \(from model.head_dim=64, model.expand_v=2.0\)"),
    (["model.num_heads=4"], r"head_k_dim=32, head_v_dim=32 \(from model.hidden_size=128, model.num_heads=4, "),
    (["rollout.vllm.dtype=float32"], r"train.device='cpu'.* rollout.vllm.dtype='float32'"),
    (["model.conv_size=3"], r"train.device='cpu'.* short convolutions of width 4, got model.conv_size=3"),
    # log-probs vLLM would report of the filtered distribution
    (["refine.top_p=0.9"], r"rollout.vllm.behaviour_logprobs='sampler' with refine.top_p=0.9 / refine.top_k=0"),
    (["refine.top_k=50"], r"rollout.vllm.behaviour_logprobs='sampler' with refine.top_p=1.0 / refine.top_k=50"),
    # a prefix plus its rollout must fit: up to data.seq_len tokens
    (["data.seq_len=4096", "rollout.vllm.max_model_len=4095"],
     r"data.seq_len=4096 exceeds rollout.vllm.max_model_len=4095"),
])
def test_the_vllm_engine_refuses_up_front_what_it_would_refuse_later(sets, error):
    assert load_config(None, sets).rollout.engine == "snapshot"  # the snapshot engine serves them all
    with pytest.raises(ConfigError, match=error):
        load_config(None, sets + ["rollout.engine=vllm"])


def test_what_the_vllm_engine_refuses_only_where_it_applies():
    vllm = ["rollout.engine=vllm"]
    assert load_config(None, vllm).rollout.engine == "vllm"  # the default model runs on vLLM's CPU kernels
    # CPU kernel limits bind only CPU runs; filters only vLLM's own log-probs.
    load_config(None, vllm + ["train.device=cuda", "model.model_type=gated_deltanet", "rollout.vllm.dtype=float32"])
    load_config(None, vllm + ["refine.top_p=0.9", "refine.top_k=50", "rollout.vllm.behaviour_logprobs=policy"])
    load_config(None, vllm + ["data.seq_len=4096", "rollout.vllm.max_model_len=4096"])
    load_config(None, vllm + ["train.device=cuda", "model.conv_size=3"])  # the CPU limit binds CPU runs only
    load_config(None, vllm + GATED_64 + ["model.head_dim=128"])


def test_reward_modules_are_a_list_of_module_names():
    assert load_config().refine.reward_modules == []
    config = load_config(None, ["refine.reward_modules=[my_rewards, lab.rewards]"])
    assert config.refine.reward_modules == ["my_rewards", "lab.rewards"]
    with pytest.raises(ConfigError, match="refine.reward_modules.0"):
        load_config(None, ["refine.reward_modules=['']"])
    with pytest.raises(ConfigError, match="refine.reward_modules: Input should be a valid list"):
        load_config(None, ["refine.reward_modules=my_rewards"])


def test_a_hand_written_model_section_holds_fields_only():
    """model.num_layers (a guess at num_hidden_layers that the typo check does not catch) would be kept as an
    unread extra and train the default depth; a checkpoint's config.json (train.init_from) may carry any
    library's keys, and a hand-written section may carry those too."""
    for key in ("num_layers", "layers"):
        with pytest.raises(ConfigError, match=f"model.{key}=4 is not a field of delta_net"):
            load_config(None, [f"model.{key}=4"])
    config = load_config(None, ["model.fuse_norm=true", "model.transformers_version=4.51.0", "model.attn=null"])
    assert config.model.model_extra["fuse_norm"] is True


def test_a_value_in_a_message_is_bounded_whatever_its_size():
    """The full repr of a value that shares one list at many places (an alias bomb within the limit, a wire
    message) costs its whole expansion; a message shows a bounded part of it, never calling the rest's repr."""
    from refine.errors import shown

    class Unreachable:
        def __repr__(self):
            raise AssertionError("repr of a part the message does not show")

    wide = [0] * 10 + [Unreachable()]  # past the items shown
    deep = [[[[[Unreachable()]]]]]  # past the levels shown
    for value in (wide, deep, {"a": Unreachable()}, (1, wide)):
        text = shown(value)
        assert len(text) <= 80 and "\n" not in text
    level = ["lol"] * 9
    for _ in range(7):
        level = [level] * 9  # 9 ** 8 strings, 8 lists in memory
    assert shown(level).startswith("[[[[") and len(shown(level)) <= 80
    assert shown("x" * 10**7).startswith("'xxx") and len(shown("x" * 10**7)) <= 80
    assert shown([1, 2, 3]) == "[1, 2, 3]" and shown("abc") == "'abc'" and shown(1e-38) == "1e-38"


def test_a_long_value_of_an_unknown_model_key_is_shown_short():
    numbers = "[" + ", ".join(str(i) for i in range(1000)) + "]"
    with pytest.raises(ConfigError) as err:
        load_config(None, [f"model.num_layers={numbers}"])
    message = str(err.value)
    assert "model.num_layers=[0, 1, 2, 3, 4, 5, ...] is not a field of delta_net" in message
    assert len(message) < 600
    with pytest.raises(ConfigError) as err:
        load_config(None, [f"data={numbers}", "data.seq_len=64"])
    assert str(err.value).startswith("cannot set data.seq_len: data is [0, 1, 2,") and len(str(err.value)) < 200


@pytest.mark.parametrize("override,field,value", [
    ("refine.selection_temperature=1e-38", "refine.selection_temperature", "1e-38"),
    ("refine.selection_temperature=0", "refine.selection_temperature", "0"),
    ("refine.temperature=1e-45", "refine.temperature", "1e-45"),
    ("refine.temperature=0.00009", "refine.temperature", "9e-05"),
    ("service.heartbeat_timeout_s=1e300", "service.heartbeat_timeout_s", "1e300"),
    ("service.heartbeat_timeout_s=86401", "service.heartbeat_timeout_s", "86401"),
    ("service.key_ttl_s=1e300", "service.key_ttl_s", "1e300"),
    ("optim.lr=1e300", "optim.lr", "1e300"),
    ("optim.weight_decay=1e300", "optim.weight_decay", "1e300"),
    ("demo.pretrain_lr=1e300", "demo.pretrain_lr", "1e300"),
    ("demo.branch_lr=2", "demo.branch_lr", "2"),
    ("refine.clip_ratio_low=1", "refine.clip_ratio_low", "1"),
    ("refine.clip_ratio_high=1e300", "refine.clip_ratio_high", "1e300"),
    ("service.worker_cpus=1e300", "service.worker_cpus", "1e300"),
    ("service.worker_cpus=1e-5", "service.worker_cpus", "1e-5"),
])
def test_extreme_finite_floats_are_refused_naming_field_and_value(override, field, value):
    """Finite, so allow_inf_nan lets them through, yet each failed far from the setting: selection's multinomial
    on inf/NaN probabilities, `new_logprobs contains NaN or Inf`, Redis' `Invalid min-idle-time argument for
    XAUTOCLAIM`, torch's `value cannot be converted to type float without overflow` in AdamW or the ratio clamp,
    policy_loss's `clip_low must be < 1`, Ray's resource precision."""
    with pytest.raises(ConfigError) as err:
        load_config(None, [override])
    message = str(err.value)
    assert f"{field}" in message and value in message, message


@pytest.mark.parametrize("field", ["refine.clip_ratio_low", "refine.clip_ratio_high"])
def test_a_clip_ratio_of_zero_is_refused(field):
    """A clip bound at ratio 1: on-policy the ratio is 1 up to rounding, whose sign then decided each token's
    gradient, and the fused, one-pass and reference paths disagreed by 12-17%."""
    with pytest.raises(ConfigError, match=rf"{field}: Input should be greater than 0 \(got 0\)"):
        load_config(None, [f"{field}=0"])
    assert getattr(load_config(None, [f"{field}=1e-6"]).refine, field.split(".")[1]) == 1e-6


@pytest.mark.parametrize("overrides,error", [
    # "can't start new thread", then a segmentation fault, after the earlier run's checkpoint was removed
    (["train.threads=100000"], "train.threads: Input should be less than or equal to 1024 (got 100000)"),
    (["data.seq_len=99999999999999999999999"], "data.seq_len: Input should be less than or equal to 16777216"),
    # generated in full before the first step: minutes, then the out-of-memory killer
    (["data.seq_len=1000000", "data.num_documents=256"],
     "data.num_documents=256 x data.seq_len=1000000 is more than the 67108864 tokens a synthetic corpus may hold"),
    (["demo.eval_length=131073"], "demo.eval_length: Input should be less than or equal to 131072"),
    (["demo.eval_examples=1000", "demo.eval_length=131072"],
     "demo.eval_examples=1000 x demo.eval_length=131072 is more than the 67108864 tokens an evaluation set may hold"),
    (["demo.heldout_documents=1000000", "data.seq_len=512"],
     "demo.heldout_documents=1000000 x data.seq_len=512 is more than the 67108864 tokens the held-out documents"),
])
def test_sizes_that_would_exhaust_the_machine_are_refused(overrides, error):
    with pytest.raises(ConfigError, match=re.escape(error)):
        load_config(None, overrides)


@pytest.mark.parametrize("overrides,error", [
    # "team" would delete another run's "team:run2:..." keys at its end
    (["service.namespace=team:run2"], "service.namespace must be letters, digits, '_', '-' or '.'"),
    (["service.namespace=a b"], "service.namespace must be letters, digits"),
    (["service.namespace=''"], "service.namespace must be letters, digits"),
    # a local Ray of 200000 logical CPUs: its actors fail to start threads and die unnamed
    (["service.worker_cpus=100000"], "service.worker_cpus: Input should be less than or equal to 1024"),
    (["service.num_reward_replicas=100000"], "service.num_reward_replicas: Input should be less than or equal to 1024"),
    (["service.num_rollout_workers=100000"], "service.num_rollout_workers: Input should be less than or equal to 1024"),
    (["service.num_learners=100000"], "service.num_learners: Input should be less than or equal to 1024"),
])
def test_service_settings_that_reach_other_runs_or_exhaust_the_machine_are_refused(overrides, error):
    with pytest.raises(ConfigError, match=re.escape(error)):
        load_config(None, overrides)


@pytest.mark.parametrize("field", ["train.out_dir", "data.source", "service.metrics_discovery_dir", "train.init_from"])
def test_a_home_directory_of_no_such_user_is_one_error_naming_the_field(field):
    with pytest.raises(ConfigError, match=re.escape(f"{field}")) as error:
        load_config(None, [f"{field}=~no-such-user-x7/run"])
    assert "'~no-such-user-x7/run' starts with a home directory that cannot be found" in str(error.value)


def test_the_size_bounds_keep_what_is_sane():
    config = load_config(None, ["train.threads=1024", "data.seq_len=16777216", "data.source=docs.jsonl",
                                "data.num_documents=100000"])  # a file source: documents are read, not generated
    assert (config.train.threads, config.data.seq_len) == (1024, 16777216)
    assert load_config(None, ["data.seq_len=262144", "data.num_documents=256"]).data.seq_len == 262144


def test_the_float_bounds_keep_what_is_sane():
    config = load_config(None, [
        "refine.selection_temperature=1e-4", "refine.temperature=1e-4", "service.heartbeat_timeout_s=86400",
        "optim.lr=1", "optim.weight_decay=1", "refine.clip_ratio_low=0.99", "refine.clip_ratio_high=1e9",
        "service.worker_cpus=1e-4", "refine.lambda_ntp=1e300", "refine.dual_clip=1e300"])
    assert config.service.reclaim_idle_ms == 2 * 86_400_000 < 2**63
    assert load_config(None, ["refine.temperature=0"]).refine.temperature == 0.0  # greedy


def test_the_temperature_bounds_keep_the_math_finite_in_float32():
    """At the lowest temperatures allowed, the logits (and entropies) a model gives stay far from float32's
    overflow once divided: sampling and selection give finite log-probs and valid positions."""
    from refine.algorithm.sampling import logprobs_from_logits, sample_tokens
    from refine.algorithm.selection import select_positions
    from refine.config import MIN_TEMPERATURE

    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(4, 262_144, generator=generator) * 100  # large logits over a large vocabulary
    tokens, logprobs = sample_tokens(logits, MIN_TEMPERATURE, 1.0, 0, generator=generator)
    assert torch.isfinite(logprobs).all()
    assert torch.isfinite(logprobs_from_logits(logits, tokens, MIN_TEMPERATURE)).all()
    entropy = torch.rand(2, 200, generator=generator) * math.log(262_144)
    positions = select_positions(entropy, num_chunks=4, rollout_len=5, temperature=MIN_TEMPERATURE, generator=generator)
    assert positions.shape == (2, 4)


def test_a_metrics_discovery_dir_that_is_a_file_is_refused_when_the_config_is_checked(tmp_path, monkeypatch):
    monkeypatch.delenv("REFINE_METRICS_DISCOVERY_DIR", raising=False)
    blocker = tmp_path / "taken"
    blocker.write_text("")
    with pytest.raises(ConfigError, match=rf"service.metrics_discovery_dir='{blocker}': it is a file, not a "
                                          rf"directory"):
        load_config(None, [f"service.metrics_discovery_dir={blocker}"])
    with pytest.raises(ConfigError, match=rf"service.metrics_discovery_dir='{blocker}/sub': {blocker} is a file"):
        load_config(None, [f"service.metrics_discovery_dir={blocker}/sub"])
    monkeypatch.setenv("REFINE_METRICS_DISCOVERY_DIR", str(blocker))  # the default takes the deployment's
    with pytest.raises(ConfigError, match=r"\(from REFINE_METRICS_DISCOVERY_DIR\): it is a file"):
        load_config(None, ["service.num_rollout_workers=2"])  # a service section: its default read now
    fresh = tmp_path / "not" / "yet"
    assert load_config(None, [f"service.metrics_discovery_dir={fresh}"]).service.metrics_discovery_dir == str(fresh)
    assert not fresh.exists()  # checking creates nothing: the service creates it before Ray starts


def test_a_run_of_no_steps_is_refused():
    # It wrote config.yaml and an empty metrics.jsonl, no checkpoint, and exited 0.
    with pytest.raises(ConfigError, match=r"train.steps: Input should be greater than or equal to 1 \(got 0\)"):
        load_config(None, ["train.steps=0"])


@pytest.mark.parametrize("url", ["redis://:secret@127.0.0.1:6400/0", "redis://user:secret@127.0.0.1:6400/0",
                                 "redis://127.0.0.1:6400/0?password=secret", "unix:///tmp/r.sock?Password=secret"])
def test_a_redis_password_in_the_saved_settings_is_refused(url):
    with pytest.raises(ConfigError, match=r"service.redis_url: a URL with a password, which the run would save in its "
                                          r"config.yaml: give it with --redis-url or REFINE_REDIS_URL instead") as error:
        load_config(None, [f"service.redis_url={url}"])
    assert "secret" not in str(error.value)
    assert load_config(None, ["service.redis_url=redis://user@127.0.0.1:6400/0"]).service.redis_url


@pytest.mark.parametrize(("field", "started"), [("ray_address", "a local Ray"), ("redis_url", "an embedded Redis")])
@pytest.mark.parametrize("value", ["''", "' '"])
def test_an_empty_service_address_is_refused_not_taken_for_none(field, started, value):
    """An empty "$VAR" in a job script ran on a local Ray or an embedded Redis of its own instead of the cluster's."""
    with pytest.raises(ConfigError, match=rf"service.{field}: {value} is empty: leave it out \(null\) to start "
                                          rf"{started} for the run"):
        load_config(None, [f"service.{field}={value}"])


def test_a_model_dtype_other_than_train_dtype_is_refused_not_ignored():
    """model.torch_dtype=bfloat16 trained in float32 without a word (train.dtype alone is read)."""
    with pytest.raises(ConfigError, match=re.escape("model.torch_dtype='bfloat16' is not read: the model is built and "
                                                    "trained in train.dtype='float32'; set train.dtype instead")):
        load_config(None, ["model.torch_dtype=bfloat16"])
    # A section copied from a config.json that agrees with train.dtype is fine.
    assert load_config(None, ["model.torch_dtype=bfloat16", "train.dtype=bfloat16"]).train.dtype == "bfloat16"
    assert load_config(None, ["model.dtype=float32"]).train.dtype == "float32"


def test_a_dual_clip_of_one_or_less_is_refused_at_load():
    """The dual clip bounds the loss of a negative advantage at dual_clip x |A|: at 1 or below it would cut under the
    ordinary clip, and policy_loss refused it only at the first step."""
    for value in ("1", "0.5"):
        with pytest.raises(ConfigError, match=r"refine.dual_clip"):
            load_config(None, [f"refine.dual_clip={value}"])
    assert load_config(None, ["refine.dual_clip=1.5"]).refine.dual_clip == 1.5
