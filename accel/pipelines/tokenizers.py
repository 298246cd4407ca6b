"""Tokenizers that can be built with no network access.

Real checkpoints ship their tokenizers; the tiny test pipelines need ones that exist without a download:

* ``t5_tokenizer()``: a character-level tokenizer built in memory with the ``tokenizers`` library, with T5's
  special tokens (``<pad>`` = 0, ``</s>`` = 1, ``<unk>`` = 2) and an end-of-sequence token appended, as T5 does.
* ``clip_tokenizer()``: the real CLIP BPE tokenizer, rebuilt from the BPE merges file that open_clip bundles
  (the same vocabulary OpenAI's CLIP and Stable Diffusion use).
"""

from __future__ import annotations

import functools
import gzip
import string

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import CLIPTokenizer, PreTrainedTokenizerFast

T5_SPECIAL_TOKENS = ("<pad>", "</s>", "<unk>")


@functools.cache
def _t5_tokenizer_json() -> str:
    vocab = {token: index for index, token in enumerate(T5_SPECIAL_TOKENS)}
    for char in string.printable:
        vocab.setdefault(char, len(vocab))
    tokenizer = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Split(pattern="", behavior="isolated")
    tokenizer.decoder = decoders.Fuse()
    tokenizer.post_processor = processors.TemplateProcessing(
        single="$A </s>", pair="$A </s> $B </s>", special_tokens=[("</s>", vocab["</s>"])]
    )
    return tokenizer.to_str()


def t5_tokenizer(model_max_length: int = 512) -> PreTrainedTokenizerFast:
    """A T5-style tokenizer (character level, ~100 tokens) built in memory."""
    return PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(_t5_tokenizer_json()),
        pad_token="<pad>",
        eos_token="</s>",
        unk_token="<unk>",
        model_max_length=model_max_length,
    )


def t5_vocab_size() -> int:
    return Tokenizer.from_str(_t5_tokenizer_json()).get_vocab_size()


def _bytes_to_unicode() -> dict[int, str]:
    # The reversible byte -> printable-character table of GPT-2 / CLIP BPE.
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    codes = printable[:]
    extra = 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            codes.append(256 + extra)
            extra += 1
    return dict(zip(printable, (chr(code) for code in codes)))


@functools.cache
def _clip_vocab_and_merges() -> tuple[dict[str, int], list[str]]:
    import open_clip.tokenizer

    with gzip.open(open_clip.tokenizer.default_bpe()) as handle:
        lines = handle.read().decode("utf-8").split("\n")
    merges = lines[1 : 49152 - 256 - 2 + 1]  # the 48,894 merges CLIP uses
    tokens = list(_bytes_to_unicode().values())
    tokens += [token + "</w>" for token in tokens]
    tokens += ["".join(merge.split()) for merge in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    return {token: index for index, token in enumerate(tokens)}, merges


def clip_tokenizer(model_max_length: int = 77) -> CLIPTokenizer:
    """CLIP's BPE tokenizer (vocabulary 49,408) from open_clip's bundled merges file."""
    vocab, merges = _clip_vocab_and_merges()
    pairs = [tuple(merge.split()) for merge in merges]
    return CLIPTokenizer(vocab=dict(vocab), merges=pairs, model_max_length=model_max_length)


CLIP_VOCAB_SIZE = 49408
