"""The umT5 tokenizer as Wan uses it: cleaned text, EOS appended, padded/truncated to 512.

Loaded from a local directory only (the `google/umt5-xxl` tokenizer files that ship with the Wan
checkpoint as `<ckpt>/google/umt5-xxl`); nothing is downloaded.

    tok = T5Tokenizer('/ckpts/Wan2.1-I2V-14B-480P/google/umt5-xxl')
    ids, mask = tok(['pick up the cup'])   # int32 [1, 512] each; mask is 1 on real tokens

`make_tiny_tokenizer(directory, words)` writes a small word-level tokenizer with the same special
tokens (pad 0, eos 1, unk 2), for tests and the `tiny` smoke configurations.
"""

from __future__ import annotations

import html
import os
import re
from typing import Sequence

import numpy as np


def clean_text(text: str) -> str:
  """Wan/EVA's prompt cleaning, always applied as EVA does: ftfy.fix_text, double HTML unescape,
  whitespace collapse. ftfy repairs mojibake and normalises curly quotes, ligatures and full-width
  characters, so such captions tokenize as EVA's do.
  """
  import ftfy  # pylint: disable=g-import-not-at-top (a dependency; imported here to keep import light)
  text = ftfy.fix_text(text)
  text = html.unescape(html.unescape(text))
  return re.sub(r"\s+", " ", text).strip()


class T5Tokenizer:
  """A transformers fast tokenizer from a local path; returns numpy (ids, mask) of shape [B, max_length]."""

  def __init__(self, path: str | os.PathLike, max_length: int = 512, clean: bool = True):
    from transformers import AutoTokenizer  # pylint: disable=g-import-not-at-top
    path = os.fspath(path)
    if not os.path.isdir(path):
      raise FileNotFoundError(
          f"tokenizer directory {path!r} does not exist (expected the google/umt5-xxl tokenizer files, "
          "e.g. <wan ckpt>/google/umt5-xxl; nothing is downloaded)")
    self.tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    self.max_length = max_length
    self.clean = clean

  @property
  def vocab_size(self) -> int:
    return len(self.tokenizer)

  def __call__(self, texts: Sequence[str] | str, max_length: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    if isinstance(texts, str):
      texts = [texts]
    if self.clean:
      texts = [clean_text(t) for t in texts]
    out = self.tokenizer(list(texts), padding="max_length", truncation=True,
                         max_length=max_length or self.max_length, add_special_tokens=True,
                         return_attention_mask=True, return_tensors="np")
    return out["input_ids"].astype(np.int32), out["attention_mask"].astype(np.int32)


def make_tiny_tokenizer(directory: str | os.PathLike, words: Sequence[str]) -> str:
  """Writes a word-level tokenizer (pad=0, eos=1, unk=2, then `words`) loadable by `T5Tokenizer`.

  Text is lower-cased and split on whitespace and punctuation; `</s>` is appended like umT5's.
  Returns the directory.
  """
  # pylint: disable=g-import-not-at-top
  from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
  from transformers import PreTrainedTokenizerFast
  vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2}
  for w in words:
    vocab.setdefault(w.lower(), len(vocab))
  tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
  tok.normalizer = normalizers.Lowercase()
  tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Whitespace()])
  tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
  fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>",
                                 unk_token="<unk>")
  directory = os.fspath(directory)
  os.makedirs(directory, exist_ok=True)
  fast.save_pretrained(directory)
  return directory
