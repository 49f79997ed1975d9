#!/usr/bin/env python3
"""Reference embeddings of prompts read as AUTOMATIC1111's web UI reads them, on the tiny SD 1.5
and the tiny SDXL.

Writes (relative to the repository root):
  testdata/reference/prompts/prompts.json         the prompts, their chunks' ids and weights
  testdata/reference/prompts/prompts.safetensors  per case the text encoder's output, [1, 77·k, d],
                                                  and `pipeline_image`: IMAGE_CASE through diffusers'
                                                  StableDiffusionPipeline with prompt_embeds= and
                                                  negative_prompt_embeds= these embeddings
  testdata/reference/prompts/sdxl.json            SDXL: the prompt, the negative and their chunks
  testdata/reference/prompts/sdxl.safetensors     SDXL: `context.prompt`/`context.negative`
                                                  [1, 77·k, 768 + 1280] (both encoders' penultimate
                                                  states side by side), `pooled.prompt`/
                                                  `pooled.negative` [1, 1280] (the second
                                                  encoder's, first chunk), and `pipeline_image`
                                                  through StableDiffusionXLPipeline given them

A re-implementation of A1111's algorithm on top of transformers' CLIPTextModel, following
AUTOMATIC1111/stable-diffusion-webui (v1.10):
  - parse_prompt_attention: modules/prompt_parser.py (copied, regexes and all);
  - tokenize_line / next_chunk (chunks of 75, comma_padding_backtrack = 20, BREAK),
    process_tokens (id_pad after the first id_end), forward (chunks encoded one by one and
    torch.hstack-ed; the shorter side padded with empty_chunk()): modules/sd_hijack_clip.py,
    FrozenCLIPEmbedderWithCustomWordsBase;
  - encode_with_transformers with CLIP_stop_at_last_layers ("Clip skip"): the same file,
    FrozenCLIPEmbedderWithCustomWords;
  - EmphasisOriginal.after_transformers (the default "Original" emphasis): modules/sd_emphasis.py;
  - SDXL: FrozenCLIPEmbedderForSDXLWithCustomWords (CLIP-L: the penultimate hidden state, padded
    with its end token, modules/sd_hijack_clip.py) and FrozenOpenCLIPEmbedder2WithCustomWords
    (OpenCLIP bigG: the penultimate state, padded with id 0, its projected pooled output attached
    to each chunk's z and kept through the emphasis, modules/sd_hijack_open_clip.py);
    FrozenCLIPEmbedderWithCustomWordsBase.forward returns `zs[0].pooled`, the first chunk's; the
    conditioner (repositories/generative-models, sgm/modules/encoders/modules.py
    GeneralConditioner) concatenates the two encoders' outputs along the channels.
Not reproduced: textual-inversion embeddings and prompt editing/scheduling ([a:b:0.5]), which
are not part of this feature.

Run with the pinned stack (tools/reference/requirements.txt), f32 on the CPU.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from safetensors.torch import save_file
from transformers import CLIPTextModel, CLIPTokenizer

ROOT = Path(__file__).resolve().parents[2]
MODEL = ROOT / "testdata/tiny-sd15"
OUT = ROOT / "testdata/reference/prompts"

# --- modules/prompt_parser.py ------------------------------------------------------------------
re_attention = re.compile(r"""
\\\(|
\\\)|
\\\[|
\\]|
\\\\|
\\|
\(|
\[|
:\s*([+-]?[.\d]+)\s*\)|
\)|
]|
[^\\()\[\]:]+|
:
""", re.X)

re_break = re.compile(r"\s*\bBREAK\b\s*", re.S)


def parse_prompt_attention(text):
    res = []
    round_brackets = []
    square_brackets = []
    round_bracket_multiplier = 1.1
    square_bracket_multiplier = 1 / 1.1

    def multiply_range(start_position, multiplier):
        for p in range(start_position, len(res)):
            res[p][1] *= multiplier

    for m in re_attention.finditer(text):
        text = m.group(0)
        weight = m.group(1)
        if text.startswith('\\'):
            res.append([text[1:], 1.0])
        elif text == '(':
            round_brackets.append(len(res))
        elif text == '[':
            square_brackets.append(len(res))
        elif weight is not None and round_brackets:
            multiply_range(round_brackets.pop(), float(weight))
        elif text == ')' and round_brackets:
            multiply_range(round_brackets.pop(), round_bracket_multiplier)
        elif text == ']' and square_brackets:
            multiply_range(square_brackets.pop(), square_bracket_multiplier)
        else:
            parts = re.split(re_break, text)
            for i, part in enumerate(parts):
                if i > 0:
                    res.append(["BREAK", -1])
                res.append([part, 1.0])

    for pos in round_brackets:
        multiply_range(pos, round_bracket_multiplier)
    for pos in square_brackets:
        multiply_range(pos, square_bracket_multiplier)
    if len(res) == 0:
        res = [["", 1.0]]
    i = 0
    while i + 1 < len(res):
        if res[i][1] == res[i + 1][1]:
            res[i][0] += res[i + 1][0]
            res.pop(i + 1)
        else:
            i += 1
    return res


# --- modules/sd_hijack_clip.py -----------------------------------------------------------------
CHUNK_LENGTH = 75
COMMA_PADDING_BACKTRACK = 20  # A1111's default opts.comma_padding_backtrack


class PromptChunk:
    def __init__(self):
        self.tokens = []
        self.multipliers = []


class A1111Clip:
    def __init__(self, tokenizer, model, clip_skip=1):
        self.tokenizer = tokenizer
        self.model = model
        self.clip_skip = clip_skip
        self.id_start = tokenizer.bos_token_id
        self.id_end = tokenizer.eos_token_id
        self.id_pad = self.id_end  # FrozenCLIPEmbedderWithCustomWords (SD 1.x)
        self.comma_token = tokenizer.get_vocab().get(',</w>', None)

    def tokenize(self, texts):
        return self.tokenizer(texts, truncation=False, add_special_tokens=False)["input_ids"]

    def empty_chunk(self):
        chunk = PromptChunk()
        chunk.tokens = [self.id_start] + [self.id_end] * (CHUNK_LENGTH + 1)
        chunk.multipliers = [1.0] * (CHUNK_LENGTH + 2)
        return chunk

    def tokenize_line(self, line):
        parsed = parse_prompt_attention(line)
        tokenized = self.tokenize([text for text, _ in parsed])
        chunks = []
        chunk = PromptChunk()
        last_comma = -1

        def next_chunk():
            nonlocal last_comma, chunk
            to_add = CHUNK_LENGTH - len(chunk.tokens)
            if to_add > 0:
                chunk.tokens += [self.id_end] * to_add
                chunk.multipliers += [1.0] * to_add
            chunk.tokens = [self.id_start] + chunk.tokens + [self.id_end]
            chunk.multipliers = [1.0] + chunk.multipliers + [1.0]
            last_comma = -1
            chunks.append(chunk)
            chunk = PromptChunk()

        for tokens, (text, weight) in zip(tokenized, parsed):
            if text == 'BREAK' and weight == -1:
                next_chunk()
                continue
            position = 0
            while position < len(tokens):
                token = tokens[position]
                if token == self.comma_token:
                    last_comma = len(chunk.tokens)
                elif COMMA_PADDING_BACKTRACK != 0 and len(chunk.tokens) == CHUNK_LENGTH and last_comma != -1 \
                        and len(chunk.tokens) - last_comma <= COMMA_PADDING_BACKTRACK:
                    break_location = last_comma + 1
                    reloc_tokens = chunk.tokens[break_location:]
                    reloc_mults = chunk.multipliers[break_location:]
                    chunk.tokens = chunk.tokens[:break_location]
                    chunk.multipliers = chunk.multipliers[:break_location]
                    next_chunk()
                    chunk.tokens = reloc_tokens
                    chunk.multipliers = reloc_mults
                if len(chunk.tokens) == CHUNK_LENGTH:
                    next_chunk()
                chunk.tokens.append(token)
                chunk.multipliers.append(weight)
                position += 1
        if chunk.tokens or not chunks:
            next_chunk()
        return chunks

    def encode_with_transformers(self, tokens):
        outputs = self.model(input_ids=tokens, output_hidden_states=True)
        if self.clip_skip > 1:
            z = outputs.hidden_states[-self.clip_skip]
            # transformers 5 flattened CLIPTextModel (4.x: model.text_model.final_layer_norm)
            tm = getattr(self.model, "text_model", self.model)
            z = tm.final_layer_norm(z)
        else:
            z = outputs.last_hidden_state
        return z

    def process_tokens(self, tokens, multipliers):
        tokens = torch.asarray([tokens])
        if self.id_end != self.id_pad:
            index = tokens[0].tolist().index(self.id_end)
            tokens[0, index + 1:] = self.id_pad
        z = self.encode_with_transformers(tokens)
        # EmphasisOriginal.after_transformers (modules/sd_emphasis.py)
        multipliers = torch.asarray([multipliers])
        original_mean = z.mean()
        z = z * multipliers.reshape(multipliers.shape + (1,)).expand(z.shape)
        new_mean = z.mean()
        z = z * (original_mean / new_mean)
        return z

    def forward(self, text, chunk_count=None):
        chunks = self.tokenize_line(text)
        count = max(len(chunks), chunk_count or 0)
        chunks = chunks + [self.empty_chunk() for _ in range(count - len(chunks))]
        zs = [self.process_tokens(c.tokens, c.multipliers) for c in chunks]
        return torch.hstack(zs), chunks


LONG = ("a lighthouse on a rocky cliff at dusk, waves crashing below, seagulls circling the lamp, "
        "storm clouds gathering over the sea, a small fishing boat heading home, warm light in the windows")
CASES = [
    # name, prompt, clip skip, chunk count to pad to (as a negative prompt's side would be)
    ("long", LONG, 1, None),
    ("weighted", "a (red:1.3) house, [blue] sky, ((sunset)), \\(literal\\) text", 1, None),
    ("long_weighted_break", "(" + LONG + ":0.8) BREAK a [[small]] dog, (bright eyes:1.2)", 1, None),
    ("padded_negative", "blurry, (low quality:1.4)", 1, 3),
    ("clip_skip2", "a (red:1.3) house " + LONG, 2, None),
]


# One image: a 3-chunk weighted prompt against a 1-chunk weighted negative (padded to 3), through
# diffusers with the embeddings passed in (the folder's PNDM scheduler, seed 42).
IMAGE_CASE = dict(prompt="(" + LONG + ":0.8) BREAK a [[small]] dog, (bright eyes:1.2)",
                  negative_prompt="blurry, (low quality:1.4)", seed=42, steps=10, guidance=7.5, width=64, height=64)


def pipeline_image(tokenizer, model):
    from diffusers import StableDiffusionPipeline
    pipe = StableDiffusionPipeline.from_pretrained(MODEL, torch_dtype=torch.float32, safety_checker=None)
    pipe.set_progress_bar_config(disable=True)
    clip = A1111Clip(tokenizer, model)
    cond, chunks = clip.forward(IMAGE_CASE["prompt"])
    uncond, _ = clip.forward(IMAGE_CASE["negative_prompt"], len(chunks))
    out = pipe(prompt_embeds=cond, negative_prompt_embeds=uncond, num_inference_steps=IMAGE_CASE["steps"],
               guidance_scale=IMAGE_CASE["guidance"], width=IMAGE_CASE["width"], height=IMAGE_CASE["height"],
               generator=torch.Generator("cpu").manual_seed(IMAGE_CASE["seed"]), output_type="np")
    return torch.from_numpy(out.images).contiguous()


# --- SDXL ----------------------------------------------------------------------------------------
SDXL = ROOT / "testdata/tiny-sdxl"
SDXL_CASE = dict(prompt="(" + LONG + ":0.8) BREAK a [[small]] dog, (bright eyes:1.2)",
                 negative_prompt="blurry, (low quality:1.4)", seed=42, steps=10, guidance=5.0, width=64, height=64)


class A1111ClipSdxl(A1111Clip):
    """One of SDXL's encoders as A1111 runs it: the penultimate hidden state, pads of `id_pad`
    after the first end token, and (the projected encoder) the pooled output of each chunk,
    computed before the emphasis and kept through it."""

    def __init__(self, tokenizer, model, id_pad):
        super().__init__(tokenizer, model)
        self.id_pad = id_pad

    def process_tokens_pooled(self, tokens, multipliers):
        tokens = torch.asarray([tokens])
        if self.id_end != self.id_pad:
            index = tokens[0].tolist().index(self.id_end)
            tokens[0, index + 1:] = self.id_pad
        out = self.model(input_ids=tokens, output_hidden_states=True)
        z = out.hidden_states[-2]
        pooled = getattr(out, "text_embeds", None)
        multipliers = torch.asarray([multipliers])
        original_mean = z.mean()
        z = z * multipliers.reshape(multipliers.shape + (1,)).expand(z.shape)
        new_mean = z.mean()
        z = z * (original_mean / new_mean)
        return z, pooled

    def forward_pooled(self, text, chunk_count=None):
        chunks = self.tokenize_line(text)
        count = max(len(chunks), chunk_count or 0)
        chunks = chunks + [self.empty_chunk() for _ in range(count - len(chunks))]
        zs = [self.process_tokens_pooled(c.tokens, c.multipliers) for c in chunks]
        return torch.hstack([z for z, _ in zs]), zs[0][1], chunks


def sdxl():
    from diffusers import StableDiffusionXLPipeline
    from transformers import CLIPTextModelWithProjection
    tok1 = CLIPTokenizer.from_pretrained(SDXL / "tokenizer")
    tok2 = CLIPTokenizer.from_pretrained(SDXL / "tokenizer_2")
    enc1 = CLIPTextModel.from_pretrained(SDXL / "text_encoder", torch_dtype=torch.float32).eval()
    enc2 = CLIPTextModelWithProjection.from_pretrained(SDXL / "text_encoder_2", torch_dtype=torch.float32).eval()
    clip_l = A1111ClipSdxl(tok1, enc1, tok1.eos_token_id)
    clip_g = A1111ClipSdxl(tok2, enc2, 0)

    def conditioning(text, chunk_count=None):
        z1, _, chunks = clip_l.forward_pooled(text, chunk_count)
        z2, pooled, chunks2 = clip_g.forward_pooled(text, chunk_count)
        assert [c.tokens[:1 + c.tokens.index(tok1.eos_token_id)] for c in chunks] == \
            [c.tokens[:1 + c.tokens.index(tok1.eos_token_id)] for c in chunks2], "the encoders' chunks differ"
        return torch.cat([z1, z2], dim=-1), pooled, chunks

    cond, pooled, chunks = conditioning(SDXL_CASE["prompt"])
    uncond, upooled, nchunks = conditioning(SDXL_CASE["negative_prompt"], len(chunks))
    pipe = StableDiffusionXLPipeline.from_pretrained(SDXL, torch_dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    out = pipe(prompt_embeds=cond, pooled_prompt_embeds=pooled, negative_prompt_embeds=uncond,
               negative_pooled_prompt_embeds=upooled, num_inference_steps=SDXL_CASE["steps"],
               guidance_scale=SDXL_CASE["guidance"], width=SDXL_CASE["width"], height=SDXL_CASE["height"],
               generator=torch.Generator("cpu").manual_seed(SDXL_CASE["seed"]), output_type="np")
    tensors = {"context.prompt": cond, "pooled.prompt": pooled, "context.negative": uncond,
               "pooled.negative": upooled, "pipeline_image": torch.from_numpy(out.images)}
    save_file({k: v.contiguous() for k, v in tensors.items()}, OUT / "sdxl.safetensors")
    meta = dict(SDXL_CASE, chunks=[{"ids": c.tokens, "multipliers": c.multipliers} for c in chunks],
                negative_chunks=[{"ids": c.tokens, "multipliers": c.multipliers} for c in nchunks])
    (OUT / "sdxl.json").write_text(json.dumps(meta, indent=1) + "\n")
    print("sdxl", len(chunks), "chunks, context", tuple(cond.shape), "pooled", tuple(pooled.shape))


def main():
    import sys
    torch.manual_seed(0)
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    parts = sys.argv[1:] or ["sd15", "sdxl"]
    OUT.mkdir(parents=True, exist_ok=True)
    if "sdxl" in parts:
        with torch.no_grad():
            sdxl()
    if "sd15" in parts:
        sd15()


def sd15():
    tokenizer = CLIPTokenizer.from_pretrained(MODEL / "tokenizer")
    model = CLIPTextModel.from_pretrained(MODEL / "text_encoder", torch_dtype=torch.float32).eval()
    tensors, meta = {}, []
    with torch.no_grad():
        for name, prompt, skip, pad_to in CASES:
            clip = A1111Clip(tokenizer, model, skip)
            z, chunks = clip.forward(prompt, pad_to)
            tensors[name] = z.contiguous()
            meta.append({
                "name": name, "prompt": prompt, "clip_skip": skip, "pad_to_chunks": pad_to,
                "parsed": parse_prompt_attention(prompt),
                "chunks": [{"ids": c.tokens, "multipliers": c.multipliers} for c in chunks],
            })
        tensors["pipeline_image"] = pipeline_image(tokenizer, model)
    save_file(tensors, OUT / "prompts.safetensors")
    (OUT / "image_case.json").write_text(json.dumps(IMAGE_CASE, indent=1) + "\n")
    (OUT / "prompts.json").write_text(json.dumps(meta, indent=1) + "\n")
    for m in meta:
        print(m["name"], len(m["chunks"]), "chunks")


if __name__ == "__main__":
    main()
