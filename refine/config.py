"""Run configuration: pydantic models, YAML files and `--set a.b=value` overrides.

Every value is validated; a wrong one fails with a message naming the field and the value.
Defaults are the paper's (REFINE, arXiv 2602.16704) where it states one.
"""

from __future__ import annotations

import copy
import difflib
import json
import os
import re
from collections.abc import Collection
from pathlib import Path
from typing import Annotated, Any, Literal, get_args
from urllib.parse import parse_qsl, urlsplit

import torch
import yaml
from pydantic import (
    BaseModel, Field, SerializeAsAny, ValidationError, ValidationInfo, field_validator, model_validator,
)

from refine.algorithm.selection import min_document_length
from refine.config_parsing import ConfigError, parse_overrides, parse_yaml, set_path
from refine.data.sources import MAX_WINDOWS, FormatName, check_min_length
from refine.errors import shown, validation_problems
from refine.example_configs import COMMAND, DEFAULT_DIR, is_shipped_example
from refine.models import config_from_dict
from refine.models.config import (
    LIBRARY_KEYS, UNSUPPORTED_FLA_FIELDS, DeltaNetConfig, ModelConfigBase, Strict,
)
from refine.tokenizer import Tokenizer, check_eos_matches, check_vocab_fits, resolve_tokenizer
from refine_vllm.servable import check_engine  # plain Python: importing it needs no vLLM
from refine_vllm.settings import VllmEngineConfig


# A path setting: "" would mean the current directory, never what was meant.
PathStr = Annotated[str, Field(min_length=1)]
# An Adam beta: torch.optim refuses one outside [0, 1), deep inside the first step.
Beta = Annotated[float, Field(ge=0, lt=1)]

# Bounds on finite floats that would still fail far from the setting. Rollouts, log-probs and the loss run in
# float32 at least, whose largest value is 3.4e38: logits / temperature overflows to inf (and softmax to NaN)
# once the temperature is below |logit| / 3.4e38 (about 3e-38 for a logit of 10; entropies, at most
# ln(vocabulary) ~ 12, likewise), and torch refuses outright a Python number beyond that range as a clamp bound
# or an optimizer step. At 1e-4, |logit| would have to pass 3.4e34 to overflow, and sampling is greedy in all
# but name already: a token whose logit is 0.01 below the best one is e^-100 times as likely.
MIN_TEMPERATURE = 1e-4


def greedy_or_sampled(value: float, name: str, what: str) -> float:
    """`value`, a sampling temperature named `name`: 0 (greedy) or at least MIN_TEMPERATURE (see there)."""
    if 0 < value < MIN_TEMPERATURE:
        raise ValueError(f"{name}={value!r} is below {MIN_TEMPERATURE:g}: logits / temperature overflows float32 "
                         f"near 1e-38, and below {MIN_TEMPERATURE:g} sampling is greedy anyway: use 0 for greedy "
                         f"{what}")
    return value


# Adam moves every weight by about lr per step; the model's weights are initialised at ~0.02 and the paper
# trains at 1e-6. Far below float32's range, and AdamW's decay factor 1 - lr * weight_decay stays in [0, 1].
MAX_LR = 1.0
# The policy ratio is exp(log-ratio clamped to +-20) (refine.algorithm.losses), at most 4.9e8: an upper
# clip of 1e9 already clips nothing, and torch refuses a clamp bound beyond float32's range.
MAX_CLIP_RATIO_HIGH = 1e9
# Roles beat once a second: a role silent for a day is gone. Twice the timeout, in milliseconds, is Redis'
# XAUTOCLAIM min-idle-time (a 64-bit integer), ten times it the learners' torch.distributed timeout.
MAX_HEARTBEAT_TIMEOUT_S = 86_400.0
# The longest time a run's Redis keys outlive their driver's last refresh: a year (in milliseconds, Redis' PEXPIRE
# argument, it stays far below a 64-bit integer).
MAX_KEY_TTL_S = 365 * 86_400.0
# Ray accounts resources in units of 1e-4 (it refuses a finer fraction). A local Ray is started with as many
# logical CPUs as the actors ask for, and at 100000 of them its actors fail to start threads
# ("pthread_create failed") and die unnamed; the largest nodes have a few hundred cores.
MIN_WORKER_CPUS, MAX_WORKER_CPUS = 1e-4, 1024.0
# Actors per role: each is a process holding a model copy; far past any cluster's useful count.
MAX_ROLE_ACTORS = 1024
# torch starts one OS thread per intra-op thread: far past any machine's cores, 100000 of them fails with "can't
# start new thread" and a segmentation fault; 5000 already runs a tiny step 40 s.
MAX_THREADS = 1024
# Documents are cut to data.seq_len tokens: 16M is far past the longest context these models train on.
MAX_SEQ_LEN = 1 << 24
# The longest synthetic niah / mqar evaluation prompt (`refine eval --length`, demo.eval_length): RULER's longest
# standard context, 128K tokens, which these tasks stand in for. Each prompt is built whole as text and prefilled
# in one pass whose activations grow with batch x length x hidden_size: on CPU the tiny model's prefill takes
# ~2.5 GB for each 128K prompt (lower eval.batch_size there), and at 100M tokens the embeddings of one prompt
# alone would take 51 GB.
MAX_SYNTHETIC_LENGTH = 131_072
# The most tokens a synthetic set may hold: a training corpus (data.num_documents x data.seq_len), an evaluation
# set (--num-examples x --length, demo.eval_examples x demo.eval_length) or the demo's held-out documents. Each is
# generated in full before it is used and kept as lists of Python ints (~36 bytes a token), so this is ~2.4 GB;
# it holds RULER's 500 examples at 128K.
MAX_SYNTHETIC_TOKENS = 1 << 26


class RefineConfig(Strict):
    """Next-sequence prediction: selection, rollouts, rewards, GRPO and the combined loss."""

    rollout_len: int = Field(5, ge=1, description="k: tokens per rollout")
    num_chunks: int = Field(8, ge=1, description="c: one rollout position per chunk of the document")
    num_samples: int = Field(1, ge=1, description="n: continuations sampled per position")
    selection: Literal["entropy", "uniform", "argmax", "argmin"] = "entropy"
    selection_temperature: float = Field(
        1.0, ge=MIN_TEMPERATURE, description="tau in softmax(H / tau); at least 1e-4, where the softmax is argmax "
        "already (selection='argmax' is that exactly) and H / tau stays far inside float32's range")
    margin: int = Field(20, ge=0, description="rollout starts stay this many tokens away from either end")
    temperature: float = Field(1.0, ge=0, description="sampling temperature; 0 = greedy, else at least 1e-4 "
                               "(below it sampling is greedy anyway, and logits / temperature overflows float32)")
    top_p: float = Field(1.0, gt=0, le=1)
    top_k: int = Field(0, ge=0, description="0 disables top-k")
    reward: str = Field("cosine", description="cosine | binary | hybrid | a registered task reward")
    reward_modules: list[Annotated[str, Field(min_length=1)]] = Field(
        [], description="Python modules imported before the reward is looked up, each registering rewards with "
                        "refine.algorithm.rewards.register_reward")
    group_by: Literal["auto", "document", "position"] = Field(
        "auto", description="GRPO groups: the c * n rollouts of a document, or the n rollouts of a position; "
                            "auto: position when num_samples > 1, else document (the paper code's choice)")
    norm_adv_by_std: bool = True
    # Not 0: on-policy the ratio is 1 up to rounding, and a clip bound at exactly 1 would let the sign of that
    # rounding decide whether each token's gradient counts (fused, one-pass and reference paths then disagree).
    clip_ratio_low: float = Field(0.2, gt=0, lt=1, description="above 0 (a bound at ratio 1 makes the gradient "
                                  "rounding noise); the ratio's lower clip 1 - clip_ratio_low must stay positive")
    clip_ratio_high: float = Field(0.2, gt=0, le=MAX_CLIP_RATIO_HIGH, description="above 0 (a bound at ratio 1 makes "
                                   "the gradient rounding noise), at most 1e9: the policy ratio (exp of a log-ratio "
                                   "clamped to +-20) never exceeds 4.9e8")
    dual_clip: float = Field(3.0, gt=1)
    loss_agg: Literal["token-mean", "seq-mean-token-mean", "seq-mean-token-sum"] = "token-mean"
    # kl_coef, lambda_ntp and lambda_nsp have no upper bound: too large a coefficient makes the loss infinite,
    # a step the loop skips and counts (and a run whose every step is skipped stops, naming the settings).
    kl_coef: float = Field(0.0, ge=0, description="KL to the frozen initial policy; 0 disables it")
    kl_type: Literal["k1", "k3", "low_var_kl"] = "low_var_kl"
    lambda_ntp: float = Field(1.0, ge=0)
    lambda_nsp: float = Field(0.2, ge=0)

    @field_validator("temperature")
    @classmethod
    def _greedy_or_sampled(cls, value: float) -> float:
        return greedy_or_sampled(value, "refine.temperature", "decoding")

    @model_validator(mode="after")
    def _groups_have_two_rollouts(self) -> "RefineConfig":
        if self.group_by == "position" and self.num_samples == 1:
            raise ValueError("group_by='position' with num_samples=1 puts every rollout in a group of its own, "
                             "so every advantage would be 0: use group_by='document' or num_samples > 1")
        if self.groups == "document" and self.num_chunks * self.num_samples == 1:
            raise ValueError("num_chunks=1 with num_samples=1 gives each document one rollout, a group of its own "
                             "(group_by='document'), so every advantage would be 0: use num_chunks > 1 or "
                             "num_samples > 1")
        greedy = "temperature=0" if self.temperature == 0 else "top_k=1" if self.top_k == 1 else None
        if greedy and self.num_samples > 1 and self.groups == "position":
            raise ValueError(f"{greedy} decodes greedily, so the num_samples={self.num_samples} rollouts of a "
                             f"position are one rollout repeated and per-position groups (group_by="
                             f"{self.group_by!r}) give every advantage 0: sample (temperature > 0, top_k not 1), or "
                             f"use num_samples=1 or group_by='document'")
        if greedy and self.num_samples > 1 and self.num_chunks == 1:  # a document's group: one position's rollouts
            raise ValueError(f"{greedy} decodes greedily, so with num_chunks=1 the num_samples={self.num_samples} "
                             f"rollouts of a document are one rollout repeated and every advantage is 0: sample "
                             f"(temperature > 0, top_k not 1), or use num_chunks > 1")
        return self

    @model_validator(mode="after")
    def _settings_are_read(self) -> "RefineConfig":
        # A value that the other settings leave unread changes nothing: refused (compared with the default, not
        # by being given, so that a run's own config.yaml, which states every setting, is read back).
        defaults = type(self).model_fields
        if self.selection != "entropy" and self.selection_temperature != defaults["selection_temperature"].default:
            raise ValueError(f"selection_temperature={self.selection_temperature} shapes selection='entropy' "
                             f"(softmax(H / tau)); selection={self.selection!r} does not read it")
        if self.temperature == 0:
            for name in ("top_k", "top_p"):
                if getattr(self, name) != defaults[name].default:
                    raise ValueError(f"{name}={getattr(self, name)} narrows the tokens rollouts sample from, but "
                                     f"temperature=0 decodes greedily (the likeliest token): drop {name}, or sample "
                                     f"(temperature > 0)")
        return self

    @property
    def groups(self) -> Literal["document", "position"]:
        """The GRPO grouping in effect (`group_by` with auto resolved)."""
        if self.group_by == "auto":
            return "position" if self.num_samples > 1 else "document"
        return self.group_by


class OptimConfig(Strict):
    lr: float = Field(1e-6, gt=0, le=MAX_LR, description="AdamW's; at most 1 (Adam moves each weight by about lr "
                      "per step, and torch refuses a step beyond float32's range)")
    weight_decay: float = Field(0.01, ge=0, le=1, description="AdamW's decoupled decay: each step multiplies the "
                                "weights by 1 - lr * weight_decay, which stays in [0, 1] (larger overflows)")
    betas: tuple[Beta, Beta] = (0.9, 0.999)
    grad_clip: float = Field(1.0, gt=0)
    schedule: Literal["constant", "cosine"] = Field(
        "constant", description="the learning rate over the run's steps, after the warm-up: lr throughout (the "
                                "paper's), or a half cosine from lr towards lr x min_lr_ratio, which it would reach "
                                "one step after train.steps (see refine.optim.learning_rate)")
    warmup_steps: int = Field(0, ge=0, description="steps 1..warmup_steps ramp the learning rate linearly up to lr "
                                                   "(step s trains at lr x s / warmup_steps)")
    min_lr_ratio: float = Field(0.0, ge=0, le=1, description="the learning rate the cosine schedule decays "
                                                             "towards, as a fraction of lr")

    @model_validator(mode="after")
    def _min_lr_ratio_decays(self) -> "OptimConfig":
        if self.min_lr_ratio and self.schedule != "cosine":
            raise ValueError(f"optim.min_lr_ratio={self.min_lr_ratio} is the learning rate the cosine schedule "
                             f"decays towards, but optim.schedule={self.schedule!r} does not decay: set "
                             f"optim.schedule=cosine")
        return self


class DataSpec(Strict):
    """Where documents come from: a path (parquet, jsonl, text dir, saved HF dataset) or `synthetic`."""

    source: PathStr = "synthetic"
    format: FormatName = Field("auto", description="auto: from the file extensions or the folder's contents")
    text_column: str = Field("text", min_length=1)
    seq_len: int = Field(512, ge=8, le=MAX_SEQ_LEN, description="the most tokens of a training document")
    max_windows: int = Field(1, ge=1, le=MAX_WINDOWS, description=(
        "a file source's document longer than seq_len becomes up to this many documents of seq_len tokens, "
        "its consecutive windows; the rest is cut (1: only its first seq_len tokens are trained on)"))
    min_length: int = Field(64, description="shorter documents (in tokens, BOS included) are dropped and counted")
    shuffle: bool = Field(False, description=(
        "a file source's records in a random order, another every pass, drawn from train.seed (parquet: row "
        "groups in a random order, each one's rows in a random order); false: the source's order"))
    num_documents: int = Field(256, ge=1, description="synthetic corpus size")
    synthetic_tasks: list[Literal["recall", "niah", "mqar"]] = Field(
        ["recall"], min_length=1,
        description="kinds of synthetic documents, in equal shares: fact-recall prose, NIAH and MQAR prompts with answers",
    )
    skip_bad_rows: bool = Field(False, description=(
        "skip and count malformed rows (not JSON, a text field missing or not text) of data.source and of task "
        "files, instead of stopping at the first, naming it"))
    eval_source: PathStr | None = Field(None, description=(
        "held-out documents whose NTP loss is measured during training (eval_ntp_loss, see train.eval_every): a "
        "source as `source` is, read the same way, or `synthetic` (the corpus generated from the random streams "
        "of held-out sets, which no training corpus draws)"))
    eval_documents: int = Field(64, ge=1, description="how many of data.eval_source's first documents")

    @field_validator("source", "eval_source")
    @classmethod
    def _home_expanded(cls, value: str | None) -> str | None:
        # As every path field: every reader (the run's source record too) gets "~" expanded; "~nobody/..." is
        # refused naming the field, not a traceback when the source is read.
        return _expand_home(value)

    @field_validator("min_length")
    @classmethod
    def _trainable_length(cls, value: int) -> int:
        return check_min_length(value, "data.min_length")

    @model_validator(mode="after")
    def _every_task_has_documents(self) -> "DataSpec":
        if self.source == "synthetic" and self.num_documents < len(self.synthetic_tasks):
            raise ValueError(f"data.num_documents={self.num_documents} is fewer than the {len(self.synthetic_tasks)} "
                             f"data.synthetic_tasks={self.synthetic_tasks}: each task needs at least one document")
        if self.source == "synthetic" and self.max_windows > 1:
            raise ValueError(f"data.max_windows={self.max_windows} splits long documents of a file source; the "
                             f"synthetic corpus' documents are made to fit data.seq_len, so leave it at 1")
        if self.source == "synthetic" and self.shuffle:
            raise ValueError("data.shuffle=true orders the records of data.source when it is a file source; the "
                             "synthetic corpus is drawn at random already (and refine posttrain draws its --data in "
                             "a new order every pass), so leave it false")
        if self.eval_source == "synthetic" and self.eval_documents < len(self.synthetic_tasks):
            raise ValueError(f"data.eval_documents={self.eval_documents} is fewer than the {len(self.synthetic_tasks)} "
                             f"data.synthetic_tasks={self.synthetic_tasks} of the synthetic held-out corpus: each "
                             f"task needs at least one document")
        if self.eval_source == "synthetic" and self.eval_documents * self.seq_len > MAX_SYNTHETIC_TOKENS:
            raise ValueError(f"data.eval_documents={self.eval_documents} x data.seq_len={self.seq_len} is more than "
                             f"the {MAX_SYNTHETIC_TOKENS} tokens a synthetic corpus may hold")
        if self.source == "synthetic" and self.num_documents * self.seq_len > MAX_SYNTHETIC_TOKENS:
            raise ValueError(f"data.num_documents={self.num_documents} x data.seq_len={self.seq_len} is more than the "
                             f"{MAX_SYNTHETIC_TOKENS} tokens a synthetic corpus may hold (it is generated in full "
                             f"before the first step): at most {MAX_SYNTHETIC_TOKENS // self.seq_len} documents at "
                             f"this data.seq_len")
        return self


# The torch dtype of each `train.dtype` name.
DTYPES = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16}


class TrainConfig(Strict):
    mode: Literal["ntp", "onepass", "fused", "reference"] = "fused"
    steps: int = Field(20, ge=1, description="batches to train (each train.mini_batches optimizer steps); a run of "
                       "none would write a run directory without a checkpoint")
    batch_size: int = Field(4, ge=1, description="documents per step (rolled out together)")
    mini_batches: int = Field(
        1, ge=1, description="optimizer steps per step: its documents split into this many mini-batches, each "
                             "trained on the rollouts sampled before the first, as the paper's code does (the later "
                             "mini-batches are off-policy, where the ratio clip acts); one-pass, reference and "
                             "ntp modes (ntp: as many updates on smaller batches), and the service's "
                             "disaggregated learner")
    micro_batches: int = Field(
        1, ge=1, description="gradient accumulation: each optimizer step's documents run forward and backward in "
                             "this many slices, their weighted gradients summed, for the same update (to rounding) "
                             "with one slice's activations in memory; one-pass, reference and ntp modes, and the "
                             "service's disaggregated learner (on each data-parallel rank's documents)")
    seed: int = Field(0, ge=-2**63, le=2**64 - 1, description="what torch.manual_seed accepts")
    device: str = "cpu"
    dtype: Literal["float32", "float64", "bfloat16"] = Field(
        "float32", description="the model's weights and compute; with bfloat16 the optimizer keeps float32 masters")
    threads: int | None = Field(None, ge=1, le=MAX_THREADS)
    log_every: int = Field(1, ge=1, description="a metrics.jsonl row every this many steps, and the last step's")
    checkpoint_every: int = Field(0, ge=0, description="0: only at the end")
    keep_checkpoints: int = Field(0, ge=0, le=100_000, description=(
        "besides checkpoints/latest, keep the newest this many checkpoints as checkpoints/step-NNNNNNNN/ (hard links "
        "of latest's files where the file system has them: no extra disk until latest moves on); 0: latest only"))
    eval_every: int = Field(0, ge=0, description="steps between measures of data.eval_source's held-out NTP loss "
                                                 "(eval_ntp_loss in metrics.jsonl); 0: at the last step only")
    out_dir: PathStr = "runs/latest"
    init_from: PathStr | None = Field(None, description="model directory to start from instead of random weights; its "
                                  "config.json then is the model section")

    @field_validator("device")
    @classmethod
    def _device(cls, value: str) -> str:
        if not re.fullmatch(r"cpu|cuda(:[0-9]+)?", value):
            raise ValueError(f"device must be 'cpu' or 'cuda[:N]', got {shown(value)}")
        return value

    @field_validator("out_dir", "init_from")
    @classmethod
    def _home(cls, value: str | None) -> str | None:
        return _expand_home(value)

    def logs_step(self, step: int) -> bool:
        """Whether step `step` gets a metrics.jsonl row (every `log_every` steps, and the last)."""
        return step % self.log_every == 0 or step == self.steps

    def evaluates_step(self, step: int) -> bool:
        """Whether step `step` measures the held-out loss, when there is a data.eval_source (every `eval_every`
        steps, and the last); such a step gets a metrics.jsonl row."""
        return (self.eval_every > 0 and step % self.eval_every == 0) or step == self.steps

    @model_validator(mode="after")
    def _mini_batches_hold_documents(self) -> "TrainConfig":
        if self.mini_batches > self.batch_size:
            raise ValueError(f"train.mini_batches={self.mini_batches} is more than train.batch_size={self.batch_size}:"
                             f" every mini-batch needs at least one document")
        if self.mini_batches * self.micro_batches > self.batch_size:
            raise ValueError(f"train.micro_batches={self.micro_batches} x train.mini_batches={self.mini_batches} is "
                             f"more than train.batch_size={self.batch_size}: every micro-batch needs at least one "
                             f"document")
        return self


class RolloutConfig(Strict):
    """Which engine produces rollouts and answers."""

    engine: Literal["snapshot", "vllm"] = Field(
        "snapshot", description="snapshot: the one-pass engine; vllm: vLLM serves the policy (needs .venv-vllm)")
    vllm: VllmEngineConfig = Field(default_factory=VllmEngineConfig)


# Where roles announce their metrics ports unless REFINE_METRICS_DISCOVERY_DIR (a deployment's) says otherwise.
BUILT_IN_DISCOVERY_DIR = "/tmp/refine-prometheus"


def default_discovery_dir() -> str:
    """service.metrics_discovery_dir's default: REFINE_METRICS_DISCOVERY_DIR as it is now (read at each config's
    making, not once at import), else BUILT_IN_DISCOVERY_DIR. Empty counts as unset (it was the working
    directory, where Prometheus never looks)."""
    return os.environ.get("REFINE_METRICS_DISCOVERY_DIR") or BUILT_IN_DISCOVERY_DIR


def discovery_dir_setting(path: str | Path) -> str:
    """`service.metrics_discovery_dir=PATH` as an error message names it, and the environment variable when the
    value came from there (the default, and a config left at BUILT_IN_DISCOVERY_DIR, take it)."""
    setting = f"service.metrics_discovery_dir={str(path)!r}"
    deployed = os.environ.get("REFINE_METRICS_DISCOVERY_DIR")
    if deployed and Path(deployed).expanduser().absolute() == Path(path).expanduser().absolute():
        setting += " (from REFINE_METRICS_DISCOVERY_DIR)"
    return setting


def discovery_dir_problem(path: str | Path) -> str | None:
    """Why `path` cannot be the metrics discovery directory, as far as can be told without creating it: it,
    or the nearest of its parents that exists, is not a directory. None when nothing is wrong so far."""
    try:
        path = Path(path).expanduser()
    except RuntimeError:  # "~nobody/...": no such user
        return f"{str(path)!r} starts with a home directory that cannot be found (no such user)"
    for candidate in (path, *path.parents):
        try:
            if not candidate.exists():
                continue
        except OSError as error:  # a name too long, a loop of links
            return f"cannot look at {candidate}: {error.strerror or error}"
        if candidate.is_dir():
            return None
        what = "it is" if candidate == path else f"{candidate} is"
        return f"{what} a file, not a directory: the roles announce their metrics ports in files inside it"
    return None


# A run's Redis keys are "<namespace>:<kind>:...": a namespace with ":" would own another run's keys (a run
# namespaced "team" deletes "team:run2:..." at its end), and whitespace breaks key patterns.
NAMESPACE_PATTERN = re.compile(r"[A-Za-z0-9_.\-]+")


def check_namespace(namespace: object, name: str = "namespace") -> str:
    """`namespace` if it is a usable Redis key prefix (NAMESPACE_PATTERN), else a ValueError naming `name`."""
    if not isinstance(namespace, str) or NAMESPACE_PATTERN.fullmatch(namespace) is None:
        raise ValueError(f"{name} must be letters, digits, '_', '-' or '.' (a ':' would reach into other runs' "
                         f"keys), got {namespace!r}")
    return namespace


class ServiceConfig(Strict):
    """The distributed service: Ray actors exchanging messages through Redis streams."""

    mode: Literal["disaggregated", "colocated"] = Field(
        "disaggregated", description="separate rollout workers (async up to max_staleness) or fused on-policy steps"
    )
    ray_address: str | None = Field(None, description="None: start a local Ray (or use RAY_ADDRESS when set)")
    redis_url: str | None = Field(None, description="None: start an embedded Redis for the run (or REFINE_REDIS_URL)")
    namespace: str | None = Field(None, description="Redis key prefix (letters, digits, '_', '-', '.'); None: "
                                                     "derived from the run directory")
    num_rollout_workers: int = Field(2, ge=1, le=MAX_ROLE_ACTORS)
    num_learners: int = Field(1, ge=1, le=MAX_ROLE_ACTORS,
                              description="data-parallel learner ranks (torch.distributed: gloo on CPU, NCCL on CUDA); "
                                          "each step's documents are split across them")
    num_reward_replicas: int = Field(1, ge=1, le=MAX_ROLE_ACTORS)
    max_staleness: int = Field(0, ge=0, description="drop rollouts more than this many versions (learner steps, each train.mini_batches optimizer steps) old; 0 = on-policy")
    sync_interval: int = Field(1, ge=1, description="learner publishes weights every this many steps")
    batches_in_flight: int = Field(2, ge=1, description="document batches published ahead of the learner")
    worker_cpus: float = Field(1.0, ge=MIN_WORKER_CPUS, le=MAX_WORKER_CPUS,
                               description="Ray CPUs reserved per rollout worker; Ray counts them in units of 1e-4")
    # Roles beat once a second (services.role): a timeout of a few beats keeps a busy moment from a restart.
    heartbeat_timeout_s: float = Field(
        30.0, ge=3, le=MAX_HEARTBEAT_TIMEOUT_S,
        description="a role silent this long is restarted; at most a day (twice it, in ms, is Redis' XAUTOCLAIM "
                    "min-idle-time, a 64-bit integer)")
    key_ttl_s: float | None = Field(
        None, gt=0, le=MAX_KEY_TTL_S,
        description="every key of the run's Redis namespace (streams, weights, records) expires this long after it "
                    "was last written or refreshed (a thread of the driver refreshes them all every minute, or every "
                    "third of this when shorter), so a driver killed without cleaning up leaves nothing in a shared "
                    "Redis for good; None: an hour, or the shortest allowed when longer. At least the namespace "
                    "claim's TTL (max(60, 4 x heartbeat_timeout_s) + 30 s) plus a minute: a driver that still holds "
                    "its namespace keeps its keys. A resume needs none of them: everything durable is in the "
                    "learner's checkpoint")
    # A plain str with min_length here, not PathStr: pydantic before 2.11.5 cannot merge an Annotated Field
    # with a default_factory ("cannot specify both default and default_factory").
    metrics_discovery_dir: str = Field(
        default_factory=default_discovery_dir, min_length=1,
        description="where each role announces its metrics port for Prometheus (deploy/prometheus.yml reads it)",
    )

    @field_validator("namespace")
    @classmethod
    def _namespace(cls, value: str | None) -> str | None:
        return value if value is None else check_namespace(value, "service.namespace")

    @field_validator("ray_address", "redis_url")
    @classmethod
    def _not_empty(cls, value: str | None, info: ValidationInfo) -> str | None:
        # An empty "$VAR" in a job script, which would otherwise run on a local Ray or Redis of its own, unnoticed.
        if value is not None and not value.strip():
            started = "a local Ray" if info.field_name == "ray_address" else "an embedded Redis"
            raise ValueError(f"{value!r} is empty: leave it out (null) to start {started} for the run")
        return value

    @field_validator("redis_url")
    @classmethod
    def _no_password(cls, value: str | None) -> str | None:
        # The settings are saved in the run directory (config.yaml) and repeated in resume commands.
        if value is not None and _holds_password(value):
            raise ValueError("a URL with a password, which the run would save in its config.yaml: give it with "
                             "--redis-url or REFINE_REDIS_URL instead, which are not saved")
        return value

    @property
    def reclaim_idle_ms(self) -> int:
        """How long an entry stays pending before a live consumer of its group takes it over.

        Twice the heartbeat timeout: the orchestrator releases a silent consumer's entries after one
        timeout when it replaces that consumer, so the takeover is the fallback for entries nobody
        released (their consumer died while Redis was down, or the orchestrator itself restarted) and
        does not race the orchestrator for a hung consumer's batch."""
        return int(2 * self.heartbeat_timeout_s * 1000)


class DemoConfig(Strict):
    """The main job: NTP pre-training, then two copies continued with REFINE and with NTP only, compared."""

    pretrain_steps: int = Field(2000, ge=1)
    branch_steps: int = Field(1000, ge=1)
    pretrain_lr: float = Field(4e-3, gt=0, le=MAX_LR,
                               description="a tiny model from scratch needs far more than the paper's 1e-6")
    branch_lr: float = Field(1e-3, gt=0, le=MAX_LR)
    eval_tasks: list[Literal["niah", "mqar"]] = Field(["niah", "mqar"], min_length=1)

    @field_validator("eval_tasks")
    @classmethod
    def _each_task_once(cls, tasks: list[str]) -> list[str]:
        if len(set(tasks)) < len(tasks):
            raise ValueError(f"names a task twice ({tasks}): each is one column of the comparison")
        return tasks
    eval_examples: int = Field(20, ge=1)
    eval_length: int = Field(384, ge=64, le=MAX_SYNTHETIC_LENGTH, description="NIAH prompt length in tokens")
    heldout_documents: int = Field(16, ge=1, description="held-out documents for the NTP loss column")

    @model_validator(mode="after")
    def _eval_set_fits(self) -> "DemoConfig":
        if self.eval_examples * self.eval_length > MAX_SYNTHETIC_TOKENS:
            raise ValueError(f"demo.eval_examples={self.eval_examples} x demo.eval_length={self.eval_length} is more "
                             f"than the {MAX_SYNTHETIC_TOKENS} tokens an evaluation set may hold (it is generated "
                             f"in full before anything trains)")
        return self


def tiny_delta_net() -> ModelConfigBase:
    """The embedded default: a DeltaNet small enough to train on a laptop CPU, byte-level vocabulary."""
    return DeltaNetConfig(vocab_size=260, hidden_size=128, num_hidden_layers=2, num_heads=2, intermediate_size=256,
                          tie_word_embeddings=True, bos_token_id=257, eos_token_id=258, pad_token_id=256)


class RunConfig(Strict):
    model: SerializeAsAny[ModelConfigBase] = Field(default_factory=tiny_delta_net)
    tokenizer: PathStr | None = Field(None, description="directory with tokenizer.json; None = train.init_from's if it "
                                  "has one, else byte-level")
    data: DataSpec = DataSpec()
    train: TrainConfig = TrainConfig()
    optim: OptimConfig = OptimConfig()
    refine: RefineConfig = RefineConfig()
    service: ServiceConfig = ServiceConfig()
    rollout: RolloutConfig = RolloutConfig()
    demo: DemoConfig | None = Field(None, description="set: run the REFINE-vs-NTP comparison instead of one run")

    @field_validator("tokenizer")
    @classmethod
    def _home(cls, value: str | None) -> str | None:
        return _expand_home(value)

    @model_validator(mode="before")
    @classmethod
    def _model_of_init_from(cls, values: Any) -> Any:
        """A run that starts from a checkpoint trains that checkpoint's model: its config.json replaces the
        model section, so that every check and every actor sees the architecture and vocabulary in use."""
        if not isinstance(values, dict):
            return values
        train = values.get("train")
        init_from = train.get("init_from") if isinstance(train, dict) else getattr(train, "init_from", None)
        if init_from:
            out_dir = train.get("out_dir") if isinstance(train, dict) else getattr(train, "out_dir", None)
            values = {**values, "model": _checkpoint_model_config(str(init_from), out_dir)}
        return values

    @field_validator("model", mode="before")
    @classmethod
    def _model(cls, value: Any) -> ModelConfigBase:
        if isinstance(value, ModelConfigBase):
            return value
        if not isinstance(value, dict):
            raise ValueError(f"model must be a mapping with a model_type, got {shown(value)}")
        return config_from_dict(value)

    @model_validator(mode="after")
    def _model_keys_are_fields(self, info: ValidationInfo) -> "RunConfig":
        # A model section written by hand (no train.init_from, whose config.json may carry any library's keys)
        # holds fields only: model.num_layers would be kept as an unread extra and train the default depth.
        # Not for a command that reads no model section (eval reads --model; a run config's is its checkpoint's).
        if self.train.init_from is None and _reads(info, "model"):
            unknown = sorted(set(self.model.model_extra or {}) - LIBRARY_KEYS - set(UNSUPPORTED_FLA_FIELDS))
            if unknown:
                key = unknown[0]
                raise ValueError(f"model.{key}={shown(self.model.model_extra[key])} is not a field of "
                                 f"{self.model.model_type}; its fields: {sorted(type(self.model).model_fields)}")
        return self

    @model_validator(mode="after")
    def _model_dtype_is_train_dtype(self, info: ValidationInfo) -> "RunConfig":
        # A model section copied from a config.json may carry its dtype (transformers' key), which nothing reads:
        # the run builds and trains the model in train.dtype. One that says otherwise is refused, not ignored.
        if self.train.init_from is None and _reads(info, "model"):
            for key in ("torch_dtype", "dtype"):
                value = (self.model.model_extra or {}).get(key)
                if value is not None and str(value).removeprefix("torch.") != self.train.dtype:
                    raise ValueError(f"model.{key}={shown(value)} is not read: the model is built and trained in "
                                     f"train.dtype={self.train.dtype!r}; set train.dtype instead")
        return self

    @model_validator(mode="after")
    def _engine_serves_model(self) -> "RunConfig":
        # What the vLLM engine would refuse only once a worker starts it (or fail on every rollout),
        # refused here with the checks that need no vLLM.
        if self.rollout.engine != "vllm":
            return self
        check_engine(self.model, self.rollout.vllm, self.refine, self.data.seq_len,
                     cpu="train.device='cpu'" if self.train.device == "cpu" else None)
        return self

    @model_validator(mode="after")
    def _loss_trains(self) -> "RunConfig":
        # Every REFINE mode trains lambda_ntp * NTP + lambda_nsp * policy loss: with both 0 the loss is 0, and a
        # run would sample and score rollouts, then take steps that only decay the weights (AdamW).
        if self.train.mode != "ntp" and self.refine.lambda_ntp == 0 and self.refine.lambda_nsp == 0:
            raise ValueError(f"refine.lambda_ntp=0 and refine.lambda_nsp=0 make the loss of train.mode="
                             f"{self.train.mode!r} 0: nothing would be learned (the weights only decay); give either "
                             f"a positive weight")
        return self

    @model_validator(mode="after")
    def _top_p_samples(self) -> "RunConfig":
        # The likeliest of vocab_size tokens has probability at least 1/vocab_size: a top_p at most that keeps it
        # alone, which is greedy decoding, refused with per-position groups as temperature=0 and top_k=1 are.
        refine, vocab_size = self.refine, self.model.vocab_size
        groups = "per position" if refine.groups == "position" else "per document, of one position: num_chunks=1"
        if (refine.num_samples > 1 and (refine.groups == "position" or refine.num_chunks == 1)
                and refine.top_p * vocab_size <= 1):
            raise ValueError(f"refine.top_p={refine.top_p} keeps only the likeliest of model.vocab_size={vocab_size} "
                             f"tokens (it has probability at least 1/{vocab_size}), so it decodes greedily: the "
                             f"num_samples={refine.num_samples} rollouts of a position are one rollout repeated and "
                             f"their groups ({groups}) give every advantage 0: raise top_p above 1/{vocab_size}, or "
                             f"use num_samples=1 or group_by='document' with num_chunks > 1")
        return self

    @model_validator(mode="after")
    def _margins_fit(self, info: ValidationInfo) -> "RunConfig":
        needed = 2 * self.refine.margin + self.refine.rollout_len + self.refine.num_chunks
        if self.train.mode != "ntp" and self.data.seq_len < needed and _reads(info, "data.seq_len"):
            raise ValueError(
                f"data.seq_len={self.data.seq_len} is too short for refine.num_chunks={self.refine.num_chunks}, "
                f"rollout_len={self.refine.rollout_len} and margin={self.refine.margin} (needs >= {needed})"
            )
        shortest = min_document_length(self.refine.num_chunks, self.refine.rollout_len, self.refine.margin)
        if self.train.mode != "ntp" and self.data.min_length < shortest and _reads(info, "data.min_length"):
            raise ValueError(
                f"data.min_length={self.data.min_length} admits documents too short for refine.num_chunks="
                f"{self.refine.num_chunks}, rollout_len={self.refine.rollout_len} and margin={self.refine.margin} "
                f"(rollouts need documents of >= {shortest} tokens)"
            )
        return self

    @model_validator(mode="after")
    def _discovery_dir_is_a_directory(self) -> "RunConfig":
        # Checked here, before any Ray or Redis starts; the service creates it before starting Ray
        # (services.metrics.prepare_discovery_dir), where a directory it cannot create (no permission) fails.
        # Not on ServiceConfig: the orchestrator assigns the deployment's directory to it (validate_assignment),
        # and that directory is checked where it is created, with one-line messages.
        problem = discovery_dir_problem(self.service.metrics_discovery_dir)
        if problem is not None:
            raise ValueError(f"{discovery_dir_setting(self.service.metrics_discovery_dir)}: {problem}")
        return self

    @model_validator(mode="after")
    def _eval_every_has_a_source(self) -> "RunConfig":
        if self.train.eval_every and self.data.eval_source is None:
            raise ValueError(f"train.eval_every={self.train.eval_every} measures the held-out loss of data.eval_source,"
                             f" which is not set: give it a source of held-out documents (or synthetic)")
        return self

    @model_validator(mode="after")
    def _main_job_reads_its_own_steps_and_rates(self) -> "RunConfig":
        # The main job's stages train demo.*_steps at demo.*_lr: a train.steps or optim.lr given would go unread.
        if self.demo is None:
            return self
        unread = []
        if "steps" in self.train.model_fields_set:
            unread.append((f"train.steps={self.train.steps}", "demo.pretrain_steps and demo.branch_steps"))
        if "lr" in self.optim.model_fields_set:
            unread.append((f"optim.lr={self.optim.lr}", "demo.pretrain_lr and demo.branch_lr"))
        if unread:
            setting, instead = unread[0]
            raise ValueError(f"{setting} is not read by the main job (a config with a demo section, as `refine train` "
                             f"without a config file runs): its stages take {instead}; set those, or train one run "
                             f"with --set demo=null")
        return self

    @model_validator(mode="after")
    def _heldout_documents_fit(self) -> "RunConfig":
        if self.demo is not None and self.demo.heldout_documents * self.data.seq_len > MAX_SYNTHETIC_TOKENS:
            raise ValueError(f"demo.heldout_documents={self.demo.heldout_documents} x data.seq_len="
                             f"{self.data.seq_len} is more than the {MAX_SYNTHETIC_TOKENS} tokens the held-out "
                             f"documents may hold (they are generated in full before anything trains)")
        return self

    @model_validator(mode="after")
    def _documents_fit(self, info: ValidationInfo) -> "RunConfig":
        # Documents are cut to seq_len tokens, so a longer minimum keeps none; the data layer would find
        # out only after reading the whole source.
        if self.data.min_length > self.data.seq_len and _reads(info, "data.min_length"):
            raise ValueError(f"data.min_length={self.data.min_length} is larger than data.seq_len={self.data.seq_len}"
                             f" (documents are cut to seq_len tokens): no document would be kept")
        return self


def _reads(info: ValidationInfo, setting: str) -> bool:
    """Whether the command validating a config reads `setting`: `refine posttrain` and `refine eval` read task
    files, whose prompts they measure against REFINE's needs themselves, not data.min_length (nor, eval,
    data.seq_len). The checks between settings skip one it does not read (load_config's `unread`)."""
    return not (isinstance(info.context, dict) and setting in info.context.get("unread", ()))


def input_path_fields(config: RunConfig) -> tuple[tuple[BaseModel, str], ...]:
    """The fields of `config` that may name a file or directory the run reads, each as (the section that holds
    it, the field's name), to read or rewrite: train.init_from, tokenizer, data.source and data.eval_source. Each
    may also name no file (`synthetic`, unset). train.out_dir, which the run writes, is apart."""
    return ((config.train, "init_from"), (config, "tokenizer"), (config.data, "source"), (config.data, "eval_source"))


def _expand_home(path: str | None) -> str | None:
    """A path as every reader gets it: "~" expanded once here (a YAML file's "~/ckpt" is not a shell's)."""
    if not (path and path.startswith("~")):
        return path
    try:
        return str(Path(path).expanduser())
    except RuntimeError:  # "~nobody/...": no such user, so no home directory
        raise ValueError(f"{path!r} starts with a home directory that cannot be found (no such user)") from None


def _checkpoint_model_config(init_from: str, out_dir: Any = None) -> dict[str, Any]:
    try:
        config_file = Path(_expand_home(init_from)) / "config.json"
    except ValueError as error:  # read before the field's own check, which names it the same way
        raise ValueError(f"train.init_from={init_from!r}: {error}") from None
    try:
        if not config_file.parent.exists():
            raise ValueError(f"train.init_from={init_from!r} does not exist{_resume_remedy(out_dir)}")
        if not config_file.is_file():
            raise ValueError(f"train.init_from={init_from!r} has no config.json: give a model directory "
                             f"(a checkpoint's model/)")
        values = json.loads(config_file.read_text())
    except OSError as error:  # a name too long, no permission: pydantic would pass it on without the field
        raise ValueError(f"train.init_from={init_from!r}: cannot read {config_file.name}: "
                         f"{error.strerror or error}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"train.init_from={init_from!r}: cannot parse its config.json: {error}") from None
    if not isinstance(values, dict):
        raise ValueError(f"train.init_from={init_from!r}: its config.json holds no mapping")
    return values


def _resume_remedy(out_dir: Any) -> str:
    """For a run whose starting checkpoint is gone (deleted, or the run moved to another machine): its --resume
    reads that checkpoint's config.json and tokenizer, and can take them from the run's own last model instead."""
    if out_dir is None:
        return ""
    try:
        model = Path(_expand_home(str(out_dir))) / "checkpoints" / "latest" / "model"
        if not (model / "config.json").is_file():
            return ""
    except (ValueError, OSError):
        return ""
    return (f": a --resume of the run in train.out_dir={str(out_dir)!r} reads its starting checkpoint's config.json "
            f"and tokenizer (the weights come from the run's checkpoint); put it back, or continue from the run's "
            f"own last model: --set train.init_from={model}")


def run_tokenizer(config: RunConfig) -> Tokenizer:
    """The tokenizer of a run: `tokenizer`, else the one saved with `train.init_from`'s model, else bytes."""
    return resolve_tokenizer(config.tokenizer, config.train.init_from)


def fit_to_tokenizer(config: RunConfig, tokenizer: Tokenizer) -> RunConfig:
    """The config whose model agrees with the tokenizer that encodes the documents.

    A model built from scratch takes the tokenizer's BOS, EOS and PAD ids (rollouts never sample the model's
    EOS, and a saved checkpoint names its special ids). A checkpoint (`train.init_from`) keeps its own, and must
    end sequences with the tokenizer's EOS: a mismatch means the wrong tokenizer for that model."""
    model = config.model
    if config.train.init_from:
        checkpoint = f"train.init_from={config.train.init_from!r}"
        remedy = "give the checkpoint's own tokenizer (--set tokenizer=DIR)"
        check_vocab_fits(model.vocab_size, tokenizer, checkpoint, remedy)
        check_eos_matches(model.eos_token_id, tokenizer, checkpoint, remedy)
        return config
    check_vocab_fits(model.vocab_size, tokenizer, "model", f"set model.vocab_size to at least {tokenizer.vocab_size}")
    # A tokenizer without a pad token pads with EOS; the model then names none (fla's embedding would
    # otherwise never train the EOS row, its padding_idx).
    pad = tokenizer.pad_id if tokenizer.pad_id != tokenizer.eos_id else None
    ids = {"bos_token_id": tokenizer.bos_id, "eos_token_id": tokenizer.eos_id, "pad_token_id": pad}
    if all(getattr(model, key) == value for key, value in ids.items()):
        return config
    return config.model_copy(update={"model": model.model_copy(update=ids)})


def _section_fields(section: str) -> list[str]:
    """The field names of run config section `section` (its pydantic model, also when optional); [] if none."""
    info = RunConfig.model_fields.get(section)
    annotation = info.annotation if info is not None else None
    models = [t for t in (annotation, *get_args(annotation)) if isinstance(t, type) and issubclass(t, BaseModel)]
    return list(models[0].model_fields) if models else []


def _no_such_key(error: dict) -> str | None:
    """A misspelt section or `section.field`: which exist, and the closest name."""
    if error["type"] != "extra_forbidden" or len(error["loc"]) > 2:
        return None
    names = list(RunConfig.model_fields) if len(error["loc"]) == 1 else _section_fields(str(error["loc"][0]))
    if not names:
        return None
    key = str(error["loc"][-1])
    where = "the run config" if len(error["loc"]) == 1 else str(error["loc"][0])
    close = difflib.get_close_matches(key, names, n=1)
    guess = f"did you mean {'.'.join([*map(str, error['loc'][:-1]), close[0]])}? " if close else ""
    if len(error["loc"]) == 1:
        return f"{key}: no such section ({guess}{where} has {', '.join(names)})"
    return f"{where}.{key}={shown(error.get('input'))}: no such field ({guess}{where} has {', '.join(names)})"


def _format_error(err: ValidationError) -> str:
    errors = err.errors()
    named = {index: _no_such_key(e) for index, e in enumerate(errors)}
    lines = [line for line in named.values() if line is not None]
    lines += validation_problems(e for index, e in enumerate(errors) if named[index] is None)
    return "invalid configuration:\n  " + "\n  ".join(lines)


def _holds_password(url: str) -> bool:
    """Whether a Redis URL carries a password: redis://user:PASSWORD@host or ?password=... ."""
    parts = urlsplit(url)
    try:
        has_userinfo_password = parts.password is not None
    except ValueError:  # a malformed port: connecting will say so
        has_userinfo_password = ":" in parts.netloc.rpartition("@")[0]
    query = {key.lower() for key, _ in parse_qsl(parts.query, keep_blank_values=True)}
    return has_userinfo_password or "password" in query


# The main job's settings when `refine train` gets no config file (configs/demo.yaml spells out the same).
DEMO_DEFAULTS: dict[str, Any] = {
    "data": {"num_documents": 2048, "synthetic_tasks": ["recall", "niah", "mqar"]},
    "train": {"out_dir": "runs/demo"},
    "demo": {},
}


def _example_hint(path: Path) -> str:
    """For a missing configs/NAME.yaml that names a shipped example (README's commands, run outside a checkout):
    the command that puts the examples there."""
    if len(path.parts) == 2 and path.parts[0] == DEFAULT_DIR and is_shipped_example(path.name):
        return f" (the example configs ship with the package: `{COMMAND}` copies them into ./{DEFAULT_DIR}/)"
    return ""


def load_config(path: str | Path | None = None, overrides: list[str] | None = None,
                defaults: dict[str, Any] | None = None, unread: Collection[str] = ()) -> RunConfig:
    """A config file (or `defaults` when there is none) with `section.field=value` overrides applied.
    `unread`: settings the command does not read (say "data.min_length"), left out of the checks between settings."""
    tree: dict[str, Any] = copy.deepcopy(defaults) if path is None and defaults else {}
    if path is not None:
        path = Path(path)
        if not path.exists():
            raise ConfigError(f"config file {path} does not exist{_example_hint(path)}")
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError as error:
            raise ConfigError(f"config file {path} is not UTF-8 text (byte {error.start}: "
                              f"{error.object[error.start:error.start + 4]!r})") from None
        except OSError as error:  # a directory, no permission
            raise ConfigError(f"config file {path} cannot be read: {error.strerror}") from None
        tree = parse_yaml(text, f"config file {path}")
        if tree is None:  # running the defaults instead would hide a truncated or wrong file
            raise ConfigError(f"config file {path} is empty: it holds no settings")
        if not isinstance(tree, dict):
            raise ConfigError(f"config file {path} must hold a mapping, got {type(tree).__name__}")
    parsed = parse_overrides(overrides or [])
    for key, value in parsed:
        set_path(tree, key, value)
    train = tree.get("train")
    init_from = train.get("init_from") if isinstance(train, dict) else None
    model_keys = [key for key, _ in parsed if key == "model" or key.startswith("model.")]
    if init_from and model_keys:  # they would be dropped without a word: the checkpoint's config.json is the model
        raise ConfigError(f"--set {', '.join(model_keys)}: train.init_from={str(init_from)!r} supplies the model (its "
                          f"config.json replaces the model section), so model settings do not apply")
    return validate_config(tree, unread)


def validate_config(tree: dict[str, Any], unread: Collection[str] = ()) -> RunConfig:
    model = tree.get("model")
    if isinstance(model, dict) and "model_type" not in model:  # overrides of the default model's fields
        tree = {**tree, "model": {**tiny_delta_net().to_json_dict(), **model}}
    try:
        return RunConfig.model_validate(tree, context={"unread": frozenset(unread)})
    except ValidationError as err:
        raise ConfigError(_format_error(err)) from None
    except ValueError as err:  # raised inside the model-config dispatch
        raise ConfigError(f"invalid configuration: {err}") from None


def dump_config(config: RunConfig) -> str:
    return yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False)
