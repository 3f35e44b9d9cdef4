"""Language-model seams: one tokenizer contract for the synthetic tokenizer and a Hugging Face model
folder; lit-vlm's generation driving a Hugging Face causal LM (GPT-2, LLaMA) with its own cache,
token for token as ``transformers``' own ``generate``; and values flowing from a model's language
model to the data (tokenizer, context length)."""

from __future__ import annotations

import warnings

import lightning.pytorch as pl
import pytest
import torch

from lit_vlm.datamodules.tokenizer import TextTokenizer, Tokenizer
from lit_vlm.errors import UserError
from lit_vlm.generation import StepDecoder, generate, left_align
from lit_vlm.modules.decoder import TextDecoder
from lit_vlm.modules.language_model import CausalLM, language_model_facts

transformers = pytest.importorskip("transformers")

WORDS = "a the red blue green circle square star small big left right top bottom of and is there".split()
SENTENCES = ["a red circle", "the big blue square is left of a small star", "there is a green star"]
MAX_POSITIONS = 40


def _lm_folder(path, kind: str):
    """A random tiny causal LM of ``kind`` and its tokenizer, saved as a Hugging Face model folder."""
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import models, pre_tokenizers

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, "<pad>": 3, **{w: i + 4 for i, w in enumerate(WORDS)}}
    backend = HFTokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>",
                                                pad_token="<pad>", unk_token="<unk>", model_max_length=MAX_POSITIONS)
    fast.save_pretrained(path)
    torch.manual_seed(0)
    common = {"vocab_size": len(vocab), "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 3}
    if kind == "gpt2":
        config = transformers.GPT2Config(n_positions=64, n_embd=32, n_layer=2, n_head=4, **common)
        model = transformers.GPT2LMHeadModel(config)
    else:  # RoPE, grouped-query attention
        config = transformers.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                          num_key_value_heads=2, max_position_embeddings=64, **common)
        model = transformers.LlamaForCausalLM(config)
    model.save_pretrained(path)
    return path


@pytest.fixture(scope="module", params=["gpt2", "llama"])
def lm_folder(request, tmp_path_factory):
    return _lm_folder(tmp_path_factory.mktemp(request.param), request.param)


# ---- the tokenizer contract ----------------------------------------------------------------------


def test_the_synthetic_tokenizer_and_a_model_folders_satisfy_one_contract(lm_folder):
    ours = Tokenizer.load(str(lm_folder))
    theirs = transformers.AutoTokenizer.from_pretrained(str(lm_folder), local_files_only=True)
    assert isinstance(ours, TextTokenizer) and isinstance(Tokenizer.synthetic(), TextTokenizer)
    assert (ours.bos_id, ours.eos_id, ours.pad_id, ours.vocab_size) == (
        theirs.bos_token_id, theirs.eos_token_id, theirs.pad_token_id, len(theirs))
    ids, mask = ours.encode(SENTENCES, 16)
    for row, text in enumerate(SENTENCES):
        expected = [theirs.bos_token_id, *theirs(text, add_special_tokens=False).input_ids, theirs.eos_token_id]
        assert ids[row][mask[row]].tolist() == expected
        assert ours.decode(ids[row]) == text

    left = Tokenizer.from_pretrained(lm_folder)
    left.padding_side = "left"
    left_ids, left_mask = left.encode(SENTENCES, 16)
    assert left_mask[:, -1].all() and not left_mask[:, 0].any()  # real tokens at the end
    assert torch.equal(left_ids[left_mask], ids[mask])
    assert left.decode_batch(left_ids, left_mask) == SENTENCES


# ---- generation over a Hugging Face causal LM ------------------------------------------------------


def _hf_generate(model, ids, mask, **options):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return model.generate(input_ids=ids, attention_mask=mask.long(), do_sample=False, pad_token_id=3, eos_token_id=2,
                              early_stopping=options.get("num_beams", 1) > 1, **options)[:, ids.shape[1]:]


def _upto_eos(tokens: torch.Tensor) -> list[list[int]]:
    rows = []
    for row in tokens.tolist():
        row = row[: row.index(2) + 1] if 2 in row else row
        rows.append([t for t in row if t != 3])
    return rows


CASES = [{}, {"num_beams": 3}, {"num_beams": 4, "length_penalty": 0.6}, {"num_beams": 2, "no_repeat_ngram_size": 2},
         {"repetition_penalty": 1.3}, {"num_beams": 3, "repetition_penalty": 1.3, "min_new_tokens": 4}]


def test_generation_drives_a_hugging_face_lm_with_its_cache_as_transformers_does(lm_folder):
    lm = CausalLM.from_pretrained(lm_folder).eval()
    tok = Tokenizer.from_pretrained(lm_folder)
    assert isinstance(lm, StepDecoder) and isinstance(TextDecoder(vocab_size=8, context_length=8, width=8, layers=1, heads=2), StepDecoder)
    ids, mask = tok.encode(["a red", "the big blue square is", "there"], 12)  # right-padded prompts, no end token:
    ids, mask = ids.clone(), mask.clone()
    ends = mask.sum(1) - 1
    mask[torch.arange(3), ends] = False  # drop each row's eos, so the LM continues the text
    ids[~mask] = tok.pad_id
    left_ids, left_mask = left_align(ids, mask, tok.pad_id)
    for options in CASES:
        ours = generate(lm, ids, mask, max_new_tokens=10, eos_id=tok.eos_id, pad_id=tok.pad_id, **options)
        uncached = generate(lm, ids, mask, max_new_tokens=10, eos_id=tok.eos_id, pad_id=tok.pad_id, use_cache=False, **options)
        theirs = _hf_generate(lm.model, left_ids, left_mask, max_new_tokens=10, **options)
        assert _upto_eos(ours) == _upto_eos(theirs) == _upto_eos(uncached), options


def test_a_prefix_of_embeddings_conditions_generation_as_inputs_embeds_do(lm_folder):
    """LLaVA / ClipCap feed projected image tokens as a prefix of the LM's input embeddings."""
    lm = CausalLM.from_pretrained(lm_folder).eval()
    torch.manual_seed(1)
    context = torch.randn(2, 3, lm.width)  # [B, S, D]
    ids = torch.tensor([[1, 5], [1, 9]])  # <s> + one word
    mask = torch.ones_like(ids, dtype=torch.bool)
    for options in ({}, {"num_beams": 3}):
        ours = generate(lm, ids, mask, context=context, max_new_tokens=8, eos_id=2, pad_id=3, **options)
        embeds = torch.cat([context, lm.model.get_input_embeddings()(ids)], dim=1)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            theirs = lm.model.generate(inputs_embeds=embeds, attention_mask=torch.ones(2, 5, dtype=torch.long), max_new_tokens=8,
                                       do_sample=False, pad_token_id=3, eos_token_id=2, early_stopping=bool(options), **options)
        assert _upto_eos(ours) == _upto_eos(theirs), options
    with pytest.raises(UserError, match="context width"):
        lm(ids, mask, context=torch.randn(2, 3, lm.width + 1))


# ---- values flow from the model's language model to the data ----------------------------------------


class NamesALanguageModel(pl.LightningModule):
    """A test double: a model that names a language model and receives the linked values."""

    def __init__(self, language_model: str, vocab_size: int | None = None, context_length: int | None = None,
                 pad_id: int | None = None) -> None:
        super().__init__()
        self.save_hyperparameters()


def test_the_data_takes_tokenizer_and_context_length_from_the_models_language_model(lm_folder, tmp_path, monkeypatch):
    from lit_vlm.cli import LitVLMCLI

    monkeypatch.setattr("sys.argv", ["lit-vlm"])

    assert language_model_facts(lm_folder) == {"tokenizer": str(lm_folder), "vocab_size": 22, "context_length": MAX_POSITIONS}
    base = ["--model", f"{__name__}.NamesALanguageModel", "--model.language_model", str(lm_folder),
            "--data", "lit_vlm.datamodules.ImageTextDataModule", "--data.root", str(tmp_path / "world")]
    cli = LitVLMCLI(args=base, run=False)
    dm, model = cli.datamodule, cli.model
    assert dm.tokenizer.name == str(lm_folder) and dm.context_length == MAX_POSITIONS
    assert model.hparams.vocab_size == 22 and model.hparams.context_length == MAX_POSITIONS and model.hparams.pad_id == 3

    with pytest.raises(UserError, match="disagrees with model.init_args.language_model"):  # one clear error
        LitVLMCLI(args=[*base, "--data.tokenizer", "synth"], run=False)
    with pytest.raises(UserError, match="longer than the language model"):
        LitVLMCLI(args=[*base, "--data.context_length", str(MAX_POSITIONS + 1)], run=False)
