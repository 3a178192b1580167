"""Build the tiny demo Llama checkpoints offline, from a fixed seed.

Runs in the engine environment (.venv-engine: torch, transformers, tokenizers), never in sem's.
Each model is a complete Hugging Face folder that vLLM serves: config.json, model.safetensors,
tokenizer.json, tokenizer_config.json, special_tokens_map.json, generation_config.json.
The weights are random, so the text is gibberish, but the serving path is real.

Rebuilding gives byte-identical files (a test checks it). A model folder that is already complete
is left alone unless --force is given.

    .venv-engine/bin/python scripts/build_demo_models.py --out models
"""

from __future__ import annotations

import argparse
import hashlib
import shutil
import sys
import tempfile
from pathlib import Path

# Shapes seen serving on vLLM's CPU backend (engine-notes.md): head_dim must be >= 32; 64 is safe.
HIDDEN = 128
HEADS = 2
KV_HEADS = 1
LAYERS = 2
INTERMEDIATE = 256
VOCAB = 1024
MAX_POSITIONS = 2048

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>\\n' + message['content'] }}"
    "{% if not loop.last or add_generation_prompt %}{{ eos_token + '\\n' }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}"
)

MODELS = {
    # name: (seed, chat template or None)
    "tiny-llama-base": (1234, None),
    "tiny-llama-chat": (5678, CHAT_TEMPLATE),
}

REQUIRED_FILES = (
    "config.json",
    "generation_config.json",
    "model.safetensors",
    "tokenizer.json",
    "tokenizer_config.json",
)

# A fixed, local training text for the byte-level BPE tokenizer.
CORPUS_WORDS = [
    "the",
    "a",
    "an",
    "of",
    "to",
    "and",
    "in",
    "is",
    "it",
    "that",
    "for",
    "on",
    "with",
    "as",
    "was",
    "at",
    "by",
    "be",
    "this",
    "from",
    "or",
    "have",
    "not",
    "are",
    "model",
    "engine",
    "server",
    "request",
    "token",
    "prompt",
    "stream",
    "reply",
    "queue",
    "memory",
    "device",
    "replica",
    "gateway",
    "supervisor",
    "hello",
    "world",
    "chat",
    "user",
    "assistant",
    "system",
    "answer",
    "question",
    "llama",
    "tiny",
    "base",
    "cache",
    "start",
    "stop",
    "drain",
    "ready",
    "pending",
    "failed",
    "restart",
    "health",
    "metric",
    "route",
    "load",
    "balance",
    "retry",
    "one",
    "two",
    "three",
    "four",
    "five",
    "six",
    "seven",
    "eight",
    "nine",
    "ten",
    "zero",
    "yes",
    "no",
    "please",
    "thank",
    "you",
    "good",
]


def corpus_lines(seed: int, count: int = 4000) -> list[str]:
    """Deterministic pseudo-sentences (a linear congruential generator: no global RNG state)."""
    state = seed
    lines = []
    for _ in range(count):
        words = []
        for _ in range(12):
            state = (state * 6364136223846793005 + 1442695040888963407) % 2**64
            words.append(CORPUS_WORDS[(state >> 33) % len(CORPUS_WORDS)])
        lines.append(" ".join(words).capitalize() + ".")
    return lines


def build_tokenizer(folder: Path, chat_template: str | None) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB,
        special_tokens=["<unk>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus_lines(seed=42), trainer=trainer)
    bos_id = tok.token_to_id("<s>")
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", bos_id)]
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )
    if chat_template is not None:
        fast.chat_template = chat_template
    fast.model_max_length = MAX_POSITIONS
    fast.save_pretrained(folder)


def build_model(folder: Path, seed: int) -> None:
    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=HIDDEN,
        intermediate_size=INTERMEDIATE,
        num_hidden_layers=LAYERS,
        num_attention_heads=HEADS,
        num_key_value_heads=KV_HEADS,
        max_position_embeddings=MAX_POSITIONS,
        bos_token_id=1,
        eos_token_id=2,
        tie_word_embeddings=False,
        torch_dtype="float32",
    )
    model = LlamaForCausalLM(config)
    model.save_pretrained(folder, safe_serialization=True)
    GenerationConfig(bos_token_id=1, eos_token_id=2).save_pretrained(folder)


def is_complete(folder: Path) -> bool:
    return all((folder / name).is_file() for name in REQUIRED_FILES)


def digest(folder: Path) -> str:
    h = hashlib.sha256()
    for path in sorted(folder.iterdir()):
        h.update(path.name.encode())
        h.update(path.read_bytes())
    return h.hexdigest()[:16]


def build(out: Path, name: str, force: bool) -> None:
    folder = out / name
    if is_complete(folder) and not force:
        print(f"{name}: present ({folder}), digest {digest(folder)}")
        return
    seed, chat_template = MODELS[name]
    print(f"{name}: building from seed {seed} ...", flush=True)
    out.mkdir(parents=True, exist_ok=True)
    # Build in a scratch folder and rename, so a half-built model is never taken for complete.
    with tempfile.TemporaryDirectory(dir=out, prefix=f".{name}-") as scratch:
        work = Path(scratch) / name
        build_tokenizer(work, chat_template)
        build_model(work, seed)
        if folder.exists():
            shutil.rmtree(folder)
        work.rename(folder)
    print(f"{name}: built ({folder}), digest {digest(folder)}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("models"))
    parser.add_argument("--force", action="store_true", help="rebuild even if present")
    parser.add_argument("names", nargs="*", default=sorted(MODELS), help="models to build")
    args = parser.parse_args(argv)
    unknown = [n for n in args.names if n not in MODELS]
    if unknown:
        print(f"unknown demo model(s): {', '.join(unknown)}; known: {', '.join(MODELS)}")
        return 2
    for name in args.names:
        build(args.out, name, args.force)
    return 0


if __name__ == "__main__":
    sys.exit(main())
