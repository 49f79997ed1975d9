#!/usr/bin/env python3
"""Reference ids for CLIP tokenizer folders that hold a `tokenizer.json` (crates/sdgen/src/tokenizer/).

transformers 5's `CLIPTokenizer.save_pretrained` (and so diffusers' `pipeline.save_pretrained`) writes
only `tokenizer.json` and `tokenizer_config.json`: no vocab.json, no merges.txt, no
special_tokens_map.json, and the added tokens only in tokenizer.json's `added_tokens`. This script
saves folders that way and records how transformers tokenizes them.

How the references read such folders (transformers 5.24, transformers 4.57):
  transformers 5  `TokenizersBackend.convert_to_native_format`: when tokenizer.json exists, CLIPTokenizer
                  takes model.vocab and model.merges from it (merges as "a b" strings or as pairs) and
                  ignores vocab.json / merges.txt even where they exist; its own normalizer,
                  pre-tokenizer and BPE options replace tokenizer.json's. `_from_pretrained`: where
                  tokenizer_config.json has no `added_tokens_decoder`, tokenizer.json's `added_tokens`
                  (with their flags) join the legacy special_tokens_map.json / added_tokens.json ones.
  transformers 4  the slow CLIPTokenizer needs vocab.json and merges.txt (it cannot load a folder with
                  only tokenizer.json), and reads tokenizer.json's `added_tokens` the same legacy way.
                  Its reference for a tokenizer.json-only folder is therefore taken on the same folder
                  plus the vocab.json and merges.txt written out of tokenizer.json's model (what the
                  file was converted from): "what the slow tokenizer gives on these files". transformers
                  5 also writes the extra special tokens as a list `extra_special_tokens`, which 4.57
                  fails on (it takes that key for a dict of named tokens): the stand-in renames it back
                  to `additional_special_tokens`, its 4.x name, as the Slow mode reads it.

Writes, under testdata/tokenizer-json/:
  tiny-sd15/     transformers 5's save of testdata/tiny-sd15/tokenizer (vocabulary 1014, 500 merges):
                 tokenizer.json + tokenizer_config.json, as written;
  tiny-sdxl2/    the same vocabulary with SDXL's tokenizer_2 configs (testdata/clip-tokenizer/variants/
                 sdxl2: pads with "!"), saved the same way;
  full/NAME/     for the four configs of testdata/reference/tokens.json (sd15 = testdata/clip-tokenizer,
                 and its variants), the full-size save (3.6 MB of tokenizer.json each) reduced to
                 tokenizer_config.json and tokenizer.skeleton.json: tokenizer.json with model.vocab {}
                 and model.merges []. Refilled with testdata/clip-tokenizer's vocab.json and
                 merges.txt (as [a, b] pairs), it is the saved file exactly (checked here);
  ids.json       the ids, see below.

Folders tokenized (the Rust test lays out the same ones):
  tiny-sd15, tiny-sdxl2                      as saved;
  tiny-sd15+merges-as-strings                tokenizer.json's merges rewritten as "a b" strings (the
                                             format of tokenizers < 0.20);
  tiny-sd15+with-vocab-files                 plus testdata/clip-tokenizer's vocab.json and merges.txt,
                                             which disagree with tokenizer.json (full vocabulary):
                                             transformers 5 uses tokenizer.json, the slow one the files
                                             (with tokenizer.json's added tokens: bos 1012, eos 1013);
  full/NAME                                  the skeleton refilled, as tokenizer.json-only folders.

ids.json `results["FOLDER/MODE"]` (MODE v5 = transformers 5 CLIPTokenizer, slow = transformers 4 slow
CLIPTokenizer without ftfy): `pad_id`, `vocab_size`, and per prompt {ids (up to and including eos;
the rest is padding), n_untruncated} as in tokens.json. Prompts are tokens.json's cases followed by
`extra_prompts`. To stay small a result names a `base` ("FOLDER/MODE", or "tokens.json:CONFIG/MODE"
for tokens.json's records of that config) and `cases` holds, by prompt index, only the records that
differ from the base's or that the base lacks.

    /opt/refvenv/bin/python tools/reference/make_tokenizer_json.py --v4-python /tmp/tf4/bin/python

(/tmp/tf4: `python3.11 -m venv /tmp/tf4 && /tmp/tf4/bin/pip install "transformers==4.57.*"`, no ftfy.)
"""

import argparse
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tempfile

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
CLIP_DIR = os.path.join(REPO, "testdata", "clip-tokenizer")
TINY_DIR = os.path.join(REPO, "testdata", "tiny-sd15", "tokenizer")
TOKENS = os.path.join(REPO, "testdata", "reference", "tokens.json")
OUT_DIR = os.path.join(REPO, "testdata", "tokenizer-json")
MAX_LENGTH = 77
CONFIGS = ["sd15", "sdxl2", "sdxl2-v4save", "flags-synthetic"]

# Added-token probes beyond tokens.json's prompts: the saved <|startoftext|> is `normalized` (matched
# after lower-casing), the saved <|endoftext|> is not (in sd15), "!" is an added token in sdxl2.
EXTRA_PROMPTS = [
    "<|startoftext|> <|endoftext|> <|STARTOFTEXT|> <|ENDOFTEXT|> <|EndOfText|>x",
    "wow!! a!b ! end!",
    "x<|StartOfText|>y <|endoftext|>z",
    "zz <qq>  x zz y !zz! a zz",
]


def trim(ids, n_full):
    return {"ids": list(ids[: min(n_full, MAX_LENGTH)]), "n_untruncated": n_full}


def encode_all(tok, prompts):
    """Per prompt {ids, n_untruncated}, as the SD pipelines call the tokenizer."""
    padded = tok(prompts, padding="max_length", max_length=MAX_LENGTH, truncation=True).input_ids
    full = tok(prompts).input_ids
    out = []
    for ids, f in zip(padded, full):
        assert len(ids) == MAX_LENGTH and all(t == tok.pad_token_id for t in ids[min(len(f), MAX_LENGTH) :])
        out.append(trim(ids, len(f)))
    return out


def worker():
    """Under either transformers: reads {"dirs": [...], "prompts": [...]} on stdin and prints, per folder,
    its CLIPTokenizer's pad id, vocabulary size and records."""
    import transformers
    from transformers import CLIPTokenizer

    if transformers.__version__.startswith("4."):
        assert importlib.util.find_spec("ftfy") is None, "uninstall ftfy: the reference is the no-ftfy CLIPTokenizer"
    req = json.load(sys.stdin)
    out = {"version": transformers.__version__, "dirs": []}
    for d in req["dirs"]:
        tok = CLIPTokenizer.from_pretrained(d)
        if transformers.__version__.startswith("4."):
            assert not tok.is_fast and tok.fix_text is None
        out["dirs"].append({"pad_id": tok.pad_token_id, "vocab_size": tok.vocab_size, "cases": encode_all(tok, req["prompts"])})
    json.dump(out, sys.stdout)


def run_worker(python, dirs, prompts):
    res = subprocess.run(
        [python, os.path.abspath(__file__), "--worker"],
        input=json.dumps({"dirs": dirs, "prompts": prompts}),
        capture_output=True,
        text=True,
    )
    if res.returncode != 0:
        sys.exit(f"worker under {python} failed:\n{res.stderr}")
    return json.loads(res.stdout)


def read_json(path):
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def write_json(path, value, indent=None):
    with open(path, "w", encoding="utf-8") as f:
        json.dump(value, f, ensure_ascii=False, indent=indent)


def clip_merge_pairs():
    with open(os.path.join(CLIP_DIR, "merges.txt"), encoding="utf-8") as f:
        lines = f.read().split("\n")
    assert lines[0].startswith("#version")
    return [line.split(" ") for line in lines[1:]]


def copy_files(src, dst, names):
    os.makedirs(dst, exist_ok=True)
    for n in names:
        shutil.copy(os.path.join(src, n), dst)


def save_v5(src, dst):
    """transformers 5's CLIPTokenizer.save_pretrained of folder `src` into `dst` (emptied first)."""
    from transformers import CLIPTokenizer

    shutil.rmtree(dst, ignore_errors=True)
    files = CLIPTokenizer.from_pretrained(src).save_pretrained(dst)
    assert sorted(os.path.basename(f) for f in files) == ["tokenizer.json", "tokenizer_config.json"], files
    assert sorted(os.listdir(dst)) == ["tokenizer.json", "tokenizer_config.json"], os.listdir(dst)


def slow_stand_in(src, dst):
    """`src` as transformers 4.57 can load it: plus the vocab.json and merges.txt its tokenizer.json was
    converted from (where missing), and with a list `extra_special_tokens` (transformers 5's name for
    `additional_special_tokens`, which 4.57 takes for a dict of named tokens and fails on) renamed back."""
    shutil.copytree(src, dst)
    config_path = os.path.join(dst, "tokenizer_config.json")
    config = read_json(config_path)
    if isinstance(config.get("extra_special_tokens"), list):
        extra = config.pop("extra_special_tokens")
        config.setdefault("additional_special_tokens", extra)
        write_json(config_path, config, indent=2)
    if all(os.path.exists(os.path.join(dst, f)) for f in ("vocab.json", "merges.txt")):
        return
    model = read_json(os.path.join(src, "tokenizer.json"))["model"]
    write_json(os.path.join(dst, "vocab.json"), model["vocab"])
    pairs = [m.split(" ") if isinstance(m, str) else m for m in model["merges"]]
    with open(os.path.join(dst, "merges.txt"), "w", encoding="utf-8") as f:
        f.write("\n".join(["#version: 0.2"] + [f"{a} {b}" for a, b in pairs]))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--v4-python", required=False, help="a python with transformers 4.x (slow CLIPTokenizer)")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        return worker()
    if not args.v4_python:
        sys.exit("pass --v4-python (a python with transformers 4.57, for the slow tokenizer's ids)")

    import tokenizers
    import transformers

    assert transformers.__version__.startswith("5."), transformers.__version__
    tokens = read_json(TOKENS)
    prompts = [c["prompt"] for c in tokens["cases"]] + EXTRA_PROMPTS
    n_tokens = len(tokens["cases"])

    tmp = tempfile.mkdtemp()
    # folder name -> path, for both references; "slow_dir" where the slow one needs a stand-in.
    folders = {}

    # Tiny fixtures, saved as they are committed.
    copy_files(TINY_DIR, os.path.join(tmp, "src", "tiny-sdxl2"), ["vocab.json", "merges.txt"])
    variant = os.path.join(CLIP_DIR, "variants", "sdxl2")
    copy_files(variant, os.path.join(tmp, "src", "tiny-sdxl2"), os.listdir(variant))
    for name, src in [("tiny-sd15", TINY_DIR), ("tiny-sdxl2", os.path.join(tmp, "src", "tiny-sdxl2"))]:
        out = os.path.join(OUT_DIR, name)
        save_v5(src, out)
        folders[name] = out
        if name == "tiny-sd15":
            strings = os.path.join(tmp, name + "+merges-as-strings")
            shutil.copytree(out, strings)
            tj = read_json(os.path.join(out, "tokenizer.json"))
            assert all(isinstance(m, list) and len(m) == 2 for m in tj["model"]["merges"])
            tj["model"]["merges"] = [" ".join(m) for m in tj["model"]["merges"]]
            write_json(os.path.join(strings, "tokenizer.json"), tj, indent=2)
            folders[name + "+merges-as-strings"] = strings
            both = os.path.join(tmp, name + "+with-vocab-files")
            shutil.copytree(out, both)
            copy_files(CLIP_DIR, both, ["vocab.json", "merges.txt"])
            folders[name + "+with-vocab-files"] = both

    # Full-size saves, committed as skeletons.
    vocab = read_json(os.path.join(CLIP_DIR, "vocab.json"))
    pairs = clip_merge_pairs()
    for name in CONFIGS:
        src = os.path.join(tmp, "src", name)
        copy_files(CLIP_DIR, src, ["vocab.json", "merges.txt"])
        config_src = CLIP_DIR if name == "sd15" else os.path.join(CLIP_DIR, "variants", name)
        configs = [f for f in os.listdir(config_src) if f.endswith(".json") and f != "vocab.json"]
        copy_files(config_src, src, configs)
        saved = os.path.join(tmp, "full", name)
        save_v5(src, saved)
        tj = read_json(os.path.join(saved, "tokenizer.json"))
        assert tj["model"]["vocab"] == vocab and tj["model"]["merges"] == pairs, name
        tj["model"]["vocab"], tj["model"]["merges"] = {}, []
        out = os.path.join(OUT_DIR, "full", name)
        shutil.rmtree(out, ignore_errors=True)
        os.makedirs(out)
        write_json(os.path.join(out, "tokenizer.skeleton.json"), tj, indent=2)
        shutil.copy(os.path.join(saved, "tokenizer_config.json"), out)
        folders["full/" + name] = saved

    # The slow tokenizer's stand-ins for tokenizer.json-only folders.
    slow_dirs = {}
    for name, d in folders.items():
        slow_dirs[name] = os.path.join(tmp, "slow", name)
        slow_stand_in(d, slow_dirs[name])

    names = list(folders)
    v5 = run_worker(sys.executable, [folders[n] for n in names], prompts)
    slow = run_worker(args.v4_python, [slow_dirs[n] for n in names], prompts)
    got = {}
    for n, r5, rs in zip(names, v5["dirs"], slow["dirs"]):
        got[n + "/v5"], got[n + "/slow"] = r5, rs

    # tokens.json's records (its make_tokens.py layout) as bases.
    def tokens_record(case, config, mode):
        own = case[config]
        slow_rec = own if "ids" in own else case["sd15"]
        rec = slow_rec if mode == "slow" else own.get("v5") or own.get("fast") or slow_rec
        return {"ids": rec["ids"], "n_untruncated": rec["n_untruncated"]}

    def base_cases(base):
        if base is None:
            return [None] * len(prompts)
        if base.startswith("tokens.json:"):
            config, mode = base[len("tokens.json:") :].split("/")
            return [tokens_record(c, config, mode) for c in tokens["cases"]] + [None] * len(EXTRA_PROMPTS)
        return got[base]["cases"]

    bases = {
        "tiny-sd15/v5": None,
        "tiny-sd15/slow": "tiny-sd15/v5",
        "tiny-sd15+merges-as-strings/v5": "tiny-sd15/v5",
        "tiny-sd15+merges-as-strings/slow": "tiny-sd15/slow",
        "tiny-sd15+with-vocab-files/v5": "tiny-sd15/v5",
        "tiny-sd15+with-vocab-files/slow": "tokens.json:sd15/slow",
        "tiny-sdxl2/v5": "tiny-sd15/v5",
        "tiny-sdxl2/slow": "tiny-sdxl2/v5",
    }
    for name in CONFIGS:
        for mode in ("v5", "slow"):
            bases[f"full/{name}/{mode}"] = f"tokens.json:{name}/{mode}"
    assert sorted(bases) == sorted(got), (sorted(bases), sorted(got))

    results = {}
    for key in bases:
        base = bases[key]
        diff = {str(i): rec for i, (rec, b) in enumerate(zip(got[key]["cases"], base_cases(base))) if rec != b}
        results[key] = {"base": base, "pad_id": got[key]["pad_id"], "vocab_size": got[key]["vocab_size"], "cases": diff}

    doc = {
        "about": "CLIP tokenizer ids for tokenizer.json folders; written by tools/reference/make_tokenizer_json.py",
        "transformers_v5": transformers.__version__,
        "tokenizers": tokenizers.__version__,
        "transformers_slow": slow["version"],
        "max_length": MAX_LENGTH,
        "n_tokens_json_prompts": n_tokens,
        "extra_prompts": EXTRA_PROMPTS,
        "results": results,
    }
    path = os.path.join(OUT_DIR, "ids.json")
    with open(path, "w", encoding="utf-8") as f:
        json.dump(doc, f, ensure_ascii=True, separators=(",", ":"))
        f.write("\n")
    shutil.rmtree(tmp)
    for key, r in results.items():
        print(f"{key:40} base {str(r['base']):28} pad {r['pad_id']:6} vocab {r['vocab_size']:6} {len(r['cases'])} records")
    print(f"-> {path} ({os.path.getsize(path)} bytes)")


if __name__ == "__main__":
    main()
