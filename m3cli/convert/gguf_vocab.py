"""The tokenizer of a Hugging Face LLaVA as GGUF metadata: llama.cpp's ``llama`` (SentencePiece) or ``gpt2`` model.

Two vocabularies, told apart by :func:`tokenizer_kind`:

* ``spm``: a SentencePiece BPE vocabulary (LLaMA / Vicuna / Mistral; every real LLaVA-1.5 and M3 checkpoint),
  written as llama.cpp's ``llama`` tokenizer model: ``tokenizer.ggml.tokens`` / ``scores`` / ``token_type``.
  From ``tokenizer.model`` when present (pieces, scores and types as the sentencepiece library reports them;
  ``add_space_prefix`` from its normaliser's ``add_dummy_prefix``), else from a Llama-style ``tokenizer.json``
  (BPE with byte fallback and a ``▁`` prefix), whose merge order becomes the scores: llama.cpp's SPM
  tokenizer merges the adjacent pair whose joined text has the highest score, which for a vocabulary made
  from a SentencePiece model is the pair transformers' BPE merges first.
* ``bpe``: byte-level BPE (GPT-2 / Qwen2 / Llama-3 style), written as llama.cpp's ``gpt2`` model with its
  merges and the pre-tokenizer whose split regex matches ``tokenizer.json``'s (``gpt-2``, ``qwen2``,
  ``llama-bpe``); any other regex is refused (llama.cpp would split text differently).

Both: the added tokens (``added_tokens.json``, ``tokenizer.json``'s ``added_tokens``, ``tokenizer_config.json``'s
``added_tokens_decoder``) keep their ids, special ones as CONTROL, others as USER_DEFINED (llama.cpp matches
both as whole tokens, like transformers' added tokens); rows the embedding has beyond the vocabulary are
``[PAD<i>]`` UNUSED tokens; BOS / EOS / UNK / PAD ids and ``add_bos`` / ``add_eos`` come from
``tokenizer_config.json`` (then the tokenizer's post-processor), as llama.cpp's own converter reads them.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from m3cli.errors import ConvertError

# gguf.TokenType values (= SentencePiece's piece types)
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6
ADDED_SCORE = -1000.0
SPM_SPACE = "\u2581"

# tokenizer.json split regexes -> llama.cpp's pre-tokenizer names (llama-vocab.cpp uses an equivalent regex)
_QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                 r"|\s*[\r\n]+|\s+(?!\S)|\s+")
SPLIT_PRE = {_QWEN2_SPLIT: "qwen2", _LLAMA3_SPLIT: "llama-bpe"}


@dataclass
class TokenizerFiles:
    """The tokenizer files of a model directory (what the GGUF vocabulary is made from)."""

    path: Path
    kind: str                                   # "spm" or "bpe"
    tokenizer_json: dict = field(default_factory=dict)
    spm_model: Path | None = None               # tokenizer.model, when the spm vocabulary comes from it
    config: dict = field(default_factory=dict)  # tokenizer_config.json
    added_json: dict = field(default_factory=dict)  # added_tokens.json


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ConvertError(f"{path}: unreadable JSON ({exc})") from exc
    return data if isinstance(data, dict) else {}


def _has_type(node: Any, wanted: str) -> bool:
    """Whether a tokenizer.json normaliser / pre-tokenizer (possibly a Sequence) contains ``wanted``."""
    if not isinstance(node, dict):
        return False
    if node.get("type") == wanted:
        return True
    return any(_has_type(n, wanted) for key in ("pretokenizers", "normalizers") for n in node.get(key) or [])


def _prepends_space(tok: dict) -> bool:
    """A Llama-style tokenizer.json puts ``▁`` in front of a text (Metaspace, or a Prepend normaliser)."""
    norm, pre = tok.get("normalizer"), tok.get("pre_tokenizer")

    def prepend(node: Any) -> bool:
        if not isinstance(node, dict):
            return False
        if node.get("type") == "Prepend" and node.get("prepend") == SPM_SPACE:
            return True
        if node.get("type") == "Metaspace" and node.get("prepend_scheme", "always") != "never" \
                and node.get("add_prefix_space", True):
            return True
        return any(prepend(n) for key in ("pretokenizers", "normalizers") for n in node.get(key) or [])

    return prepend(norm) or prepend(pre)


def prefix_after_special(files: TokenizerFiles) -> bool | None:
    """Whether transformers puts a ``▁`` in front of the text after a special token (None: tokenizer.json
    does not say, e.g. a ``tokenizer.model``-only directory).

    transformers splits the added tokens out first and then normalises and pre-tokenises each piece on its own:
    a ``Prepend("▁")`` normaliser (the pipeline of the llava-hf repositories, written by transformers 4.36)
    prefixes every piece, a Metaspace pre-tokenizer only with ``prepend_scheme: always``.
    """
    if files.kind != "spm" or not files.tokenizer_json:
        return None
    tok = files.tokenizer_json

    def find(node: Any, kind: str) -> dict | None:
        if not isinstance(node, dict):
            return None
        if node.get("type") == kind:
            return node
        for key in ("pretokenizers", "normalizers"):
            for child in node.get(key) or []:
                if (hit := find(child, kind)) is not None:
                    return hit
        return None

    prepend = find(tok.get("normalizer"), "Prepend")
    if prepend is not None and prepend.get("prepend") == SPM_SPACE:
        return True
    meta = find(tok.get("pre_tokenizer"), "Metaspace")
    if meta is not None:
        return meta.get("prepend_scheme", "always") == "always" and bool(meta.get("add_prefix_space", True))
    return None


def tokenizer_kind(path: Path) -> TokenizerFiles:
    """The tokenizer files of ``path`` and which GGUF vocabulary they make; a one-line ConvertError otherwise."""
    tok_json = path / "tokenizer.json"
    spm = path / "tokenizer.model"
    tok = _read_json(tok_json) if tok_json.is_file() else {}
    cfg = _read_json(path / "tokenizer_config.json") if (path / "tokenizer_config.json").is_file() else {}
    added = _read_json(path / "added_tokens.json") if (path / "added_tokens.json").is_file() else {}
    model = tok.get("model") or {}
    if tok and model.get("type") == "BPE" and _has_type(tok.get("pre_tokenizer"), "ByteLevel"):
        return TokenizerFiles(path, "bpe", tok, None, cfg, added)
    if spm.is_file():
        return TokenizerFiles(path, "spm", tok, spm, cfg, added)
    if tok and model.get("type") == "BPE" and model.get("byte_fallback") and _prepends_space(tok):
        return TokenizerFiles(path, "spm", tok, None, cfg, added)
    if tok:
        raise ConvertError(f"{path}: tokenizer.json is neither byte-level BPE nor SentencePiece-style BPE "
                           f"({model.get('type', 'no model type')}); llama.cpp's llama and gpt2 vocabularies need one")
    raise ConvertError(f"{path}: no tokenizer.model or tokenizer.json")


# -- the vocabulary ------------------------------------------------------------------------------------------
@dataclass
class Vocab:
    """A GGUF vocabulary: tokens with scores (SPM) and types, plus the BPE merges."""

    model: str                   # "llama" or "gpt2"
    pre: str
    tokens: list[str]
    types: list[int]
    scores: list[float] | None = None
    merges: list[str] = field(default_factory=list)
    add_space_prefix: bool | None = None

    def id_of(self, text: str) -> int | None:
        """The id of the token whose text is ``text`` (the first one; None when absent)."""
        if not hasattr(self, "_index"):
            self._index: dict[str, int] = {}
            for i, t in enumerate(self.tokens):
                self._index.setdefault(t, i)
        return self._index.get(text)


def _added_tokens(files: TokenizerFiles) -> dict[int, tuple[str, bool]]:
    """id -> (text, special) of every added token, later sources overriding earlier ones."""
    out: dict[int, tuple[str, bool]] = {}
    for text, idx in files.added_json.items():
        out[int(idx)] = (str(text), False)
    for added in files.tokenizer_json.get("added_tokens") or []:
        out[int(added["id"])] = (str(added["content"]), bool(added.get("special", False)))
    for idx, data in (files.config.get("added_tokens_decoder") or {}).items():
        if isinstance(data, dict) and isinstance(data.get("content"), str):
            out[int(idx)] = (data["content"], bool(data.get("special", False)))
    return out


def _spm_from_model(files: TokenizerFiles) -> tuple[list[str], list[float], list[int], bool]:
    try:
        import sentencepiece
        from sentencepiece import sentencepiece_model_pb2
    except ImportError as exc:  # pragma: no cover - a dependency
        raise ConvertError("reading tokenizer.model needs the sentencepiece package (pip install sentencepiece)") \
            from exc
    assert files.spm_model is not None
    data = files.spm_model.read_bytes()
    proto = sentencepiece_model_pb2.ModelProto()
    try:
        proto.ParseFromString(data)
        sp = sentencepiece.SentencePieceProcessor(model_proto=data)
    except Exception as exc:  # noqa: BLE001 - any parse failure is a bad file
        raise ConvertError(f"{files.spm_model}: not a SentencePiece model ({type(exc).__name__})") from exc
    if proto.trainer_spec.model_type != sentencepiece_model_pb2.TrainerSpec.BPE:
        raise ConvertError(f"{files.spm_model}: only SentencePiece BPE models (LLaMA-style) convert to llama.cpp's "
                           "llama vocabulary")
    tokens, scores, types = [], [], []
    for i in range(sp.vocab_size()):
        tokens.append(sp.id_to_piece(i))
        scores.append(float(sp.get_score(i)))
        types.append(UNKNOWN if sp.is_unknown(i) else CONTROL if sp.is_control(i) else UNUSED if sp.is_unused(i)
                     else BYTE if sp.is_byte(i) else NORMAL)
    return tokens, scores, types, bool(proto.normalizer_spec.add_dummy_prefix)


def _spm_from_json(files: TokenizerFiles) -> tuple[list[str], list[float], list[int], bool]:
    model = files.tokenizer_json["model"]
    vocab: dict[str, int] = model["vocab"]
    size = max(vocab.values()) + 1
    tokens = [f"[PAD{i}]" for i in range(size)]
    types = [UNUSED] * size
    scores = [ADDED_SCORE] * size
    for text, idx in vocab.items():
        tokens[idx] = text
        types[idx] = BYTE if re.fullmatch(r"<0x[0-9A-Fa-f]{2}>", text) else NORMAL
        scores[idx] = 0.0
    # a merged token scores by the rank of the first merge making it (earlier merges score higher); a token no
    # merge makes is never a merge result in transformers either, so it scores below every merge
    made: set[int] = set()
    merges = model.get("merges") or []
    for rank, merge in enumerate(merges):
        left, right = merge.split(" ", 1) if isinstance(merge, str) else merge
        idx = vocab.get(left + right)
        if idx is not None and idx not in made:
            made.add(idx)
            scores[idx] = -float(rank)
    floor = -float(len(merges) + 1)
    for idx, text in enumerate(tokens):
        if types[idx] == NORMAL and idx not in made and len(text) > 1:
            scores[idx] = floor
    unk = model.get("unk_token")
    if isinstance(unk, str) and unk in vocab:
        types[vocab[unk]] = UNKNOWN
    return tokens, scores, types, _prepends_space(files.tokenizer_json)


def spm_vocab(files: TokenizerFiles, n_rows: int) -> Vocab:
    """The ``llama`` (SentencePiece) vocabulary for an embedding of ``n_rows`` rows."""
    tokens, scores, types, prefix = _spm_from_model(files) if files.spm_model else _spm_from_json(files)
    for idx, (text, special) in sorted(_added_tokens(files).items()):
        while idx >= len(tokens):
            tokens.append(f"[PAD{len(tokens)}]")
            scores.append(ADDED_SCORE)
            types.append(UNUSED)
        if types[idx] in (UNKNOWN, CONTROL, BYTE) and tokens[idx] == text:
            continue            # <unk>, <s>, </s> of the SentencePiece model itself: keep their type
        # llama.cpp's converter stores a user-defined token's "▁" as the space it stands for
        tokens[idx] = text if special else text.replace(SPM_SPACE, " ")
        types[idx] = CONTROL if special else USER_DEFINED
        scores[idx] = ADDED_SCORE
    _pad_rows(tokens, types, n_rows, scores)
    add_prefix = files.config.get("add_prefix_space")
    return Vocab("llama", "default", tokens, types, scores,
                 add_space_prefix=add_prefix if isinstance(add_prefix, bool) else prefix)


def _bpe_pre(tok: dict, path: Path) -> str:
    pre = tok.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else [pre]
    splits = [s for s in steps if s.get("type") == "Split"]
    byte_level = [s for s in steps if s.get("type") == "ByteLevel"]
    if not splits and byte_level and byte_level[0].get("use_regex", True):
        return "gpt-2"
    if len(splits) == 1 and byte_level and not byte_level[0].get("use_regex", True):
        pattern = (splits[0].get("pattern") or {}).get("Regex")
        if pattern in SPLIT_PRE:
            return SPLIT_PRE[pattern]
    raise ConvertError(f"{path}: byte-level BPE pre-tokenizer not known to llama.cpp (only GPT-2's, Qwen2's and "
                       "Llama-3's splits convert exactly)")


def bpe_vocab(files: TokenizerFiles, n_rows: int) -> Vocab:
    """The ``gpt2`` (byte-level BPE) vocabulary for an embedding of ``n_rows`` rows."""
    tok = files.tokenizer_json
    vocab: dict[str, int] = dict(tok["model"]["vocab"])
    size = max(vocab.values()) + 1
    tokens = [f"[PAD{i}]" for i in range(size)]
    types = [UNUSED] * size
    for text, idx in vocab.items():
        tokens[idx], types[idx] = text, NORMAL
    for idx, (text, special) in sorted(_added_tokens(files).items()):
        while idx >= len(tokens):
            tokens.append(f"[PAD{len(tokens)}]")
            types.append(UNUSED)
        tokens[idx], types[idx] = text, CONTROL if special else USER_DEFINED
    _pad_rows(tokens, types, n_rows)
    merges = [m if isinstance(m, str) else " ".join(m) for m in tok["model"].get("merges") or []]
    return Vocab("gpt2", _bpe_pre(tok, files.path), tokens, types, merges=merges)


def _pad_rows(tokens: list[str], types: list[int], n_rows: int, scores: list[float] | None = None) -> None:
    if len(tokens) > n_rows:
        raise ConvertError(f"tokenizer has {len(tokens)} tokens but the embedding has {n_rows} rows")
    while len(tokens) < n_rows:
        tokens.append(f"[PAD{len(tokens)}]")
        types.append(UNUSED)
        if scores is not None:
            scores.append(ADDED_SCORE)


def build_vocab(files: TokenizerFiles, n_rows: int) -> Vocab:
    """:func:`spm_vocab` or :func:`bpe_vocab`, as ``files.kind`` says."""
    return spm_vocab(files, n_rows) if files.kind == "spm" else bpe_vocab(files, n_rows)


# -- special tokens ------------------------------------------------------------------------------------------
@dataclass
class SpecialIds:
    """BOS / EOS / UNK / PAD ids and whether the tokenizer adds BOS / EOS by itself."""

    bos: int | None
    eos: int | None
    unk: int | None
    pad: int | None
    add_bos: bool
    add_eos: bool


def _token_text(value: Any) -> str | None:
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) and value else None


def _post_processor_adds(tok: dict, bos: int | None, eos: int | None) -> tuple[bool | None, bool | None]:
    """(adds BOS, adds EOS) according to tokenizer.json's TemplateProcessing (None: it does not say)."""
    post = tok.get("post_processor") or {}
    steps = post.get("processors", [post]) if post.get("type") == "Sequence" else [post]
    for step in steps:
        if step.get("type") == "TemplateProcessing":
            single = step.get("single") or []
            ids = [((s.get("SpecialToken") or {}).get("id")) for s in single]
            specials = {t["id"]: t.get("ids", []) for t in (step.get("special_tokens") or {}).values()} \
                if isinstance(step.get("special_tokens"), dict) else {}
            first = specials.get(ids[0], [None])[0] if ids and ids[0] else None
            last = specials.get(ids[-1], [None])[0] if len(ids) > 1 and ids[-1] else None
            return (first is not None and first == bos), (last is not None and last == eos)
    return None, None


def special_ids(files: TokenizerFiles, vocab: Vocab, config: dict, text_config: dict) -> SpecialIds:
    """The special ids of the converted vocabulary: ``tokenizer_config.json`` first, then the model configs."""
    cfg = files.config

    def lookup(name: str, fallback: Any) -> int | None:
        text = _token_text(cfg.get(f"{name}_token"))
        if text is not None:
            return vocab.id_of(text)
        if f"{name}_token" in cfg and cfg[f"{name}_token"] is None:
            return None         # the tokenizer says it has none
        value = text_config.get(f"{name}_token_id", config.get(f"{name}_token_id", fallback))
        if isinstance(value, list):
            value = value[0] if value else None
        return int(value) if isinstance(value, int) else None

    spm = files.kind == "spm"
    bos = lookup("bos", None)
    eos = lookup("eos", None)
    unk = lookup("unk", None)
    pad = lookup("pad", None)
    if spm and files.spm_model is not None:
        # the SentencePiece model's own ids when the configs name none
        import sentencepiece

        sp = sentencepiece.SentencePieceProcessor(model_file=str(files.spm_model))
        bos = bos if bos is not None or "bos_token" in cfg else (sp.bos_id() if sp.bos_id() >= 0 else None)
        eos = eos if eos is not None or "eos_token" in cfg else (sp.eos_id() if sp.eos_id() >= 0 else None)
        unk = unk if unk is not None else (sp.unk_id() if sp.unk_id() >= 0 else None)
    post_bos, post_eos = _post_processor_adds(files.tokenizer_json, bos, eos)
    cfg_bos, cfg_eos = cfg.get("add_bos_token"), cfg.get("add_eos_token")
    cfg_bos = cfg_bos if isinstance(cfg_bos, bool) else None
    cfg_eos = cfg_eos if isinstance(cfg_eos, bool) else None
    if spm:
        # transformers' Llama tokenizer builds its post-processor from add_bos_token / add_eos_token (BOS by
        # default); a byte-level fast tokenizer runs tokenizer.json's post-processor as it is
        add_bos = _first(cfg_bos, post_bos, bos is not None)
        add_eos = _first(cfg_eos, post_eos, False)
    else:
        add_bos = _first(post_bos, cfg_bos, False)
        add_eos = _first(post_eos, cfg_eos, False)
    return SpecialIds(bos, eos, unk, pad, bool(add_bos and bos is not None), bool(add_eos and eos is not None))


def _first(*values: bool | None) -> bool:
    return next((bool(v) for v in values if v is not None), False)


def add_vocab_kv(kv: Any, vocab: Vocab, ids: SpecialIds) -> None:
    """Write ``vocab`` and ``ids`` into a :class:`m3cli.gguf.writer.KeyValues` as llama.cpp reads them."""
    kv.add("tokenizer.ggml.model", vocab.model, "STRING")
    kv.add("tokenizer.ggml.pre", vocab.pre, "STRING")
    kv.add("tokenizer.ggml.tokens", vocab.tokens, "ARRAY", "STRING")
    if vocab.scores is not None:
        kv.add("tokenizer.ggml.scores", vocab.scores, "ARRAY", "FLOAT32")
    kv.add("tokenizer.ggml.token_type", vocab.types, "ARRAY", "INT32")
    if vocab.model == "gpt2":
        kv.add("tokenizer.ggml.merges", vocab.merges, "ARRAY", "STRING")
    for name, value in (("bos", ids.bos), ("eos", ids.eos), ("unknown", ids.unk), ("padding", ids.pad)):
        if value is not None:
            kv.add(f"tokenizer.ggml.{name}_token_id", int(value), "UINT32")
    kv.add("tokenizer.ggml.add_bos_token", ids.add_bos, "BOOL")
    kv.add("tokenizer.ggml.add_eos_token", ids.add_eos, "BOOL")
    if vocab.add_space_prefix is not None:
        kv.add("tokenizer.ggml.add_space_prefix", bool(vocab.add_space_prefix), "BOOL")
