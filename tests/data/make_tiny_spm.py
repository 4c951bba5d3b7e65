"""Train the tiny LLaMA-style SentencePiece model committed as ``tests/data/tiny_llama_spm.model``.

Run ``python tests/data/make_tiny_spm.py`` to rebuild it (needs ``sentencepiece``). The settings
follow LLaMA/Vicuna's ``tokenizer.model`` where they change how text is cut: BPE, byte fallback,
``<unk>``=0 ``<s>``=1 ``</s>``=2, no pad piece, a dummy-prefix ``▁``, digits split, whitespace kept
as it is (identity normalisation). Training runs on one thread so the result is deterministic.
"""

from __future__ import annotations

import io
import sys
from pathlib import Path

OUT = Path(__file__).with_name("tiny_llama_spm.model")
VOCAB_SIZE = 700  # + <image>, <pad> = 702 -> padded to 704 (a multiple of 64), as 32002 -> 32064

# Plain English around what the tests ask: the vicuna_v1 system line, colours, shapes, counts.
CORPUS = """\
A chat between a curious user and an artificial intelligence assistant.
The assistant gives helpful, detailed, and polite answers to the user's questions.
USER: What colour is the background? ASSISTANT: The background is grey.
USER: What colours are there? ASSISTANT: There are red, green, blue and yellow shapes.
USER: How many shapes are there? ASSISTANT: There are three shapes in the picture.
USER: Is there a circle? ASSISTANT: Yes, there is a red circle on the left.
USER: Is there a square? ASSISTANT: No, there is no square.
USER: What letter is written? ASSISTANT: The letter written in the middle is A.
Answer the question using a single word or phrase.
Answer with the option's letter from the given choices directly.
The provided image arranges keyframes from a video in a grid view.
The image shows a red circle, a blue square and a green triangle on a white background.
A small yellow star is in the top right corner of the image.
The photo was taken outside on a sunny day; the sky is blue and the grass is green.
There are 2 cats and 1 dog sitting on the sofa, and 3 birds on the window.
The numbers 0 1 2 3 4 5 6 7 8 9 10 12 24 36 144 576 appear on the sign.
What is the man holding? He is holding an umbrella.
What is the woman wearing? She is wearing a long black coat and a hat.
Where is the cat? The cat is under the table, next to the chair.
Which animal is bigger, the horse or the mouse? The horse is bigger.
Describe the image in detail. The scene shows a busy street with cars, people and shops.
Is the light on or off? The light is on.
How many people are in the photo? There are four people in the photo.
What time of day is it? It looks like early morning.
What is written on the board? The board says "open" in large white letters.
Count the apples: one, two, three, four, five.
The left half of the picture is red and the right half is blue.
The top of the image is dark and the bottom is bright.
What shape is the object in the centre? It is a circle.
Are there any trees? Yes, there are many tall trees behind the house.
What colour is the car? The car is white with a black roof.
Options: A. red B. green C. blue D. yellow
The answer is B.
yes no maybe left right top bottom middle centre corner edge
red green blue yellow white black grey orange purple pink brown
circle square triangle rectangle star line dot shape shapes
one two three four five six seven eight nine ten many few none
image picture photo video frame scene view grid
question answer user assistant chat human
""" * 2


def train(out: Path = OUT) -> Path:
    """Train the model into ``out`` and return its path."""
    import sentencepiece as spm

    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(CORPUS.splitlines()),
        model_writer=model,
        model_type="bpe",
        vocab_size=VOCAB_SIZE,
        byte_fallback=True,
        split_digits=True,
        add_dummy_prefix=True,
        remove_extra_whitespaces=False,
        normalization_rule_name="identity",
        allow_whitespace_only_pieces=True,
        split_by_unicode_script=True,
        split_by_whitespace=True,
        split_by_number=True,
        max_sentencepiece_length=16,
        character_coverage=1.0,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        unk_surface=" \u2047 ",
        num_threads=1,
        minloglevel=2,
    )
    out.write_bytes(model.getvalue())
    return out


if __name__ == "__main__":
    path = train(Path(sys.argv[1]) if len(sys.argv) > 1 else OUT)
    print(f"wrote {path} ({path.stat().st_size} bytes)")
