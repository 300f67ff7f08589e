"""Small random models of each family, with real fast tokenizers built here, so tests
need no model hub."""

from __future__ import annotations

import torch
import transformers
from tokenizers import Tokenizer, models, pre_tokenizers, processors

WORDS = [
    "a",
    "the",
    "cat",
    "dog",
    "sat",
    "on",
    "mat",
    "ran",
    "in",
    "park",
    "bird",
    "sings",
    "tree",
    "red",
    "blue",
    "green",
    "big",
    "small",
    "man",
    "woman",
    "plays",
    "guitar",
    "piano",
    "reads",
    "book",
    "eats",
    "apple",
    "is",
    "are",
    "quick",
    "brown",
    "fox",
    "jumps",
    "over",
    "lazy",
]
TEXTS = [
    "the cat sat on the mat",
    "a dog",
    "the quick brown fox jumps over the lazy dog in the park",
    "",
    "bird",
    "a man plays guitar and a woman plays piano",  # "and" is unknown
    "red blue green big small tree",
]


def word_tokenizer(
    specials: list[str],
    template: str | None,
    *,
    unk: str,
    pad: str,
    bos: str | None = None,
    eos: str | None = None,
    specials_last: bool = False,
    padding_side: str = "right",
    model_max_length: int = 64,
) -> transformers.PreTrainedTokenizerFast:
    """A whitespace word-level fast tokenizer over WORDS. ``template`` uses tokenizers'
    TemplateProcessing syntax (e.g. "[CLS] $A [SEP]"); ``specials_last`` puts the special
    tokens at the highest ids (as CLIP's end-of-text is)."""
    words = [w for w in WORDS if w not in specials]
    order = words + specials if specials_last else specials + words
    vocab = {token: index for index, token in enumerate(dict.fromkeys(order))}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token=unk))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    if template:
        used = [token for token in specials if token in template.split()]
        backend.post_processor = processors.TemplateProcessing(
            single=template, special_tokens=[(token, vocab[token]) for token in used]
        )
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=backend,
        unk_token=unk,
        pad_token=pad,
        bos_token=bos,
        eos_token=eos,
        padding_side=padding_side,
        model_max_length=model_max_length,
    )


def bert(layers: int = 4, seed: int = 0):
    torch.manual_seed(seed)
    tokenizer = word_tokenizer(
        ["[PAD]", "[UNK]", "[CLS]", "[SEP]"], "[CLS] $A [SEP]", unk="[UNK]", pad="[PAD]"
    )
    config = transformers.BertConfig(
        vocab_size=len(tokenizer),
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=layers,
        num_attention_heads=2,
        max_position_embeddings=64,
    )
    return transformers.BertModel(config).eval(), tokenizer


def clip(legacy_eos: bool, with_projection: bool = False, seed: int = 0, template: bool = True):
    """A CLIP text tower. ``legacy_eos`` writes eos_token_id=2 into the config (as configs
    made before transformers PR #24773 do); otherwise the real end-of-text id."""
    torch.manual_seed(seed)
    tokenizer = word_tokenizer(
        ["<|unk|>", "<|startoftext|>", "<|endoftext|>"],
        "<|startoftext|> $A <|endoftext|>" if template else "<|startoftext|> $A",
        unk="<|unk|>",
        pad="<|endoftext|>",
        bos="<|startoftext|>",
        eos="<|endoftext|>",
        specials_last=True,
    )
    end_of_text = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    assert end_of_text == len(tokenizer) - 1
    config = transformers.CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=3,
        num_attention_heads=2,
        max_position_embeddings=64,
        projection_dim=8,
        eos_token_id=2 if legacy_eos else end_of_text,
        pad_token_id=end_of_text,
        bos_token_id=tokenizer.convert_tokens_to_ids("<|startoftext|>"),
    )
    model_class = (
        transformers.CLIPTextModelWithProjection if with_projection else transformers.CLIPTextModel
    )
    return model_class(config).eval(), tokenizer


def t5(seed: int = 0):
    torch.manual_seed(seed)
    tokenizer = word_tokenizer(
        ["<pad>", "</s>", "<unk>"], "$A </s>", unk="<unk>", pad="<pad>", eos="</s>"
    )
    config = transformers.T5Config(
        vocab_size=len(tokenizer),
        d_model=16,
        d_ff=32,
        d_kv=8,
        num_layers=2,
        num_decoder_layers=2,
        num_heads=2,
        decoder_start_token_id=0,
        pad_token_id=0,
        eos_token_id=1,
    )
    return transformers.T5ForConditionalGeneration(config).eval(), tokenizer


def gpt2(padding_side: str, seed: int = 0):
    """GPT-2 with no pad token, as the real tokenizer has none."""
    torch.manual_seed(seed)
    tokenizer = word_tokenizer(
        ["<|endoftext|>"],
        None,
        unk="<|endoftext|>",
        pad="<|endoftext|>",
        eos="<|endoftext|>",
        padding_side=padding_side,
    )
    tokenizer.pad_token = None
    config = transformers.GPT2Config(
        vocab_size=len(tokenizer),
        n_embd=16,
        n_layer=2,
        n_head=2,
        n_positions=64,
        bos_token_id=0,
        eos_token_id=0,
    )
    return transformers.GPT2Model(config).eval(), tokenizer
