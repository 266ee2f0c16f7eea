"""Build the byte-level BPE tokenizer of the built-in model ``loops-local/tiny-chat``.

Writes ``loops_async/assets/tiny-chat/{tokenizer.json, tokenizer_config.json,
special_tokens_map.json}``, which ``transformers.AutoTokenizer.from_pretrained`` loads offline.
The corpus is spelled out below (small English + digits + arithmetic + word reversal), and the
run is deterministic: re-running the script reproduces the same files byte for byte.

    python scripts/build_tiny_chat_tokenizer.py [--out DIR] [--check]

Design:

- Byte-level BPE (any UTF-8 text round-trips), 1024 tokens in all: the special tokens first
  (ids 0-5), then the 256 byte symbols, then merges.
- Digits are always split one per token (so ``12+34=46`` tokenises as ``1 2 + 3 4 = 4 6`` and a
  number's tokens never depend on its neighbours).
- Chat format (no automatic BOS/EOS in plain ``encode``; the chat template adds them)::

      <|bos|><|system|>...<|end|><|user|>...<|end|><|assistant|>...<|end|>

  ``<|end|>`` (id 2) is the EOS token: generation stops there. The assistant's content and its
  ``<|end|>`` are wrapped in ``{% generation %}`` so ``return_assistant_tokens_mask=True`` works.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

VOCAB_SIZE = 1024
MODEL_MAX_LENGTH = 1024
SPECIAL_TOKENS = [
    "<|pad|>",  # 0
    "<|bos|>",  # 1
    "<|end|>",  # 2  (eos)
    "<|user|>",  # 3
    "<|assistant|>",  # 4
    "<|system|>",  # 5
]
PAD, BOS, EOS = "<|pad|>", "<|bos|>", "<|end|>"

CHAT_TEMPLATE = (
    "{{- bos_token -}}"
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'system' -%}"
    "{{- '<|system|>' + message['content'] + '<|end|>' -}}"
    "{%- elif message['role'] == 'user' -%}"
    "{{- '<|user|>' + message['content'] + '<|end|>' -}}"
    "{%- elif message['role'] == 'assistant' -%}"
    "{{- '<|assistant|>' -}}"
    "{%- generation -%}"
    "{{- message['content'] + '<|end|>' -}}"
    "{%- endgeneration -%}"
    "{%- else -%}"
    "{{- raise_exception('tiny-chat knows the roles system, user and assistant, not '"
    " + message['role']) -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}"
    "{{- '<|assistant|>' -}}"
    "{%- endif -%}"
)

_TEXT = """
Hello! How can I help you today?
Hi there. I am a small language model that runs on your own computer.
Please answer the question in one word.
What is the capital of France? The capital of France is Paris.
What is the answer? The answer is the sum of the two numbers.
Reverse the word and write it backwards, one letter at a time.
Add the two numbers and give only the result.
Thank you very much. You are welcome, have a nice day.
The quick brown fox jumps over the lazy dog.
A model learns from examples: it reads the prompt and predicts the next token.
Training makes the loss go down, step by step, until the answers are right.
The teacher asked the students to count from one to ten and back again.
We walked to the park in the morning and came home in the evening.
She said that the weather would be warm and sunny for the rest of the week.
They went to the market to buy apples, bread, milk, cheese and some fresh water.
This is a test of the tokenizer. It should split text into useful pieces.
If you do not know the answer, say that you do not know.
The cat sat on the mat, and the dog slept by the door.
Write a short story about a robot who wants to learn how to paint.
Can you explain why the sky is blue? Light from the sun is scattered by the air.
Good morning, good afternoon, good evening and good night.
Yes, no, maybe, always, never, sometimes, often, rarely, again, first, last, next.
The system prompt tells the assistant how to behave; the user asks, the assistant answers.
Numbers: zero, one, two, three, four, five, six, seven, eight, nine, ten, eleven, twelve,
twenty, thirty, forty, fifty, sixty, seventy, eighty, ninety, hundred, thousand, million.
Colors: red, orange, yellow, green, blue, purple, black, white, brown, gray, pink.
Animals: cat, dog, bird, fish, horse, cow, sheep, lion, tiger, bear, mouse, rabbit, snake.
Food: apple, banana, orange, bread, rice, soup, cake, water, coffee, tea, sugar, salt.
Words: house, tree, river, mountain, city, road, school, book, paper, window, table, chair,
light, music, friend, family, people, world, time, year, day, week, month, hour, minute.
Verbs: be, have, do, say, get, make, go, know, take, see, come, think, look, want, give,
use, find, tell, ask, work, seem, feel, try, leave, call, write, read, learn, play, run.
Adjectives: good, new, first, last, long, great, little, own, other, old, right, big, high,
small, large, next, early, young, important, few, public, bad, same, able, happy, simple.
Questions: who, what, when, where, why, how, which, whose. Is it true? Are you sure?
Math: plus, minus, times, divided by, equals, sum, difference, product, total, result.
Once upon a time there was a little village near a big forest. Every morning the people of
the village woke up early, made breakfast and went out to work in the fields. The children
played games, sang songs and listened to stories about the old days. One day a stranger
arrived with a heavy bag and a friendly smile, and asked if anyone could give him a place
to stay for the night. The baker offered him a warm room above the shop, and in return the
stranger told them about the cities he had seen, the ships he had sailed and the mountains
he had climbed. When he left, he gave the children a small wooden box full of paper stars.
Computers store numbers as bits. A program is a list of instructions that a computer follows.
To solve a problem, break it into smaller parts, solve each part, and then put them together.
Practice every day, keep notes, check your work, and ask for help when you need it.
The library opens at nine o'clock and closes at six. Please return your books on time.
It was raining, so we stayed inside, drank hot chocolate and played cards by the fire.
Remember: the answer should be short, correct and written in plain English.
"""

_WORD_LIST = (
    "apple banana cherry house river mountain garden window letter pencil table chair "
    "orange purple yellow silver winter summer spring autumn monday friday planet ocean "
    "forest desert castle dragon rocket guitar piano violin candle mirror basket bottle "
    "bridge tunnel island valley thunder shadow kitten puppy turtle rabbit monkey parrot "
    "hello world python model token answer reverse number simple little"
)
_WORDS = _WORD_LIST.split()


def corpus() -> list[str]:
    """The training corpus: prose, word lists, arithmetic and reversal examples."""
    lines = [line for line in _TEXT.strip().splitlines() if line]
    for a in range(0, 100, 3):
        for b in range(1, 100, 7):
            lines.append(f"What is {a} + {b}? {a + b}")
            lines.append(f"{a}+{b}={a + b}")
            lines.append(f"{a} - {b} = {a - b}, {a} * {b} = {a * b}")
    for word in _WORDS:
        spaced = " ".join(reversed(word))
        lines.append(f"Reverse the word: {word}. Answer: {spaced}")
        lines.append(f"reverse {word} -> {spaced}")
    lines.extend(
        f"In {year}, on {year % 28 + 1} May at {year % 24}:{year % 60:02d}."
        for year in range(1990, 2031)
    )
    return lines


def build() -> Tokenizer:
    """Train the tokenizer on :func:`corpus` (deterministic)."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        min_frequency=1,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus(), trainer=trainer)
    return tok


def _json(obj: object) -> str:
    return json.dumps(obj, indent=2, ensure_ascii=False, sort_keys=False) + "\n"


def render() -> dict[str, str]:
    """File name -> content of every file the tokenizer directory holds."""
    tok = build()
    assert tok.get_vocab_size() <= VOCAB_SIZE, tok.get_vocab_size()
    for i, name in enumerate(SPECIAL_TOKENS):
        assert tok.token_to_id(name) == i, (name, tok.token_to_id(name))
    # Compact JSON keeps the file small; re-serialising through json makes the key order and
    # spacing independent of the tokenizers version's pretty-printer.
    tokenizer_json = json.dumps(json.loads(tok.to_str()), ensure_ascii=False) + "\n"
    added = {
        str(i): {
            "content": name,
            "lstrip": False,
            "normalized": False,
            "rstrip": False,
            "single_word": False,
            "special": True,
        }
        for i, name in enumerate(SPECIAL_TOKENS)
    }
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "added_tokens_decoder": added,
        "additional_special_tokens": SPECIAL_TOKENS[3:],
        "bos_token": BOS,
        "eos_token": EOS,
        "pad_token": PAD,
        "clean_up_tokenization_spaces": False,
        "model_max_length": MODEL_MAX_LENGTH,
        "padding_side": "right",
        "chat_template": CHAT_TEMPLATE,
    }
    special_map = {
        "bos_token": BOS,
        "eos_token": EOS,
        "pad_token": PAD,
        "additional_special_tokens": SPECIAL_TOKENS[3:],
    }
    return {
        "tokenizer.json": tokenizer_json,
        "tokenizer_config.json": _json(config),
        "special_tokens_map.json": _json(special_map),
    }


def main(argv: list[str] | None = None) -> int:
    """Write (or with ``--check``, compare) the tokenizer files."""
    default_out = Path(__file__).resolve().parents[1] / "loops_async" / "assets" / "tiny-chat"
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=default_out)
    parser.add_argument(
        "--check", action="store_true", help="fail if the files on disk differ from a fresh build"
    )
    args = parser.parse_args(argv)
    files = render()
    if args.check:
        stale = [
            name
            for name, text in files.items()
            if not (args.out / name).is_file()
            or (args.out / name).read_text(encoding="utf-8") != text
        ]
        if stale:
            print(f"out of date in {args.out}: {', '.join(stale)}", file=sys.stderr)
            return 1
        print(f"{args.out}: up to date")
        return 0
    args.out.mkdir(parents=True, exist_ok=True)
    for name, text in files.items():
        (args.out / name).write_text(text, encoding="utf-8")
        print(f"wrote {args.out / name} ({len(text.encode())} bytes)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
