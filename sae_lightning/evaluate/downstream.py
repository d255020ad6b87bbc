"""Downstream metrics: the LM's next-token loss when the hooked activation is replaced.

Four forwards per token batch: clean; the activation replaced by the SAE reconstruction
``decode(encode(x))`` (the SAE takes raw activations); zero-ablated; mean-ablated (the mean activation
over the evaluation tokens). Excluded positions (BOS and other special
tokens, as in the activation cache) are treated the same way everywhere: their activation is never
replaced, they do not enter the mean, and the loss/KL of the prediction made AT them is not counted.
Every number is a mean over all counted positions of all batches (not a mean of batch means).

Transcoders (``input_hook`` given): ``hook`` is the target; in the SAE forward the input hook's clean
value is recorded as the forward passes it (left unchanged) and the target is replaced by the
transcoder's output computed from it. Zero and mean ablation act on the target hook.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Sequence
from typing import Protocol

import torch
from torch import Tensor, nn

from sae_lightning.metrics import ce_loss_recovered, kl_div_score, next_token_kl, next_token_loss

Splice = Callable[[Tensor], Tensor]
ExcludeMask = Callable[[Tensor], Tensor]


class HookedLMLike(Protocol):
    """The part of ``lm.HookedLM`` used here."""

    def logits(self, tokens: Tensor, replace: dict | None = None) -> Tensor: ...

    def activations(self, tokens: Tensor, hooks: Sequence) -> dict: ...


def sae_splice(sae: nn.Module) -> Splice:
    """``x -> decode(encode(x), x)`` on ``[..., d]`` (SAEs take raw rows ``[B, d]``), computed in the SAE's
    dtype and returned in ``x``'s (a transcoder's output is ``[..., d_out]``)."""
    dtype = next(sae.parameters()).dtype

    def splice(x: Tensor) -> Tensor:
        rows = x.reshape(-1, x.shape[-1]).to(dtype)
        return sae.decode(sae.encode(rows), rows).to(x.dtype).reshape(*x.shape[:-1], -1)

    return splice


class InputRecorder:
    """Feeds a transcoder in one forward: :meth:`record` (at the input hook) keeps the value it is given and
    returns it unchanged; the splice from :meth:`feeding` (at the target hook) ignores the target's value
    and applies ``fn`` to the recorded input. The input hook must run before the target hook."""

    def __init__(self, input_hook: Hashable, target_hook: Hashable) -> None:
        self.hooks = (input_hook, target_hook)
        self._value: Tensor | None = None

    def record(self, x: Tensor) -> Tensor:
        self._value = x
        return x

    def feeding(self, fn: Splice) -> Splice:
        def splice(_: Tensor) -> Tensor:
            if self._value is None:
                raise ValueError(f"target hook {self.hooks[1]} ran before input hook {self.hooks[0]}: a "
                                 "transcoder's input must come earlier in the forward than its target")
            x, self._value = self._value, None
            return fn(x)
        return splice


def _keep_excluded(fn: Splice, excluded: Tensor) -> Splice:
    """Apply ``fn`` to ``[B, T, d]`` activations everywhere except at ``excluded`` ``[B, T]`` positions."""
    return lambda x: torch.where(excluded[..., None], x, fn(x))


def excluded_positions(tokens: Tensor, exclude: ExcludeMask | None) -> Tensor:
    """``[B, T]`` bool: the positions ``exclude`` marks in ``tokens`` (none when it is None)."""
    if exclude is None:
        return torch.zeros_like(tokens, dtype=torch.bool)
    return exclude(tokens).to(torch.bool)


@torch.inference_mode()
def mean_activation(lm: HookedLMLike, token_batches: Sequence[Tensor], hook: Hashable,
                    exclude: ExcludeMask | None = None) -> Tensor:
    """Mean hooked activation ``[d]`` over the non-excluded positions of ``token_batches`` (float64 sum)."""
    total, count = None, 0
    for tokens in token_batches:
        acts = lm.activations(tokens, [hook])[hook]
        kept = acts[~excluded_positions(tokens, exclude)].double()
        total = kept.sum(0) if total is None else total + kept.sum(0)
        count += kept.shape[0]
    if total is None or count == 0:
        raise ValueError("no non-excluded tokens to average")
    return (total / count).float()


@torch.inference_mode()
def downstream_metrics(
    lm: HookedLMLike,
    token_batches: Sequence[Tensor],
    hook: Hashable,
    sae: nn.Module,
    exclude: ExcludeMask | None = None,
    mean_act: Tensor | None = None,
    input_hook: Hashable | None = None,
) -> dict[str, float]:
    """``ce_loss_{clean,sae,zero,mean_ablation}``, ``ce_loss_recovered``, ``kl_div`` (clean -> SAE splice),
    ``kl_div_zero`` (clean -> zero-ablated) and ``kl_div_score`` over ``token_batches`` (``[B, T]`` each).
    ``exclude(tokens) -> [B, T]`` bool marks positions to leave alone (``text.special_token_mask``);
    ``mean_act`` defaults to :func:`mean_activation` over the same batches. ``n_tokens_downstream`` is the
    number of counted predictions. With ``input_hook`` ``sae`` is a transcoder from ``input_hook`` to
    ``hook`` (module docstring)."""
    if mean_act is None:
        mean_act = mean_activation(lm, token_batches, hook, exclude)
    recorder = None if input_hook is None else InputRecorder(input_hook, hook)
    ablations: dict[str, Splice] = {
        "sae": sae_splice(sae) if recorder is None else recorder.feeding(sae_splice(sae)),
        "zero": torch.zeros_like,
        "mean_ablation": lambda x: mean_act.to(x).expand_as(x),
    }
    kl_of = {"sae": "kl", "zero": "kl_zero"}  # the splices whose KL from the clean LM is measured
    sums = dict.fromkeys(["clean", *ablations, *kl_of.values()], 0.0)
    count = 0
    for tokens in token_batches:
        excluded = excluded_positions(tokens, exclude)
        counted = ~excluded[:, :-1]  # position t predicts token t+1
        clean = lm.logits(tokens)
        sums["clean"] += float(next_token_loss(clean, tokens)[counted].sum())
        for name, fn in ablations.items():
            replace = {hook: _keep_excluded(fn, excluded)}
            if name == "sae" and recorder is not None:
                replace[input_hook] = recorder.record
            logits = lm.logits(tokens, replace=replace)
            sums[name] += float(next_token_loss(logits, tokens)[counted].sum())
            if name in kl_of:
                sums[kl_of[name]] += float(next_token_kl(clean, logits)[counted].sum())
        count += int(counted.sum())
    if count == 0:
        raise ValueError("no counted positions: every position is excluded")
    out = {f"ce_loss_{name}": sums[name] / count for name in ["clean", *ablations]}
    out["ce_loss_recovered"] = ce_loss_recovered(out["ce_loss_clean"], out["ce_loss_sae"],
                                                 out["ce_loss_zero"])
    out["kl_div"] = sums["kl"] / count
    out["kl_div_zero"] = sums["kl_zero"] / count
    out["kl_div_score"] = kl_div_score(out["kl_div"], out["kl_div_zero"])
    out["n_tokens_downstream"] = count
    return out
