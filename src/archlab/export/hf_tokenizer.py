"""The tokenizer half of a transformers export: archlab's tokenizer as a ``tokenizers`` file.

Written as ``tokenizer.json`` wrapped by ``PreTrainedTokenizerFast``: byte-level BPE as is;
char and word vocabularies become WordLevel models with pre-tokenizers that split as archlab
does, so ``AutoTokenizer.from_pretrained`` gives archlab's token ids. One known difference:
the word tokenizer keeps ``</s>`` whole only as a whitespace-separated word, while the
exported special token also matches it glued to punctuation (``"hi </s>."``); archlab's own
corpora never glue it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ..errors import UserError

# ASCII punctuation, each character its own token (RustGPT's rule, as archlab's word tokenizer)
_ASCII_PUNCT_CLASS = r"[!-/:-@\[-`{-~]"


def hf_tokenizer_object(tokenizer: Any) -> Any:
    """A ``tokenizers.Tokenizer`` that encodes and decodes as archlab's ``tokenizer``."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers

    from ..data.tokenizer import CharTokenizer, HFTokenizer, WordTokenizer

    if isinstance(tokenizer, HFTokenizer):
        return Tokenizer.from_str(tokenizer.to_json())
    if isinstance(tokenizer, CharTokenizer | WordTokenizer):
        vocab = {t: i for i, t in enumerate(tokenizer.vocab)}
        tok = Tokenizer(models.WordLevel(vocab, unk_token=tokenizer.unk_token or UNK_FALLBACK))
        if isinstance(tokenizer, CharTokenizer):
            tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
            tok.decoder = decoders.Fuse()  # characters join with nothing between them
            specials = [
                AddedToken(s, special=True, normalized=False) for s in tokenizer.special_tokens
            ]
        else:
            tok.pre_tokenizer = pre_tokenizers.Sequence(
                [
                    pre_tokenizers.WhitespaceSplit(),
                    pre_tokenizers.Split(Regex(_ASCII_PUNCT_CLASS), behavior="isolated"),
                ]
            )
            # no decoder: tokens join with single spaces, as archlab's word decode
            specials = [
                AddedToken(s, special=True, single_word=True, normalized=False)
                for s in tokenizer.special_tokens
            ]
        tok.add_special_tokens(specials)
        return tok
    raise UserError(f"cannot export a tokenizer of kind {getattr(tokenizer, 'kind', '?')!r}")


UNK_FALLBACK = "<unk>"


def save_hf_tokenizer(tokenizer: Any, out: Path, max_len: int | None) -> None:
    """tokenizer.json + tokenizer_config.json (+ special tokens) for ``AutoTokenizer``."""
    from transformers import PreTrainedTokenizerFast

    eot = tokenizer.eot_token
    unk = getattr(tokenizer, "unk_token", None)
    kwargs: dict[str, Any] = dict(
        tokenizer_object=hf_tokenizer_object(tokenizer),
        eos_token=eot,
        bos_token=eot,
        pad_token=eot,
        clean_up_tokenization_spaces=False,
    )
    if unk:
        kwargs["unk_token"] = unk
    if max_len is not None:
        kwargs["model_max_length"] = max_len
    PreTrainedTokenizerFast(**kwargs).save_pretrained(str(out))
    # an explicit class name that every transformers version resolves
    cfg_path = out / "tokenizer_config.json"
    tcfg = json.loads(cfg_path.read_text())
    tcfg["tokenizer_class"] = "PreTrainedTokenizerFast"
    cfg_path.write_text(json.dumps(tcfg, indent=2, ensure_ascii=False) + "\n")
