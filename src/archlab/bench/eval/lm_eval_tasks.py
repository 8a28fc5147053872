"""`archlab eval --tasks`: lm-evaluation-harness tasks on an archlab checkpoint.

Loads the tasks (a hub task without network fails at once in one line: when the hub is
unreachable, datasets and huggingface_hub are switched to offline mode first, so cached and
local datasets still load), wraps the checkpoint in :class:`~.lm_eval_adapter.ArchlabLM`
and runs ``lm_eval.simple_evaluate`` with one seed for every random source. The result
prints as lm-eval's own table and saves as JSON.
"""

from __future__ import annotations

import json
import logging
import math
import os
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ...errors import UserError
from ...progress import progress_mode as resolve_progress_mode
from .lm_eval_adapter import ArchlabLM


@dataclass
class HarnessResult:
    results: dict[str, Any]

    def table(self) -> str:
        from lm_eval.utils import make_table

        text = make_table(self.results)
        if self.results.get("groups"):
            text += "\n" + make_table(self.results, "groups")
        return text.rstrip()

    def to_json(self) -> str:
        keep = {k: self.results[k] for k in ("results", "versions", "n-shot", "config")}
        keep = {k: v for k, v in keep.items() if v is not None}
        return json.dumps(keep, indent=2, default=str)


def _first_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return (text[:240] + "...") if len(text) > 240 else (text or type(exc).__name__)


def _is_network_error(exc: BaseException) -> bool:
    """Errors datasets/huggingface_hub raise when the hub cannot be reached (or is disabled)."""
    names = {type(e).__name__ for e in _chain(exc)}
    modules = {type(e).__module__.split(".")[0] for e in _chain(exc)}
    network = {
        "ConnectionError",
        "ConnectTimeout",
        "ReadTimeout",
        "OfflineModeIsEnabled",
        "LocalEntryNotFoundError",
        "DatasetNotFoundError",
        "HfHubHTTPError",
        "RepositoryNotFoundError",
        "MaxRetryError",
        "NameResolutionError",
    }
    return bool(names & network) or bool(modules & {"requests", "urllib3", "httpx"})


def _chain(exc: BaseException) -> Iterator[BaseException]:
    seen: set[int] = set()
    e: BaseException | None = exc
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        yield e
        e = e.__cause__ or e.__context__


def silence_harness_bars() -> None:
    """Turn off lm-eval's and datasets' own tqdm bars (``--quiet``, and logs, where their
    carriage-return redraws do not belong; archlab's progress prints plain lines there)."""
    import functools

    for name in ("lm_eval.api.model", "lm_eval.api.task", "lm_eval.api.metrics"):
        mod = sys.modules.get(name)
        bar = getattr(mod, "tqdm", None)
        if bar is not None and not getattr(bar, "_archlab_silenced", False):
            quiet_bar = functools.partial(bar, disable=True)
            quiet_bar._archlab_silenced = True  # type: ignore[attr-defined]
            mod.tqdm = quiet_bar  # type: ignore[union-attr]
    try:
        import datasets

        datasets.disable_progress_bars()
    except ImportError:  # pragma: no cover - lm-eval depends on datasets
        pass


def _hub_reachable(timeout: float = 3.0) -> bool:
    """Whether the Hugging Face hub answers a TCP connection (DNS + connect, no request)."""
    import socket
    from urllib.parse import urlparse

    host = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co")).hostname
    try:
        socket.create_connection((host or "huggingface.co", 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def offline_unless_reachable() -> bool:
    """Without network, switch datasets/huggingface_hub to offline mode (True if switched).

    Cached hub datasets and local files still load; an uncached hub dataset then fails at once
    instead of after huggingface_hub's five retries (about 25 s of warnings).
    """
    if os.environ.get("HF_HUB_OFFLINE") == "1" or _hub_reachable():
        return False
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["HF_DATASETS_OFFLINE"] = "1"
    for module, names in (
        ("huggingface_hub.constants", ("HF_HUB_OFFLINE",)),
        ("datasets.config", ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")),
    ):  # already imported: their flags were read at import time
        mod = sys.modules.get(module)
        for name in names:
            if mod is not None and hasattr(mod, name):
                setattr(mod, name, True)
    return True


def _broken_yaml(folder: Path) -> str | None:
    """'FILE: YAML syntax error at line N (...)' for the first task YAML lm-eval cannot read
    (it skips such a file, so its task would be reported as unknown)."""
    import yaml

    class Loader(yaml.SafeLoader):  # lm-eval's own tags (!function) are not errors here
        pass

    Loader.add_multi_constructor("!", lambda loader, suffix, node: None)
    files = [folder] if folder.is_file() else sorted(folder.rglob("*.yaml"))
    for f in files:
        try:
            yaml.load(f.read_text(encoding="utf-8"), Loader=Loader)  # noqa: S506
        except (OSError, UnicodeDecodeError) as exc:
            return f"{f}: cannot read it ({exc})"
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            where = f" at line {mark.line + 1}" if mark is not None else ""
            problem = getattr(exc, "problem", None) or "invalid YAML"
            return f"{f}: YAML syntax error{where} ({problem})"
    return None


def load_tasks(tasks: Sequence[str], include_path: str | None) -> tuple[Any, list[Any]]:
    """(TaskManager, the tasks to pass to ``simple_evaluate``) or a UserError saying why not.

    Loading builds the datasets, so a hub task without network fails here, in one line; the
    built Task/Group objects are handed on so nothing loads twice (a tag expands by name).
    """
    from lm_eval.tasks import TaskManager

    if include_path is not None and not Path(include_path).exists():
        raise UserError(f"--include-path: {include_path} does not exist")
    manager = None
    if include_path is not None:  # indexing lm-eval's thousands of built-in YAMLs takes a while
        local = TaskManager(include_path=include_path, include_defaults=False)
        if all(t in set(local.all_tasks) for t in tasks):
            manager = local
    if manager is None:
        manager = TaskManager(include_path=include_path)
    known = set(manager.all_tasks)
    unknown = [t for t in tasks if t not in known and not Path(t).is_file()]
    if unknown and include_path is not None:
        broken = _broken_yaml(Path(include_path))
        if broken is not None:
            raise UserError(f"--include-path: {broken}")
    if unknown:
        hint = "" if include_path else " (a local task YAML needs --include-path DIR)"
        raise UserError(
            f"--tasks: unknown task(s) {', '.join(unknown)}{hint}; `lm-eval ls tasks` lists them"
        )
    try:
        loaded = manager.load(list(tasks))
    except UserError:
        raise
    except Exception as exc:
        if _is_network_error(exc):
            where = (
                "the Hugging Face hub is unreachable from here and the dataset is not cached"
                if os.environ.get("HF_HUB_OFFLINE") == "1"
                else "cannot fetch the dataset from the Hugging Face hub"
            )
            raise UserError(
                f"--tasks {','.join(tasks)}: {where} ({_first_line(exc)}); hub tasks need "
                "network access, offline use a local task YAML (dataset_path: json with local "
                "data_files) and --include-path"
            ) from None
        raise UserError(
            f"--tasks {','.join(tasks)}: cannot load the task ({_first_line(exc)})"
        ) from None
    built = {**loaded["tasks"], **loaded["groups"]}
    specs = [built.get(name, name) for name in tasks]
    return manager, specs


def run_harness(
    checkpoint: str | Path,
    tasks: Sequence[str],
    *,
    include_path: str | None = None,
    limit: float | None = None,
    num_fewshot: int | None = None,
    batch_size: int = 8,
    device: str = "cpu",
    max_length: int | None = None,
    seed: int = 0,
    log_samples: bool = False,
    quiet: bool = False,
) -> HarnessResult:
    """Evaluate a checkpoint on lm-eval tasks; see ``archlab eval --help``."""
    offline_unless_reachable()  # before lm_eval imports datasets
    try:
        import lm_eval
    except ImportError:
        raise UserError(
            "--tasks needs EleutherAI lm-evaluation-harness: pip install 'archlab[eval]'"
        ) from None
    from ...generate import load

    tasks = [t.strip() for t in tasks if t.strip()]
    if not tasks:
        raise UserError("--tasks: give at least one task name")
    if limit is not None and limit <= 0:
        raise UserError(f"--limit: must be > 0 (got {limit:g})")
    logging.getLogger("lm_eval").setLevel(logging.ERROR)  # its per-task info lines are noise here
    mode = "off" if quiet else resolve_progress_mode()
    if mode != "bar":
        import lm_eval.api.task  # noqa: F401  (so that its bar can be silenced)

        silence_harness_bars()
    manager, specs = load_tasks(tasks, include_path)
    loaded = load(checkpoint, device=device)
    lm = ArchlabLM(
        loaded.model, loaded.tokenizer, batch_size=batch_size, max_length=max_length,
        progress_mode=mode,
    )  # fmt: skip
    limit_arg: float | None = limit
    if limit is not None and limit >= 1:
        limit_arg = int(limit)
    try:
        results = lm_eval.simple_evaluate(
            model=lm,
            tasks=specs,
            num_fewshot=num_fewshot,
            limit=limit_arg,
            task_manager=manager,
            log_samples=log_samples,
            random_seed=seed,
            numpy_random_seed=seed,
            torch_random_seed=seed,
            fewshot_random_seed=seed,
            bootstrap_iters=0 if limit_arg is not None and limit_arg < 10 else 1000,
        )
    except UserError:
        raise
    except Exception as exc:
        if _is_network_error(exc):
            raise UserError(
                f"--tasks: cannot reach the Hugging Face hub ({_first_line(exc)}); hub tasks "
                "need network access"
            ) from None
        raise
    if results is None:  # pragma: no cover - only non-zero ranks get None
        raise UserError("lm-eval returned no results")
    for task, metrics in results.get("results", {}).items():
        for name, value in metrics.items():
            if isinstance(value, float) and math.isnan(value) and not name.endswith("stderr"):
                logging.getLogger(__name__).warning("%s: %s is NaN", task, name)
    return HarnessResult(results)
