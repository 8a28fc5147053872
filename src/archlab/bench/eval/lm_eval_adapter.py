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
every architecture is causal, so padding after a sequence never changes its logits. Loading
and running tasks (`archlab eval --tasks`) is ``lm_eval_tasks.py``.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from ...errors import UserError
from ...progress import Progress
from ...progress import progress_mode as resolve_progress_mode

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
                f"--seq-len {self._max_length} exceeds the model's learned positions "
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
        ``settings`` has ``do_sample`` (then temperature, top_k, top_p as in generate/sampling.py).
        """
        from ...generate import SamplingParams, sample_token

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
