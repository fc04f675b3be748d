"""The one contract every fast-weight language model in the project follows.

    out = model(input_ids, state=None, lengths=None, state_positions=None, output_state=True,
                defer_states=False, logit_positions=None)
    out.logits          [B, T, V]; with logit_positions [B, P] token indices, [B, P, V] at those only
    out.hidden_states   [B, T, D]   final layer, after the final norm (what the cosine reward reads)
    out.state           ModelState  after each row's `lengths[b]` tokens (right padding never leaks)
    out.position_states ModelState  batch B * P: the state after `state_positions[b, j]` tokens of
                                    row b, at index b * P + j; differentiable
    out.states_at       with defer_states=True: positions [B, P] -> ModelState, usable after the
                        forward (positions chosen from this very pass's logits), differentiable

A forward over segments with the carried state equals one forward over the whole sequence.

Mixers (the token-mixing layer of each block) implement one method:

    mixer(x [B, T, D], state: dict | None, want_states: bool, final_only: bool = False)
        -> (y [B, T, D], states_at: Callable[[LongTensor [B, P]], dict] | None)

where `states_at(positions)` returns the layer state after `positions[b, j]` tokens of this call,
batch B * P, and `states_at(None)` the state after all T tokens of every row (batch B). The language
model asks for each row's length, or None when every row is whole, to obtain the final state, so a
mixer needs one mechanism only: states at arbitrary positions, computable after its forward.
With final_only=True the caller promises to ask states_at(None) only (every row whole, no positions,
no deferred states): a mixer may then use a kernel that returns just the final state (fla's).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from refine.models.common import RMSNorm, SwiGLUMLP, mlp_intermediate_size
from refine.models.state import ModelState, is_integer_dtype


@dataclass
class ModelOutput:
    logits: Tensor
    hidden_states: Tensor
    state: ModelState | None = None
    position_states: ModelState | None = None
    states_at: Callable[[Tensor], ModelState] | None = None


class Block(nn.Module):
    """Pre-norm residual block: x + mixer(norm(x)), then x + mlp(norm(x)) (fla's layout)."""

    def __init__(self, config: Any, mixer: nn.Module):
        super().__init__()
        self.attn_norm = RMSNorm(config.hidden_size, eps=config.norm_eps)
        self.attn = mixer
        self.mlp_norm = RMSNorm(config.hidden_size, eps=config.norm_eps)
        size = mlp_intermediate_size(config.hidden_size, config.hidden_ratio, config.intermediate_size)
        self.mlp = SwiGLUMLP(config.hidden_size, size)

    def forward(self, x: Tensor, state: dict | None, want_states: bool,
                final_only: bool = False) -> tuple[Tensor, Callable | None]:
        mixed, states_at = self.attn(self.attn_norm(x), state, want_states, final_only)
        x = x + mixed
        x = x + self.mlp(self.mlp_norm(x))
        return x, states_at


def check_integer_tensor(name: str, value: Any) -> None:
    """Raises ValueError naming `name` unless value is an integer tensor: a cast to long would
    silently truncate 1.5 to 1 (and read True as 1)."""
    if not isinstance(value, Tensor):
        raise ValueError(f"{name} must be an integer tensor, got {type(value).__name__} {value!r}")
    if not is_integer_dtype(value.dtype):
        raise ValueError(f"{name} must be an integer tensor, got dtype {value.dtype}: {value.tolist()}")


def check_token_ids(name: str, ids: Any, vocab_size: int) -> None:
    """Raises ValueError naming `name` unless ids is an integer tensor [batch, time] of at least one row with
    every id (padding included: every position is embedded) in [0, vocab_size). For the library's entry points:
    one host sync (the min and max together), which the model's forward leaves out to stay sync-free; out of
    range, the embedding would fail deep inside torch (on a GPU, as an asynchronous device-side assert)."""
    check_integer_tensor(name, ids)
    if ids.dim() != 2:
        raise ValueError(f"{name} must be [batch, time], got shape {tuple(ids.shape)}")
    if ids.shape[0] == 0 or ids.shape[1] == 0:
        raise ValueError(f"{name} holds no tokens: shape {tuple(ids.shape)}")
    low, high = torch.stack(torch.aminmax(ids)).tolist()
    if low < 0 or high >= vocab_size:
        bad = low if low < 0 else high
        row, column = (ids == bad).nonzero()[0].tolist()
        raise ValueError(f"{name}[{row}, {column}]={bad} is not a token id of the model (vocab_size={vocab_size}: "
                         f"ids 0..{vocab_size - 1})")


def check_lengths(lengths: Any, batch: int, seq_len: int, read_values: bool = True) -> bool:
    """Raises ValueError naming `lengths` unless it is an integer tensor [batch] (read_values: with
    values in [0, seq_len]). Returns whether every row is whole (all lengths seq_len); False when the
    values are not read.

    The values cost one host sync (their min and max together), as the positions' check does.
    """
    check_integer_tensor("lengths", lengths)
    if tuple(lengths.shape) != (batch,):
        raise ValueError(f"lengths must have shape [batch={batch}], got {tuple(lengths.shape)}: {lengths.tolist()}")
    if not read_values:
        return False
    if batch == 0:
        return True
    low, high = torch.stack(torch.aminmax(lengths)).tolist()
    if low < 0 or high > seq_len:
        raise ValueError(f"lengths must lie in [0, {seq_len}] (the input's length), got {lengths.tolist()}")
    return low == seq_len


class FastWeightLM(nn.Module):
    """Embeddings -> blocks -> final norm -> lm_head, with fla's module names (`model.*`, `lm_head`)."""

    def __init__(self, config: Any):
        super().__init__()
        self.config = config
        self.model = nn.Module()
        # The pad token's row is the embedding's padding_idx, as in fla's models and the LaCT release: a lookup
        # of it passes no gradient to that row (initialized like every row, as fla's _init_weights does). Checked
        # here, not in the config, so that a run's too small model.vocab_size is named as such first.
        pad = config.pad_token_id
        if pad is not None and not -config.vocab_size <= pad < config.vocab_size:  # nn.Embedding's own rule
            raise ValueError(f"model pad_token_id={pad} is outside the vocabulary (vocab_size={config.vocab_size}): "
                             f"the embedding has no such row")
        self.model.embeddings = nn.Embedding(config.vocab_size, config.hidden_size, padding_idx=pad)
        self.model.layers = nn.ModuleList(
            [Block(config, self.make_mixer(config, i)) for i in range(config.num_hidden_layers)]
        )
        self.model.norm = RMSNorm(config.hidden_size, eps=config.norm_eps)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embeddings.weight
        self.reset_parameters()

    def make_mixer(self, config: Any, layer_idx: int) -> nn.Module:
        raise NotImplementedError

    def reset_parameters(self) -> None:
        """Normal(0, initializer_range) for linear and embedding weights, as fla initializes."""
        std = self.config.initializer_range
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, mean=0.0, std=std)
                if getattr(module, "bias", None) is not None:
                    nn.init.zeros_(module.bias)

    @property
    def device(self) -> torch.device:
        return self.lm_head.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.lm_head.weight.dtype

    def _check_state(self, state: ModelState, batch: int) -> None:
        """Refuse a carried state this model did not make (another model's: other layers or state keys); its
        layers would be dropped or misread without a word."""
        if state.batch_size != batch:
            raise ValueError(f"state has batch size {state.batch_size} but input_ids has {batch}")
        if len(state.layers) != len(self.model.layers):
            raise ValueError(f"state has {len(state.layers)} layers but the model has {len(self.model.layers)}: a "
                             f"state carries over only to a model of the config that made it")
        for i, (layer, block) in enumerate(zip(state.layers, self.model.layers)):
            if set(layer) != block.attn.state_names:
                raise ValueError(f"state layer {i} holds {sorted(layer)} but the model's layer {i} keeps "
                                 f"{sorted(block.attn.state_names)}: a state carries over only to a model of the "
                                 f"config that made it")

    def forward(
        self,
        input_ids: Tensor,
        state: ModelState | None = None,
        lengths: Tensor | None = None,
        state_positions: Tensor | None = None,
        output_state: bool = True,
        defer_states: bool = False,
        logit_positions: Tensor | None = None,
    ) -> ModelOutput:
        if not isinstance(input_ids, Tensor):  # a list of lists: "has no attribute 'dim'" named nothing
            raise ValueError(f"input_ids must be an integer tensor [batch, time], got {type(input_ids).__name__}")
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be [batch, time], got shape {tuple(input_ids.shape)}")
        batch, seq_len = input_ids.shape
        if state is not None:
            self._check_state(state, batch)
        want_states = output_state or defer_states or state_positions is not None
        whole_rows = True  # every row is seq_len tokens long: its end needs no per-row gather
        if lengths is not None:
            # The values are read (one host sync, as positions are checked) only where states are
            # wanted: nothing else reads lengths, and a training forward then stays sync-free.
            whole_rows = check_lengths(lengths, batch, seq_len, read_values=want_states)
            lengths = lengths.to(device=input_ids.device, dtype=torch.long)
        else:
            lengths = torch.full((batch,), seq_len, dtype=torch.long, device=input_ids.device)
        for name, positions in (("state_positions", state_positions), ("logit_positions", logit_positions)):
            if positions is not None:
                check_integer_tensor(name, positions)
        # Only the state after every whole row: a mixer may use a kernel that returns just that (fla's).
        final_only = output_state and whole_rows and not defer_states and state_positions is None

        x = self.model.embeddings(input_ids)
        layer_states_at: list[Callable | None] = []
        for i, block in enumerate(self.model.layers):
            x, states_at = block(x, None if state is None else state.layers[i], want_states, final_only)
            layer_states_at.append(states_at)
        hidden = self.model.norm(x)
        if logit_positions is None:
            logits = self.lm_head(hidden)
        else:  # a prefill reads one row: a long prompt's [B, T, V] logits can take gigabytes
            logit_positions = logit_positions.to(device=input_ids.device, dtype=torch.long)
            if logit_positions.dim() != 2 or logit_positions.shape[0] != batch:
                raise ValueError(f"logit_positions must be [batch={batch}, P], got {tuple(logit_positions.shape)}")
            if ((logit_positions < 0) | (logit_positions >= seq_len)).any():
                raise ValueError(f"logit_positions must lie in [0, {seq_len - 1}], got {logit_positions.tolist()}")
            rows = torch.arange(batch, device=input_ids.device)[:, None]
            logits = self.lm_head(hidden[rows, logit_positions])
        out = ModelOutput(logits=logits, hidden_states=hidden)
        if not want_states:
            return out

        def states_at(positions: Tensor, name: str = "positions") -> ModelState:
            check_integer_tensor(name, positions)
            positions = positions.to(device=input_ids.device, dtype=torch.long)
            if positions.dim() != 2 or positions.shape[0] != batch:
                raise ValueError(f"{name} must be [batch={batch}, P], got {tuple(positions.shape)}")
            if ((positions < 0) | (positions > lengths[:, None])).any():
                raise ValueError(f"{name} must lie in [0, length] of their row (lengths {lengths.tolist()}), "
                                 f"got {positions.tolist()}")
            return collect(positions)

        def collect(positions: Tensor | None) -> ModelState:
            return ModelState([fn(positions) for fn in layer_states_at])

        if state_positions is not None:
            out.position_states = states_at(state_positions, "state_positions")
        if output_state:  # each row's own length: in range by construction
            # None asks the mixers for every row's end without a tensor of positions to inspect: a
            # decoded token then costs no device sync.
            out.state = collect(None if whole_rows else lengths[:, None])
        if defer_states:
            out.states_at = states_at
        return out

    def num_parameters(self) -> int:
        return sum(p.numel() for p in {id(p): p for p in self.parameters()}.values())
