//! A1111's long prompts: the parsed pieces' tokens laid into chunks of 75, each framed as CLIP's
//! 77 (`FrozenCLIPEmbedderWithCustomWordsBase.tokenize_line` and `process_tokens` in
//! AUTOMATIC1111/stable-diffusion-webui `modules/sd_hijack_clip.py`), and the emphasis applied to
//! each chunk's hidden states (`EmphasisOriginal.after_transformers`, `modules/sd_emphasis.py`).

use candle_core::Tensor;

/// Tokens per chunk between its start and end tokens (A1111's `chunk_length`).
pub const CHUNK_TOKENS: usize = 75;
/// A1111's default `comma_padding_backtrack`: when a chunk fills up within this many tokens
/// after a comma, the words after the comma move to the next chunk.
pub const COMMA_BACKTRACK: usize = 20;

/// The ids that frame a chunk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChunkFrame {
    /// `<|startoftext|>`.
    pub bos: u32,
    /// `<|endoftext|>`.
    pub eos: u32,
    /// What follows the end token (A1111's `id_pad`: eos for SD 1.5's tokenizer, `!` for SDXL's
    /// second one).
    pub pad: u32,
    /// The id of `,` (A1111's `comma_token`), for the backtrack.
    pub comma: Option<u32>,
}

/// One chunk as the text encoder reads it: `CHUNK_TOKENS + 2` ids and a weight per id.
#[derive(Debug, Clone, PartialEq)]
pub struct PromptChunk {
    /// bos, up to 75 tokens, eos, padding.
    pub ids: Vec<u32>,
    /// 1.0 for the frame and padding, the parsed weight for each token.
    pub multipliers: Vec<f64>,
}

impl PromptChunk {
    /// A1111's `empty_chunk`, which pads the shorter of the prompt and negative prompt.
    pub fn empty(frame: ChunkFrame) -> Self {
        framed(frame, Vec::new(), Vec::new())
    }

    /// Whether every weight is 1 (the emphasis is then the identity).
    pub fn unweighted(&self) -> bool {
        self.multipliers.iter().all(|&m| m == 1.0)
    }
}

/// A piece of a parsed prompt as token ids: tokens and their weight, or a `BREAK`.
#[derive(Debug, Clone, PartialEq)]
pub enum TokenPiece {
    /// Tokens with one weight.
    Tokens(Vec<u32>, f64),
    /// Start a new chunk.
    Break,
}

/// `next_chunk` of `tokenize_line`: pad to 75 with eos, frame with bos/eos, and (as
/// `process_tokens` does where `id_end != id_pad`) everything after the first eos becomes `pad`.
fn framed(frame: ChunkFrame, tokens: Vec<u32>, weights: Vec<f64>) -> PromptChunk {
    let mut ids = Vec::with_capacity(CHUNK_TOKENS + 2);
    let mut multipliers = Vec::with_capacity(CHUNK_TOKENS + 2);
    ids.push(frame.bos);
    multipliers.push(1.0);
    let n = tokens.len();
    ids.extend(tokens);
    multipliers.extend(weights);
    ids.push(frame.eos);
    ids.resize(CHUNK_TOKENS + 2, frame.pad);
    multipliers.resize(CHUNK_TOKENS + 2, 1.0);
    debug_assert!(n <= CHUNK_TOKENS);
    PromptChunk { ids, multipliers }
}

/// Lays the pieces' tokens into chunks as `tokenize_line` does (with the comma backtrack of
/// [`COMMA_BACKTRACK`]); at least one chunk.
pub fn chunk_tokens(pieces: &[TokenPiece], frame: ChunkFrame) -> Vec<PromptChunk> {
    let mut chunks = Vec::new();
    let (mut tokens, mut weights): (Vec<u32>, Vec<f64>) = (Vec::new(), Vec::new());
    let mut last_comma: Option<usize> = None;
    let next_chunk = |chunks: &mut Vec<PromptChunk>, tokens: &mut Vec<u32>, weights: &mut Vec<f64>| {
        chunks.push(framed(frame, std::mem::take(tokens), std::mem::take(weights)));
    };
    for piece in pieces {
        let (ids, weight) = match piece {
            TokenPiece::Break => {
                next_chunk(&mut chunks, &mut tokens, &mut weights);
                last_comma = None;
                continue;
            }
            TokenPiece::Tokens(ids, w) => (ids, *w),
        };
        for &token in ids {
            if Some(token) == frame.comma {
                last_comma = Some(tokens.len());
            } else if let Some(comma) =
                last_comma.filter(|&c| tokens.len() == CHUNK_TOKENS && tokens.len() - c <= COMMA_BACKTRACK)
            {
                // The words after the comma move on to the next chunk.
                let (moved, moved_w) = (tokens.split_off(comma + 1), weights.split_off(comma + 1));
                next_chunk(&mut chunks, &mut tokens, &mut weights);
                last_comma = None;
                (tokens, weights) = (moved, moved_w);
            }
            if tokens.len() == CHUNK_TOKENS {
                next_chunk(&mut chunks, &mut tokens, &mut weights);
                last_comma = None;
            }
            tokens.push(token);
            weights.push(weight);
        }
    }
    if !tokens.is_empty() || chunks.is_empty() {
        next_chunk(&mut chunks, &mut tokens, &mut weights);
    }
    chunks
}

/// A1111's "Original" emphasis on one chunk's hidden states `[1, tokens, d]`: each token's
/// state times its weight, then the whole rescaled so its mean is the unweighted mean.
pub fn apply_emphasis(hidden: &Tensor, multipliers: &[f64]) -> candle_core::Result<Tensor> {
    let dtype = hidden.dtype();
    let z = hidden.to_dtype(candle_core::DType::F32)?;
    let original_mean = z.mean_all()?.to_scalar::<f32>()?;
    let m: Vec<f32> = multipliers.iter().map(|&m| m as f32).collect();
    let m = Tensor::from_vec(m, (1, multipliers.len(), 1), z.device())?;
    let z = z.broadcast_mul(&m)?;
    let new_mean = z.mean_all()?.to_scalar::<f32>()?;
    (z * f64::from(original_mean / new_mean))?.to_dtype(dtype)
}

#[cfg(test)]
mod tests {
    use super::*;

    const FRAME: ChunkFrame = ChunkFrame { bos: 100, eos: 101, pad: 0, comma: Some(7) };

    fn words(n: usize, id: u32) -> TokenPiece {
        TokenPiece::Tokens(vec![id; n], 1.0)
    }

    #[test]
    fn short_prompt_is_one_framed_chunk() {
        let chunks = chunk_tokens(&[TokenPiece::Tokens(vec![5, 6], 1.2)], FRAME);
        assert_eq!(chunks.len(), 1);
        let c = &chunks[0];
        assert_eq!(c.ids.len(), 77);
        assert_eq!(&c.ids[..5], &[100, 5, 6, 101, 0]);
        assert_eq!(&c.multipliers[..4], &[1.0, 1.2, 1.2, 1.0]);
        assert_eq!(chunk_tokens(&[], FRAME), [PromptChunk::empty(FRAME)]);
    }

    #[test]
    fn long_prompt_and_break_start_new_chunks() {
        let chunks = chunk_tokens(&[words(80, 5)], FRAME);
        assert_eq!(chunks.len(), 2);
        assert_eq!((chunks[0].ids[75], chunks[0].ids[76]), (5, 101));
        assert_eq!(&chunks[1].ids[..7], &[100, 5, 5, 5, 5, 5, 101]);
        let chunks = chunk_tokens(&[words(3, 5), TokenPiece::Break, words(2, 6)], FRAME);
        assert_eq!(chunks.len(), 2);
        assert_eq!(&chunks[1].ids[..4], &[100, 6, 6, 101]);
    }

    /// A comma within 20 tokens of a full chunk's end carries the words after it over.
    #[test]
    fn comma_backtrack() {
        let chunks = chunk_tokens(&[words(60, 5), TokenPiece::Tokens(vec![7], 1.0), words(20, 6)], FRAME);
        assert_eq!(chunks.len(), 2);
        // Chunk 0: 60 words and the comma; the 14 words after it moved to chunk 1 (20 in all).
        assert_eq!(chunks[0].ids[61], 7);
        assert_eq!(chunks[0].ids[62], 101);
        assert_eq!(&chunks[1].ids[1..21], &[6; 20]);
        assert_eq!(chunks[1].ids[21], 101);
        // Too far back: no backtrack.
        let chunks = chunk_tokens(&[words(40, 5), TokenPiece::Tokens(vec![7], 1.0), words(40, 6)], FRAME);
        assert_eq!(chunks[0].ids[76], 101);
        assert_eq!(chunks[0].ids[75], 6);
    }

    #[test]
    fn emphasis_keeps_the_mean() {
        let z = Tensor::new(&[[[1.0f32, 2.0], [3.0, 4.0], [5.0, 6.0]]], &candle_core::Device::Cpu).unwrap();
        let out = apply_emphasis(&z, &[1.0, 2.0, 1.0]).unwrap();
        let mean = out.mean_all().unwrap().to_scalar::<f32>().unwrap();
        assert!((mean - 3.5).abs() < 1e-6);
        let v: Vec<f32> = out.flatten_all().unwrap().to_vec1().unwrap();
        // Weighted: [1,2,6,8,5,6] (mean 28/6); rescaled by 3.5/(28/6) = 0.75.
        assert!((v[2] - 4.5).abs() < 1e-6 && (v[0] - 0.75).abs() < 1e-6);
    }
}
