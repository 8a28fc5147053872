"""EleutherAI lm-evaluation-harness over archlab's own model and tokenizer.

:class:`ArchlabLM` implements lm-eval's ``LM`` interface (through ``TemplateLM``, which turns
(context, continuation) strings into token ids with our ``tok_encode``), so every architecture
is evaluable, HyperMixer and the hybrid included, not only the ones with a transformers twin.

* ``loglikelihood``: the sum of log p(continuation token | everything before it). A request
  longer than the model's window (``max_length`` = the trained ``max_seq_len``) keeps its last
  ``max_length`` inputs (left truncation, as lm-eval's HFLM); a continuation longer than the
  window is scored in consecutive windows, each with the most context that fits.
* ``loglikelihood_rolling``: the whole document after the end-of-text prefix token, in
  disjoint prediction windows of ``max_length`` tokens, each with maximal context (the
  windows of ``lm_eval.utils.get_rolling_token_windows`` with ``context_len = 1``).
* ``generate_until``: cached decoding (KV cache for attention, recurrent state for Mamba and
  HyperMixer), greedy unless the task asks to sample; requests whose prompts have the same
  token length and the same generation settings decode together as one batch (no padding, so
  batching never changes a result). The context keeps its last ``max_length - max_gen_toks``
  tokens; with learned positions generation also stops at the window's end.

Scoring windows are sorted longest first and run ``batch_size`` at a time, right-padded:
every architecture is causal, so padding after a sequence never changes its logits.
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

import torch
import torch.nn.functional as F

from ..errors import UserError
from ..progress import Progress
from ..progress import progress_mode as resolve_progress_mode

try:  # optional extra: archlab[eval]
    from lm_eval.api.model import TemplateLM
except ImportError:  # pragma: no cover - exercised only without the extra
    TemplateLM = object  # type: ignore[assignment,misc]

DEFAULT_MAX_GEN_TOKS = 256


def score_windows(
    context: Sequence[int], continuation: Sequence[int], max_length: int
) -> Iterator[tuple[list[int], list[int]]]:
    """(inputs, targets) windows that score every continuation token once.

    The logits at the last ``len(targets)`` input positions predict ``targets``; each window
    has at most ``max_length`` inputs and the most context that fits. ``context`` must be
    non-empty (lm-eval puts the end-of-text token there when a request has no context).
    """
    full = list(context) + list(continuation)
    pos = len(context)
    while pos < len(full):
        end = min(len(full), pos + max_length)  # targets full[pos:end]
        yield full[max(0, end - 1 - max_length) : end - 1], full[pos:end]
        pos = end


@dataclass
class _Window:
    request: int  # index of the request this window belongs to
    inputs: list[int]
    targets: list[int]


class ArchlabLM(TemplateLM):  # type: ignore[misc,valid-type]
    """lm-eval ``LM`` over an archlab model; see the module docstring for the policies."""

    backend = "causal"

    def __init__(
        self,
        model: torch.nn.Module,
        tokenizer: Any,
        batch_size: int = 8,
        max_length: int | None = None,
        device: str | torch.device | None = None,
        max_gen_toks: int = DEFAULT_MAX_GEN_TOKS,
        progress_mode: str | None = "off",
    ) -> None:
        if TemplateLM is object:
            raise UserError("lm-evaluation-harness is not installed: pip install 'archlab[eval]'")
        super().__init__()
        if batch_size < 1:
            raise UserError(f"--batch-size: must be >= 1 (got {batch_size})")
        self.model = model.eval()
        self.archlab_tokenizer = tokenizer
        self.cfg = model.cfg
        self._device = torch.device(device) if device else next(model.parameters()).device
        self.batch_size = batch_size
        self._max_length = int(max_length or self.cfg.max_seq_len)
        if self.cfg.uses_learned_positions and self._max_length > self.cfg.max_seq_len:
            raise UserError(
                f"--max-length {self._max_length} exceeds the model's learned positions "
                f"({self.cfg.max_seq_len})"
            )
        self.max_gen_toks = max_gen_toks
        # archlab.progress modes; None: a bar on a terminal, plain lines elsewhere
        self.progress_mode = progress_mode or resolve_progress_mode()

    # ---- TemplateLM plumbing ------------------------------------------------------------
    @property
    def eot_token_id(self) -> int:
        return int(self.archlab_tokenizer.eot_id)

    @property
    def max_length(self) -> int:
        return self._max_length

    @property
    def device(self) -> torch.device:
        return self._device

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kw) -> list[int]:
        return list(self.archlab_tokenizer.encode(string))

    def tok_decode(self, tokens: Sequence[int], **kw) -> str:
        return self.archlab_tokenizer.decode(list(tokens))

    def get_model_info(self) -> dict[str, Any]:
        cfg = self.cfg
        return {
            "model_architecture": cfg.architecture,
            "model_num_parameters": sum(p.numel() for p in self.model.parameters()),
            "max_length": self.max_length,
        }

    # ---- scoring ----------------------------------------------------------------------------
    @torch.inference_mode()
    def _score(self, windows: list[_Window], n_requests: int) -> list[tuple[float, bool]]:
        """Sum log-probabilities per request; greedy iff every target is the argmax."""
        logprob = [0.0] * n_requests
        greedy = [True] * n_requests
        order = sorted(range(len(windows)), key=lambda i: -len(windows[i].inputs))
        with Progress(
            sum(len(w.targets) for w in windows), "lm-eval score", "tok", mode=self.progress_mode,
            unit_scale=True, leave=False,
        ) as bar:  # fmt: skip
            for start in range(0, len(order), self.batch_size):
                batch = [windows[i] for i in order[start : start + self.batch_size]]
                self._score_batch(batch, logprob, greedy)
                bar.update(sum(len(w.targets) for w in batch))
        return list(zip(logprob, greedy, strict=True))

    def _score_batch(self, batch: list[_Window], logprob: list[float], greedy: list[bool]) -> None:
        """One right-padded forward over ``batch``; adds into ``logprob`` / ``greedy``."""
        T = max(len(w.inputs) for w in batch)
        idx = torch.full((len(batch), T), self.eot_token_id, dtype=torch.long)
        for row, w in enumerate(batch):
            idx[row, : len(w.inputs)] = torch.tensor(w.inputs, dtype=torch.long)
        logits = self.model(idx.to(self.device))  # (B, T, V)
        for row, w in enumerate(batch):
            n_in, n_tgt = len(w.inputs), len(w.targets)
            lp = F.log_softmax(logits[row, n_in - n_tgt : n_in].float(), dim=-1)  # (n, V)
            tgt = torch.tensor(w.targets, device=lp.device)
            logprob[w.request] += float(lp.gather(1, tgt[:, None]).double().sum())
            greedy[w.request] &= bool((lp.argmax(dim=-1) == tgt).all())

    def loglikelihood(self, requests: list[Any], disable_tqdm: bool = False):
        quiet = disable_tqdm or self.progress_mode != "bar"  # lm-eval's "Tokenizing" bar
        return super().loglikelihood(requests, disable_tqdm=quiet)

    def _loglikelihood_tokens(
        self, requests: list[tuple[tuple[str, str], list[int], list[int]]], **kwargs: Any
    ) -> list[tuple[float, bool]]:
        windows = [
            _Window(i, inp, tgt)
            for i, (_, ctx, cont) in enumerate(requests)
            for inp, tgt in score_windows(ctx, cont, self.max_length)
        ]
        results = self._score(windows, len(requests))
        for (key, _, _), res in zip(requests, results, strict=True):
            if key is not None:
                self.cache_hook.add_partial("loglikelihood", key, res)
        return results

    def loglikelihood_rolling(self, requests: list[Any], disable_tqdm: bool = False) -> list[float]:
        texts = [req.args[0] for req in requests]
        windows = [
            _Window(i, inp, tgt)
            for i, text in enumerate(texts)
            for inp, tgt in score_windows(
                [self.prefix_token_id], self.tok_encode(text), self.max_length
            )
        ]
        results = [lp for lp, _ in self._score(windows, len(texts))]
        for text, lp in zip(texts, results, strict=True):
            self.cache_hook.add_partial("loglikelihood_rolling", (text,), lp)
        return results

    # ---- generation ---------------------------------------------------------------------------
    def generate_until(self, requests: list[Any], disable_tqdm: bool = False) -> list[str]:
        from lm_eval.models.utils import (
            handle_stop_sequences,
            normalize_gen_kwargs,
            postprocess_generated_text,
        )

        eos = self.tok_decode([self.eot_token_id])
        jobs: dict[tuple, list[int]] = {}  # (prompt length, settings) -> request indices
        prepared: list[tuple[list[int], dict[str, Any], list[str]]] = []
        for i, req in enumerate(requests):
            context, gen_kwargs = req.args
            kw = normalize_gen_kwargs(dict(gen_kwargs), self.max_gen_toks)
            until = handle_stop_sequences(kw.pop("until", None), eos=eos)
            max_gen = int(kw.pop("max_gen_toks"))
            ids = self.tok_encode(context) or [self.prefix_token_id]
            ids = ids[-max(1, self.max_length - max_gen) :]
            if self.cfg.uses_learned_positions:  # positions end at the window
                max_gen = min(max_gen, self.max_length - len(ids))
            settings = dict(kw, max_gen_toks=max_gen)
            prepared.append((ids, settings, until))
            key = (len(ids), json.dumps(settings, sort_keys=True, default=str), tuple(until))
            jobs.setdefault(key, []).append(i)
        out: list[str] = [""] * len(requests)
        bar = Progress(
            len(requests), "lm-eval generate", "req", mode=self.progress_mode, leave=False
        )
        for key in sorted(jobs, key=lambda k: -k[0]):
            members = jobs[key]
            for start in range(0, len(members), self.batch_size):
                chunk = members[start : start + self.batch_size]
                _, settings, until = prepared[chunk[0]]
                new = self.generate_batch([prepared[i][0] for i in chunk], settings, until)
                for i, toks in zip(chunk, new, strict=True):
                    text = postprocess_generated_text(self.tok_decode(toks), until, None)
                    out[i] = text
                    self.cache_hook.add_partial("generate_until", requests[i].args, text)
                bar.update(len(chunk))
        bar.close()
        return out

    @torch.inference_mode()
    def generate_batch(
        self, prompts: list[list[int]], settings: dict[str, Any], until: Sequence[str] = ()
    ) -> list[list[int]]:
        """New tokens for equal-length prompts decoded together from one cache.

        A row stops at end-of-text or once its text contains a stop string; greedy unless
        ``settings`` has ``do_sample`` (then temperature, top_k, top_p as in generate.py).
        """
        from ..generate import SamplingParams, sample_token

        max_gen = int(settings.get("max_gen_toks", self.max_gen_toks))
        B = len(prompts)
        outs: list[list[int]] = [[] for _ in range(B)]
        if max_gen <= 0:
            return outs
        if settings.get("do_sample"):
            params = SamplingParams(
                temperature=float(settings.get("temperature", 1.0)) or 1.0,
                top_k=settings.get("top_k"),
                top_p=settings.get("top_p"),
            )
        else:
            params = SamplingParams(temperature=0.0)
        cache = self.model.init_cache()
        idx = torch.tensor(prompts, dtype=torch.long, device=self.device)  # (B, T)
        logits = self.model(idx, cache=cache)[:, -1]  # (B, V)
        done = [False] * B
        stops = [s for s in until if s]
        for step in range(max_gen):
            nxt = [sample_token(logits[b].float(), params) for b in range(B)]
            for b, tok in enumerate(nxt):
                if done[b]:
                    continue
                if tok == self.eot_token_id:
                    done[b] = True
                    continue
                outs[b].append(tok)
                if stops and any(s in self.tok_decode(outs[b]) for s in stops):
                    done[b] = True
            if all(done) or step + 1 == max_gen:
                break
            step_idx = torch.tensor(nxt, dtype=torch.long, device=self.device)[:, None]
            logits = self.model(step_idx, cache=cache)[:, -1]
        return outs


# ---- the `archlab eval --tasks` front ---------------------------------------------------------
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
    from ..generate import load

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
