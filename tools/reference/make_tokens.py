#!/usr/bin/env python3
"""Reference token ids for the CLIP BPE tokenizer (crates/sdgen/src/tokenizer.rs).

Writes
  testdata/clip-tokenizer/{vocab.json,merges.txt}   the real CLIP vocabulary (49408 tokens), built from
      `bpe_simple_vocab_16e6.txt.gz` exactly as openai/CLIP's SimpleTokenizer and HF's converted
      openai/clip-vit-large-patch14 folder have it;
  testdata/reference/tokens.json                    ids for a few hundred deterministic prompts.

The tokenizer folders tokenized:
  sd15   testdata/clip-tokenizer itself: SD 1.5 / openai/clip-vit-large-patch14, pads with <|endoftext|>;
  NAME   for each testdata/clip-tokenizer/variants/NAME/: the same vocab.json and merges.txt with that
         folder's config files. `sdxl2` is SDXL's `tokenizer_2` (stabilityai/stable-diffusion-xl-base-1.0):
         it pads with "!", which thereby becomes an *added token* split out of the text; `sdxl2-v4save`
         is the same as a later transformers `save_pretrained` writes it (added_tokens_decoder,
         added_tokens.json), as found in derived SDXL repos; `flags-synthetic` is no real model: it
         exercises added tokens' lstrip/rstrip/single_word and a special token outside the vocabulary.

What is recorded, per prompt and config, as the SD pipelines call the tokenizer
(`padding="max_length", max_length=77, truncation=True`):
  ids             the 77 ids up to and including the closing <|endoftext|> (min(n_untruncated, 77) of
                  them); the rest are the config's pad id (`configs.NAME.pad_id`); a variant omits ids
                  and n_untruncated equal to sd15's;
  n_untruncated   len(input_ids) with no truncation (bos and eos included);
  fast            {ids, n_untruncated} of transformers 4.x CLIPTokenizerFast, only where it differs from
                  the slow tokenizer's;
  v5              the same for transformers 5.x CLIPTokenizer (the tokenizers-backed class diffusers loads
                  under transformers 5), only where it differs from "fast" (or from the slow ids where
                  "fast" is absent); `differ_from_slow` counts the prompts where each differs from slow.

`v5_folders` (transformers 5 only: no slow tokenizer to compare) covers more of how transformers 5
resolves added tokens (tokenization_utils_base.py `_from_pretrained`, tokenization_utils_tokenizers.py
`TokenizersBackend.__init__`): synthetic folders (V5_FOLDERS: the config files, with the real vocab.json
and merges.txt) with the backend's added tokens (`[id, content, single_word, lstrip, rstrip, normalized,
special]`), the bos/eos/pad ids, and the ids of a few probe prompts, recorded as the cases above.

The target is transformers 4.x's *slow* `CLIPTokenizer` without `ftfy` (its BasicTokenizer path).
Transformers 5 has no slow CLIP tokenizer any more, so this script needs a 4.x environment:

    python3.11 -m venv /tmp/tf4 && /tmp/tf4/bin/pip install "transformers==4.57.*"
    /opt/refvenv/bin/pip download --no-deps open_clip_torch -d /tmp/oc && (cd /tmp/oc && unzip -o *.whl)
    /tmp/tf4/bin/python tools/reference/make_tokens.py \
        --bpe-gz /tmp/oc/open_clip/bpe_simple_vocab_16e6.txt.gz --v5-python /opt/refvenv/bin/python
"""

import argparse
import gzip
import importlib.util
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
TOK_DIR = os.path.join(REPO, "testdata", "clip-tokenizer")
VARIANTS = os.path.join(TOK_DIR, "variants")
OUT = os.path.join(REPO, "testdata", "reference", "tokens.json")
MAX_LENGTH = 77


# ---------------------------------------------------------------------------------------------
# Vocabulary: openai/CLIP simple_tokenizer.py, verbatim in effect.


def bytes_to_unicode():
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(2**8):
        if b not in bs:
            bs.append(b)
            cs.append(2**8 + n)
            n += 1
    return dict(zip(bs, [chr(n) for n in cs]))


def write_vocab(bpe_gz):
    merges = gzip.open(bpe_gz).read().decode("utf-8").split("\n")
    merges = merges[1 : 49152 - 256 - 2 + 1]
    merges = [tuple(m.split()) for m in merges]
    vocab = list(bytes_to_unicode().values())
    vocab = vocab + [v + "</w>" for v in vocab]
    for m in merges:
        vocab.append("".join(m))
    vocab.extend(["<|startoftext|>", "<|endoftext|>"])
    assert len(vocab) == 49408 and len(set(vocab)) == 49408
    # Laid out as the hub's files are (sorted keys, raw UTF-8; no newline at the end of either):
    # the SD 1.5 vocab.json is exactly this text, 951508 characters.
    with open(os.path.join(TOK_DIR, "vocab.json"), "w", encoding="utf-8") as f:
        f.write(json.dumps({t: i for i, t in enumerate(vocab)}, sort_keys=True, ensure_ascii=False))
    with open(os.path.join(TOK_DIR, "merges.txt"), "w", encoding="utf-8") as f:
        f.write("\n".join(["#version: 0.2"] + [f"{a} {b}" for a, b in merges]))


def find_bpe_gz():
    # find_spec does not import open_clip (which would import ftfy).
    spec = importlib.util.find_spec("open_clip")
    if spec and spec.submodule_search_locations:
        for loc in spec.submodule_search_locations:
            p = os.path.join(loc, "bpe_simple_vocab_16e6.txt.gz")
            if os.path.exists(p):
                return p
    sys.exit("no bpe_simple_vocab_16e6.txt.gz: pass --bpe-gz (it ships inside the open_clip_torch wheel)")


# ---------------------------------------------------------------------------------------------
# Prompts.

HAND = [
    "",
    " ",
    "   ",
    "\n",
    "\t\t",
    "a photo of a cat",
    "A photo of an astronaut riding a horse on mars",
    "a photograph of an astronaut riding a horse",
    "A majestic lion jumping from a big stone at night",
    "portrait of a young woman, highly detailed, 8k, trending on artstation, by greg rutkowski",
    "(masterpiece:1.2), best quality, [blurry], {red|blue} eyes, <lora:foo:0.8>",
    "  leading and trailing spaces   ",
    "repeated     spaces    between     words",
    "tabs\tand\nnewlines\r\nand\rcarriage returns",
    "vertical\x0btab and form\x0cfeed",
    "next\x85line, line\u2028separator, paragraph\u2029separator",
    "no\u00a0break space and ideographic\u3000space and thin\u2009space",
    "zero\u200bwidth space, zero\u200cwidth non-joiner, soft\u00adhyphen, \ufeffbom",
    "control \x00 chars \x01 \x07 \x1b[31m red \x1b[0m \x7f del",
    "replacement \ufffd char",
    "unassigned \u0378 code point and private \ue000 use",
    "café, naïve, Zürich, São Paulo, façade, Ångström, crème brûlée",
    "cafe\u0301 decomposed e-acute, n\u0303 tilde, A\u030a ring",
    "e\x00\u0301 a control char between base and combining mark",
    "\u0301leading combining mark",
    "\u212b angstrom sign and \u2126 ohm sign",
    "中文",
    "中文提示词：一只猫坐在窗台上",
    "日本語のテキスト",
    "東京タワーの夜景、美しい",
    "한국어",
    "서울의 밤 풍경",
    "compat ideograph \uf900 and ext-b \U00020000 and ext-a \u3400",
    "mixed 中文 and English and 日本語 and 한국어",
    "emoji 🐱🐶🦊",
    "thumbs 👍🏽 up",
    "family 👨‍👩‍👧 zwj sequence",
    "flags 🇯🇵🇺🇸",
    "heart ❤️ with variation selector",
    "keycap 1️⃣ and #️⃣",
    "🔥🔥🔥 fire",
    "!!!",
    "wow!!! amazing!!!",
    "what?!?! no way...",
    "ellipsis… and em—dash and en–dash",
    "~~~ ### *** &&& %%% $$$ @@@ ^^^",
    "a -- b --- c ---- d",
    "punctuation, runs; of: many! kinds? (yes) [no] {maybe} <tag> \"quote\" 'single'",
    "numbers 1234567890",
    "pi is 3.14159 and e is 2.71828",
    "1,000,000 people in 2024",
    "superscript x² and fractions ½ ¾ and roman Ⅻ",
    "arabic-indic ٣٤٥ and devanagari ३४५ digits",
    "fullwidth ＡＢＣ１２３ letters",
    "math 𝐀𝐁𝐂 bold and 𝓐𝓑𝓒 script",
    "ligature ﬁ ﬂ and ß and ẞ",
    "html &amp; entities &lt;b&gt;bold&lt;/b&gt; &quot;q&quot; &#39;s &nbsp;",
    "url https://example.com/path?q=1&x=y#frag",
    "email someone@example.com",
    "HeLLo WoRLD in MiXeD CaSe",
    "ALL CAPS PROMPT OF A DOG",
    "greek ΟΔΟΣ and ΣΟΦΙΑ and Σ alone and ΑΣ.",
    "turkish İstanbul and DİYARBAKIR",
    "titlecase ǅ and ǈ",
    "kelvin K sign and long ſ",
    "it's a dog's life",
    "don't won't can't shouldn't",
    "we're they're you're",
    "I've I'm you'll he'd she'll",
    "IT'S DON'T WE'RE I'VE I'M YOU'LL HE'D",
    "curly apostrophe it’s don’t",
    "lone 's 't 're at start",
    "'s",
    "'ſ long s apostrophe",
    "<|endoftext|>",
    "<|startoftext|>",
    "a<|startoftext|>b<|endoftext|>c",
    "<|ENDOFTEXT|> upper case special",
    "!!<|endoftext|>",
    "a!!<|ENDOFTEXT|>",
    "<|endo\x00ftext|> with a control char inside",
    "<|end of text|>",
    "<|endoftext|><|endoftext|><|endoftext|>",
    "!",
    "hello!",
    "hello! world!",
    "!hello",
    "a!b!c",
    "!!!!!!!!!!!!!!!!!!!!",
    "arabic مرحبا بالعالم",
    "hebrew שלום עולם",
    "hindi हिन्दी भाषा",
    "thai ภาษาไทย",
    "russian Привет мир, ПРИВЕТ",
    "armenian Բարեւ",
    "georgian გამარჯობა",
    "vietnamese Tiếng Việt có dấu",
    "polish zażółć gęślą jaźń",
    "ascii art ¯\\_(ツ)_/¯",
    "backslash \\ and slash / and pipe |",
    "under_score and camelCase and snake_case_name",
    "hyphenated-word and dotted.word and a.b.c.d",
    "a" * 100,
    "abc" * 40,
    "x " * 100,
    "1 " * 100,
    "🐱" * 80,
    "cat " * 74,
    "cat " * 75,
    "cat " * 76,
    "x\u0345y iota subscript",
    "x zz y",
    "xzz y",
    "x zzy",
    "a  !  b zz",
    "zzz",
    "pizza fizz jazz",
    "a <qq>  b",
    "<qq>x",
    "!zz",
    "zz!zz",
]

WORDS = (
    "a an the of on in with and cat dog astronaut horse castle forest mountain river city street night "
    "sunset sunrise portrait landscape painting photo photograph illustration render cinematic lighting "
    "highly detailed intricate elegant sharp focus digital art concept art octane unreal engine 4k 8k "
    "hdr bokeh volumetric fog misty golden hour studio ghibli anime watercolor oil canvas red blue green "
    "purple orange yellow black white silver golden glowing neon cyberpunk steampunk fantasy medieval "
    "futuristic ancient ruins temple dragon knight wizard robot spaceship ocean beach waves clouds sky "
    "stars galaxy nebula moon sun rain snow winter summer autumn spring flowers garden tree house"
).split()
EXTRA = [
    "café", "naïve", "Zürich", "中文", "日本語", "한국어", "🐱", "👍🏽", "❤️", "!!!", "...", "?!", "'s", "'t",
    "'re", "don't", "it's", "&amp;", "&#39;", "\t", "\n", "  ", "\x00", "\x1f", "1234", "3.14", "ΣΟΦΙΑ",
    "(", ")", "[", "]", ":1.3", ",", ";", "—", "Ⅻ", "½", "ＡＢＣ", "\u00a0", "\u3000", "\u200b", "<|endoftext|>",
    "!", "HDR", "UHD", "McDonald's", "O'Neill", "e\u0301", "\ufeff",
]


def generated_prompts(n, seed=1234):
    rng = random.Random(seed)
    out = []
    for i in range(n):
        length = rng.choice([2, 3, 4, 5, 6, 8, 10, 12, 16, 24]) if i % 12 else rng.randint(50, 120)
        parts = []
        for _ in range(length):
            r = rng.random()
            if r < 0.75:
                w = rng.choice(WORDS)
                c = rng.random()
                if c < 0.1:
                    w = w.upper()
                elif c < 0.2:
                    w = w.capitalize()
                elif c < 0.25:
                    w = "".join(ch.upper() if rng.random() < 0.5 else ch for ch in w)
            elif r < 0.95:
                w = rng.choice(EXTRA)
            else:
                w = str(rng.randint(0, 100000))
            parts.append(w)
        sep = [" ", " ", " ", ", ", ",", "  ", "\t", "\n", ""]
        s = parts[0]
        for w in parts[1:]:
            s += rng.choice(sep) + w
        out.append(s)
    return out


def prompts():
    ps = HAND + generated_prompts(200)
    seen, uniq = set(), []
    for p in ps:
        if p not in seen:
            seen.add(p)
            uniq.append(p)
    return uniq


# ---------------------------------------------------------------------------------------------
# transformers 5 loading: synthetic folders (name -> config files) and their probe prompts.


def _tok(content, **flags):
    return {"__type": "AddedToken", "content": content, **flags}


_SD15_SPECIAL = {k: {"content": c, "single_word": False, "lstrip": False, "rstrip": False, "normalized": True}
                 for k, c in (("bos_token", "<|startoftext|>"), ("eos_token", "<|endoftext|>"),
                              ("unk_token", "<|endoftext|>"))}
_PROBES = [
    "a photo of a cat",
    "<|startoftext|> <|endoftext|> <|STARTOFTEXT|> <|ENDOFTEXT|> <|EndOfText|>x",
    "wow!! a!b ! end!",
]
V5_FOLDERS = {
    # special_tokens_map.json gives pad as a normalized object: <|endoftext|> stays normalized.
    "map-pad-object": {
        "files": {
            "tokenizer_config.json": {"model_max_length": 77, "pad_token": "<|endoftext|>", "do_lower_case": True},
            "special_tokens_map.json": {**_SD15_SPECIAL, "pad_token": {"content": "<|endoftext|>", "normalized": True}},
        },
        "prompts": [],
    },
    # Legacy added_tokens.json (ids it gives are not the ids the backend assigns) with config objects
    # for the named tokens (not yet AddedTokens when added_tokens.json is read) and extras.
    "legacy-added": {
        "files": {
            "tokenizer_config.json": {
                "model_max_length": 77,
                "bos_token": _tok("<|startoftext|>", normalized=True),
                "eos_token": _tok("<|endoftext|>", normalized=True),
                "unk_token": _tok("<|endoftext|>", normalized=True),
                "pad_token": "<|endoftext|>",
                "additional_special_tokens": ["<extra1>", _tok("<Extra2>", normalized=True, lstrip=True)],
            },
            "added_tokens.json": {"<new1>": 49410, "<|startoftext|>": 49406, "newword": 49411, "<extra1>": 49412},
        },
        "prompts": ["<new1> newword NEWWORD <NEW1> newwords", "x<extra1>y <Extra2> <extra2>  z  <EXTRA2>"],
    },
    # added_tokens_decoder with ids that disagree with the vocabulary, a normalized token with capitals
    # (matched on the lower-cased text, inside words too), an rstrip token past the vocabulary.
    "decoder-ids": {
        "files": {
            "tokenizer_config.json": {
                "model_max_length": 77,
                "added_tokens_decoder": {
                    "5": {"content": "!", "lstrip": False, "normalized": False, "rstrip": False, "single_word": False, "special": True},
                    "49406": {"content": "<|startoftext|>", "normalized": True, "special": True},
                    "49407": {"content": "<|endoftext|>", "normalized": False, "special": True},
                    "49999": {"content": "Hello", "normalized": True, "special": False},
                    "50000": {"content": "<far>", "normalized": False, "special": True, "rstrip": True},
                },
                "bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>",
                "pad_token": "!",
            },
        },
        "prompts": ["Hello othello HELLO hello!", "<far>   x <FAR> y<far>z", "say hello\u00a0world"],
    },
    # Model-specific *_token keys (string, object, and from special_tokens_map.json) and extras merged
    # from both files.
    "model-specific": {
        "files": {
            "tokenizer_config.json": {
                "model_max_length": 77,
                "bos_token": _tok("<|startoftext|>", normalized=True), "eos_token": _tok("<|endoftext|>", normalized=True),
                "unk_token": _tok("<|endoftext|>", normalized=True), "pad_token": "<|endoftext|>",
                "image_token": "<image>",
                "video_token": _tok("<video>", lstrip=True, normalized=False, special=True),
                "extra_special_tokens": ["<e1>", "<e2>"],
            },
            "special_tokens_map.json": {**_SD15_SPECIAL, "pad_token": "<|endoftext|>", "audio_token": "<audio>",
                                        "extra_special_tokens": ["<e2>", {"content": "<E3>", "normalized": True}]},
        },
        "prompts": ["<image><video> <audio>  <e1><e2><e3><E3>", "a  <video>b <IMAGE> <Video>"],
    },
    # extra_special_tokens as an object (model-specific tokens), so additional_special_tokens stays under
    # its own name, and special_tokens_map.json's replaces the config's.
    "extra-dict": {
        "files": {
            "tokenizer_config.json": {
                "model_max_length": 77,
                "extra_special_tokens": {"boi_token": "<boi>", "eoi_token": _tok("<eoi>", special=True, normalized=False)},
                "additional_special_tokens": ["<add1>"],
            },
            "special_tokens_map.json": {"additional_special_tokens": ["<add2>"], "pad_token": "!"},
        },
        "prompts": ["<boi>x<eoi> <add1> <add2> <ADD2>"],
    },
    # Nothing but the length: CLIPTokenizer's defaults, and no unk token.
    "defaults": {
        "files": {"tokenizer_config.json": {"model_max_length": 77, "unk_token": None}},
        "prompts": [],
    },
    # single_word / lstrip / rstrip on raw-text and normalized tokens.
    "word-flags": {
        "files": {
            "tokenizer_config.json": {
                "model_max_length": 77,
                "added_tokens_decoder": {
                    "2368": {"content": "cat", "single_word": True, "normalized": False, "special": False},
                    "49406": {"content": "<|startoftext|>", "normalized": True, "special": True},
                    "49407": {"content": "<|endoftext|>", "normalized": True, "special": True},
                    "49408": {"content": "Dog", "single_word": True, "normalized": True, "special": False},
                    "49409": {"content": "<l>", "lstrip": True, "normalized": False, "special": True},
                    "49410": {"content": "<r>", "rstrip": True, "normalized": False, "special": True},
                    "49411": {"content": "<lr>", "lstrip": True, "rstrip": True, "normalized": True, "special": True},
                },
            },
        },
        "prompts": [
            "cat cats concat cat, a cat. CAT",
            "dog DOG hotdog Dog! dogs",
            "a  <l>  b  <r>  c <lr>  d",
            "<l><r><lr>",
            "x <l>",
            "  <r>",
            "\t<LR>\n y",
        ],
    },
}


def write_folder(d, files):
    os.makedirs(d, exist_ok=True)
    for f in ("vocab.json", "merges.txt"):
        shutil.copy(os.path.join(TOK_DIR, f), d)
    for name, content in files.items():
        with open(os.path.join(d, name), "w", encoding="utf-8") as fh:
            json.dump(content, fh, indent=2)


# ---------------------------------------------------------------------------------------------
# Tokenizing.


def encode_all(tok, ps):
    """(padded ids, untruncated length) per prompt, as the SD pipelines call the tokenizer."""
    padded = tok(ps, padding="max_length", max_length=MAX_LENGTH, truncation=True).input_ids
    full = tok(ps).input_ids
    return [(list(a), len(b)) for a, b in zip(padded, full)]


def v5_worker():
    """Runs under transformers 5: reads {"dir", "prompts"} (or {"folders": {name: {"files", "prompts"}}})
    on stdin, prints results as JSON."""
    import transformers
    from transformers import CLIPTokenizer

    assert transformers.__version__.startswith("5."), transformers.__version__
    req = json.load(sys.stdin)
    if "folders" not in req:
        tok = CLIPTokenizer.from_pretrained(req["dir"])
        json.dump({"version": transformers.__version__, "res": encode_all(tok, req["prompts"])}, sys.stdout)
        return
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, spec in req["folders"].items():
            d = os.path.join(tmp, name)
            write_folder(d, spec["files"])
            tok = CLIPTokenizer.from_pretrained(d)
            backend = json.loads(tok.backend_tokenizer.to_str())
            added = [[t["id"], t["content"], t["single_word"], t["lstrip"], t["rstrip"], t["normalized"], t["special"]]
                     for t in backend["added_tokens"]]
            cases = []
            for p, (ids, n_full) in zip(spec["prompts"], encode_all(tok, spec["prompts"])):
                cases.append({"prompt": p, "ids": ids[: min(n_full, MAX_LENGTH)], "n_untruncated": n_full})
            out[name] = {
                "files": spec["files"],
                "bos_id": tok.bos_token_id,
                "eos_id": tok.eos_token_id,
                "pad_id": tok.pad_token_id,
                "added_tokens": added,
                "cases": cases,
            }
    json.dump(out, sys.stdout)


def sweep(path):
    """Every code point (surrogates aside) in one prompt, `a{c}b {c}{c}x`, through CLIPTokenizer: lines of
    `hex-code-point id id ...` (untruncated, bos/eos included), about 36 MB. Under transformers 4.x that is
    the slow tokenizer; under 5.x, the tokenizers-backed one. The ignored Rust test
    `tokenizer::tests::sweep_all_code_points` reads it (CLIP_TOKENIZER_SWEEP=PATH, and
    CLIP_TOKENIZER_SWEEP_MODE=slow for a 4.x sweep) to find where Rust's Unicode tables disagree with the
    reference's."""
    import transformers
    from transformers import CLIPTokenizer

    if transformers.__version__.startswith("4."):
        assert importlib.util.find_spec("ftfy") is None, "uninstall ftfy: the reference is the no-ftfy CLIPTokenizer"
    tok = CLIPTokenizer.from_pretrained(TOK_DIR)
    with open(path, "w") as f:
        cps = [cp for cp in range(0x110000) if not 0xD800 <= cp < 0xE000]
        for start in range(0, len(cps), 10000):
            chunk = cps[start : start + 10000]
            ids = tok([f"a{chr(cp)}b {chr(cp)}{chr(cp)}x" for cp in chunk]).input_ids
            for cp, row in zip(chunk, ids):
                f.write(f"{cp:x} {' '.join(map(str, row))}\n")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--bpe-gz", help="bpe_simple_vocab_16e6.txt.gz from the open_clip_torch wheel")
    ap.add_argument("--v5-python", help="a python with transformers 5.x, to record its CLIPTokenizer too")
    ap.add_argument("--v5-worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--sweep", metavar="PATH", help="only write every code point's ids to PATH (see below)")
    args = ap.parse_args()
    if args.v5_worker:
        return v5_worker()
    if args.sweep:
        return sweep(args.sweep)

    # The reference is the no-ftfy path, which is what a plain `pip install diffusers transformers`
    # gives (transformers 4.x CLIPTokenizer switches to ftfy.fix_text when ftfy imports).
    assert importlib.util.find_spec("ftfy") is None, "uninstall ftfy: the reference is the no-ftfy CLIPTokenizer"
    import tokenizers
    import transformers
    from transformers import CLIPTokenizer, CLIPTokenizerFast

    assert transformers.__version__.startswith("4."), "needs transformers 4.x (5.x has no slow CLIPTokenizer)"

    write_vocab(args.bpe_gz or find_bpe_gz())
    ps = prompts()

    with tempfile.TemporaryDirectory() as tmp:
        dirs = {"sd15": TOK_DIR}
        for name in sorted(os.listdir(VARIANTS)):
            d = os.path.join(tmp, name)
            shutil.copytree(os.path.join(VARIANTS, name), d)
            for f in ("vocab.json", "merges.txt"):
                shutil.copy(os.path.join(TOK_DIR, f), d)
            dirs[name] = d

        configs, results, v5_version = {}, {}, None
        for name, d in dirs.items():
            slow = CLIPTokenizer.from_pretrained(d)
            assert slow.fix_text is None and not hasattr(slow, "do_lower_case")
            fast = CLIPTokenizerFast.from_pretrained(d)
            configs[name] = {
                "pad_id": slow.pad_token_id,
                "max_length": slow.model_max_length,
                "vocab_size": slow.vocab_size,
                "added_tokens": {t: i for t, i in sorted(slow.added_tokens_encoder.items())},
            }
            assert slow.model_max_length == MAX_LENGTH
            v5 = None
            if args.v5_python:
                req = json.dumps({"dir": d, "prompts": ps})
                out = subprocess.run(
                    [args.v5_python, os.path.abspath(__file__), "--v5-worker"],
                    input=req, capture_output=True, text=True, check=True,
                )
                v5 = json.loads(out.stdout)
                v5_version = v5["version"]
                v5 = [(list(ids), n) for ids, n in v5["res"]]
            results[name] = (encode_all(slow, ps), encode_all(fast, ps), v5)

    # Compact: ids stop at eos (the rest is padding); a variant omits ids equal to sd15's; "fast" is
    # kept only where it differs from the slow ids, "v5" only where it differs from "fast".
    def trim(res):
        ids, n_full = res
        return {"ids": ids[: min(n_full, MAX_LENGTH)], "n_untruncated": n_full}

    cases, n_diff = [], {k: {"fast": 0, "v5": 0} for k in dirs}
    for i, p in enumerate(ps):
        case = {"prompt": p}
        for name, (slow, fast, v5) in results.items():
            ids, n_full = slow[i]
            pad = configs[name]["pad_id"]
            eos = min(n_full, MAX_LENGTH)  # bos, the (kept) tokens, eos; then padding
            assert ids[eos - 1] == 49407 and all(t == pad for t in ids[eos:]) and len(ids) == MAX_LENGTH
            rec = trim(slow[i])
            if name != "sd15" and rec == {k: case["sd15"][k] for k in ("ids", "n_untruncated")}:
                rec = {}
            if fast[i] != slow[i]:
                rec["fast"] = trim(fast[i])
                n_diff[name]["fast"] += 1
            if v5 is not None:
                n_diff[name]["v5"] += v5[i] != slow[i]
                if v5[i] != fast[i]:
                    rec["v5"] = trim(v5[i])
            case[name] = rec
        cases.append(case)

    v5_folders = None
    if args.v5_python:
        folders = {name: {"files": spec["files"], "prompts": _PROBES + spec["prompts"]} for name, spec in V5_FOLDERS.items()}
        out = subprocess.run(
            [args.v5_python, os.path.abspath(__file__), "--v5-worker"],
            input=json.dumps({"folders": folders}), capture_output=True, text=True, check=True,
        )
        v5_folders = json.loads(out.stdout)

    doc = {
        "about": "CLIP tokenizer reference ids; written by tools/reference/make_tokens.py",
        "transformers_slow": transformers.__version__,
        "tokenizers_fast": tokenizers.__version__,
        "transformers_v5": v5_version,
        "python_unicode": __import__("unicodedata").unidata_version,
        "max_length": MAX_LENGTH,
        "configs": configs,
        "differ_from_slow": n_diff,
        "cases": cases,
        "v5_folders": v5_folders,
    }
    with open(OUT, "w", encoding="utf-8") as f:
        json.dump(doc, f, ensure_ascii=True, separators=(",", ":"))
        f.write("\n")
    print(f"{len(ps)} prompts -> {OUT} ({os.path.getsize(OUT)} bytes); prompts where fast/v5 differ: {n_diff}")


if __name__ == "__main__":
    main()
