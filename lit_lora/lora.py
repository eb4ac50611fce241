"""LoRA: low-rank adaptation of a frozen model (Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large
Language Models"), written to be read top to bottom.

The idea (paper section 4.1)
----------------------------
Finetuning changes a pretrained weight W (out x in) by some dW. LoRA bets that dW has low rank
(the paper finds r = 1..8 enough for GPT-3) and trains it in factored form, dW = (alpha / r) B A,
with A (r x in) and B (out x r), while W stays frozen:

          x  (.., in)
          ├───────────────────────────┐
          ▼                           ▼
    ┌────────────┐               dropout(x)
    │ W (out,in) │                    ▼
    │   frozen   │             ┌────────────┐
    └────────────┘             │ A  (r, in) │   Kaiming-uniform random
          │                    └────────────┘
          │                           ▼ (.., r)   the low-rank bottleneck
          │                    ┌────────────┐
          │                    │ B (out, r) │   zeros at init
          │                    └────────────┘
          │                           ▼
          │                     * (alpha / r)
          ▼                           │
        ( + ) ◄───────────────────────┘
          ▼
    h = W x + (alpha / r) B A x   (.., out)

Why A is random and B is zero. With B = 0 the update B A is exactly zero, so the adapted model
*starts as the pretrained model*: finetuning begins from a known-good function, not from noise.
The factors cannot both be zero, though: up to the factor alpha / r, dL/dB = (dL/dh) (A x)^T and
dL/dA = B^T (dL/dh) x^T, so with A = B = 0 neither ever receives a gradient. A random A
(Kaiming-uniform, like any nn.Linear, so A x has a sensible scale) lets B move on the very first
step, and A follows once B is non-zero.

Why the scale is alpha / r. B A is a sum of r rank-one terms; with more of them the update grows.
The paper divides by r to keep the update's size independent of the rank at initialisation, so that
changing r needs no retuning of the learning rate (rsLoRA, below, corrects this for training); alpha is then a fixed knob (the paper sets alpha to the first r
it tries and does not tune it). alpha = 2 r, as in the defaults here (r=8, alpha=16), gives scale 2.

What it saves. A full update of one matrix trains out * in numbers; LoRA trains r * (in + out). For
Llama-2-7B's 4096 x 4096 q_proj at r = 8 that is 65,536 instead of 16,777,216 (256x fewer). With the
default targets (q_proj and v_proj in all 32 layers) 4,194,304 parameters train, 0.06 % of 6.7B.
The optimizer memory shrinks with them: AdamW keeps two fp32 moments per trainable parameter,
8 bytes each, i.e. ~54 GB for a full finetune of 7B but ~34 MB here; gradients exist only for A and
B; the adapter checkpoint is ~17 MB (fp32) instead of a 13.5 GB copy of the model. The frozen base
can stay in bf16 and is shared by any number of adapters.

The LoRA family (each a setting of `LoRAConfig`, each equal to PEFT's):
  * rsLoRA (Kalajdzievski 2023), `use_rslora`: scale alpha / sqrt(r). With alpha / r, the update's size
    per step shrinks like 1/sqrt(r) as r grows (r random-ish directions add up like sqrt(r), and the
    scale divides by r), so high ranks learn slower and end no better than low ones; alpha / sqrt(r)
    keeps it the same at every rank, so a higher rank can pay off.
  * DoRA (Liu et al. 2024), `use_dora`: a trainable length per output row beside LoRA's update of the
    direction; lit_lora/dora.py explains it.
  * Per-layer rank and alpha, `rank_pattern` / `alpha_pattern`: {glob over lit-lora's module names, e.g.
    "layers.0.*": value}, the first match wins (PEFT's rank_pattern / alpha_pattern, translated on import).
  * LoRA+ (Hayou et al. 2024), `lr_ratio`: B (and DoRA's magnitudes) learn lr_ratio times faster than A.
    A starts random and B at zero, so they play different roles; the paper shows one learning rate for
    both is inefficient for wide models and suggests a ratio of ~16. It is a setting of the optimizer
    (`lora_lr_scale`), not of the layer.

Why merging removes all inference overhead. W' = W + (alpha / r) B A has the shape of W, so once
the update is folded in the model is a plain Llama again: same FLOPs, same latency, no extra layer
(paper section 4.1, "No Additional Inference Latency"). `unmerge` subtracts the same product to go
back, e.g. to swap in another task's adapter.

How to use it here
------------------
    model = load_checkpoint(checkpoint_dir)                 # a plain Llama
    lora_config = LoRAConfig(r=8, alpha=16, dropout=0.05, targets=("q", "v"))
    add_lora(model, lora_config)                            # returns the layers it wrapped
    mark_only_lora_as_trainable(model)                      # everything else frozen
    ...train...
    lora_state_dict(model)                                  # A, B (DoRA: m), ~17 MB for 7B (methods.py saves it)
    with lora_disabled(model): ...                          # the base model's outputs, adapter off
    merge_lora(model); remove_lora(model)                   # a plain Llama with the update folded in

`add_lora` also adapts any PyTorch model: targets that are not the Llama names below are glob
patterns over module names (`fnmatch`, `*` also crosses dots), e.g. targets=("classifier.*",) for a
convnet's classifier Linear layers. See howto/lora_any_model.md.
"""

import itertools
import math
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from fnmatch import fnmatchcase
from typing import Any, Dict, Iterator, List, Mapping, Optional, Tuple, Union

import torch
import torch.nn as nn

from lit_lora.dora import dora_merged_weight, dora_output, row_norms
from lit_lora.files.checkpoint import check_keys_and_shapes  # a loaded adapter is checked key by key, shape by shape
from lit_lora.files.utils import count_parameters, tied_parameters  # the lesson counts what trains, skips tied weights
from lit_lora.model import Config, Llama


# Llama target names -> the module names they select in lit_lora.model.Llama (glob patterns).
LLAMA_TARGETS: Dict[str, str] = {
    "q": "layers.*.attn.q_proj",
    "k": "layers.*.attn.k_proj",
    "v": "layers.*.attn.v_proj",
    "o": "layers.*.attn.o_proj",
    "gate": "layers.*.mlp.gate_proj",
    "up": "layers.*.mlp.up_proj",
    "down": "layers.*.mlp.down_proj",
    "head": "lm_head",
}
TARGET_SHORTHANDS: Dict[str, Tuple[str, ...]] = {"mlp": ("gate", "up", "down"), "all": tuple(LLAMA_TARGETS)}


@dataclass
class LoRAConfig:
    """LoRA settings. `targets`: Llama names q, k, v, o, gate, up, down, head, the shorthands "mlp"
    (gate, up, down) and "all" (all eight), or glob patterns over module names for any other model.
    Shorthands are expanded on construction, so a saved config lists every target explicitly."""

    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.05
    targets: Union[Tuple[str, ...], str] = ("q", "v")  # one name alone too: --lora.targets all
    use_rslora: bool = False  # scale alpha / sqrt(r) instead of alpha / r
    use_dora: bool = False  # learn each output row's length apart from its direction (lit_lora/dora.py)
    rank_pattern: Dict[str, int] = field(default_factory=dict)  # {module name glob: rank} for some layers
    alpha_pattern: Dict[str, float] = field(default_factory=dict)  # {module name glob: alpha}
    lr_ratio: Optional[float] = None  # LoRA+: B's learning rate over A's (the paper suggests 16); None: off

    def __post_init__(self) -> None:
        if isinstance(self.targets, str):  # targets="all" means ("all",), not ("a", "l", "l")
            self.targets = (self.targets,)
        if isinstance(self.r, bool) or not isinstance(self.r, int) or self.r < 1:
            raise ValueError(f"LoRA rank r must be a positive integer, got {self.r!r}")
        if not self.alpha > 0:
            raise ValueError(f"LoRA alpha must be positive, got {self.alpha!r}")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"LoRA dropout must be in [0, 1), got {self.dropout!r}")
        self.rank_pattern, self.alpha_pattern = dict(self.rank_pattern or {}), dict(self.alpha_pattern or {})
        if any(isinstance(r, bool) or not isinstance(r, int) or r < 1 for r in self.rank_pattern.values()):
            raise ValueError(f"LoRA rank_pattern ranks must be positive integers, got {self.rank_pattern}")
        if not all(isinstance(a, (int, float)) and a > 0 for a in self.alpha_pattern.values()):
            raise ValueError(f"LoRA alpha_pattern alphas must be positive, got {self.alpha_pattern}")
        if self.lr_ratio is not None and not self.lr_ratio > 0:
            raise ValueError(f"LoRA+ lr_ratio must be positive, got {self.lr_ratio!r}")
        expanded: List[str] = []
        for target in self.targets:
            for name in TARGET_SHORTHANDS.get(target, (target,)):
                if name not in expanded:
                    expanded.append(name)
        if not expanded:
            raise ValueError("LoRA targets are empty: name at least one layer, e.g. targets=('q', 'v')")
        self.targets = tuple(expanded)

    def to_dict(self) -> Dict[str, Any]:
        return {**asdict(self), "targets": list(self.targets)}

    def rank_and_alpha(self, module_name: str) -> Tuple[int, float]:
        """(r, alpha) of one adapted module: the first matching pattern's, else the defaults."""
        r = next((v for p, v in self.rank_pattern.items() if fnmatchcase(module_name, p)), self.r)
        alpha = next((v for p, v in self.alpha_pattern.items() if fnmatchcase(module_name, p)), self.alpha)
        return r, alpha

    def scaling(self, module_name: str) -> float:
        """The factor of B A in that module: alpha / r, or alpha / sqrt(r) with rsLoRA."""
        r, alpha = self.rank_and_alpha(module_name)
        return alpha / math.sqrt(r) if self.use_rslora else alpha / r


def lora_lr_scale(config: LoRAConfig, parameter_name: str) -> float:
    """LoRA+: the factor of the learning rate for a trainable parameter (B and DoRA's 1-D magnitudes get
    `lr_ratio`, A gets 1), as PEFT's `create_loraplus_optimizer` groups them."""
    if config.lr_ratio is None or not parameter_name.endswith(("lora_B", "lora_magnitude")):
        return 1.0
    return config.lr_ratio


def is_quantized(layer: nn.Module) -> bool:
    """Whether `layer` stores its weight quantized. Quantized layers (lit_lora/nf4.py, int8.py, and
    bitsandbytes') declare the dtype they compute in as `compute_dtype`, since their storage is integers;
    an nn.Linear has no such attribute. A quantized weight cannot absorb B A in place."""
    return hasattr(layer, "compute_dtype")


def compute_device_dtype(layer: nn.Module) -> Tuple[torch.device, torch.dtype]:
    """Where a linear layer lives and the dtype it computes in: A and B are created with these."""
    tensor = next(itertools.chain(layer.parameters(), layer.buffers()))  # a weight, or a quantized layer's buffer
    if is_quantized(layer):
        return tensor.device, layer.compute_dtype or torch.float32
    return tensor.device, tensor.dtype


def dense_weight(layer: nn.Module) -> torch.Tensor:
    """The (out, in) weight of a linear layer as a dense tensor (a quantized one is dequantized)."""
    return layer.dequantize() if is_quantized(layer) else layer.weight


class LoRALinear(nn.Module):
    """A frozen linear layer (kept as the child `base`) plus a trainable low-rank update:

        h = base(x) + s * (dropout(x) @ A^T) @ B^T      A: (r, in), B: (out, r), s = alpha / r (or / sqrt(r))

    With DoRA a trainable magnitude m (out,) rescales every output row: h = (m / ||W + s B A||) (W + s B A) x.
    State-dict keys: `<name>.base.weight` (the original weight), `<name>.lora_A`, `<name>.lora_B`, and with
    DoRA `<name>.lora_magnitude`. `merge()` folds the update into base.weight, `unmerge()` takes it out
    again; while `disabled` is set the layer computes base(x) alone (the pretrained model).

    `base` is an `nn.Linear` or a quantized layer (QLoRA's 4-bit layer, int8; see `is_quantized`); A and B
    live on the base's device in the dtype it computes in (never the integer storage type).
    """

    def __init__(self, base: nn.Module, r: int, alpha: float, dropout: float = 0.0, use_rslora: bool = False,
                 use_dora: bool = False) -> None:
        super().__init__()
        self.base = base
        self.r, self.alpha, self.scaling = r, alpha, alpha / math.sqrt(r) if use_rslora else alpha / r
        device, dtype = compute_device_dtype(base)
        self.lora_A = nn.Parameter(torch.empty(r, base.in_features, device=device, dtype=dtype))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, r, device=device, dtype=dtype))
        # The init nn.Linear gives its own weight: uniform in +-1/sqrt(in), so A x has the scale of x.
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        if use_dora and getattr(base, "bias", None) is not None:
            raise ValueError("DoRA rescales the whole output row, a bias included: only bias-free layers (Llama's)")
        # DoRA's magnitude starts at ||W||, so that with B = 0 the layer is the pretrained one exactly. It stays
        # in float32 (see `_apply`): norms are ~1, where bf16's steps (~0.004) would swallow every update.
        self.lora_magnitude = nn.Parameter(row_norms(dense_weight(base).detach().float())) if use_dora else None
        # Dropout regularises the update only: the frozen path always sees the full input.
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.merged = False
        self._disabled = False
        self.register_buffer("merged_norm", None, persistent=False)  # DoRA: ||V|| at merge time, for unmerge

    @property
    def disabled(self) -> bool:
        return self._disabled

    @disabled.setter
    def disabled(self, value: bool) -> None:
        if value and self.merged:
            raise RuntimeError("cannot disable a merged LoRA layer (its update is inside base.weight): unmerge() it first")
        self._disabled = value

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.base(x)  # (..., out)
        if self.merged or self._disabled:  # merged: the update is already inside base.weight
            return h
        if self.lora_magnitude is not None:
            return dora_output(x, h, self.base, dense_weight(self.base), self.lora_A, self.lora_B, self.scaling,
                               self.lora_magnitude, self.dropout)
        # (W + s B A) x computed as W x + s B (A x): T * r * (in + out) multiply-adds through an
        # r-wide bottleneck, instead of materialising the (out, in) matrix B A on every step.
        update = (self.dropout(x) @ self.lora_A.T) @ self.lora_B.T  # (..., in) -> (..., r) -> (..., out)
        return h + self.scaling * update

    def delta_weight(self) -> torch.Tensor:
        """The low-rank update as a full matrix, s B A: (out, in), computed in float32."""
        return self.scaling * (self.lora_B.float() @ self.lora_A.float())

    def merged_weight(self, weight: torch.Tensor) -> torch.Tensor:
        """The weight the adapted layer computes with, in float32: W + s B A (DoRA: m * V / ||V||)."""
        if self.lora_magnitude is None:
            return weight.float() + self.delta_weight()
        return dora_merged_weight(weight, self.delta_weight(), self.lora_magnitude)[0]

    @torch.no_grad()
    def merge(self) -> None:
        """W <- W + s B A (DoRA: W <- m * V / ||V||). Computed in float32 and rounded once to W's dtype."""
        if self.merged:
            raise RuntimeError("LoRA layer is already merged: merging twice would add the update twice")
        if self._disabled:
            raise RuntimeError("cannot merge a disabled LoRA layer: re-enable it first")
        if is_quantized(self.base):
            raise RuntimeError("the base weight is quantized and cannot absorb B A in place: "
                               "use lit_lora.speed.quantize.merge_lora_quantized(model)")
        weight = self.base.weight
        if self.lora_magnitude is not None:
            self.merged_norm = dora_merged_weight(weight, self.delta_weight(), self.lora_magnitude)[1]
        weight.copy_(self.merged_weight(weight).to(weight.dtype))
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """W <- W - s B A (DoRA: V = W' ||V|| / m, then W = V - s B A), the inverse of `merge` up to
        rounding (none in float32 beyond ~1e-7 relative; a bf16 weight is rounded once more)."""
        if not self.merged:
            raise RuntimeError("LoRA layer is not merged")
        weight = self.base.weight
        direction = weight.float()
        if self.lora_magnitude is not None:
            direction = direction * (self.merged_norm / self.lora_magnitude.float())[:, None]
            self.merged_norm = None
        weight.copy_((direction - self.delta_weight()).to(weight.dtype))
        self.merged = False

    def _apply(self, fn, recurse=True):
        super()._apply(fn, recurse)  # e.g. Fabric's bf16-true casts every parameter; DoRA's magnitudes go back
        if self.lora_magnitude is not None and self.lora_magnitude.dtype != torch.float32:
            self.lora_magnitude.data = self.lora_magnitude.data.float()
        return self

    def extra_repr(self) -> str:
        dora = ", dora" if self.lora_magnitude is not None else ""
        return f"r={self.r}, alpha={self.alpha}, scaling={self.scaling:g}{dora}, merged={self.merged}"


def lora_layers(model: nn.Module) -> Dict[str, LoRALinear]:
    """Every LoRALinear in `model`, by qualified module name."""
    return {name: module for name, module in model.named_modules() if isinstance(module, LoRALinear)}


def _target_patterns(model: nn.Module, config: LoRAConfig) -> Dict[str, str]:
    """target as written -> glob pattern over module names. Llama names apply to a Llama only."""
    is_llama = isinstance(model, Llama)
    return {target: LLAMA_TARGETS[target] if is_llama and target in LLAMA_TARGETS else target for target in config.targets}


def add_lora(model: nn.Module, config: LoRAConfig) -> Dict[str, nn.Module]:
    """Wrap every `nn.Linear` (or quantized linear layer, see `is_quantized`) selected by
    `config.targets` in a `LoRALinear`, in place.

    Returns {module name: the layer it replaced}; `remove_lora` undoes this. Works on a
    meta-device model (A and B are created where the wrapped weight lives). Raises ValueError if the
    model already has LoRA layers, if a target selects no nn.Linear, or if a target's weight is tied
    to another module (merging would silently change both).
    """
    if lora_layers(model):
        raise ValueError("the model already has LoRA layers: call remove_lora(model) first instead of wrapping twice")
    linears = {name: m for name, m in model.named_modules() if name and (isinstance(m, nn.Linear) or is_quantized(m))}
    tied = tied_parameters(model)

    chosen: List[str] = []
    for target, pattern in _target_patterns(model, config).items():
        matches = [name for name in linears if fnmatchcase(name, pattern)]
        if not matches:
            examples = ", ".join(list(linears)[:6]) or "none"
            raise ValueError(
                f"LoRA target {target!r} selects no nn.Linear in this {type(model).__name__} (its Linear layers: "
                f"{examples}{', ...' if len(linears) > 6 else ''}). On a Llama use {', '.join(LLAMA_TARGETS)}, "
                "'mlp' or 'all'; on other models glob patterns over module names such as 'classifier.*'")
        for name in matches:
            if any(id(p) in tied for p in linears[name].parameters(recurse=False)):
                raise ValueError(f"LoRA target {target!r}: {name}.weight is tied to another module, and merging "
                                 "would change both; leave it out of the targets")
            if name not in chosen:
                chosen.append(name)
    unused = [p for p in (*config.rank_pattern, *config.alpha_pattern) if not any(fnmatchcase(n, p) for n in chosen)]
    if unused:  # e.g. PEFT's "q_proj": patterns here are globs over lit-lora's names, "layers.*.attn.q_proj"
        raise ValueError(f"LoRA rank/alpha patterns {unused} match no adapted module (names such as {chosen[0]})")
    replaced = {}
    for name in chosen:
        replaced[name] = linears[name]
        r, alpha = config.rank_and_alpha(name)
        layer = LoRALinear(linears[name], r, alpha, config.dropout, config.use_rslora, config.use_dora)
        model.set_submodule(name, layer.train(linears[name].training))  # an eval model gets no LoRA dropout
    return replaced


def remove_lora(model: nn.Module) -> Dict[str, LoRALinear]:
    """Put each LoRALinear's `base` back in its place; returns {name: the removed LoRALinear}.

    An unmerged layer gives back the original weights (the model is the base model again); a merged
    one keeps the update (after `merge_lora` this yields a plain model with the update folded in,
    whose state dict has the original names).
    """
    removed = lora_layers(model)
    for name, layer in removed.items():
        model.set_submodule(name, layer.base)
    return removed


def merge_lora(model: nn.Module) -> List[str]:
    """Merge every not-yet-merged LoRA layer; returns the names merged."""
    layers = lora_layers(model)
    if not layers:
        raise ValueError("the model has no LoRA layers to merge")
    quantized = [name for name, layer in layers.items() if is_quantized(layer.base)]
    if quantized:  # checked before touching any layer, so a failure never leaves a half-merged model
        raise RuntimeError(f"{len(quantized)} LoRA layers (e.g. {quantized[0]}) have quantized base weights, which cannot "
                           "absorb B A in place: use lit_lora.speed.quantize.merge_lora_quantized(model)")
    merged = [name for name, layer in layers.items() if not layer.merged]
    for name in merged:
        layers[name].merge()
    return merged


def unmerge_lora(model: nn.Module) -> List[str]:
    """Take every merged update out of the weights again (the inverse of `merge_lora`); returns the names."""
    layers = lora_layers(model)
    unmerged = [name for name, layer in layers.items() if layer.merged]
    for name in unmerged:
        layers[name].unmerge()
    return unmerged

@contextmanager
def lora_disabled(model: nn.Module) -> Iterator[None]:
    """Run the base model without its (unmerged) LoRA updates inside the `with` block."""
    layers = list(lora_layers(model).values())
    if any(layer.merged for layer in layers):
        raise RuntimeError("cannot disable merged LoRA layers: their update is inside the weights")
    for layer in layers:
        layer.disabled = True
    try:
        yield
    finally:
        for layer in layers:
            layer.disabled = False


def mark_only_lora_as_trainable(model: nn.Module) -> Tuple[int, int]:
    """Freeze everything but the LoRA A and B matrices (and DoRA's magnitudes); returns (trainable, total)
    parameter counts."""
    layers = lora_layers(model)
    if not layers:
        raise ValueError("the model has no LoRA layers: call add_lora(model, config) first")
    model.requires_grad_(False)
    for layer in layers.values():
        layer.requires_grad_(True)
        layer.base.requires_grad_(False)
    return count_parameters(model)


def lora_state_dict(model: nn.Module) -> Dict[str, torch.Tensor]:
    """Only the adapter: {'<module>.lora_A': (r, in), '<module>.lora_B': (out, r)} for every LoRA layer,
    and '<module>.lora_magnitude': (out,) with DoRA."""
    return {f"{name}.{key}": tensor.detach() for name, layer in lora_layers(model).items()
            for key, tensor in layer.named_parameters(recurse=False)}


def load_lora_state_dict(model: nn.Module, state: Mapping[str, torch.Tensor], source: str = "LoRA state") -> None:
    """Copy A and B (and DoRA's magnitudes) into the model's LoRA layers. The keys and shapes must be
    exactly the model's adapter (same targets, same rank), else a CheckpointError naming `source`."""
    layers = lora_layers(model)
    if not layers:
        raise ValueError("the model has no LoRA layers: call add_lora(model, config) first")
    if any(layer.merged for layer in layers.values()):
        raise RuntimeError("cannot load LoRA weights into merged layers: their old update is inside the weights")
    check_keys_and_shapes({name: t.shape for name, t in lora_state_dict(model).items()}, state, source)
    with torch.no_grad():
        for name, layer in layers.items():
            for key, tensor in layer.named_parameters(recurse=False):
                tensor.copy_(state[f"{name}.{key}"])


def lora_state_shapes(model_config: Config, lora_config: LoRAConfig) -> Dict[str, torch.Size]:
    """Names and shapes of the adapter tensors for this base and LoRA config (built on the meta
    device: no memory is allocated even for 70B)."""
    with torch.device("meta"):
        model = Llama(model_config)
    add_lora(model, lora_config)
    return {name: t.shape for name, t in lora_state_dict(model).items()}
