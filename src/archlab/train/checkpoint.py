"""Checkpoint folders: atomic writes, last-K retention, safe and verified loading.

Layout of a run folder (the contract other commands rely on)::

    RUN/checkpoints/step_0000200/model.safetensors   weights (safetensors; tied weights once)
                                 config.json         ModelConfig dict + "archlab_version"
                                 tokenizer.json      the tokenizer the data was encoded with
                                 trainer_state.pt    optimizer, step, RNG states, counters
                                 checksums.json      sha256 of the four files above
    RUN/checkpoints/latest                           text: name of the newest checkpoint

A checkpoint is written into a hidden temporary folder, every file fsynced, and renamed into
place with ``os.replace``; ``latest`` is replaced the same way afterwards. A crash (even
SIGKILL) at any point leaves either the old set of checkpoints or the new one, never a half
folder. ``trainer_state.pt`` holds only tensors and primitives so it loads with
``torch.load(weights_only=True)``; weights are safetensors, so no file executes code on load.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..config import ConfigError, ModelConfig
from ..errors import FileSystemError, UserError
from ..fsutil import errno_reason, is_read_error, readable_like_the_others, write_errno

CHECKPOINT_FILES = ("model.safetensors", "config.json", "tokenizer.json", "trainer_state.pt")
_STEP_RE = re.compile(r"^step_(\d+)$")
# Set (by --skip-checksums, inherited by child processes): load checkpoints without
# checksums.json unverified instead of refusing them.
SKIP_CHECKSUMS_ENV = "ARCHLAB_SKIP_CHECKSUMS"


class CheckpointError(UserError):
    """A checkpoint is missing, corrupt, truncated or does not fit; one line for the CLI."""


class CheckpointWriteError(FileSystemError):
    """Writing a checkpoint failed (disk full, read-only, ...); the previous one is intact."""


# ---- paths --------------------------------------------------------------------------------
def checkpoint_name(step: int) -> str:
    return f"step_{step:07d}"


def list_checkpoints(run_dir: str | Path) -> list[Path]:
    """Complete checkpoint folders of a run, oldest first (temporary folders ignored)."""
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    found = [
        (int(m.group(1)), p) for p in root.iterdir() if p.is_dir() and (m := _STEP_RE.match(p.name))
    ]
    return [p for _, p in sorted(found)]


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    """The folder named by ``checkpoints/latest``; else the highest step; None if there is none."""
    root = Path(run_dir) / "checkpoints"
    pointer = root / "latest"
    if pointer.is_file():
        try:  # a damaged pointer (binary bytes, unreadable) falls back to the highest step
            name = pointer.read_bytes()[:256].decode("utf-8", "replace").strip()
        except OSError:
            name = ""
        if _STEP_RE.match(name) and (root / name).is_dir():
            return root / name
    found = list_checkpoints(run_dir)
    return found[-1] if found else None


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint folder, or a run folder (its latest checkpoint) -> the checkpoint folder."""
    p = Path(path).expanduser()
    if not p.exists():
        raise CheckpointError(f"checkpoint not found: {p}")
    if (p / "model.safetensors").exists() or (p / "config.json").exists():
        return p
    ckpt = latest_checkpoint(p)
    if ckpt is None:
        raise CheckpointError(f"no checkpoint in {p} (expected {p}/checkpoints/step_*/)")
    return ckpt


def run_dir_of(checkpoint_dir: Path) -> Path:
    """RUN for RUN/checkpoints/step_N."""
    return checkpoint_dir.resolve().parent.parent


# ---- writing ------------------------------------------------------------------------------
def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # platforms without directory fds
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()


def atomic_write_text(path: Path, text: str) -> None:
    """Write a small text file so readers see the old or the new content, never a mix."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)  # a full disk or an abort leaves no temporary behind
        raise
    _fsync_dir(path.parent)


def weights_are_finite(model: nn.Module) -> bool:
    """One reduction over all parameters; a single host sync."""
    flags = [torch.isfinite(p.detach()).all() for p in model.parameters()]
    return bool(torch.stack(flags).all().item()) if flags else True


def save_checkpoint(
    run_dir: str | Path,
    step: int,
    model: nn.Module,
    model_cfg: ModelConfig,
    tokenizer_path: str | Path,
    trainer_state: dict[str, Any],
    keep: int = 3,
    before_swap: Callable[[], None] | None = None,
) -> Path:
    """Write RUN/checkpoints/step_<step> atomically, point ``latest`` at it, keep the last K.

    Refuses (CheckpointError) to write weights that are not all finite, so a diverged run can
    never replace a good checkpoint.
    """
    from safetensors.torch import save_model

    from .._version import __version__

    if not weights_are_finite(model):
        raise CheckpointError(f"refusing to write checkpoint at step {step}: non-finite weights")
    root = Path(run_dir) / "checkpoints"
    previous = latest_checkpoint(run_dir)
    name = checkpoint_name(step)
    tmp = root / f".tmp-{name}-{os.getpid()}"
    try:
        root.mkdir(parents=True, exist_ok=True)
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()
        save_model(model, str(tmp / "model.safetensors"), metadata={"archlab_version": __version__})
        config = dict(model_cfg.to_dict(), archlab_version=__version__)
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        shutil.copyfile(tokenizer_path, tmp / "tokenizer.json")
        torch.save(trainer_state, tmp / "trainer_state.pt")
        sums = {f: _sha256(tmp / f) for f in CHECKPOINT_FILES}
        (tmp / "checksums.json").write_text(json.dumps(sums, indent=2) + "\n")
        readable_like_the_others(tmp)
        for f in (*CHECKPOINT_FILES, "checksums.json"):
            _fsync_file(tmp / f)
        _fsync_dir(tmp)
        if before_swap is not None:  # test hook: a window in which the save is half done
            before_swap()
        final = _swap_into_place(root, name, tmp)
        atomic_write_text(root / "latest", name + "\n")
    except BaseException as exc:
        code = None if is_read_error(exc, root) else write_errno(exc, root)
        shutil.rmtree(tmp, ignore_errors=True)  # never leave a half checkpoint behind
        if code is None:
            raise
        raise CheckpointWriteError(
            f"{errno_reason(code)} writing checkpoint step {step} in {run_dir}; "
            + (
                f"the previous checkpoint step {_step_of(previous)} is intact"
                if previous is not None
                else "no earlier checkpoint of this run exists"
            )
        ) from None
    prune_checkpoints(run_dir, keep)
    return final


def _step_of(ckpt: Path) -> int:
    m = _STEP_RE.match(ckpt.name)
    return int(m.group(1)) if m else -1


def _swap_into_place(root: Path, name: str, tmp: Path) -> Path:
    """Rename the finished temporary folder to ``root/name`` (replacing one of the same step)."""
    final = root / name
    trash = None
    if final.exists():  # the same step written again (e.g. after a resume): swap, then delete
        trash = root / f".old-{name}-{os.getpid()}"
        os.replace(final, trash)
    try:
        os.replace(tmp, final)
    except BaseException:
        if trash is not None:
            os.replace(trash, final)
        raise
    _fsync_dir(root)
    if trash is not None:
        shutil.rmtree(trash, ignore_errors=True)
    return final


def prune_checkpoints(run_dir: str | Path, keep: int) -> list[Path]:
    """Delete all but the newest ``keep`` checkpoints (never the one ``latest`` names)."""
    found = list_checkpoints(run_dir)
    latest = latest_checkpoint(run_dir)
    removed = []
    for p in found[: max(0, len(found) - keep)]:
        if latest is not None and p.resolve() == latest.resolve():
            continue
        shutil.rmtree(p, ignore_errors=True)
        removed.append(p)
    return removed


def clean_temporary(run_dir: str | Path) -> list[Path]:
    """Remove temporaries a killed process left (half checkpoints, unrenamed JSON files).

    Call only while holding the run folder's lock: then no live writer owns any of them.
    """
    run = Path(run_dir)
    removed: list[Path] = []
    for folder, prefixes in (
        (run / "checkpoints", (".tmp-", ".old-", ".latest.tmp-")),
        (run, (".summary.json.tmp-", "metrics.jsonl.tmp", ".archlab-write-test-")),
    ):
        if not folder.is_dir():
            continue
        for p in folder.iterdir():
            if p.name.startswith(prefixes):
                if p.is_dir() and not p.is_symlink():
                    shutil.rmtree(p, ignore_errors=True)
                else:
                    p.unlink(missing_ok=True)
                removed.append(p)
    return removed


# ---- reading ------------------------------------------------------------------------------
def verify_checkpoint(ckpt: Path) -> None:
    """All files present and, where checksums.json exists, byte-identical to what was written."""
    missing = [f for f in CHECKPOINT_FILES if not (ckpt / f).is_file()]
    if missing:
        raise CheckpointError(
            f"checkpoint {ckpt} is incomplete: missing {', '.join(missing)}" + _earlier_hint(ckpt)
        )
    sums_path = ckpt / "checksums.json"
    if not sums_path.is_file():
        if os.environ.get(SKIP_CHECKSUMS_ENV, "") not in ("", "0"):
            return
        raise CheckpointError(
            f"checkpoint {ckpt} has no checksums.json (archlab writes one with every "
            "checkpoint), so its files cannot be verified; pass --skip-checksums to load it "
            "unverified"
        )
    try:
        sums = json.loads(sums_path.read_text())
    except (OSError, ValueError) as exc:
        raise CheckpointError(
            f"checkpoint {ckpt} is corrupt: checksums.json unreadable ({exc})"
        ) from None
    for f, digest in sums.items():
        if f in CHECKPOINT_FILES and _sha256(ckpt / f) != digest:
            raise CheckpointError(
                f"checkpoint {ckpt} is corrupt or truncated: {f} does not match its checksum"
                + _earlier_hint(ckpt)
            )


def _earlier_hint(ckpt: Path) -> str:
    """Point at the previous checkpoint of the same run, which a bad one never touches."""
    try:
        earlier = [p for p in list_checkpoints(run_dir_of(ckpt)) if p.name < ckpt.name]
    except OSError:
        return ""
    return f" (an earlier checkpoint is {earlier[-1]})" if earlier else ""


def read_model_config(ckpt: Path) -> ModelConfig:
    try:
        d = json.loads((ckpt / "config.json").read_text())
        if not isinstance(d, dict):
            raise ValueError("not a JSON object")
        d.pop("archlab_version", None)
        return ModelConfig.from_dict(d).validate()
    except (OSError, ValueError, TypeError, ConfigError) as exc:
        raise CheckpointError(
            f"checkpoint {ckpt}: bad config.json ({exc})" + _earlier_hint(ckpt)
        ) from None


def load_weights(model: nn.Module, ckpt: Path, device: str | torch.device = "cpu") -> None:
    """Load model.safetensors into ``model`` (strict: every tensor, every shape)."""
    from safetensors.torch import load_model as st_load_model

    try:
        st_load_model(model, str(ckpt / "model.safetensors"), strict=True, device=str(device))
    except Exception as exc:  # safetensors raises its own error types for bad files
        msg = " ".join(str(exc).split())[:200]
        raise CheckpointError(
            f"checkpoint {ckpt}: cannot load model.safetensors ({msg})" + _earlier_hint(ckpt)
        ) from None
    bad = [name for name, p in model.named_parameters() if not torch.isfinite(p).all()]
    if bad:
        raise CheckpointError(
            f"checkpoint {ckpt}: model.safetensors holds non-finite weights (NaN or Inf) in "
            f"{len(bad)} tensor(s), first {bad[0]}; nothing can be computed from it"
            + _earlier_hint(ckpt)
        )


def load_trainer_state(ckpt: Path) -> dict[str, Any]:
    try:
        state = torch.load(ckpt / "trainer_state.pt", map_location="cpu", weights_only=True)
    except Exception as exc:
        msg = " ".join(str(exc).split())[:200]
        raise CheckpointError(
            f"checkpoint {ckpt}: cannot load trainer_state.pt ({msg})" + _earlier_hint(ckpt)
        ) from None
    if not isinstance(state, dict) or "step" not in state:
        raise CheckpointError(
            f"checkpoint {ckpt}: trainer_state.pt is not an archlab trainer state"
        )
    return state


def load_tokenizer_of(ckpt: Path):
    from ..data.tokenizer import load_tokenizer

    try:
        return load_tokenizer(ckpt / "tokenizer.json")
    except UserError:
        raise
    except Exception as exc:
        raise CheckpointError(f"checkpoint {ckpt}: bad tokenizer.json ({exc})") from None


def load_model(path: str | Path, device: str | torch.device = "cpu"):
    """(LanguageModel in eval mode, ModelConfig, TextTokenizer) from a checkpoint or run folder."""
    from ..models import build_model

    ckpt = resolve_checkpoint(path)
    verify_checkpoint(ckpt)
    cfg = read_model_config(ckpt)
    tokenizer = load_tokenizer_of(ckpt)
    model = build_model(cfg)
    load_weights(model, ckpt, device="cpu")
    model.to(device)
    model.eval()
    return model, cfg, tokenizer
