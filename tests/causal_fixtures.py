"""A tiny causal-LM teacher saved as a Hugging Face folder (Llama, V = 32,000, briefly trained on real
text with its own small BPE tokenizer), a smaller student, and the corpus, for the causal-cache tests."""
from __future__ import annotations

from pathlib import Path

import torch
from trainer_fixtures import write_corpus
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from kdfast.data import causal_packing
from kdfast.data.corpus import documents

VOCAB = 32_000   # the model's vocabulary (head rows); the tokenizer uses its first TOKENS ids
TOKENS = 400
SEQ_LEN = 16
MAX_POSITIONS = 256


def build_tokenizer(corpus: Path, tokens: int = TOKENS) -> PreTrainedTokenizerFast:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=tokens, special_tokens=["<unk>", "<s>", "</s>"], show_progress=False)
    tokenizer.train_from_iterator(documents([str(corpus)]), trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


def llama(hidden: int, layers: int, seed: int) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(vocab_size=VOCAB, hidden_size=hidden, intermediate_size=2 * hidden,
                                        num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                                        max_position_embeddings=MAX_POSITIONS, tie_word_embeddings=False,
                                        bos_token_id=1, eos_token_id=2, attention_dropout=0.0))


def student() -> LlamaForCausalLM:
    """A 1-layer, 32-wide Llama over the teacher's vocabulary."""
    return llama(32, 1, seed=1)


def save_teacher(folder: Path, steps: int = 12) -> dict:
    """A 2-layer, 64-wide Llama trained ``steps`` AdamW steps on the corpus, saved with its tokenizer in
    ``folder/teacher``; returns the paths (teacher, corpus as .txt and .jsonl)."""
    import json

    text = write_corpus(folder, characters=6_000)
    jsonl = folder / "corpus.jsonl"
    jsonl.write_text("".join(json.dumps({"text": doc}) + "\n" for doc in documents([str(text)])))
    tokenizer = build_tokenizer(text)
    sequences = causal_packing.pack(documents([str(text)]), tokenizer, SEQ_LEN).long()
    teacher = llama(64, 2, seed=0)
    optimizer = torch.optim.AdamW(teacher.parameters(), lr=3e-3)
    generator = torch.Generator().manual_seed(0)
    for _ in range(steps):
        batch = sequences[torch.randint(0, sequences.shape[0], (8,), generator=generator)]
        teacher(input_ids=batch, labels=batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    path = folder / "teacher"
    teacher.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return {"teacher": path, "text": text, "jsonl": jsonl}
