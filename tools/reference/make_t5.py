"""A tiny real-format T5 tokenizer and T5 encoder, and transformers' outputs for them (SD 3.5's
`tokenizer_3` / `text_encoder_3`).

1. Tokenizer: a sentencepiece Unigram model trained on the fixed text `CORPUS` with fixed settings
   (one thread, no shuffling, NFKC for a fixed set of characters, see `NFKC_CHARS`), 260 pieces with
   T5's `<pad>` 0, `</s>` 1, `<unk>` 2 and no `<s>`, converted by transformers' `T5Tokenizer` with
   3 extra ids (263 tokens) and saved with `save_pretrained` to `testdata/tiny-t5/tokenizer_3/`
   (`tokenizer.json`, `tokenizer_config.json`, and `spiece.model` copied beside them as the hub's
   folders have it).
2. Encoder: a `T5EncoderModel` (d_model 64, d_kv 16, 4 heads, d_ff 96, 2 layers, gated-gelu,
   vocab = the tokenizer's length), every weight drawn from a seeded normal (layer norms around
   1), saved with `save_pretrained` to `testdata/tiny-t5/text_encoder_3/` and loaded back with
   `from_pretrained` before any output is taken. A second, ReLU-FF model (`feed_forward_proj:
   "relu"`, T5 1.0's `wi`/`wo`) is only written into the reference file, its keys under `relu.`.
3. References, loaded as diffusers' SD 3 pipeline does (`T5TokenizerFast.from_pretrained`, the
   tokenizer called with `padding="max_length", truncation=True, add_special_tokens=True`):
   `testdata/reference/sd3/t5.json` (per prompt and max length: the ids, the untruncated length and
   the dropped text as diffusers warns it) and `testdata/reference/sd3/t5.safetensors` (the last
   hidden states in f32, bf16 and f16, the last two loaded with `torch_dtype`, so f16 keeps `wo` in
   f32 as transformers' `_keep_in_fp32_modules` does; with and without the attention mask), and
   the relative-position bucket tables of two bucket configurations.

Deterministic: sentencepiece with one thread on a fixed text, seeded weights, one torch thread.

  python tools/reference/make_t5.py
"""
import json
import shutil
import tempfile
import unicodedata
from pathlib import Path

import sentencepiece as spm
from sentencepiece import sentencepiece_model_pb2 as sp_pb2
import torch
from safetensors.torch import save_file
from transformers import T5Config, T5EncoderModel, T5TokenizerFast
from transformers.models.t5.modeling_t5 import T5Attention

ROOT = Path(__file__).resolve().parents[2]
TOKENIZER_DIR = ROOT / "testdata/tiny-t5/tokenizer_3"
ENCODER_DIR = ROOT / "testdata/tiny-t5/text_encoder_3"
OUT = ROOT / "testdata/reference/sd3"

# Prompt-like text the tokenizer is trained on (a few accented words, so NFKC and the charsmap
# matter). Each line is one sentence.
CORPUS = [
    "a photograph of an astronaut riding a horse on the moon",
    "a painting of a fox sitting in a field at sunrise, oil on canvas",
    "a cat wearing a wizard hat, digital art, highly detailed",
    "the city skyline at night with neon lights reflected in the rain",
    "a bowl of ramen with a soft boiled egg, studio lighting",
    "portrait of an old fisherman, dramatic light, black and white",
    "a castle on a hill surrounded by a forest in autumn",
    "a cozy café in paris with a red awning, watercolor",
    "a dragon flying over snowy mountains, epic fantasy art",
    "a robot reading a book in a library, warm tones",
    "macro photo of a dew drop on a green leaf",
    "an isometric illustration of a tiny island with a lighthouse",
    "a vintage car parked on a cobblestone street, film grain",
    "a bouquet of sunflowers in a blue vase on a wooden table",
    "the northern lights over a frozen lake, long exposure",
    "a crème brûlée on a white plate, food photography",
    "an owl perched on a branch under the full moon",
    "a knight in shining armor standing in the rain",
    "a steaming cup of coffee next to an open notebook",
    "children playing in the snow, soft pastel colors",
    "a spaceship landing in a desert with two suns",
    "a jazz band playing in a smoky bar, cinematic",
    "a field of lavender stretching to the horizon",
    "a sleeping dog curled up by the fireplace",
    "the word hello written in the sand at the beach",
]
# More sentences, spelled out from fixed word lists, so the trainer finds 260 pieces.
CORPUS += [
    f"a {adj} {noun} {place}, {style}"
    for adj in ["small", "golden", "ancient", "glowing", "quiet", "colorful", "broken", "giant", "frozen",
                "mysterious", "peaceful", "crowded", "abandoned", "floating", "shimmering", "wooden"]
    for noun, place in [("tower", "by the sea"), ("garden", "behind a house"), ("bridge", "over a river"),
                        ("market", "in the old town"), ("temple", "in the jungle"), ("village", "among hills"),
                        ("statue", "in a museum"), ("lantern", "during a festival"), ("ship", "through a storm")]
    for style in ["photorealistic", "pencil sketch", "concept art", "trending on artstation", "unreal engine",
                  "impressionist brushwork", "minimalist poster"][: 1 + len(adj) % 7]
]
CORPUS += [
    f"{who} {action} {when}"
    for who in ["an explorer", "a musician", "the queen", "a farmer", "two penguins", "a philosopher", "my grandmother",
                "a samurai", "the engineer", "a tired waiter", "seven ravens", "a curious child",
                "a lonely astronomer", "the blacksmith", "a nervous violinist", "our neighbour"]
    for action, when in [("juggling oranges", "at dawn"), ("repairing a clock", "yesterday evening"),
                         ("painting murals", "before midnight"), ("climbing glaciers", "every winter"),
                         ("whistling melodies", "throughout summer"), ("baking pretzels", "on weekends"),
                         ("knitting scarves", "during thunderstorms"), ("photographing butterflies", "in spring")]
]
CORPUS += [
    "The Quick Brown Fox Jumps Over The Lazy Dog In 1987, 2024 And 3650 Nights",
    "Vivid Zebras Quietly Keep Warm Under Yellow Xylophones 0123456789",
]

# The normaliser: NFKC as T5's own model (`nmt_nfkc`) but only for the characters below, so the
# precompiled charsmap (which `tokenizer.json` stores too) stays a few kB instead of 240 kB.
NFKC_CHARS = (
    "ﬀﬁﬂﬃﬄ½¼²³…™Ⅻ\u00a0\u3000"
    + "".join(chr(c) for c in range(0xFF01, 0xFF5F))  # full-width ASCII
)


def normalization_rules() -> str:
    rules = []
    for c in NFKC_CHARS:
        target = unicodedata.normalize("NFKC", c)
        assert target != c, c
        rules.append(f"{ord(c):X}\t{' '.join(f'{ord(t):X}' for t in target)}")
    # Composition of a decomposed e + acute accent (NFC's part of NFKC).
    rules.append("65 301\tE9")
    return "\n".join(rules) + "\n"


SP_SETTINGS = dict(
    model_type="unigram",
    vocab_size=260,
    pad_id=0,
    eos_id=1,
    unk_id=2,
    bos_id=-1,
    character_coverage=1.0,
    num_threads=1,
    input_sentence_size=0,
    shuffle_input_sentence=False,
    max_sentence_length=4192,
)
EXTRA_IDS = 3

ENCODER_CONFIG = dict(
    d_model=64,
    d_kv=16,
    d_ff=96,
    num_layers=2,
    num_decoder_layers=2,
    num_heads=4,
    relative_attention_num_buckets=32,
    relative_attention_max_distance=128,
    dropout_rate=0.0,
    layer_norm_epsilon=1e-6,
    feed_forward_proj="gated-gelu",
    is_encoder_decoder=False,
    use_cache=False,
)

LONG = ", ".join(f"a {w} fox in a field number {i}" for i, w in enumerate(["red", "blue", "tiny", "wise"] * 9))
PROMPTS = [
    "a photograph of an astronaut riding a horse on the moon",
    "A Cat, wearing a wizard hat!! (digital art) -- highly detailed...",
    "  spaces   and\ttabs\nand newlines  ",
    "café crème brûlée, Straße, ﬁne ｆｕｌｌｗｉｄｔｈ Ⅻ ½ … cafe\u0301\u00a0nbsp\u3000ideo",
    "東京の夜 🌃 and ñandú, ΑΒΓ",
    "special tokens </s> <pad> <extra_id_0> <unk> stay whole",
    "",
    LONG,
]
MAX_LENGTHS = [256, 77]


def make_tokenizer() -> T5TokenizerFast:
    with tempfile.TemporaryDirectory() as tmp:
        prefix = Path(tmp) / "spiece"
        text = Path(tmp) / "corpus.txt"
        text.write_text("\n".join(CORPUS) + "\n", encoding="utf-8")
        rules = Path(tmp) / "rules.tsv"
        rules.write_text(normalization_rules(), encoding="utf-8")
        spm.SentencePieceTrainer.train(
            input=str(text), model_prefix=str(prefix), normalization_rule_tsv=str(rules), **SP_SETTINGS
        )
        # The model records the trainer's file paths (temporary, so different every run): cleared.
        proto = sp_pb2.ModelProto()
        proto.ParseFromString(Path(str(prefix) + ".model").read_bytes())
        proto.trainer_spec.ClearField("input")
        proto.trainer_spec.ClearField("model_prefix")
        proto.normalizer_spec.ClearField("normalization_rule_tsv")
        Path(str(prefix) + ".model").write_bytes(proto.SerializeToString())
        # transformers converts a folder's spiece.model (SpmConverter) when it has no tokenizer.json.
        spm_dir = Path(tmp) / "spm"
        spm_dir.mkdir()
        shutil.copy(str(prefix) + ".model", spm_dir / "spiece.model")
        tok = T5TokenizerFast.from_pretrained(spm_dir, extra_ids=EXTRA_IDS)
        if TOKENIZER_DIR.exists():
            shutil.rmtree(TOKENIZER_DIR)
        tok.save_pretrained(TOKENIZER_DIR)
        shutil.copy(spm_dir / "spiece.model", TOKENIZER_DIR / "spiece.model")
    return T5TokenizerFast.from_pretrained(TOKENIZER_DIR)


def reinit(model: torch.nn.Module, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            if "layer_norm" in name:
                p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=gen))
            elif p.dim() == 2 and ("embed" in name or "shared" in name or "relative_attention_bias" in name):
                p.copy_(torch.randn(p.shape, generator=gen))
            else:
                p.copy_(torch.randn(p.shape, generator=gen) / p.shape[-1] ** 0.5)


def main() -> None:
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    tok = make_tokenizer()
    vocab = len(tok)
    assert vocab == 263, vocab

    cases = []
    for prompt in PROMPTS:
        case = {"prompt": prompt}
        untruncated = tok(prompt, padding="longest").input_ids
        for max_len in MAX_LENGTHS:
            enc = tok(prompt, padding="max_length", max_length=max_len, truncation=True, add_special_tokens=True)
            ids = enc.input_ids
            assert len(ids) == max_len
            # diffusers' _get_t5_prompt_embeds: the warning's text is untruncated[max_len - 1 : -1].
            dropped = untruncated[max_len - 1:-1] if len(untruncated) > max_len else []
            case[str(max_len)] = {
                "ids": ids,
                "attention_mask": enc.attention_mask,
                "dropped_tokens": len(dropped),
                "dropped_text": tok.decode(dropped) if dropped else "",
            }
        case["untruncated_len"] = len(untruncated)
        cases.append(case)
    assert cases[-1]["256"]["dropped_tokens"] > 0 and cases[-1]["77"]["dropped_tokens"] > 0
    assert any(c["256"]["dropped_tokens"] == 0 and c["77"]["dropped_tokens"] == 0 for c in cases)

    torch.manual_seed(0)
    model = T5EncoderModel(T5Config(vocab_size=vocab, **ENCODER_CONFIG)).eval()
    reinit(model, 1)
    if ENCODER_DIR.exists():
        shutil.rmtree(ENCODER_DIR)
    model.save_pretrained(ENCODER_DIR)

    relu = T5EncoderModel(T5Config(vocab_size=vocab, **dict(ENCODER_CONFIG, feed_forward_proj="relu"))).eval()
    reinit(relu, 2)

    # Encoder inputs: every prompt at 77 tokens; at 256 (SD 3.5's default) three of them, to keep
    # the file small.
    rows_256 = [0, 3, len(cases) - 1]
    ids = {
        77: torch.tensor([c["77"]["ids"] for c in cases]),
        256: torch.tensor([cases[i]["256"]["ids"] for i in rows_256]),
    }
    mask_77 = torch.tensor([c["77"]["attention_mask"] for c in cases])
    tensors = {"ids.77": ids[77], "ids.256": ids[256], "mask.77": mask_77}
    with torch.no_grad():
        for dname, dtype in [("f32", torch.float32), ("bf16", torch.bfloat16), ("f16", torch.float16)]:
            m = T5EncoderModel.from_pretrained(ENCODER_DIR, torch_dtype=dtype).eval()
            if dtype == torch.float16:
                assert m.encoder.block[0].layer[1].DenseReluDense.wo.weight.dtype == torch.float32
            out = m(ids[77])[0]
            assert out.dtype == dtype, (out.dtype, dtype)
            # Half-precision outputs are stored in their own dtype (exactly what transformers returned).
            tensors[f"out.{dname}.77"] = out.contiguous()
            tensors[f"out_masked.{dname}.77"] = m(ids[77], attention_mask=mask_77)[0].contiguous()
            if dtype == torch.float32:
                tensors["out.f32.256"] = m(ids[256])[0].contiguous()
        m = T5EncoderModel.from_pretrained(ENCODER_DIR).eval()
        for name, p in model.state_dict().items():
            assert torch.equal(p, m.state_dict()[name]), name
        for name, p in relu.state_dict().items():
            if name != "encoder.embed_tokens.weight":
                tensors[f"relu.{name}"] = p.contiguous()
        tensors["relu_out.77"] = relu(ids[77])[0].contiguous()
    # transformers' bidirectional relative-position buckets for key − query offsets −600..=600
    # (the float32 logarithm puts offsets such as 64 exactly on a bucket boundary).
    offsets = torch.arange(-600, 601)
    for buckets, distance in [(32, 128), (64, 256)]:
        tensors[f"buckets.{buckets}.{distance}"] = T5Attention._relative_position_bucket(offsets, True, buckets, distance)

    OUT.mkdir(parents=True, exist_ok=True)
    meta = {"rows_256": rows_256, "encoder": ENCODER_CONFIG, "vocab_size": vocab}
    save_file(tensors, OUT / "t5.safetensors", metadata={"config": json.dumps(meta)})
    (OUT / "t5.json").write_text(
        json.dumps({"tokenizer": "testdata/tiny-t5/tokenizer_3", "cases": cases}, ensure_ascii=False, indent=1) + "\n",
        encoding="utf-8",
    )
    print("vocab", vocab, "untruncated lengths", [c["untruncated_len"] for c in cases])


if __name__ == "__main__":
    main()
