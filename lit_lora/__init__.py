"""lit-lora: Llama with LoRA and LLaMA-Adapter, written to be read.

The files at this level are the teaching path (README, "Reading order"); the folders hold the engineering:
`files` (checkpoints and conversions), `speed` (faster forms and kernels, quantization schemes),
`evaluation` (perplexity, lm-eval, the method comparison) and `workflows` (what the scripts do).
"""

import importlib
import importlib.abc
import importlib.util
import sys
import warnings

from lit_lora.files.checkpoint import load_checkpoint
from lit_lora.model import Config, Llama

__all__ = ["Config", "Llama", "load_checkpoint"]

# Where each module lived before the folders: `import lit_lora.checkpoint` keeps working for one release
# (with a DeprecationWarning naming the new path).
MOVED = {
    "checkpoint": "files.checkpoint", "convert": "files.convert", "hf_names": "files.hf_names",
    "run_dir": "files.run_dir", "plots": "files.plots", "utils": "files.utils",
    "speed_training": "speed.training", "row_kernels": "speed.row_kernels",
    "int8": "speed.int8", "quantize": "speed.quantize",
    "evaluate": "evaluation.evaluate", "lm_eval_model": "evaluation.lm_eval_model",
    "compare": "evaluation.compare", "synthetic": "evaluation.synthetic",
    "prepare": "workflows.prepare", "conversations": "workflows.conversations", "inference": "workflows.inference",
    "chat": "workflows.chat", "cli": "workflows.cli", "peft_interop": "workflows.peft",
}


class _MovedModules(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Answers `lit_lora.<old name>` with the module at its new path."""

    def find_spec(self, fullname, path=None, target=None):
        package, _, name = fullname.partition(".")
        if package != __name__ or name not in MOVED:
            return None
        return importlib.util.spec_from_loader(fullname, self)

    def create_module(self, spec):
        new_name = f"{__name__}.{MOVED[spec.name.split('.', 1)[1]]}"
        warnings.warn(f"{spec.name} moved to {new_name}; the old name goes in the next release",
                      DeprecationWarning, stacklevel=2)
        return importlib.import_module(new_name)

    def exec_module(self, module):
        pass  # the module at its new path is already executed


sys.meta_path.append(_MovedModules())
