"""``HookedLM``: a causal LM with named hook points, a truncated forward to read them and a spliced one
to replace them (CE loss recovered, KL), plus the matrices of direct logit effects."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn

from sae_lightning.checks import ConfigError
from sae_lightning.config import HOOK_NAMES, is_hook_name, parse_module_hook
from sae_lightning.lm.layout import (
    MODULE_HELP,
    RESIDUAL_WRITERS,
    BlockLayout,
    LayoutError,
    Site,
    find_blocks,
    input_tensor,
    norm_gain,
    output_tensor,
    recording,
    resolve_block,
    same,
)

Replacement = Callable[[Tensor], Tensor]
_PROBE_TOKENS = 8  # per row of the probe forward (2 rows) that finds and checks the hook points


class HookPoint(NamedTuple):
    """Where activations are read: ``name`` (one of ``HOOK_NAMES`` or ``module:<path>:<side>``) in block
    ``layer`` (0-based)."""

    layer: int
    name: str


@dataclass(frozen=True)
class ModelShape:
    """What the hook and context checks need, read from a model's config alone (no weights)."""

    family: str
    n_layers: int
    context_size: int  # max positions

    @classmethod
    def from_config(cls, config: Any) -> ModelShape:
        """From a transformers ``PretrainedConfig`` (its attribute map gives every family these names)."""
        positions = getattr(config, "max_position_embeddings", None) or 1 << 30
        return cls(str(config.model_type), int(config.num_hidden_layers), int(positions))

    def check_context_size(self, context_size: int) -> None:
        """ConfigError unless the model accepts inputs of ``context_size`` tokens."""
        if context_size > self.context_size:
            raise ConfigError(f"data.context_size={context_size} exceeds the model's max positions "
                              f"({self.context_size}); set data.context_size<={self.context_size}")

    def check_hook(self, hook: HookPoint) -> None:
        """ConfigError for a hook name we do not define or a layer outside ``0..n_layers-1``."""
        if not is_hook_name(hook.name):
            raise ConfigError(f"Hook {hook.name!r} does not exist for family {self.family!r}; choose one of "
                              f"{', '.join(HOOK_NAMES)}, or {MODULE_HELP}")
        if not 0 <= hook.layer < self.n_layers:
            raise ConfigError(f"layer={hook.layer} is beyond the model's depth: it has "
                              f"n_layers={self.n_layers} (valid layers 0..{self.n_layers - 1})")


class _StopForward(Exception):
    """Raised by a hook once every requested tensor is read, to skip the rest of the model."""


class HookedLM:
    """A causal LM with named hook points, a truncated forward for reading, a spliced one for evaluation.

    Hook points are found and checked on the model itself (``sae_lightning.lm.layout``) the first time
    a layer is used; :meth:`check_hooks` does it up front. ``context_size`` is the longest input the model
    accepts (its max positions).
    """

    def __init__(self, model: nn.Module, tokenizer: Any) -> None:
        self.shape = ModelShape.from_config(model.config)
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.family = self.shape.family
        self.n_layers = self.shape.n_layers
        self.context_size = self.shape.context_size
        self.d_model = int(model.get_input_embeddings().embedding_dim)
        self.vocab_size = int(model.get_input_embeddings().num_embeddings)
        try:
            self.blocks_path, self._blocks = find_blocks(model, self.n_layers, self.family)
            self._blocks_error: LayoutError | None = None
        except LayoutError as err:  # module hooks still work; named ones raise this when asked for
            self.blocks_path, self._blocks, self._blocks_error = "", nn.ModuleList(), err
        self._layouts: dict[int, BlockLayout] = {}
        self._module_sites: dict[HookPoint, tuple[Site, int]] = {}
        self._final_gain: Tensor | bool | None = False  # False: not measured yet

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def blocks(self) -> nn.ModuleList:
        """The decoder blocks (LayoutError where they cannot be found)."""
        if self._blocks_error is not None:
            raise self._blocks_error
        return self._blocks

    # ------------------------------------------------------------ validation

    def check_context_size(self, context_size: int) -> None:
        """ValueError unless the model accepts inputs of ``context_size`` tokens."""
        self.shape.check_context_size(context_size)

    def _check_tokens(self, tokens: Tensor) -> Tensor:
        if tokens.ndim != 2 or tokens.dtype not in (torch.int64, torch.int32):
            raise ValueError(f"tokens must be an integer tensor [batch, seq]; got {tuple(tokens.shape)} "
                             f"{tokens.dtype}")
        self.check_context_size(tokens.shape[1])
        if tokens.numel() and not 0 <= int(tokens.min()) <= int(tokens.max()) < self.vocab_size:
            raise ValueError(f"token ids must lie in [0, {self.vocab_size}); got [{int(tokens.min())}, "
                             f"{int(tokens.max())}]: were they made by another tokenizer?")
        return tokens.to(self.device, torch.long)

    def check_hooks(self, hooks: Sequence[HookPoint]) -> None:
        """Find and verify every hook point now (one probe forward for all their layers): LayoutError or
        ValueError naming the module and what to do, before any real work."""
        hooks = [HookPoint(*h) for h in hooks]
        for h in hooks:
            self.shape.check_hook(h)
        self._resolve({h.layer for h in hooks if parse_module_hook(h.name) is None})
        for h in hooks:
            self._site(h)

    # ------------------------------------------------------------ where the hook points are

    def _probe(self, modules: dict[str, nn.Module], stop_after: nn.Module | None) -> dict:
        """Record ``modules`` on a forward of 2 fixed random rows, stopped after ``stop_after`` if given."""
        n = min(_PROBE_TOKENS, self.context_size)
        tokens = torch.randint(0, self.vocab_size, (2, n), generator=torch.Generator().manual_seed(0))
        with recording(modules) as calls:
            handles = [] if stop_after is None else [stop_after.register_forward_hook(_stop)]
            with _removing(handles), torch.inference_mode(), suppress(_StopForward):
                self.model(input_ids=tokens.to(self.device), use_cache=False)
        return dict(calls)

    def _resolve(self, layers: set[int]) -> None:
        """Lay out the blocks of ``layers`` not yet known, from one probe forward."""
        todo = sorted(layer for layer in layers if layer not in self._layouts)
        if not todo:
            return
        blocks = self.blocks
        modules = {f"{i}.{rel}".rstrip("."): m for i in todo for rel, m in blocks[i].named_modules()}
        calls = self._probe(modules, blocks[todo[-1]])
        for i in todo:
            own = {k[len(str(i)) + 1:]: v for k, v in calls.items() if k.startswith(f"{i}.")}
            if str(i) in calls:
                own[""] = calls[str(i)]
            self._layouts[i] = resolve_block(f"{self.blocks_path}.{i}", blocks[i], own, self.family)

    def layout(self, layer: int) -> BlockLayout:
        """Where each hook point of block ``layer`` is, or why it is missing (found on first use)."""
        self.shape.check_hook(HookPoint(layer, HOOK_NAMES[0]))
        self._resolve({layer})
        return self._layouts[layer]

    def _site(self, hook: HookPoint) -> tuple[Site, int]:
        """``(site, width)`` of ``hook``; LayoutError naming the modules if it is missing."""
        self.shape.check_hook(hook)
        module = parse_module_hook(hook.name)
        if module is not None:
            if hook not in self._module_sites:
                self._module_sites[hook] = self._module_site(hook.layer, *module)
            return self._module_sites[hook]
        layout = self.layout(hook.layer)
        if hook.name not in layout.sites:
            raise LayoutError(f"Hook {hook.name!r} at layer {hook.layer} of this {self.family!r} model: "
                              f"{layout.missing[hook.name]}")
        return layout.sites[hook.name], layout.dims[hook.name]

    def _module_site(self, layer: int, path: str, side: str) -> tuple[Site, int]:
        """A ``hook=module`` path (from the model root, or relative to block ``layer``), checked to run once
        per forward and to give one row per token."""
        where = _find_module(self.model, path)
        block_prefix = f"{self.blocks_path}." if self.blocks_path and self._blocks_error is None else None
        if where is None and block_prefix is not None:
            rel = _find_module(self.blocks[layer], path)
            where = None if rel is None else f"{block_prefix}{layer}.{rel}"
        if where is None:
            raise LayoutError(f"hook.module={path!r}: no such module in this {self.family!r} model, from its "
                              f"root or from block {layer} ({block_prefix or ''}{layer}). "
                              f"{_children_hint(self.model, path)}")
        if block_prefix and where.startswith(block_prefix):
            index = int(where[len(block_prefix):].split(".")[0])
            if index != layer:
                rel = where[len(block_prefix):].partition(".")[2]
                raise LayoutError(f"hook.module={path!r} lies in block {index} but layer={layer}: set "
                                  f"layer={index} (the cache key and the export's hook_layer use it), or "
                                  f"give the path relative to the block: hook.module={rel or '<block>'}")
        module = self.model.get_submodule(where)
        calls = self._probe({where: module}, None).get(where)
        if calls is None:
            raise LayoutError(f"hook.module={where!r} did not run on a forward pass of this model")
        if calls.count > 1:
            raise LayoutError(f"hook.module={where!r} runs {calls.count} times per forward (a shared "
                              "module); choose one that runs once")
        tensor = calls.inp if side == "input" else calls.out
        n = min(_PROBE_TOKENS, self.context_size)
        if tensor is None or tensor.ndim < 2 or tensor.numel() != 2 * n * tensor.shape[-1]:
            got = "no tensor" if tensor is None else f"shape {tuple(tensor.shape)}"
            raise LayoutError(f"The {side} of hook.module={where!r} is not one vector per token: got {got} "
                              f"for an input of [2, {n}] tokens; choose a module whose {side} is [B, T, d]")
        return Site(where, side), int(tensor.shape[-1])

    def hook_dim(self, hook: HookPoint) -> int:
        """Width of the hooked tensor: d_mlp for mlp_post, d_model for the residual-stream ones."""
        return self._site(HookPoint(*hook))[1]

    def hook_module(self, hook: HookPoint) -> nn.Module:
        """The module whose input or output is ``hook`` (for mlp_post: the MLP output projection)."""
        return self.model.get_submodule(self._site(HookPoint(*hook))[0].path)

    _module = hook_module  # the name lm.py had

    def hook_site(self, hook: HookPoint) -> str:
        """Where ``hook`` is read, e.g. ``'input of gpt_neox.layers.1.mlp.dense_4h_to_h'``."""
        return str(self._site(HookPoint(*hook))[0])

    # ------------------------------------------------------------ direct logit effects

    def has_direct_logit_effect(self, hook: HookPoint) -> bool:
        """Whether ``hook`` writes to the residual stream (directly, or through mlp_post's ``W_out``): its
        directions have direct logit effects. Not for mlp_in (what the MLP reads) and ``hook=module``."""
        return hook.name in (*RESIDUAL_WRITERS, "mlp_post")

    def output_projection(self, hook: HookPoint) -> Tensor | None:
        """``W_out [hook_dim, d_model]`` into the residual stream; ``None`` for hooks already in it.

        For mlp_post it is the MLP output projection (GPT-2 ``c_proj``, LLaMA ``down_proj``) as
        ``[d_mlp, d_model]`` (its bias, if any, is not included), times the per-dimension gain of any norm
        between the MLP and the residual stream (Gemma-2's post-feedforward norm). Detached.
        """
        hook = HookPoint(*hook)
        if not self.has_direct_logit_effect(hook):
            raise ValueError(f"Hook {hook.name!r} is not written to the residual stream: it has no direct "
                             "logit effect (check has_direct_logit_effect first)")
        self._site(hook)
        if hook.name != "mlp_post":
            return None
        layout = self.layout(hook.layer)
        proj = self.model.get_submodule(layout.out_proj or "")
        weight = proj.weight.detach()
        w_out = weight.T if isinstance(proj, nn.Linear) else weight  # GPT-2's Conv1D already stores [in, out]
        for path in layout.mlp_chain[1:]:
            gain = norm_gain(self.model.get_submodule(path), self.d_model)
            if gain is not None:
                w_out = w_out * gain.to(w_out)
        return w_out

    def unembed_directions(self, fold_norm: bool = True) -> Tensor:
        """``W_U [d_model, vocab]`` for direct logit effects: ``directions @ W_out @ W_U``.

        Caveat: the final norm sits between the residual stream and W_U. With ``fold_norm`` its per-dimension
        gain is folded in (``diag(g) @ W_U``; the norm is the module whose output the unembedding reads, its
        gain measured by :func:`layout.norm_gain`), but its data-dependent part (division by the RMS/std of
        the whole residual, LayerNorm's centring and bias) cannot be, so these are direction effects up
        to a positive per-token scale, not exact logit changes. Logit soft-capping (Gemma-2) is monotone and
        left out too.
        """
        w_u = self.model.get_output_embeddings().weight.detach().T
        gain = self.final_norm_gain() if fold_norm else None
        return w_u if gain is None else gain.to(w_u)[:, None] * w_u

    def final_norm_gain(self) -> Tensor | None:
        """Per-dimension gain ``[d_model]`` of the norm whose output the unembedding reads (found on a probe
        forward, measured once); ``None`` if there is none."""
        if self._final_gain is False:
            self._final_gain = self._measure_final_gain()
        return self._final_gain  # type: ignore[return-value]

    def _measure_final_gain(self) -> Tensor | None:
        head = self.model.get_output_embeddings()
        blocks = self.blocks_path or "\0"
        modules = {p: m for p, m in self.model.named_modules()  # what lies outside the blocks and around them
                   if p and m is not head and p != blocks and not p.startswith(blocks + ".")
                   and not blocks.startswith(p + ".")}
        modules["<head>"] = head
        calls = self._probe(modules, None)
        read = calls["<head>"].inp if "<head>" in calls else None
        found = [p for p, c in calls.items() if p != "<head>" and c.count == 1 and same(c.out, read)
                 and not isinstance(c.module, (nn.Dropout, nn.Identity))]
        for path in sorted(found, key=lambda p: -calls[p].end):
            gain = norm_gain(calls[path].module, self.d_model)
            if gain is not None:
                return gain
        return None

    # ------------------------------------------------------------ forwards

    def activations(self, tokens: Tensor, hooks: Sequence[HookPoint]) -> dict[HookPoint, Tensor]:
        """One forward pass capturing every hook ``[B, T, hook_dim]``, stopped as soon as all are read.

        The stop is an exception raised by the hook that reads the last tensor: it runs exactly the model's
        own code (rotary embeddings, masks) and skips the rest of the model (later modules of that block,
        later blocks and the unembedding).
        """
        if not hooks:
            raise ValueError("activations() needs at least one HookPoint")
        hooks = list(dict.fromkeys(HookPoint(*h) for h in hooks))
        tokens = self._check_tokens(tokens)
        self.check_hooks(hooks)
        captured: dict[HookPoint, Tensor] = {}

        def capture(hook: HookPoint) -> Callable[[Tensor], None]:
            def fn(tensor: Tensor) -> None:
                if hook in captured:
                    return
                if len(captured) + 1 == len(hooks):  # the last: the forward stops here, nothing can change it
                    captured[hook] = tensor.detach()
                    raise _StopForward
                captured[hook] = tensor.detach().clone()  # the model may change it in place later (Falcon)
            return fn

        handles = [self._attach(self._site(h)[0], capture(h), tokens.shape) for h in hooks]
        with _removing(handles), torch.inference_mode(), suppress(_StopForward):
            self.model(input_ids=tokens, use_cache=False)
        if len(captured) < len(hooks):
            raise LayoutError(f"Hooks {[h for h in hooks if h not in captured]} did not run on this forward")
        return {h: captured[h] for h in hooks}

    def logits(self, tokens: Tensor, replace: dict[HookPoint, Replacement] | None = None) -> Tensor:
        """Full forward ``[B, T, vocab]`` with each hooked tensor replaced by ``fn(tensor)`` (e.g. an SAE's
        reconstruction, for CE loss recovered).

        resid_mid is not a module's input or output the model passes on (the sum it adds to is a local
        variable), so it is replaced through attn_out: ``attn_out' = fn(resid_pre + attn_out) - resid_pre``.
        """
        tokens = self._check_tokens(tokens)
        replace = {HookPoint(*h): fn for h, fn in (replace or {}).items()}
        self.check_hooks(list(replace))
        handles = []
        for hook, fn in replace.items():
            handles += self._splice(hook, self._replacer(hook, fn), tokens.shape)
        with _removing(handles), torch.inference_mode():
            return self.model(input_ids=tokens, use_cache=False).logits

    def _splice(self, hook: HookPoint, fn: Replacement, shape: torch.Size) -> list[Any]:
        if hook.name != "resid_mid":
            return [self._attach(self._site(hook)[0], fn, shape)]
        sites = self.layout(hook.layer).sites
        state: dict[str, Tensor] = {}

        def keep(resid_pre: Tensor) -> None:
            state["pre"] = resid_pre

        def through_attn_out(attn_out: Tensor) -> Tensor:
            return fn(state["pre"] + attn_out) - state["pre"]

        return [self._attach(sites["resid_pre"], keep, shape),
                self._attach(sites["attn_out"], through_attn_out, shape)]

    def _attach(self, site: Site, fn: Callable[[Tensor], Tensor | None], shape: torch.Size) -> Any:
        """Attach ``fn(hooked tensor [B, T, d]) -> replacement or None`` at ``site``; ``shape`` is the tokens'
        ``[B, T]`` (modules that work on ``[B*T, d]`` rows, as OPT's MLP, are viewed as ``[B, T, d]``)."""
        module = self.model.get_submodule(site.path)

        def call(tensor: Tensor) -> Tensor | None:
            new = fn(_per_token(tensor, shape, site))
            return None if new is None else new.reshape(tensor.shape)

        if site.side == "input":
            def pre(_: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
                found = input_tensor(args, kwargs)
                if found is None:
                    raise LayoutError(f"The input of {site.path} is not a tensor")
                key, tensor = found
                new = call(tensor)
                if new is None:
                    return None
                if key == 0:
                    return (new, *args[1:]), kwargs
                return args, {**kwargs, key: new}
            return module.register_forward_pre_hook(pre, with_kwargs=True)

        def post(_: nn.Module, __: Any, output: Any) -> Any:
            tensor = output_tensor(output)
            if tensor is None:
                raise LayoutError(f"The output of {site.path} is not a tensor")
            new = call(tensor)
            if new is None:
                return None
            return new if isinstance(output, Tensor) else type(output)([new, *output[1:]])
        return module.register_forward_hook(post)

    @staticmethod
    def _replacer(hook: HookPoint, replace: Replacement) -> Replacement:
        def fn(tensor: Tensor) -> Tensor:
            new = replace(tensor)
            if new.shape != tensor.shape:
                raise ValueError(f"Replacement for {hook} returned shape {tuple(new.shape)}, expected "
                                 f"{tuple(tensor.shape)}")
            return new.to(tensor.dtype)
        return fn


def _per_token(tensor: Tensor, shape: torch.Size, site: Site) -> Tensor:
    """``tensor`` as ``[B, T, d]`` for tokens of ``shape`` ``[B, T]``."""
    b, t = shape
    if tensor.shape[:-1] == (b, t):
        return tensor
    if tensor.numel() == b * t * tensor.shape[-1]:
        return tensor.reshape(b, t, tensor.shape[-1])
    raise LayoutError(f"The {site} has shape {tuple(tensor.shape)}, not one vector per token of [{b}, {t}]")


def _find_module(root: nn.Module, path: str) -> str | None:
    try:
        root.get_submodule(path)
    except AttributeError:
        return None
    return path


def _children_hint(model: nn.Module, path: str) -> str:
    """The children of the longest prefix of ``path`` that exists, to show what could be meant."""
    parts = path.split(".")
    for n in range(len(parts) - 1, -1, -1):
        prefix = ".".join(parts[:n])
        try:
            module = model.get_submodule(prefix)
        except AttributeError:
            continue
        names = [name for name, _ in module.named_children()]
        more = " ..." if len(names) > 20 else ""
        return f"{prefix or 'The model'} has children: {', '.join(names[:20])}{more}"
    return ""


def _stop(*_: Any) -> None:
    raise _StopForward


@contextmanager
def _removing(handles: list[Any]) -> Iterator[None]:
    try:
        yield
    finally:
        for h in handles:
            h.remove()
