"""The registry of finetuning methods: for each one, how it is applied to a model, what trains, what it
saves and under which name, how it is loaded back, and whether it merges into the base weights.

    method    applied to a built Llama             trains           saves in out_dir                 merges
    lora      LoRALinear around chosen layers      A and B          lit_lora.safetensors (A, B)      yes
    adapter   AdaptionPrompt in the top layers     prompts, gates   lit_adapter.safetensors          no
    full      nothing                              every weight     final/ (a checkpoint directory)  -

The finetune scripts, generation, `compare` and the quickstart all go through this table, so a new
method is one `Method` entry (`register_method`) plus the file that implements it; nothing else
changes. A method that saves a weights file writes it with `save_weights`: the tensors plus a header
naming the method, its settings, the base model's Config and how it was trained (prompt style, maximum
sequence length), so `apply_weights` can rebuild it on a base model and check that it fits.
"""

from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Optional, Tuple, Union

import torch

from lit_lora.adapter import (AdapterConfig, adapter_state_dict, adapter_state_shapes, add_adapter, load_adapter_state_dict,
                              mark_only_adapter_as_trainable, remove_adapter)
# Each method says how its file is saved, loaded and merged: the registry calls lit_lora.files for that.
from lit_lora.files.checkpoint import (TOKENIZER_NAME, WEIGHTS_NAME, CheckpointError, MethodFile, check_keys_and_shapes,
                                       check_same_base, load_checkpoint, load_config, read_method_file, refuse_to_overwrite,
                                       removed_on_failure, save_checkpoint, save_method_file)
from lit_lora.files.convert import copy_hf_side_files
from lit_lora.files.utils import PathLike
from lit_lora.lora import (LLAMA_TARGETS, LoRAConfig, add_lora, load_lora_state_dict, lora_lr_scale, lora_state_dict,
                           lora_state_shapes, mark_only_lora_as_trainable, merge_lora, remove_lora, unmerge_lora)
from lit_lora.model import Config, Llama


StateShapes = Dict[str, torch.Size]


@dataclass(frozen=True)
class Method:
    """One finetuning method. A method that adds modules (`add` is set) saves only their tensors, in a
    weights file; one that adds nothing trains the base weights and saves a whole checkpoint directory."""

    name: str  # also its settings' key in the finetune script's arguments (--lora.r 8, --adapter.prompt_length 10)
    summary: str
    recipe: Dict[str, Any]  # its finetune script's default optimisation settings (TrainArgs fields)
    weights_name: str  # what a finished run leaves in out_dir
    config_type: Optional[type] = None  # the settings dataclass (with to_dict()); None: no settings
    add: Optional[Callable[[Llama, Any], Any]] = None  # inject into a built model, reversibly
    remove: Optional[Callable[[Llama], Any]] = None  # undo `add`
    mark_trainable: Callable[[Llama], Any] = lambda model: model.requires_grad_(True)
    state_dict: Optional[Callable[[Llama], Dict[str, torch.Tensor]]] = None  # the tensors its file holds
    load_state_dict: Optional[Callable[[Llama, Mapping[str, torch.Tensor], str], None]] = None
    state_shapes: Optional[Callable[[Any, Config], StateShapes]] = None  # (settings, base config) -> expected tensors
    merge: Optional[Callable[[Llama], Any]] = None  # fold the update into the base weights
    unmerge: Optional[Callable[[Llama], Any]] = None  # take it out again
    quantizable_base: bool = False  # trains on a 4-bit base (QLoRA, --quantize)
    lr_scale: Optional[Callable[[Any, str], float]] = None  # (settings, parameter name) -> learning-rate factor
    update_norms: Optional[Callable[[Any, Config, Mapping[str, torch.Tensor]], Tuple[List[str], List[str], torch.Tensor]]] = None

    @property
    def saves_file(self) -> bool:
        return self.add is not None

    def default_config(self) -> Any:
        return self.config_type() if self.config_type is not None else None

    def config_from_dict(self, settings: Dict[str, Any], source: str) -> Any:
        """The settings dataclass from a file header's dict, with a one-line error naming `source`."""
        if self.config_type is None:
            return None
        known = {f.name for f in fields(self.config_type)}
        try:
            values = {key: tuple(value) if isinstance(value, list) else value for key, value in settings.items()}
            if set(values) - known:
                raise TypeError(f"unknown fields {sorted(set(values) - known)}")
            return self.config_type(**values)
        except (TypeError, ValueError) as error:
            raise CheckpointError(f"{source}: invalid {self.name} settings {settings} ({error})") from None


METHODS: Dict[str, Method] = {}


def register_method(method: Method) -> Method:
    """Make `method` known to the finetune entry point, generation and `compare`, by its name."""
    if method.saves_file and (method.remove is None or method.state_dict is None or method.load_state_dict is None
                              or method.state_shapes is None):
        raise ValueError(f"method {method.name!r} adds modules, so it needs remove, state_dict, load_state_dict "
                         "and state_shapes too")
    METHODS[method.name] = method
    return method


def get_method(method: Union[str, Method]) -> Method:
    if isinstance(method, Method):
        return method
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; known methods: {', '.join(METHODS)}")
    return METHODS[method]


def lora_update_norms(lora_config: LoRAConfig, model_config: Config, state: Mapping[str, torch.Tensor]
                      ) -> Tuple[List[str], List[str], torch.Tensor]:
    """Frobenius norm of each adapted weight's low-rank update, s ||B A|| (s = alpha / r, per layer, or
    alpha / sqrt(r) with rsLoRA; with DoRA, the update of the direction), from an adapter's tensors.

    Returns (projection names, layer names, norms of shape (n_projections, n_layers)); a projection a
    layer does not adapt is NaN. ||B A|| is computed without forming the (out, in) matrix:
    ||B A||_F^2 = trace(A^T B^T B A) = sum((B^T B) * (A A^T)), two r x r products."""
    projections = [t for t in LLAMA_TARGETS if t in lora_config.targets and t != "head"]
    norms = torch.full((len(projections), model_config.n_layer), float("nan"))
    for row, target in enumerate(projections):
        for layer in range(model_config.n_layer):
            prefix = LLAMA_TARGETS[target].replace("*", str(layer))
            if f"{prefix}.lora_A" not in state:
                continue
            a, b = state[f"{prefix}.lora_A"].double(), state[f"{prefix}.lora_B"].double()  # (r, in), (out, r)
            squared = ((b.T @ b) * (a @ a.T)).sum().clamp_min(0.0)
            norms[row, layer] = lora_config.scaling(prefix) * squared.sqrt().item()
    return [f"{p}_proj" for p in projections], [str(i) for i in range(model_config.n_layer)], norms


LORA = register_method(Method(
    name="lora", summary="LoRA (Hu et al. 2021): low-rank updates B A of chosen linear layers",
    recipe=dict(learning_rate=3e-4, weight_decay=0.0, global_batch_size=128, micro_batch_size=4, warmup_steps=100),
    weights_name="lit_lora.safetensors", config_type=LoRAConfig, add=add_lora, remove=remove_lora,
    mark_trainable=mark_only_lora_as_trainable, state_dict=lora_state_dict, load_state_dict=load_lora_state_dict,
    state_shapes=lambda config, model_config: lora_state_shapes(model_config, config),
    merge=merge_lora, unmerge=unmerge_lora, quantizable_base=True, update_norms=lora_update_norms,
    lr_scale=lora_lr_scale,
))
ADAPTER = register_method(Method(
    name="adapter", summary="LLaMA-Adapter (Zhang et al. 2023): zero-gated attention to learned prompts",
    recipe=dict(learning_rate=9e-3, weight_decay=0.02, global_batch_size=64, micro_batch_size=4, warmup_steps=100),
    weights_name="lit_adapter.safetensors", config_type=AdapterConfig, add=add_adapter, remove=remove_adapter,
    mark_trainable=mark_only_adapter_as_trainable, state_dict=adapter_state_dict,
    load_state_dict=load_adapter_state_dict, state_shapes=adapter_state_shapes,
))
FULL = register_method(Method(
    name="full", summary="full finetuning: every weight trains",
    recipe=dict(learning_rate=3e-5, weight_decay=0.02, global_batch_size=64, micro_batch_size=1, warmup_steps=100),
    weights_name="final",
))


# ----------------------------------------------------------------------------------------------------
# Weights files
# ----------------------------------------------------------------------------------------------------


@dataclass
class MethodWeights:
    """A method's weights file, read and checked: the method, its settings, the base it was trained on,
    the tensors, and how it was trained (prompt_style and max_seq_length, when the file records them)."""

    method: Method
    config: Any
    model_config: Config
    tensors: Dict[str, torch.Tensor]
    training: Dict[str, Any] = field(default_factory=dict)

    @property
    def prompt_style(self) -> Optional[str]:
        return self.training.get("prompt_style")


def save_weights(path: PathLike, model: Llama, method: Union[str, Method], config: Any,
                 training: Optional[Dict[str, Any]] = None) -> Path:
    """Write the tensors `method` added to `model` (checked against what `config` describes) with a header
    that describes them: the method, `config`, the base model's Config, and `training`."""
    method = get_method(method)
    state = method.state_dict(model)
    check_keys_and_shapes(method.state_shapes(config, model.config), state,
                          f"the model's {method.name} tensors (saving with {config})")
    settings = config.to_dict() if config is not None else {}
    return save_method_file(path, MethodFile(method.name, settings, model.config, state, training or {}))


def read_weights(path: PathLike, method: Optional[Union[str, Method]] = None) -> MethodWeights:
    """Read a weights file, checking its tensors against the settings its header declares; `method`, when
    given, must be the file's."""
    contents = read_method_file(path, None if method is None else get_method(method).name)
    if contents.method not in METHODS or not METHODS[contents.method].saves_file:
        raise CheckpointError(f"{path} holds weights of method {contents.method!r}, which this lit-lora does not know")
    found = METHODS[contents.method]
    config = found.config_from_dict(contents.settings, str(path))
    try:
        expected = found.state_shapes(config, contents.model_config)
    except ValueError as error:
        raise CheckpointError(f"{path}: its {found.name} settings do not fit its base model ({error})") from None
    check_keys_and_shapes(expected, contents.tensors, f"{path} (checked against its header's settings)")
    return MethodWeights(found, config, contents.model_config, contents.tensors, contents.training)


def apply_weights(model: Llama, path: PathLike, method: Optional[Union[str, Method]] = None) -> MethodWeights:
    """Add the method of the file at `path` to `model` with the file's settings, and load its tensors. The
    file's base Config must equal the model's (the name aside); on any error the model is left as it was."""
    weights = read_weights(path, method)
    check_same_base(str(path), weights.model_config, model.config)
    weights.method.add(model, weights.config)
    try:
        weights.method.load_state_dict(model, weights.tensors, str(path))
    except Exception:
        weights.method.remove(model)
        raise
    return weights


def take_off(model: Llama, method: Union[str, Method]) -> None:
    """Remove `method` from `model` and leave the base weights as they were (unmerging first if merged)."""
    method = get_method(method)
    if method.unmerge is not None:
        method.unmerge(model)
    method.remove(model)


# ----------------------------------------------------------------------------------------------------
# Finetuning
# ----------------------------------------------------------------------------------------------------


def finetune(method: Union[str, Method], arguments: Dict[str, Any]) -> Dict[str, Any]:
    """Finetune with `method`; returns the run's final metrics (lit_lora.train.fit).

    `arguments` are a finetune script's arguments: the `RunSettings` fields, plus the method's settings
    under its name (e.g. "lora": LoRAConfig(...)); default settings where it is absent. They are also
    written to out_dir/hyperparameters.json, which the script takes back with --config.
    """
    from lit_lora.train import RunSettings, answer_sampler, fit, start_run  # Lightning: only when training

    method = get_method(method)
    settings = RunSettings(**{key: value for key, value in arguments.items() if key != method.name})
    config = arguments.get(method.name) or method.default_config()
    if settings.quantize is not None and not method.quantizable_base:
        raise ValueError(f"--quantize trains on a 4-bit base, which method {method.name!r} cannot: its weights train")
    run = start_run(settings)
    if method.add is not None:
        method.add(run.model, config)
    method.mark_trainable(run.model)
    training = {"prompt_style": run.prompt_style.name, "max_seq_length": run.max_seq_length}
    tokenizer_path = run.tokenizer.model_path

    def save(path: Path, model: Llama) -> None:
        if method.saves_file:
            save_weights(path, model, method, config, training)
        else:
            save_checkpoint(path, model.state_dict(), model.config, tokenizer_path, training=training)

    sample = answer_sampler(run.tokenizer, run.prompt_style.format(settings.train.sample_instruction))
    return fit(run.fabric, run.model, run.train_data, run.val_data, settings.train, settings.out_dir,
               save_weights=save, weights_name=method.weights_name, sample=sample, resume=settings.resume,
               overwrite=settings.overwrite, hyperparameters=arguments,
               lr_scale=(lambda name: method.lr_scale(config, name)) if method.lr_scale else (lambda name: 1.0),
               compile_model=settings.compile)


def merge_into_checkpoint(checkpoint_dir: PathLike, weights_path: PathLike, output_dir: PathLike,
                          overwrite: bool = False) -> Tuple[Path, MethodWeights]:
    """Fold a merging method's weights file into its base: a standalone lit-lora checkpoint in `output_dir`
    (weights, config, the base's tokenizer, and training.json with the prompt style the adapter learned).
    Returns (output_dir, the weights file as read)."""
    checkpoint_dir, output_dir = Path(checkpoint_dir), Path(output_dir)
    if output_dir.resolve() == checkpoint_dir.resolve():
        raise ValueError(f"--output_dir {output_dir} is the base checkpoint: choose a new directory")
    load_config(checkpoint_dir)  # a missing base fails before anything is read
    refuse_to_overwrite(output_dir / WEIGHTS_NAME, overwrite)
    weights = read_weights(weights_path)
    if weights.method.merge is None:
        raise ValueError(f"{weights_path} holds {weights.method.name} weights, which do not merge into the base")
    model = load_checkpoint(checkpoint_dir)
    apply_weights(model, weights_path, weights.method)
    weights.method.merge(model)
    weights.method.remove(model)  # the merged weights stay: a plain Llama with the original parameter names
    tokenizer = checkpoint_dir / TOKENIZER_NAME
    with removed_on_failure(output_dir):  # a failed save (a full disk) leaves no half-made directory
        save_checkpoint(output_dir, model.state_dict(), model.config, tokenizer if tokenizer.is_file() else None,
                        training=weights.training or None)
        copy_hf_side_files(checkpoint_dir, output_dir)  # tokenizer.json, the chat template: what exports need
    return output_dir, weights
