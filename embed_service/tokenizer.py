"""CLIP's text tokenizer: OpenAI's BPE vocabulary run by Hugging Face tokenizers, with clip.tokenize's ids."""

import gzip
import html
import threading
from pathlib import Path

import ftfy
from tokenizers import Regex, Tokenizer, models, normalizers, pre_tokenizers, processors

VOCAB_PATH = Path(__file__).resolve().parent / "clip_vocab" / "bpe_simple_vocab_16e6.txt.gz"
# Number of token positions of every OpenAI CLIP text tower, start and end tokens included.
CONTEXT_LENGTH = 77
START_OF_TEXT = "<|startoftext|>"
END_OF_TEXT = "<|endoftext|>"
START_OF_TEXT_ID = 49406
END_OF_TEXT_ID = 49407
VOCAB_SIZE = 49408

# openai/CLIP clip/simple_tokenizer.py reads this many merges after the file's header line, so that
# 256 byte symbols, their 256 end-of-word forms, the merges and 2 special tokens make VOCAB_SIZE.
_MERGE_COUNT = VOCAB_SIZE - 2 * 256 - 2
_END_OF_WORD = "</w>"
# The word pattern of openai/CLIP clip/simple_tokenizer.py. Its two special tokens are left out,
# because the tokenizer matches them as added tokens before this split.
_WORD_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""
# U+0345 COMBINING GREEK YPOGEGRAMMENI. openai/CLIP matches its word pattern with re.IGNORECASE,
# under which no branch matches this character, because its case fold is a letter. So the character
# is dropped and separates the words on either side, as a space does.
_UNMATCHED_CHARACTER = "\u0345"


class ClipTokenizer:
    """Turns text into the token ids of openai/CLIP's `clip.tokenize(text, truncate=True)`.

    As there, the text is cleaned: ftfy.fix_text, HTML unescaped twice, stripped, whitespace runs
    made one space, and lower-cased. It is then split into words and byte-pair encoded. The start
    and end tokens are added, and the ids are cut to context_length with the end token kept last.
    Safe to share between threads.
    """

    def __init__(self, vocab_path: Path = VOCAB_PATH, context_length: int = CONTEXT_LENGTH):
        """Build the tokenizer from an openai/CLIP vocabulary file. Raises ValueError for a malformed file."""
        self.context_length = context_length
        self._tokenizer = _build_tokenizer(vocab_path, context_length)

    def encode(self, text: str) -> list[int]:
        """Return the ids of text: START_OF_TEXT_ID, at most context_length - 2 ids, END_OF_TEXT_ID."""
        return self._tokenizer.encode(clean_text(text)).ids

    def fit_to_context(self, text: str) -> str:
        """Return text unchanged when its ids fit the context, else its cleaned form cut so that they fit.

        The cut falls after the last whole word that fits, or inside the first word when even that
        one is too long. The ids of the cut text may therefore differ from encode(text) in the last
        word's tokens. It is for servers that reject long text instead of cutting it.

        NOTE: such a server cleans the cut text again. That changes it only where the text nests HTML
        entities three or more deep, such as "&amp;amp;amp;", which the second cleaning unescapes further.
        """
        cleaned = clean_text(text)
        encoding = self._tokenizer.encode(cleaned)
        if not encoding.overflowing:
            return text

        # The first and last ids are the start and end tokens. A token that ends with "</w>" ends a word.
        tokens, token_ends = encoding.tokens[1:-1], [end for _, end in encoding.offsets[1:-1]]
        word_ends = [end for token, end in zip(tokens, token_ends, strict=True) if token.endswith(_END_OF_WORD)]
        cuts = word_ends[-1:] + [end for end in reversed(token_ends) if not word_ends or end < word_ends[-1]]
        # A cut after a whole word encodes to the same ids as before, so it fits. A cut inside a word is
        # encoded anew, which may take more tokens. The last cut keeps one token, which always fits.
        for end in cuts[:-1]:
            if not self._tokenizer.encode(cleaned[:end]).overflowing:
                return cleaned[:end]
        return cleaned[: cuts[-1]]


def clean_text(text: str) -> str:
    """Clean text as openai/CLIP does before it splits words, except for whitespace runs.

    The tokenizer's normalizer makes each whitespace run one space, with the regex engine of
    Hugging Face tokenizers, whose \\s matches the same characters as that of the regex package.
    """
    text = html.unescape(html.unescape(ftfy.fix_text(text)))
    return text.strip().lower().replace(_UNMATCHED_CHARACTER, " ")


_default_lock = threading.Lock()
_default: ClipTokenizer | None = None


def default_tokenizer() -> ClipTokenizer:
    """Return the shared tokenizer over VOCAB_PATH, building it on the first call."""
    global _default
    with _default_lock:
        if _default is None:
            _default = ClipTokenizer()
        return _default


def _build_tokenizer(vocab_path: Path, context_length: int) -> Tokenizer:
    merges = _read_merges(vocab_path)
    symbols = _byte_symbols()
    vocab = symbols + [symbol + _END_OF_WORD for symbol in symbols]
    vocab += ["".join(pair) for pair in merges] + [START_OF_TEXT, END_OF_TEXT]

    tokenizer = Tokenizer(
        models.BPE(
            vocab={token: index for index, token in enumerate(vocab)},
            merges=merges,
            continuing_subword_prefix="",
            end_of_word_suffix=_END_OF_WORD,
        )
    )
    tokenizer.normalizer = normalizers.Replace(Regex(r"\s+"), " ")
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(_WORD_PATTERN), behavior="removed", invert=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tokenizer.add_special_tokens([START_OF_TEXT, END_OF_TEXT])
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{START_OF_TEXT} $A {END_OF_TEXT}",
        special_tokens=[(START_OF_TEXT, START_OF_TEXT_ID), (END_OF_TEXT, END_OF_TEXT_ID)],
    )
    # The limit counts the start and end tokens, so that at most context_length - 2 text tokens stay.
    tokenizer.enable_truncation(max_length=context_length)
    return tokenizer


def _read_merges(vocab_path: Path) -> list[tuple[str, str]]:
    """Return the merges of an openai/CLIP vocabulary file: a header line, then one "a b" pair a line."""
    lines = gzip.decompress(vocab_path.read_bytes()).decode("utf-8").split("\n")
    merges = [tuple(line.split()) for line in lines[1 : _MERGE_COUNT + 1]]
    if len(merges) != _MERGE_COUNT or any(len(pair) != 2 for pair in merges):
        raise ValueError(f"{vocab_path} is not CLIP's BPE vocabulary: expected {_MERGE_COUNT} merge lines")
    return merges


def _byte_symbols() -> list[str]:
    """Return the 256 characters that stand for the bytes 0 to 255, in openai/CLIP's vocabulary order.

    This is the bytes_to_unicode() table of GPT-2 and CLIP: printable Latin-1 bytes stand for
    themselves, and the others, in byte order, for the characters from U+0100 on.
    """
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = [byte for byte in range(256) if byte not in printable]
    return [chr(byte) for byte in printable] + [chr(256 + index) for index in range(len(others))]
