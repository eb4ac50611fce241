"""A training run's directory, kept safe: the plumbing around lit_lora/train.py's loop.

    out_dir/
        .lock                   held while a run writes here: a second run stops with "in use"
        hyperparameters.json    the resolved arguments (reusable with --config)
        checkpoints/step-N.ckpt the two newest resumable checkpoints (weights that train, optimizer, position)
        history.json, loss.png  the loss curves
        <the method's weights>  written when every step has run
        final_metrics.json      written last: it marks the run finished

Rules: a finished run, or an unfinished one's checkpoints, is never touched unless the user says so
(--overwrite, --resume); temporary files of a killed run are removed when the next one starts; Ctrl-C and
SIGTERM let the step in progress finish and save before the run exits.
"""

import json
import os
import shutil
import signal
import threading
from contextlib import contextmanager
from dataclasses import asdict, is_dataclass
from pathlib import Path
from typing import IO, Any, Dict, Iterator, List, Optional

import lightning as L

from lit_lora.files.checkpoint import save_json


CHECKPOINT_DIR_NAME = "checkpoints"
FINISHED_NAME = "final_metrics.json"
LOCK_NAME = ".lock"


def lock_out_dir(out_dir: Path) -> Optional[IO[str]]:
    """Hold an exclusive lock on out_dir for as long as the returned file stays open (the operating system
    releases it when the process ends, however it ends). None where file locks are not available."""
    try:
        import fcntl
    except ImportError:  # not a POSIX system
        return None
    handle = open(out_dir / LOCK_NAME, "a+")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        handle.seek(0)
        owner = handle.read().strip() or "unknown"
        handle.close()
        raise OSError(f"{out_dir} is in use by another run (process {owner}): wait for it to end, "
                      "or choose another --out_dir") from None
    handle.seek(0)
    handle.truncate()
    handle.write(str(os.getpid()))
    handle.flush()
    return handle


def _refusal(out_dir: Path, resume: Optional[str], overwrite: bool) -> Optional[str]:
    """Why this run must not write into out_dir, or None."""
    if (out_dir / FINISHED_NAME).exists() and not overwrite:
        return f"{out_dir} already holds a finished run ({FINISHED_NAME}); pass --overwrite true or choose another --out_dir"
    if resume is None and not overwrite and any((out_dir / CHECKPOINT_DIR_NAME).glob("step-*.ckpt")):
        return (f"{out_dir} holds the resumable checkpoints of an unfinished run: continue it with --resume auto, "
                "or start afresh with --overwrite true")
    return None


def remove_path(path: Path) -> None:
    """A file or a directory tree (a sharded FSDP checkpoint is a directory)."""
    shutil.rmtree(path) if path.is_dir() else path.unlink(missing_ok=True)


@contextmanager
def claim_out_dir(fabric: L.Fabric, out_dir: Path, resume: Optional[str], overwrite: bool, weights_name: str,
                  hyperparameters: Optional[Dict[str, Any]]) -> Iterator[None]:
    """For the block: hold out_dir's lock. Rank 0 first refuses to touch a finished or an unfinished run
    unless told to, and every rank stops with the same one-line error then. With --overwrite (and no
    --resume) the old run's checkpoints, weights and finished marker go, so nothing stale looks finished;
    temporary files a killed run left are removed; the resolved arguments are recorded."""
    lock, problem = None, None
    if fabric.global_rank == 0:
        out_dir.mkdir(parents=True, exist_ok=True)
        try:
            lock = lock_out_dir(out_dir)
            problem = _refusal(out_dir, resume, overwrite)
        except OSError as error:
            problem = str(error)
        if problem is None:
            if overwrite and resume is None:
                for old in (out_dir / CHECKPOINT_DIR_NAME, out_dir / weights_name, out_dir / FINISHED_NAME):
                    if old.exists():
                        remove_path(old)
            for stale in (out_dir / CHECKPOINT_DIR_NAME).glob("*.tmp"):  # left by a run killed while saving
                remove_path(stale)
            if hyperparameters is not None:
                as_json = json.dumps(hyperparameters, default=lambda v: asdict(v) if is_dataclass(v) else str(v))
                save_json(json.loads(as_json), out_dir / "hyperparameters.json")
    problem = fabric.broadcast(problem, src=0)
    try:
        if problem is not None:
            raise FileExistsError(problem)
        fabric.barrier()
        yield
    finally:
        if lock is not None:
            lock.close()


def find_resume_checkpoints(out_dir: Path, resume: Optional[str]) -> List[Path]:
    """The checkpoints --resume names, to try in order: "auto" means the newest in out_dir, then the one
    before it (kept in case the newest is unreadable); an explicit path means that one only."""
    if resume is None:
        return []
    if resume != "auto":
        path = Path(resume)
        if not path.exists():
            raise FileNotFoundError(f"--resume {path}: no such checkpoint")
        return [path]
    return sorted((out_dir / CHECKPOINT_DIR_NAME).glob("step-*.ckpt"), reverse=True)


def set_aside(checkpoint: Path) -> Path:
    """Rename an unreadable checkpoint to `<name>.corrupt`: kept for inspection, never resumed from or
    counted among the checkpoints kept."""
    target = checkpoint.with_name(checkpoint.name + ".corrupt")
    os.replace(checkpoint, target)
    return target


@contextmanager
def deferred_signals() -> Iterator[List[int]]:
    """While the block runs, Ctrl-C (SIGINT) and SIGTERM (what schedulers and preemptible machines send)
    are recorded in the yielded list instead of interrupting: the loop finishes the optimizer step it is
    in, saves a resumable checkpoint and exits, and a second signal while it saves does not abort the save.
    A third signal stops at once (for a step that never finishes); the last checkpoint stays."""
    received: List[int] = []
    if threading.current_thread() is not threading.main_thread():  # only the main thread may set handlers
        yield received
        return
    numbers = (signal.SIGINT, signal.SIGTERM)

    def record(signum: int, frame: Any) -> None:
        received.append(signum)
        if len(received) >= 3:
            for number in numbers:
                signal.signal(number, previous[number])
            raise KeyboardInterrupt

    previous = {number: signal.signal(number, record) for number in numbers}
    try:
        yield received
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler)
