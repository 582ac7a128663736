"""Train the default model from text that ships with every Python install: `python -m
inference.train_default`.

Corpus: the Python reference documentation bundled as `pydoc_data.topics` (plain English prose,
~700 kB), plus /usr/share/common-licenses when present. The tokenizer is a byte-level BPE (no unknown
tokens, any UTF-8 round-trips) with `<|endoftext|>` between documents. Training is a fixed number of
steps with a fixed seed, so a rerun on the same corpus reproduces the model up to float rounding.
Writes config.json, model.safetensors (fp16) and tokenizer.json into inference/default_model/.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import time
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from inference.model import GPT, GPTConfig, save_checkpoint
from inference.tokenizer import DEFAULT_MODEL_DIR, END_OF_TEXT, TOKENIZER_FILE_NAME, TextTokenizer

LICENSES_DIR = Path("/usr/share/common-licenses")
VOCAB_SIZE = 2048
MODEL_CONFIG = GPTConfig(vocab_size=VOCAB_SIZE, block_size=512, n_layer=4, n_head=6, n_embd=192)


def corpus_documents() -> list[str]:
    import pydoc_data.topics

    documents = [text for _, text in sorted(pydoc_data.topics.topics.items())]
    if LICENSES_DIR.is_dir():
        for path in sorted(LICENSES_DIR.iterdir()):
            if path.is_file():
                documents.append(path.read_text(encoding="utf-8", errors="replace"))
    assert documents, "no training text found"
    return documents


def train_tokenizer(documents: list[str]) -> Tokenizer:
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=[END_OF_TEXT],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(documents, trainer=trainer)
    return tokenizer


def encode_corpus(tokenizer: TextTokenizer, documents: list[str]) -> torch.Tensor:
    ids: list[int] = []
    for document in documents:
        ids.extend(tokenizer.encode(document))
        ids.append(tokenizer.eos_token_id)
    return torch.tensor(ids, dtype=torch.long)


def learning_rate(step: int, steps: int, peak: float, warmup_steps: int) -> float:
    if step < warmup_steps:
        return peak * (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, steps - warmup_steps)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def train(args: argparse.Namespace) -> None:
    torch.manual_seed(args.seed)
    random.seed(args.seed)
    torch.set_num_threads(args.threads)
    documents = corpus_documents()
    output_dir: Path = args.output_dir
    output_dir.mkdir(parents=True, exist_ok=True)
    train_tokenizer(documents).save(str(output_dir / TOKENIZER_FILE_NAME))
    tokenizer = TextTokenizer.from_directory(output_dir)
    data = encode_corpus(tokenizer, documents)
    config = GPTConfig(**{**MODEL_CONFIG.__dict__, "eos_token_id": tokenizer.eos_token_id})
    model = GPT(config)
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=args.learning_rate, betas=(0.9, 0.95), weight_decay=0.1
    )
    print(
        json.dumps({"corpus_tokens": data.numel(), "parameters": sum(p.numel() for p in model.parameters())})
    )
    started = time.monotonic()
    for step in range(args.steps):
        starts = torch.randint(0, data.numel() - args.sequence_tokens - 1, (args.batch_size,))
        inputs = torch.stack([data[s : s + args.sequence_tokens] for s in starts])  # (B, T)
        targets = torch.stack([data[s + 1 : s + 1 + args.sequence_tokens] for s in starts])  # (B, T)
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(step, args.steps, args.learning_rate, warmup_steps=args.steps // 20)
        logits = model(inputs)
        loss = torch.nn.functional.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        if step % 50 == 0 or step == args.steps - 1:
            elapsed = time.monotonic() - started
            print(
                json.dumps({"step": step, "loss": round(loss.item(), 4), "elapsed_s": round(elapsed, 1)}),
                flush=True,
            )
    save_checkpoint(model, output_dir, dtype=torch.float16)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--output-dir", type=Path, default=DEFAULT_MODEL_DIR)
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--sequence-tokens", type=int, default=128)
    parser.add_argument("--learning-rate", type=float, default=3e-3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=1337)
    train(parser.parse_args())


if __name__ == "__main__":
    main()
