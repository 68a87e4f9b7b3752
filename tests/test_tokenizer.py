"""The offline CLIP tokenizer reproduces open_clip's tokenization exactly."""

import random

import pytest
import torch

from eovseg.processing.tokenization_eovseg import (
    EOT_TOKEN_ID,
    SOT_TOKEN_ID,
    VOCAB_SIZE,
    ClipTokenizerError,
    build_clip_tokenizer,
    check_clip_tokenizer,
    clean_text,
    clip_tokenize,
    clip_vocab_and_merges,
    write_vocab_files,
)
from eovseg.vocabulary import PROMPT_TEMPLATES, build_prompts, synonym_counts


open_clip = pytest.importorskip("open_clip")


@pytest.fixture(scope="module")
def tokenizer():
    return build_clip_tokenizer()


@pytest.fixture(scope="module")
def reference():
    return open_clip.get_tokenizer("RN50")


_BASE_NAMES = [
    # COCO / ADE-like things and stuff, with synonyms
    "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat", "traffic light",
    "fire hydrant", "stop sign", "parking meter", "bench", "bird", "cat", "dog", "horse", "sheep", "cow",
    "elephant", "bear", "zebra", "giraffe", "backpack", "umbrella", "handbag", "tie", "suitcase", "frisbee",
    "skis", "snowboard", "sports ball", "kite", "baseball bat", "baseball glove", "skateboard", "surfboard",
    "tennis racket", "bottle", "wine glass", "cup", "fork", "knife", "spoon", "bowl", "banana", "apple",
    "sandwich", "orange", "broccoli", "carrot", "hot dog", "pizza", "donut", "cake", "chair", "couch",
    "potted plant", "bed", "dining table", "toilet", "tv", "laptop", "mouse", "remote", "keyboard",
    "cell phone", "microwave", "oven", "toaster", "sink", "refrigerator", "book", "clock", "vase", "scissors",
    "teddy bear", "hair drier", "toothbrush", "banner", "blanket", "bridge", "cardboard", "counter", "curtain",
    "door-stuff", "floor-wood", "flower", "fruit", "gravel", "house", "light", "mirror-stuff", "net", "pillow",
    "platform", "playingfield", "railroad", "river", "road", "roof", "sand", "sea", "shelf", "snow", "stairs",
    "tent", "towel", "wall-brick", "wall-stone", "wall-tile", "wall-wood", "water-other", "window-blind",
    "window-other", "tree-merged", "fence-merged", "ceiling-merged", "sky-other-merged", "cabinet-merged",
    "table-merged", "floor-other-merged", "pavement-merged", "mountain-merged", "grass-merged", "dirt-merged",
    "paper-merged", "food-other-merged", "building-other-merged", "rock-merged", "wall-other-merged", "rug-merged",
    "person, child, girl, boy, woman, man, people, children, girls, boys, women, men, lady, guy, ladies, guys",
    "television receiver, television, television set, tv, tv set, idiot box, boob tube, telly, goggle box",
    "sidewalk, pavement", "skyscraper", "grandstand, covered stand", "stove, kitchen stove, range, kitchen range",
    "crt screen", "plaything, toy", "swimming pool, swimming bath, natatorium", "kitchen island",
    # apostrophes, punctuation, numbers
    "dog's bed", "children's toy", "it's a trap", "o'clock tower", "rock 'n' roll stage", "you'll've",
    "we're here", "they'd go", "i'm fine", "rock'n'roll", "ma'am's hat", "don't walk sign",
    "7-eleven store", "route 66 sign", "3d printer", "0.5 liter bottle", "1,000 piece puzzle", "h2o bottle",
    "covid-19 mask", "2001: a space odyssey poster", "mp3 player", "4x4 truck", "no. 9 bus", "a/c unit",
    "t-shirt", "x-ray machine", "e-mail", "rock & roll", "salt & pepper", "black+decker drill", "50% off sign",
    "$100 bill", "#hashtag", "@handle", "c++ book", "semi;colon", "quote \"unquote\"", "(parenthesized) thing",
    "[bracketed] thing", "{braced} thing", "what?!", "wow!!!", "ellipsis...", "tilde~wave", "pipe|bar",
    "back\\slash", "under_score", "<angle> bracket", "hello !", "!", "!!", "...", "-", "--- ---",
    # unicode
    "café", "naïve art", "crème brûlée", "jalapeño", "piñata", "façade", "smörgåsbord", "Ærøskøbing",
    "straße", "São Paulo", "Zürich", "İstanbul", "Σίσυφος ΣΑΣ", "матрёшка", "Москва", "日本語", "東京タワー",
    "ｶﾀｶﾅ", "ＦＵＬＬＷＩＤＴＨ text", "한국어", "中文 名字", "العربية", "עברית", "हिन्दी", "ภาษาไทย",
    "emoji 😀", "🐶 dog", "❤️ heart", "👨‍👩‍👧 family", "ﬁ ligature", "“curly quotes”", "‘single curly’",
    "em—dash", "en–dash", "non\u00a0breaking space", "zero\u200bwidth", "soft\u00adhyphen", "e\u0301 combining",
    "mojibake Ã© text", "&amp; html &lt;entity&gt;", "&#39;numeric entity&#39;", "tab\tseparated",
    "new\nline", "  padded   spaces  ", "ǅungla", "Ω ohm", "µ micro", "½ half", "² squared", "Ⅻ roman",
    # literal special-token strings
    "<start_of_text> inside", "!!wow<end_of_text>", "<|endoftext|>", "<|startoftext|> hf special",
    # long names that overflow 77 tokens
    "a very long class name " + "with many many words " * 20,
    "supercalifragilisticexpialidocious" * 6,
    " ".join(str(i) for i in range(60)),
    "antidisestablishmentarianism pneumonoultramicroscopicsilicovolcanoconiosis " * 4 + "floccinaucinihilipilification",
    "long synonyms, " + "really " * 80 + "long synonym, short",
]


def _varied_names():
    names = list(_BASE_NAMES)
    names += [n.upper() for n in _BASE_NAMES[:60]]
    names += [n.title() for n in _BASE_NAMES[60:120]]
    names = list(dict.fromkeys(names))  # distinct, order kept
    return names


NAMES = _varied_names()


def test_name_list_is_varied():
    assert len(NAMES) >= 300
    assert any(len(clean_text(n)) > 300 for n in NAMES)


def test_vocabulary_and_merges_equal_open_clip():
    encoder, merges = clip_vocab_and_merges()
    simple = open_clip.tokenizer.SimpleTokenizer()
    assert len(encoder) == VOCAB_SIZE
    assert encoder == simple.encoder
    assert merges == sorted(simple.bpe_ranks, key=simple.bpe_ranks.get)
    assert encoder["<start_of_text>"] == SOT_TOKEN_ID and encoder["<end_of_text>"] == EOT_TOKEN_ID
    assert encoder["!"] == 0 and encoder["!</w>"] == 256


def test_special_tokens(tokenizer):
    assert len(tokenizer) == VOCAB_SIZE
    assert tokenizer.bos_token == "<start_of_text>" and tokenizer.bos_token_id == SOT_TOKEN_ID
    assert tokenizer.eos_token == "<end_of_text>" and tokenizer.eos_token_id == EOT_TOKEN_ID
    assert tokenizer.pad_token_id == 0
    assert tokenizer.model_max_length == 77


def test_every_prompt_equals_open_clip(tokenizer, reference):
    prompts = build_prompts(NAMES)
    assert len(prompts) == sum(synonym_counts(NAMES)) * len(PROMPT_TEMPLATES) >= 5000
    ours = clip_tokenize(tokenizer, prompts)
    expected = reference(prompts)
    assert ours.shape == expected.shape == (len(prompts), 77)
    assert ours.dtype == torch.long
    mismatched = [prompts[i] for i in (ours != expected).any(dim=1).nonzero().flatten().tolist()]
    assert mismatched == []
    # the list really exercises truncation: some rows are full with the end token kept last
    full = (ours[:, -1] == EOT_TOKEN_ID).sum().item()
    assert full >= 4 * len(PROMPT_TEMPLATES)
    assert (ours[:, 0] == SOT_TOKEN_ID).all()
    # models find the end token by argmax: it is the largest id of each row and only padding (0) follows it
    # (except where a class name contains the literal "<end_of_text>", which open_clip maps to the end token)
    plain_rows = [i for i, p in enumerate(prompts) if "_of_text>" not in p.lower()]
    assert len(plain_rows) > 5000
    eot_position = ours.argmax(dim=1)
    for i in plain_rows:
        row, end = ours[i], eot_position[i].item()
        assert row[end] == EOT_TOKEN_ID and (row[end + 1 :] == 0).all() and (row[:end] != EOT_TOKEN_ID).all()


def test_known_ids(tokenizer):
    ids = clip_tokenize(tokenizer, ["a photo of a dog.", "hello !", "It's a DOG's life"], context_length=10)
    assert ids.tolist() == [
        [49406, 320, 1125, 539, 320, 1929, 269, 49407, 0, 0],
        [49406, 3306, 256, 49407, 0, 0, 0, 0, 0, 0],
        [49406, 585, 568, 320, 1929, 568, 970, 49407, 0, 0],
    ]


def test_other_context_length_equals_open_clip(tokenizer, reference):
    prompts = build_prompts(NAMES[:40] + NAMES[-8:])
    for context_length in (8, 16, 77):
        assert torch.equal(
            clip_tokenize(tokenizer, prompts, context_length=context_length),
            reference(prompts, context_length=context_length),
        )


def test_random_unicode_equals_open_clip(tokenizer, reference):
    rng = random.Random(0)
    blocks = [(0x20, 0x7E), (0xA0, 0x24F), (0x370, 0x4FF), (0x590, 0x6FF), (0x900, 0x97F), (0xE00, 0xE7F),
              (0x2000, 0x206F), (0x3000, 0x30FF), (0x4E00, 0x4FFF), (0xFF00, 0xFFEF), (0x1F300, 0x1F64F)]
    texts = []
    for _ in range(500):
        chars = [chr(rng.randint(*rng.choice(blocks))) for _ in range(rng.randint(1, 40))]
        texts.append("".join(chars))
    assert torch.equal(clip_tokenize(tokenizer, texts), reference(texts))


def test_plain_tokenizer_call_matches_on_clean_text(tokenizer, reference):
    """Calling the transformers tokenizer directly (padding to 77, truncation) gives open_clip's ids for text that
    is already clean: padding is 0 and the end token is kept last on truncation."""
    names = [n for n in NAMES if "_of_text>" not in n.lower() and "<|" not in n]
    prompts = [clean_text(p) for p in build_prompts(names)]
    out = tokenizer(prompts, padding="max_length", max_length=77, truncation=True, return_tensors="pt")
    assert torch.equal(out["input_ids"], reference(prompts))


def test_exclamation_mark_is_text_not_padding(tokenizer, reference):
    """The pad token is "!" (id 0), but a "!" in a prompt must be encoded as open_clip encodes it."""
    texts = ["wow!", "hello ! world", "!!", "what?!"]
    ours = tokenizer(texts, padding="max_length", max_length=77, truncation=True, return_tensors="pt")["input_ids"]
    assert torch.equal(ours, reference(texts))
    assert ours[0].tolist()[:4] == [49406, 2781, 256, 49407]  # "!" after a word is "!</w>" (256), not padding (0)


def test_save_load_round_trip(tokenizer, reference, tmp_path):
    from transformers import AutoTokenizer, CLIPTokenizer

    saved = build_clip_tokenizer(save_directory=tmp_path)
    prompts = build_prompts(NAMES[::3])
    expected = clip_tokenize(tokenizer, prompts)
    assert torch.equal(clip_tokenize(saved, prompts), expected)
    for loader in (CLIPTokenizer, AutoTokenizer):
        loaded = loader.from_pretrained(tmp_path)
        assert isinstance(loaded, CLIPTokenizer)
        check_clip_tokenizer(loaded)
        assert loaded.pad_token_id == 0 and loaded.split_special_tokens
        assert torch.equal(clip_tokenize(loaded, prompts), expected)
        plain = [clean_text(p) for p in build_prompts(["dog", "wow!", "traffic light"])]
        assert torch.equal(
            loaded(plain, padding="max_length", max_length=77, truncation=True, return_tensors="pt")["input_ids"],
            reference(plain),
        )


def test_added_special_tokens_are_accepted_and_leave_prompt_ids_alone(tokenizer, tmp_path):
    """`from_pretrained(..., cls_token=...)` (as transformers' processor tests load one) adds tokens after the 49408 of
    the vocabulary; the prompts' ids come from the vocabulary's merges, so they stay open_clip's."""
    from transformers import CLIPTokenizer

    build_clip_tokenizer(save_directory=tmp_path)
    loaded = CLIPTokenizer.from_pretrained(tmp_path, cls_token="(CLS)", sep_token="(SEP)")
    assert len(loaded) == len(tokenizer) + 2 and loaded.cls_token == "(CLS)"
    check_clip_tokenizer(loaded)
    prompts = build_prompts(["dog", "a (CLS) car", "traffic light"])
    assert torch.equal(clip_tokenize(loaded, prompts), clip_tokenize(tokenizer, prompts))


def test_fast_tokenizer_pitfall_is_avoided(tokenizer, tmp_path):
    """`CLIPTokenizer(vocab_file=..., merges_file=...)` silently ignores the files in transformers 5 and maps text to
    ids like 0, 2, 2, ...; the files must be given as `vocab`/`merges` (or loaded with from_pretrained)."""
    from transformers import CLIPTokenizer, CLIPTokenizerFast

    vocab_file, merges_file = write_vocab_files(tmp_path)
    broken = CLIPTokenizerFast(vocab_file=vocab_file, merges_file=merges_file)
    broken_ids = broken("a photo of a dog.")["input_ids"]
    assert len(broken) < 10 and set(broken_ids) <= {0, 1, 2}  # the pitfall still exists upstream ...
    with pytest.raises(ClipTokenizerError, match="does not reproduce open_clip"):
        check_clip_tokenizer(broken)  # ... and is detected

    from_files = CLIPTokenizer(
        vocab_file, merges_file, bos_token="<start_of_text>", eos_token="<end_of_text>",
        unk_token="<end_of_text>", pad_token="!", split_special_tokens=True,
    )
    check_clip_tokenizer(from_files)
    prompts = build_prompts(NAMES[:50])
    ours = clip_tokenize(tokenizer, prompts)
    assert torch.equal(clip_tokenize(from_files, prompts), ours)
    # not garbage: real, varied ids
    assert ours[0, :8].tolist() == [49406, 320, 1125, 539, 320, 2533, 269, 49407]  # "a photo of a person."
    assert len(set(ours.flatten().tolist())) > 60


def test_non_string_text_raises(tokenizer):
    with pytest.raises(TypeError, match="must be strings"):
        clip_tokenize(tokenizer, ["dog", 3])
