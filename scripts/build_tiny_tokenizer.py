"""Build the tiny, offline Qwen2-style tokenizer shipped with cached-diffusers.

The tiny Qwen-Image pipeline (:mod:`cached_diffusers.tools.tiny`) needs a tokenizer that ``transformers.Qwen2Tokenizer``
loads without the Hugging Face Hub. This script trains one with the ``tokenizers`` library and writes it to
``cached_diffusers/assets/qwen2-tiny-tokenizer/``:

* the same text processing as Qwen2's tokenizer: NFC normalization, the Qwen2 split regex, byte-level BPE with
  byte-level decoding (every string tokenizes, words the corpus lacks fall back to byte tokens);
* the Qwen2.5-VL special tokens up to ``<|video_pad|>``, in Qwen's order, after the BPE vocabulary (Qwen-Image's
  text encoder is Qwen2.5-VL); ``<|endoftext|>`` is the pad token and ``<|im_end|>`` the end-of-sequence token;
* a vocabulary of at most :data:`MAX_BPE_VOCAB` BPE entries, learned from :func:`build_corpus`: the chat template
  that ``diffusers.QwenImagePipeline`` wraps prompts in, plus a few hundred common words of image prompts.

The template's words all become single tokens, so the system prefix before the user prompt is exactly 34 tokens,
as with the real Qwen tokenizer; the pipeline drops that many hidden states (``prompt_template_encode_start_idx``).
The script checks this before writing.

Training is deterministic: running the script again writes byte-identical files. Usage (from the repository root)::

    python scripts/build_tiny_tokenizer.py [--output-dir DIR]
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path
from typing import Sequence

from tokenizers import AddedToken, Regex, Tokenizer, decoders, normalizers, pre_tokenizers, processors, trainers
from tokenizers.models import BPE


DEFAULT_OUTPUT_DIR = Path(__file__).resolve().parents[1] / "cached_diffusers" / "assets" / "qwen2-tiny-tokenizer"

# Qwen2's pre-tokenizer split pattern (`PRETOKENIZE_REGEX` in `transformers.models.qwen2.tokenization_qwen2`): text is
# cut into these pieces before byte-level BPE, and merges never cross a piece boundary.
SPLIT_PATTERN = "|".join(
    [
        r"(?i:'s|'t|'re|'ve|'m|'ll|'d)",  # English contractions
        r"[^\r\n\p{L}\p{N}]?\p{L}+",  # a word, with one leading space or punctuation character
        r"\p{N}",  # a single digit
        r" ?[^\s\p{L}\p{N}]+[\r\n]*",  # punctuation, with a leading space and trailing newlines
        r"\s*[\r\n]+",  # newlines
        r"\s+(?!\S)",  # spaces not followed by a word (the last space goes with the word)
        r"\s+",
    ]
)

# Qwen2.5-VL's special tokens, in the order of their ids (151643, 151644, ... in the real vocabulary).
SPECIAL_TOKENS = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|object_ref_start|>",
    "<|object_ref_end|>",
    "<|box_start|>",
    "<|box_end|>",
    "<|quad_start|>",
    "<|quad_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
]
PAD_TOKEN = "<|endoftext|>"
EOS_TOKEN = "<|im_end|>"

MAX_BPE_VOCAB = 4096
"""Upper bound on BPE entries (256 byte symbols + merges); the corpus below needs fewer, so training stops when every
corpus word is one token."""

# `diffusers.QwenImagePipeline.prompt_template_encode` and `prompt_template_encode_start_idx`.
PROMPT_TEMPLATE = (
    "<|im_start|>system\nDescribe the image by detailing the color, shape, size, texture, quantity, text, spatial "
    "relationships of the objects and background:<|im_end|>\n<|im_start|>user\n{}<|im_end|>\n<|im_start|>assistant\n"
)
PROMPT_TEMPLATE_START_IDX = 34

# Common words of image prompts, grouped by topic. Every word here becomes a single token (with and without a leading
# space); anything else still tokenizes, as several byte-level pieces.
WORDS = {
    "function": """a an the of and or with without in on at to from by for into onto over under above below behind
        beside between near far next inside outside front back left right top bottom middle center side its their his
        her this that these those is are was be very some many few no not""",
    "quantity": """one two three four five six seven eight nine ten single pair couple group several dozen lots
        crowd""",
    "color": """red orange yellow green blue purple violet pink brown black white gray grey gold golden silver beige
        cyan magenta teal turquoise navy maroon olive lime indigo crimson scarlet amber ivory cream colorful
        colourful pastel neon dark light bright pale vivid muted monochrome rainbow""",
    "shape": """circle circular round square rectangle rectangular triangle triangular oval sphere cube cone
        cylinder pyramid star heart diamond hexagon spiral curved straight wavy pointed flat""",
    "size": """tiny small little medium large big huge giant enormous massive tall short long wide narrow thin thick
        slim fat miniature""",
    "texture": """smooth rough soft hard shiny glossy matte fluffy furry fuzzy wooden metal metallic glass plastic
        stone rock brick paper fabric cotton silk leather wool velvet marble concrete sandy wet dry icy frozen
        transparent reflective rusty dusty striped spotted dotted checkered patterned""",
    "animal": """cat cats kitten dog dogs puppy horse cow pig sheep goat rabbit bunny mouse rat fox wolf bear panda
        lion tiger leopard elephant giraffe zebra monkey deer camel kangaroo koala squirrel hedgehog owl eagle
        parrot duck chicken penguin swan bird birds fish shark whale dolphin octopus turtle frog snake lizard
        dragon butterfly bee spider insect dinosaur unicorn""",
    "people": """man woman boy girl child children baby person people family friends king queen knight wizard
        robot astronaut pirate chef doctor farmer soldier dancer artist""",
    "object": """apple banana orange cherry lemon strawberry grape pear bread cake pizza cup mug bowl plate bottle
        glass chair table bed sofa lamp clock book books pen pencil box bag hat shoe shoes shirt dress coat umbrella
        ball toy kite balloon balloons flower flowers rose tulip tree trees leaf leaves plant car bus truck train
        bicycle bike boat ship plane airplane rocket house houses castle tower bridge door window wall fence road
        street city village building robot computer phone camera guitar piano violin drum candle key crown sword
        shield vase mirror flag sign""",
    "scene": """sky cloud clouds sun moon stars planet space ocean sea lake river water beach sand island mountain
        mountains hill forest jungle desert field garden park meadow valley cave waterfall snow rain storm fog mist
        wind grass ground floor room kitchen street market night day morning evening sunset sunrise winter summer
        spring autumn background foreground landscape scene""",
    "action": """sitting standing running walking flying swimming sleeping jumping eating drinking holding wearing
        playing reading looking smiling dancing singing riding floating falling glowing burning shining""",
    "style": """photo photograph photorealistic realistic painting drawing sketch illustration cartoon anime
        watercolor oil digital art render rendering pixel poster portrait closeup view aerial detailed sharp
        blurry blur cinematic lighting shadow shadows soft warm cold cool beautiful cute old new ancient modern
        futuristic vintage simple minimal abstract high low quality resolution bad ugly distorted noisy watermark
        text letters word words logo number""",
}


def prompt_words() -> list[str]:
    """The prompt vocabulary: :data:`WORDS` flattened, without repeats, in a fixed order."""
    words = []
    for group in WORDS.values():
        for word in group.split():
            if word not in words:
                words.append(word)
    return words


def build_corpus(extra_words: Sequence[str] = ()) -> list[str]:
    """The fixed training corpus, one string per training "sentence".

    The chat template is split at its special tokens (the BPE model never sees those; they are added tokens), and
    each prompt word (:func:`prompt_words`, then ``extra_words`` not already among them) appears both at the start of
    a sentence and after a space.
    """
    special = "|".join(re.escape(token) for token in SPECIAL_TOKENS)
    template_pieces = [piece for piece in re.split(special, PROMPT_TEMPLATE.replace("{}", "")) if piece]
    words = prompt_words()
    words += [word for word in dict.fromkeys(extra_words) if word not in set(words)]
    return template_pieces + words + [" " + word for word in words]


def train_tokenizer(extra_words: Sequence[str] = (), max_vocab: int = MAX_BPE_VOCAB) -> Tokenizer:
    """Trains the byte-level BPE tokenizer on :func:`build_corpus` (with ``extra_words``), at most ``max_vocab`` BPE
    entries, and adds :data:`SPECIAL_TOKENS` after its vocab."""
    tokenizer = Tokenizer(
        BPE(unk_token=None, continuing_subword_prefix="", end_of_word_suffix="", fuse_unk=False, byte_fallback=False)
    )
    tokenizer.normalizer = normalizers.NFC()
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(SPLIT_PATTERN), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False),
        ]
    )
    tokenizer.post_processor = processors.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)
    tokenizer.decoder = decoders.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)

    trainer = trainers.BpeTrainer(
        vocab_size=max_vocab,
        min_frequency=0,
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tokenizer.train_from_iterator(build_corpus(extra_words), trainer=trainer)
    tokenizer.add_special_tokens([AddedToken(token, special=True, normalized=False) for token in SPECIAL_TOKENS])
    return tokenizer


def tokenizer_config(tokenizer: Tokenizer) -> dict:
    """``tokenizer_config.json`` in the layout of Qwen2.5-VL's, for ``transformers.Qwen2Tokenizer``."""
    added_tokens_decoder = {
        str(tokenizer.token_to_id(token)): {
            "content": token,
            "lstrip": False,
            "normalized": False,
            "rstrip": False,
            "single_word": False,
            "special": True,
        }
        for token in SPECIAL_TOKENS
    }
    return {
        "add_bos_token": False,
        "add_prefix_space": False,
        "added_tokens_decoder": added_tokens_decoder,
        "additional_special_tokens": [token for token in SPECIAL_TOKENS if token not in (PAD_TOKEN, EOS_TOKEN)],
        "bos_token": None,
        "clean_up_tokenization_spaces": False,
        "eos_token": EOS_TOKEN,
        "errors": "replace",
        "model_max_length": 32768,
        "pad_token": PAD_TOKEN,
        "padding_side": "right",
        "split_special_tokens": False,
        "tokenizer_class": "Qwen2Tokenizer",
        "unk_token": None,
    }


def check_template_prefix(tokenizer: Tokenizer) -> None:
    """Raises ``ValueError`` unless the template's text before the user prompt is
    :data:`PROMPT_TEMPLATE_START_IDX` tokens, the number of hidden states ``QwenImagePipeline`` drops."""
    prefix = PROMPT_TEMPLATE.split("{}")[0]
    num_tokens = len(tokenizer.encode(prefix).ids)
    if num_tokens != PROMPT_TEMPLATE_START_IDX:
        raise ValueError(f"The template prefix is {num_tokens} tokens, expected {PROMPT_TEMPLATE_START_IDX}.")


def build_tokenizer(
    output_dir: str | Path = DEFAULT_OUTPUT_DIR, extra_words: Sequence[str] = (), max_vocab: int = MAX_BPE_VOCAB
) -> Path:
    """Trains the tokenizer (see :func:`train_tokenizer`) and writes ``tokenizer.json``, ``vocab.json``,
    ``merges.txt`` and ``tokenizer_config.json`` to ``output_dir`` (created if missing). Returns ``output_dir`` as a
    ``Path``. The defaults write the shipped tiny tokenizer."""
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)

    tokenizer = train_tokenizer(extra_words, max_vocab)
    check_template_prefix(tokenizer)

    tokenizer.save(str(output_dir / "tokenizer.json"), pretty=True)
    tokenizer.model.save(str(output_dir))  # vocab.json and merges.txt
    with open(output_dir / "tokenizer_config.json", "w", encoding="utf-8") as f:
        json.dump(tokenizer_config(tokenizer), f, indent=2, sort_keys=True, ensure_ascii=False)
        f.write("\n")
    return output_dir


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output-dir", type=Path, default=DEFAULT_OUTPUT_DIR, help="where to write the files")
    args = parser.parse_args()
    output_dir = build_tokenizer(args.output_dir)
    vocab_size = len(json.loads((output_dir / "vocab.json").read_text(encoding="utf-8")))
    print(f"Wrote a tokenizer with {vocab_size} BPE entries + {len(SPECIAL_TOKENS)} special tokens to {output_dir}")


if __name__ == "__main__":
    main()
