"""The fixed-length CLIP-style tokenizer: synthetic word level and foreign tokenizer.json files."""

from __future__ import annotations

import re

import pytest
import torch
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, processors, trainers

from lit_vlm.datamodules.tokenizer import SYNTH_SPECIALS, Tokenizer

synth = pytest.importorskip("lit_vlm.datamodules.synth")

SENTENCES = [
    "a small red circle at the top left.",
    "Two big blue squares, and a green star?",
    "there is a yellow triangle in the middle; one shape: no star.",
    "where is the purple heart? bottom right.",
]


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return Tokenizer.synthetic()


def test_synthetic_specials_and_vocab(tok: Tokenizer):
    assert [tok.token_to_id(t) for t in SYNTH_SPECIALS] == [0, 1, 2, 3, 4]
    assert (tok.pad_id, tok.unk_id, tok.bos_id, tok.eos_id, tok.mask_id) == (0, 1, 2, 3, 4)
    vocab = synth.vocabulary()
    assert tok.vocab_size == len(SYNTH_SPECIALS) + len(vocab)
    for word in vocab:
        token_id = tok.token_to_id(word)
        assert token_id is not None and token_id >= len(SYNTH_SPECIALS), word
        assert tok.tokenize(word) == [word]  # one word is one non-UNK token
    assert Tokenizer.load("synth").vocab_size == tok.vocab_size


def test_synthetic_pre_tokenisation_matches_the_regex(tok: Tokenizer):
    texts = [*SENTENCES, "Hello,World!!  a\tb\nc...", "x$5 _under_score (paren) 'quote'", "naïve café-au-lait"]
    for text in texts:
        assert tok.tokenize(text) == [
            t if tok.token_to_id(t) is not None else "[UNK]" for t in re.findall(r"\w+|[^\w\s]", text.lower())
        ]


def test_every_synth_caption_word_is_known(tok: Tokenizer):
    captions = [c.format("circle") for c in synth.TEMPLATES] + [n for n in synth.CLASSNAMES]
    ids, mask = tok.encode(captions, 32)
    assert not bool((ids[mask] == tok.unk_id).any())


def test_encode_layout_padding_and_mask(tok: Tokenizer):
    ids, mask = tok.encode(["a red circle.", ""], 8)
    assert ids.shape == mask.shape == (2, 8) and ids.dtype == torch.long and mask.dtype == torch.bool
    expected = [
        tok.bos_id,
        tok.token_to_id("a"),
        tok.token_to_id("red"),
        tok.token_to_id("circle"),
        tok.token_to_id("."),
    ]
    assert ids[0].tolist() == expected + [tok.eos_id, tok.pad_id, tok.pad_id]
    assert mask[0].tolist() == [True] * 6 + [False] * 2
    assert ids[1].tolist()[:2] == [tok.bos_id, tok.eos_id] and mask[1].sum() == 2
    empty_ids, empty_mask = tok.encode([], 8)
    assert empty_ids.shape == (0, 8) and empty_mask.shape == (0, 8)
    with pytest.raises(TypeError):
        tok.encode("not a list", 8)  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        tok.encode(["a"], 1)


def test_truncation_keeps_the_end_token(tok: Tokenizer):
    long_text = " ".join(["red circle"] * 40)
    ids, mask = tok.encode([long_text], 6)
    assert ids[0, 0] == tok.bos_id and ids[0, -1] == tok.eos_id
    assert mask.all()
    assert ids[0, 1:5].tolist() == [tok.token_to_id("red"), tok.token_to_id("circle")] * 2


def test_round_trip(tok: Tokenizer):
    ids, mask = tok.encode(SENTENCES, 32)
    decoded = tok.decode_batch(ids)
    for text, back in zip(SENTENCES, decoded):
        assert back == " ".join(re.findall(r"\w+|[^\w\s]", text.lower()))
        assert torch.equal(tok.encode([back], 32)[0][0], tok.encode([text], 32)[0][0])
    assert tok.decode(ids[0].tolist()) == decoded[0]
    assert tok.decode_batch(ids, mask) == decoded
    assert tok.decode(tok.encode(["a zebra circle"], 8)[0][0]) == "a circle"  # specials ([UNK]) are skipped


def test_save_and_from_file_round_trip(tok: Tokenizer, tmp_path):
    path = tmp_path / "tokenizer.json"
    tok.save(path)
    loaded = Tokenizer.from_file(path)
    assert (loaded.bos_id, loaded.eos_id, loaded.pad_id, loaded.mask_id) == (2, 3, 0, 4)
    assert torch.equal(loaded.encode(SENTENCES, 16)[0], tok.encode(SENTENCES, 16)[0])
    assert Tokenizer.load(str(path)).vocab_size == tok.vocab_size


def test_from_file_errors_name_the_path(tmp_path):
    missing = tmp_path / "nope" / "tokenizer.json"
    with pytest.raises(FileNotFoundError, match="nope"):
        Tokenizer.from_file(missing)
    broken = tmp_path / "broken.json"
    broken.write_text("{not json")
    with pytest.raises(ValueError, match="broken.json"):
        Tokenizer.load(str(broken))


def _train_wordpiece(path) -> None:
    backend = HFTokenizer(models.WordPiece(unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    backend.decoder = decoders.WordPiece()
    trainer = trainers.WordPieceTrainer(vocab_size=200, special_tokens=["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"])
    backend.train_from_iterator(SENTENCES * 3, trainer)
    cls_id, sep_id = backend.token_to_id("[CLS]"), backend.token_to_id("[SEP]")
    backend.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B [SEP]", special_tokens=[("[CLS]", cls_id), ("[SEP]", sep_id)]
    )
    # Padding and truncation in the file must not leak into our fixed-length layout.
    backend.enable_padding(pad_id=backend.token_to_id("[PAD]"), pad_token="[PAD]", length=50)
    backend.enable_truncation(max_length=4)
    backend.save(str(path))


def test_foreign_wordpiece_with_cls_sep(tmp_path):
    path = tmp_path / "bert.json"
    _train_wordpiece(path)
    tok = Tokenizer.from_file(path)
    assert tok.bos_token == "[CLS]" and tok.eos_token == "[SEP]"
    assert tok.pad_id == tok.token_to_id("[PAD]") and tok.mask_id == tok.token_to_id("[MASK]")
    ids, mask = tok.encode(SENTENCES[:2], 20)
    assert ids.shape == (2, 20)
    for row in range(2):
        real = ids[row][mask[row]].tolist()
        assert real[0] == tok.bos_id and real[-1] == tok.eos_id
        assert real.count(tok.bos_id) == 1 and real.count(tok.eos_id) == 1  # no second [CLS]/[SEP]
        assert len(real) > 4  # the file's truncation is off
        assert (ids[row][~mask[row]] == tok.pad_id).all()
    assert tok.decode(ids[0]) == SENTENCES[0].lower()
    truncated, _ = tok.encode([SENTENCES[2]], 5)
    assert truncated[0, -1] == tok.eos_id


def test_foreign_bpe_with_clip_names_pads_with_eos(tmp_path):
    backend = HFTokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=["<|startoftext|>", "<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    backend.train_from_iterator(SENTENCES * 3, trainer)
    path = tmp_path / "clip.json"
    backend.save(str(path))
    tok = Tokenizer.from_file(path)
    assert tok.bos_id == tok.token_to_id("<|startoftext|>") and tok.eos_id == tok.token_to_id("<|endoftext|>")
    assert tok.pad_id == tok.eos_id and tok.mask_id is None
    ids, mask = tok.encode(["a red circle"], 12)
    real = ids[0][mask[0]].tolist()
    assert real[0] == tok.bos_id and real[-1] == tok.eos_id
    assert tok.decode(ids[0]) == "a red circle"


def test_foreign_without_specials(tmp_path):
    backend = HFTokenizer(models.WordLevel({"a": 0, "b": 1, "[UNK]": 2}, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    path = tmp_path / "plain.json"
    backend.save(str(path))
    tok = Tokenizer.from_file(path)
    assert tok.bos_id is None and tok.eos_id is None and tok.pad_id == 0
    ids, mask = tok.encode(["a b b a b"], 3)
    assert ids.tolist() == [[0, 1, 1]] and mask.all()
