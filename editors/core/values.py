"""Target values: the residual change at a block's output that makes the model say the target.

For each request i we look for a vector delta_i, added to the output of block `layer` at the
subject's last token, that minimises

    NLL(target_new | prefix + prompt)            averaged over the context prefixes
  + kl_factor * KL(p_before || p_after)          on "{subject} is a" (keep what the subject is)
  + weight_decay * |delta_i| / |h_i|^2           with |delta_i| <= clamp_norm_factor * |h_i|

where h_i is the block output at that token. Nothing before the subject's last token depends
on delta_i (causal attention), and the blocks at and below `layer` do not either: both are
computed once (a KV cache for the tokens before the subject, frozen block outputs for the
rest), so each step runs only the upper blocks on the few tokens from the subject on.
All requests of a batch are optimised together; a request leaves the batch once its target is
reached.

With `components` (PMET) delta_i is one vector per named module inside block `layer` (its
attention output and its MLP output), each added to that module's output at the subject and
clamped and decayed against that output's own norm; block `layer` then runs on every step
(on its cached input), so the MLP sees what the attention vector changed.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from ..model_spec import ModelSpec, get_module
from ..requests import EditRequest
from ..tokens import PromptIds, locate
from ..tracing import frozen_below, hidden_of
from .keys import pad_id_of

KL_TEMPLATE = "{} is a"

ProgressFn = Callable[[float, str], None]
Anchor = Callable[[], AbstractContextManager[object]]  # see optimise_residual_targets


def progress_share(progress: ProgressFn | None, low: float, high: float) -> ProgressFn:
    """`progress` for a step that makes up the share [low, high] of the job."""

    def report(fraction: float, stage: str) -> None:
        if progress:
            progress(low + (high - low) * fraction, stage)

    return report


def clamp_row_norms(rows: torch.Tensor, limit: torch.Tensor) -> torch.Tensor:
    """Each row of `rows` scaled down to a norm of at most `limit` (one per row)."""
    norms = rows.norm(dim=1)
    return rows * torch.clamp(limit / norms.clamp_min(1e-12), max=1.0)[:, None]


@dataclass(frozen=True)
class ValueOptions:
    steps: int = 25
    lr: float = 0.5
    kl_factor: float = 0.0625
    weight_decay: float = 0.5
    clamp_norm_factor: float = 4.0
    stop_nll: float = 0.05


@dataclass
class ResidualTargets:
    """delta[i] is the change of block `layer`'s output wanted at request i's subject."""

    layer: int
    delta: torch.Tensor  # [n, d]
    start: torch.Tensor  # [n, d] what delta is measured against (bare prompt, subject token)
    # [n, d] start minus the current weights' block output there (None unless anchored)
    offset: torch.Tensor | None = None
    losses: list[float] = field(default_factory=list)
    prob_before: list[float] = field(default_factory=list)
    prob_after: list[float] = field(default_factory=list)
    steps: int = 0


@dataclass
class _Rows:
    """The optimisation batch split at each row's subject token."""

    past_ids: torch.Tensor  # [B, P] tokens before the subject's last token (right-padded)
    past_mask: torch.Tensor
    ids: torch.Tensor  # [B, S] from the subject's last token on (right-padded)
    mask: torch.Tensor
    positions: torch.Tensor  # [B, S]
    request: torch.Tensor  # [B] which request each row belongs to
    is_kl: torch.Tensor  # [B] bool
    answer_rows: torch.Tensor  # [T] row of each answer token
    answer_cols: torch.Tensor  # [T] column (in ids) predicting it
    answer_ids: torch.Tensor  # [T]
    answer_row_len: torch.Tensor  # [B] answer length of each row (1 for KL rows)
    kl_cols: torch.Tensor  # [B] column of the next-token distribution used for KL
    scale: torch.Tensor  # [B] share of its request's delta this row receives


def _build_rows(
    tok: PreTrainedTokenizerBase,
    requests: list[EditRequest],
    prefixes: list[str],
    device: torch.device,
) -> _Rows:
    entries: list[tuple[int, bool, PromptIds]] = []
    for i, request in enumerate(requests):
        for prefix in prefixes:
            entries.append(
                (i, False, locate(tok, prefix, request.prompt, request.subject, request.target))
            )
        entries.append((i, True, locate(tok, "", KL_TEMPLATE, request.subject, None)))
    pad = pad_id_of(tok)
    past_width = max(e.lookup for _, _, e in entries)
    suffixes = [
        (e.prompt_ids + e.answer_ids[:-1])[e.lookup :] if not kl else e.prompt_ids[e.lookup :]
        for _, kl, e in entries
    ]
    width = max(len(s) for s in suffixes)
    n = len(entries)
    past_ids = torch.full((n, past_width), pad, dtype=torch.long)
    past_mask = torch.zeros((n, past_width), dtype=torch.long)
    ids = torch.full((n, width), pad, dtype=torch.long)
    mask = torch.zeros((n, width), dtype=torch.long)
    positions = torch.zeros((n, width), dtype=torch.long)
    a_rows, a_cols, a_ids, row_len, kl_cols = [], [], [], [], []
    for row, ((_, kl, e), suffix) in enumerate(zip(entries, suffixes, strict=True)):
        past_ids[row, : e.lookup] = torch.tensor(e.prompt_ids[: e.lookup], dtype=torch.long)
        past_mask[row, : e.lookup] = 1
        ids[row, : len(suffix)] = torch.tensor(suffix, dtype=torch.long)
        mask[row, : len(suffix)] = 1
        positions[row] = e.lookup + torch.arange(width)
        first = len(e.prompt_ids) - 1 - e.lookup
        kl_cols.append(first)
        if kl:
            row_len.append(1)
            continue
        row_len.append(len(e.answer_ids))
        for j, token in enumerate(e.answer_ids):
            a_rows.append(row)
            a_cols.append(first + j)
            a_ids.append(token)

    def t(values: list[int]) -> torch.Tensor:
        return torch.tensor(values, dtype=torch.long, device=device)

    return _Rows(
        past_ids=past_ids.to(device),
        past_mask=past_mask.to(device),
        ids=ids.to(device),
        mask=mask.to(device),
        positions=positions.to(device),
        request=t([i for i, _, _ in entries]),
        is_kl=torch.tensor([kl for _, kl, _ in entries], device=device),
        answer_rows=t(a_rows),
        answer_cols=t(a_cols),
        answer_ids=t(a_ids),
        answer_row_len=t(row_len),
        kl_cols=t(kl_cols),
        scale=torch.ones(n, device=device),
    )


def _logits(model: PreTrainedModel, hidden: torch.Tensor) -> torch.Tensor:
    logits = model.get_output_embeddings()(hidden).float()
    cap = getattr(model.config, "final_logit_softcapping", None)
    if cap:
        logits = torch.tanh(logits / cap) * cap
    return logits


class _UpperStack:
    """Runs the blocks above `layer` on the suffix tokens, prefix held in a KV cache.

    With `components` (module paths inside block `layer`) block `layer` runs too, on its
    input computed once, and `run` adds one part of the delta to each component's output."""

    def __init__(
        self,
        model: PreTrainedModel,
        spec: ModelSpec,
        layer: int,
        rows: _Rows,
        post_norm: torch.nn.Module | None = None,
        components: tuple[str, ...] = (),
    ):
        self.model = model
        self.post_norm = post_norm
        self.mlp_path = spec.mlp_out_path(layer)
        self.backbone = model.base_model
        self.layers = get_module(model, spec.layers)
        self.layer = layer
        self.rows = rows
        self.past_len = rows.past_ids.shape[1]
        self.cache = None
        self.offset: torch.Tensor | None = None  # [B, d] added at each row's subject token
        self.components = components
        self.block_in: torch.Tensor | None = None  # with components: block `layer`'s input
        self.component_out: torch.Tensor | None = None  # [B, P * d] their clean outputs
        with torch.no_grad():
            if self.past_len:
                out = self.backbone(
                    input_ids=rows.past_ids,
                    attention_mask=rows.past_mask,
                    position_ids=torch.arange(self.past_len, device=rows.past_ids.device).expand_as(
                        rows.past_ids
                    ),
                    use_cache=True,
                )
                self.cache = out.past_key_values
            self.block_out, self.example, self.clean_hidden = self._clean_pass()

    def _call(self, first_cached_block: int) -> torch.Tensor:
        rows = self.rows
        out = self.backbone(
            input_ids=rows.ids,
            attention_mask=torch.cat([rows.past_mask, rows.mask], dim=1),
            position_ids=rows.positions,
            past_key_values=self.cache,
            use_cache=self.cache is not None,
        )
        if self.cache is not None:
            # forget the suffix again (stubbed blocks never appended to their caches)
            for block_cache in self.cache.layers[first_cached_block:]:
                block_cache.crop(-rows.ids.shape[1])
                block_cache.keys = block_cache.keys.detach()
                block_cache.values = block_cache.values.detach()
        return out.last_hidden_state

    def _clean_pass(self):
        captured = {}
        hooks = [
            self.layers[self.layer].register_forward_hook(
                lambda _m, _a, out: captured.setdefault("out", out)
            ),
            self.model.get_submodule(self.mlp_path).register_forward_hook(
                lambda _m, _a, out: captured.setdefault("mlp", out)
            ),
        ]
        for path in self.components:
            hooks.append(
                self.model.get_submodule(path).register_forward_hook(
                    lambda _m, _a, out, path=path: captured.setdefault(path, out)
                )
            )
        if self.components and self.layer > 0:
            hooks.append(
                self.layers[self.layer - 1].register_forward_hook(
                    lambda _m, _a, out: captured.setdefault("in", out)
                )
            )
        try:
            hidden = self._call(first_cached_block=0)
        finally:
            for hook in hooks:
                hook.remove()
        self.mlp_out = captured["mlp"][:, 0].detach().float()
        if self.components:
            parts = [captured[path][:, 0].detach().float() for path in self.components]
            self.component_out = torch.cat(parts, dim=1)
            if self.layer > 0:
                self.block_in = hidden_of(captured["in"]).detach()
        return hidden_of(captured["out"]).detach(), captured["out"], hidden.detach()

    def run(self, row_delta: torch.Tensor) -> torch.Tensor:
        """Final hidden states with `row_delta` [B, d] applied at each row's subject token.

        Without a post-norm the delta is added to the block output (= the MLP output's
        contribution). With one, the delta is added to the MLP output *before* the norm, so
        only reachable residual changes are sought. Each row's delta is first scaled by the
        share of it the edit will make at that row's context (`rows.scale`).
        """
        row_delta = row_delta * self.rows.scale[:, None]
        if self.components:
            return self._run_components(row_delta)
        if self.post_norm is not None:
            norm = self.post_norm
            row_delta = norm(self.mlp_out + row_delta) - norm(self.mlp_out)
        if self.offset is not None:
            row_delta = row_delta + self.offset
        width = self.block_out.shape[1]
        bump = F.pad(row_delta.to(self.block_out.dtype).unsqueeze(1), (0, 0, 0, width - 1))
        with frozen_below(self.layers, self.layer, lambda: self.block_out + bump, self.example):
            return self._call(first_cached_block=self.layer + 1)

    def _run_components(self, row_delta: torch.Tensor) -> torch.Tensor:
        """Final hidden states with part j of `row_delta` [B, P * d] added to component j's
        output at each row's subject token; block `layer` runs from its cached input."""
        width = self.rows.ids.shape[1]
        parts = row_delta.view(len(row_delta), len(self.components), -1)
        handles = []
        for j, path in enumerate(self.components):
            bump = F.pad(parts[:, j].unsqueeze(1), (0, 0, 0, width - 1))

            def add(_m: torch.nn.Module, _a: object, out: torch.Tensor, bump=bump) -> torch.Tensor:
                return out + bump.to(out.dtype)

            handles.append(self.model.get_submodule(path).register_forward_hook(add))
        block_in = self.block_in
        below = (
            nullcontext()
            if block_in is None
            else frozen_below(self.layers, self.layer - 1, lambda: block_in, self.example)
        )
        try:
            with below:
                return self._call(first_cached_block=self.layer)
        finally:
            for handle in handles:
                handle.remove()

    def select(self, keep: torch.Tensor) -> None:
        """Keep only the rows in `keep` (indices), dropping finished requests' rows."""
        self.rows = _select_rows(self.rows, keep)
        self.block_out = self.block_out[keep]
        if self.block_in is not None:
            self.block_in = self.block_in[keep]
        self.mlp_out = self.mlp_out[keep]
        self.clean_hidden = self.clean_hidden[keep]
        if self.offset is not None:
            self.offset = self.offset[keep]
        if self.cache is not None:
            self.cache.batch_select_indices(keep)


def _select_rows(rows: _Rows, keep: torch.Tensor) -> _Rows:
    remap = torch.full((rows.ids.shape[0],), -1, dtype=torch.long, device=keep.device)
    remap[keep] = torch.arange(len(keep), device=keep.device)
    token_keep = remap[rows.answer_rows] >= 0
    return _Rows(
        past_ids=rows.past_ids[keep],
        past_mask=rows.past_mask[keep],
        ids=rows.ids[keep],
        mask=rows.mask[keep],
        positions=rows.positions[keep],
        request=rows.request[keep],
        is_kl=rows.is_kl[keep],
        answer_rows=remap[rows.answer_rows[token_keep]],
        answer_cols=rows.answer_cols[token_keep],
        answer_ids=rows.answer_ids[token_keep],
        answer_row_len=rows.answer_row_len[keep],
        kl_cols=rows.kl_cols[keep],
        scale=rows.scale[keep],
    )


def _row_answer_nll(model: PreTrainedModel, rows: _Rows, hidden: torch.Tensor) -> torch.Tensor:
    """Length-normalised NLL of each row's answer [B] (0 for KL rows)."""
    logp = torch.log_softmax(_logits(model, hidden[rows.answer_rows, rows.answer_cols]), -1)
    token_nll = -logp.gather(1, rows.answer_ids[:, None]).squeeze(1)
    per_row = torch.zeros(rows.ids.shape[0], device=hidden.device)
    per_row = per_row.index_add(0, rows.answer_rows, token_nll)
    return per_row / rows.answer_row_len


def _kl_logprobs(model: PreTrainedModel, rows: _Rows, hidden: torch.Tensor) -> torch.Tensor:
    kl_rows = torch.nonzero(rows.is_kl).squeeze(1)
    return torch.log_softmax(_logits(model, hidden[kl_rows, rows.kl_cols[kl_rows]]), -1)


def optimise_residual_targets(
    model: PreTrainedModel,
    tok: PreTrainedTokenizerBase,
    spec: ModelSpec,
    requests: list[EditRequest],
    prefixes: list[str],
    layer: int,
    options: ValueOptions,
    progress: ProgressFn | None = None,
    mlp_space: bool = False,
    delivery: torch.Tensor | None = None,
    anchor: Anchor | None = None,
    components: tuple[str, ...] = (),
) -> ResidualTargets:
    """`mlp_space`: seek the change of block `layer`'s MLP output rather than of the block's
    output. The two are the same unless the family normalises the MLP output before adding it
    to the residual (Gemma 3), where only the MLP-space change is reachable by its weights.

    `delivery` [n, len(prefixes) + 1]: the share of delta_i that the weight update will
    actually make at each context of request i (its KL prompt last), when the method knows
    it in advance (ROME); the targets are then sought as the edit will deliver them.

    `anchor`: a context manager giving other weights (NSE's rewound ones). Each context's
    subject state is taken under them and delta is measured from there, while every other
    token keeps its state on the current weights: the target is anchored where the anchor
    weights put the subject, and sought in the context it will be read in.

    `components`: module paths inside block `layer` (PMET: its attention and MLP outputs);
    delta_i is then their parts side by side [P * d], each added to its module's output,
    and `start` their clean outputs at the bare prompt's subject (see the module notes)."""
    if components and (anchor is not None or mlp_space or delivery is not None):
        raise ValueError("components cannot be combined with anchor, mlp_space or delivery")
    device = next(model.parameters()).device
    n = len(requests)
    rows = _build_rows(tok, requests, prefixes, device)
    if delivery is not None:
        rows.scale = delivery.reshape(-1).to(device=device, dtype=torch.float32)
    post_norm = None
    if mlp_space and spec.mlp_post_norm is not None:
        post_norm = get_module(model, f"{spec.layer_path(layer)}.{spec.mlp_post_norm}")
    stack = _UpperStack(model, spec, layer, rows, post_norm, components)
    # the bare-prompt row of each request is its first row
    first_rows = torch.tensor([i * (len(prefixes) + 1) for i in range(n)], device=device)
    if stack.component_out is not None:
        start = stack.component_out[first_rows]
    else:
        start = stack.mlp_out if post_norm is not None else stack.block_out[:, 0].float()
        start = start[first_rows]
    before = stack.clean_hidden  # what the KL term keeps: the model without delta
    offset = None
    if anchor is not None:
        with anchor():
            anchored = _UpperStack(model, spec, layer, rows, post_norm).block_out[:, 0].float()
        stack.offset = anchored - stack.block_out[:, 0].float()
        offset = stack.offset[first_rows]
        if post_norm is None:
            start = anchored[first_rows]
        with torch.no_grad():  # the anchored subject state in the current context
            before = stack.run(torch.zeros_like(anchored))
    kl_before = _kl_logprobs(model, rows, before).detach()  # [n, V] in order
    parts = max(len(components), 1)  # delta's parts, each clamped and decayed on its own
    start_norms = _part_norms(start, parts)  # [n, parts]
    max_norm = options.clamp_norm_factor * start_norms

    delta = torch.zeros((n, start.shape[1]), device=device, requires_grad=True)
    optimizer = torch.optim.Adam([delta], lr=options.lr)
    active = torch.arange(n, device=device)
    result = ResidualTargets(layer=layer, delta=delta, start=start, offset=offset)
    final_nll = torch.zeros(n, device=device)

    for step in range(options.steps):
        rows = stack.rows
        hidden = stack.run(delta[rows.request])
        row_nll = _row_answer_nll(model, rows, hidden)
        counts = torch.zeros(n, device=device).index_add(0, rows.request, (~rows.is_kl).float())
        nll = torch.zeros(n, device=device).index_add(0, rows.request, row_nll)
        nll = nll[active] / counts[active]
        kl_now = _kl_logprobs(model, rows, hidden)
        kl = F.kl_div(kl_now, kl_before, log_target=True, reduction="none").sum(-1)
        shares = options.weight_decay * _part_norms(delta[active], parts)
        decay = (shares / start_norms[active] ** 2).sum(1)
        loss = (nll + options.kl_factor * kl + decay).sum()

        final_nll[active] = nll.detach()
        if step == 0:
            result.prob_before = torch.exp(-nll.detach()).tolist()
        result.losses.append(float(loss.detach()) / len(active))
        result.steps = step + 1
        if progress:
            progress((step + 1) / options.steps, "optimise target values")
        # a request is done when every one of its contexts (not just their mean) says the target
        worst = torch.zeros(n, device=device).scatter_reduce(
            0, rows.request, row_nll.detach(), "amax", include_self=False
        )
        done = worst[active] < options.stop_nll
        if bool(done.all()) or step == options.steps - 1:
            break
        optimizer.zero_grad()
        loss.backward()
        frozen = delta.detach().clone()
        optimizer.step()
        with torch.no_grad():
            inactive = torch.ones(n, dtype=torch.bool, device=device)
            inactive[active] = False
            delta[inactive] = frozen[inactive]
            delta.copy_(clamp_row_norms(delta.view(n * parts, -1), max_norm.view(-1)).view(n, -1))
        if bool(done.any()):
            with torch.no_grad():
                delta[active[done]] = frozen[active[done]]
            active = active[~done]
            keep = torch.nonzero(torch.isin(stack.rows.request, active)).squeeze(1)
            stack.select(keep)
            kl_before = kl_before[~done]

    result.prob_after = torch.exp(-final_nll).tolist()
    result.delta = delta.detach()
    return result


def _part_norms(rows: torch.Tensor, parts: int) -> torch.Tensor:
    """[n, parts]: the norm of each of the `parts` equal slices of each row of `rows`."""
    return rows.view(len(rows), parts, -1).norm(dim=2)
