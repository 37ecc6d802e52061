"""Tests of the CLIP tokenizer against token ids of openai/CLIP's own clip.tokenize.

The expected ids come from `clip.tokenize(text)` of openai/CLIP's clip/clip.py and
clip/simple_tokenizer.py, as the rf-clip 1.1 wheel packages them, with the same vocabulary file.
That is the code that the Roboflow Inference server (inference 1.8.3) tokenizes with.
"""

import gzip
import hashlib

import pytest

from embed_service.tokenizer import (
    CONTEXT_LENGTH,
    END_OF_TEXT_ID,
    START_OF_TEXT_ID,
    VOCAB_PATH,
    ClipTokenizer,
    default_tokenizer,
)

_VOCAB_SHA256 = "924691ac288e54409236115652ad4aa250f48203de50a9e4722a6ecd48d6804a"

# (text, ids of openai/CLIP's clip.tokenize without the zero padding)
_OPENAI_IDS = [
    ("a photo of a cat", [49406, 320, 1125, 539, 320, 2368, 49407]),
    ("A dog on a sofa", [49406, 320, 1929, 525, 320, 15723, 49407]),
    ("Hello, World!", [49406, 3306, 267, 1002, 256, 49407]),
    ("The dog's toy isn't here, we'll see.", [49406, 518, 1929, 568, 5988, 2923, 713, 763, 267, 649, 1342, 862, 269, 49407]),
    ("Café naïve résumé", [49406, 15304, 1097, 35689, 563, 29106, 7054, 4166, 49407]),
    ("东京塔", [49406, 19759, 250, 21078, 105, 161, 94, 498, 49407]),
    ("emoji 🐶 party", [49406, 16327, 10631, 1580, 49407]),
    ("cats &amp; dogs", [49406, 3989, 261, 3255, 49407]),
    ("\u201ccurly quotes\u201d", [49406, 257, 20795, 5808, 257, 49407]),
    ("  A  DOG\ton\na   SOFA  ", [49406, 320, 1929, 525, 320, 15723, 49407]),
    ("<|endoftext|> a cat", [49406, 49407, 320, 2368, 49407]),
    ("3.14 km/h", [49406, 274, 269, 272, 275, 4590, 270, 327, 49407]),
    ("ΣΑΣ", [49406, 139, 225, 138, 109, 139, 480, 49407]),
    ("a\u0345b", [49406, 320, 321, 49407]),
]


@pytest.fixture(scope="module")
def tokenizer() -> ClipTokenizer:
    return default_tokenizer()


def test_vocab_file_is_openai_clip():
    assert hashlib.sha256(VOCAB_PATH.read_bytes()).hexdigest() == _VOCAB_SHA256


@pytest.mark.parametrize(("text", "expected"), _OPENAI_IDS, ids=[text for text, _ in _OPENAI_IDS])
def test_ids_match_openai_clip(tokenizer, text, expected):
    assert tokenizer.encode(text) == expected


def test_long_text_cut_keeps_end_token(tokenizer):
    ids = tokenizer.encode("a " * 100)

    assert len(ids) == CONTEXT_LENGTH
    assert ids[0] == START_OF_TEXT_ID
    assert ids[1:-1] == [320] * (CONTEXT_LENGTH - 2)
    assert ids[-1] == END_OF_TEXT_ID


def test_75_text_tokens_fit_uncut(tokenizer):
    fits = "a " * (CONTEXT_LENGTH - 2)

    assert tokenizer.encode(fits) == [START_OF_TEXT_ID] + [320] * (CONTEXT_LENGTH - 2) + [END_OF_TEXT_ID]
    assert tokenizer.fit_to_context(fits) is fits


def test_ids_within_vocab(tokenizer):
    # The tiny test model and every OpenAI CLIP text tower have 49408 token embeddings.
    ids = tokenizer.encode("Ünïcödé ✓ 🐶🐱 東京 مرحبا " * 5)

    assert max(ids) <= END_OF_TEXT_ID
    assert min(ids) >= 0


def test_smaller_context():
    tokenizer = ClipTokenizer(context_length=5)

    assert tokenizer.encode("a photo of a cat") == [49406, 320, 1125, 539, 49407]


def test_fit_short_text_unchanged(tokenizer):
    text = "  A Dog on a SOFA  "

    assert tokenizer.fit_to_context(text) is text


def test_fit_cuts_after_whole_word(tokenizer):
    # 74 one-token words, then a word of several tokens that does not fit in the last place.
    text = "x " * 74 + "supercalifragilisticexpialidocious and more"
    whole = tokenizer.encode(text)

    cut = tokenizer.fit_to_context(text)

    assert cut == ("x " * 74).rstrip()
    ids = tokenizer.encode(cut)
    assert ids == whole[:75] + [END_OF_TEXT_ID]


def test_fit_cut_ids_prefix_of_cut_ids(tokenizer):
    text = "The quick brown fox jumps over the lazy dog. " * 10

    cut = tokenizer.fit_to_context(text)

    ids = tokenizer.encode(cut)
    assert len(ids) <= CONTEXT_LENGTH
    assert ids[:-1] == tokenizer.encode(text)[: len(ids) - 1]
    assert cut.startswith("the quick brown fox")


@pytest.mark.parametrize("text", ["🎉" * 80, "a" * 3000, "ab1" * 200])
def test_fit_single_long_word(tokenizer, text):
    cut = tokenizer.fit_to_context(text)

    assert cut
    assert tokenizer.fit_to_context(cut) == cut
    assert len(tokenizer.encode(cut)) <= CONTEXT_LENGTH


def test_malformed_vocab_file(tmp_path):
    path = tmp_path / "vocab.txt.gz"
    path.write_bytes(gzip.compress(b"#version: 0.2\na b\n"))

    with pytest.raises(ValueError, match="not CLIP's BPE vocabulary"):
        ClipTokenizer(vocab_path=path)


def test_default_tokenizer_shared():
    assert default_tokenizer() is default_tokenizer()
