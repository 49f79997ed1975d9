//! A1111's emphasis syntax, as `parse_prompt_attention` reads it
//! (AUTOMATIC1111/stable-diffusion-webui, `modules/prompt_parser.py`): the same regex, the same
//! bracket stacks, the same merge of equal-weight runs, so the weights are equal to the last bit
//! (f64, multiplied in the same order).

use std::sync::LazyLock;

use regex::Regex;

/// One run of text and the weight its tokens get, or a `BREAK`.
#[derive(Debug, Clone, PartialEq)]
pub enum Piece {
    /// Text and its multiplier.
    Text(String, f64),
    /// `BREAK`: the rest starts a new 75-token chunk (A1111's `["BREAK", -1]`).
    Break,
}

/// `re_attention` of `prompt_parser.py`, alternative for alternative (leftmost-first, as
/// Python's `re`): escapes, `(`, `[`, `:weight)`, `)`, `]`, plain text, a lone `:`.
static ATTENTION: LazyLock<Regex> = LazyLock::new(|| {
    Regex::new(r"\\\(|\\\)|\\\[|\\\]|\\\\|\\|\(|\[|:\s*([+-]?[.\d]+)\s*\)|\)|\]|[^\\()\[\]:]+|:").expect("static regex")
});

/// `re_break` of `prompt_parser.py`.
static BREAK: LazyLock<Regex> = LazyLock::new(|| Regex::new(r"\s*\bBREAK\b\s*").expect("static regex"));

/// `(x)` multiplies by 1.1, `[x]` by 1/1.1 (A1111's `round_bracket_multiplier`,
/// `square_bracket_multiplier`).
const ROUND: f64 = 1.1;
const SQUARE: f64 = 1.0 / 1.1;

/// Parses `text` into runs of text with their weights, as `parse_prompt_attention` does:
/// `(abc)` ×1.1, `(abc:3.12)` ×3.12, `[abc]` ÷1.1, `\(` `\)` `\[` `\]` `\\` literal characters,
/// unbalanced brackets closed at the end, `BREAK` (upper-case, a word of its own) a chunk break;
/// adjacent runs of equal weight merged. One divergence: a weight Python's `float()` would refuse
/// (`(x:1.2.3)`, where A1111 raises) is read as plain text here.
pub fn parse_prompt_attention(text: &str) -> Vec<Piece> {
    // (text, weight) with A1111's -1 marking a BREAK, as its list holds them.
    let mut res: Vec<(String, f64)> = Vec::new();
    let mut round: Vec<usize> = Vec::new();
    let mut square: Vec<usize> = Vec::new();
    let multiply_range = |res: &mut Vec<(String, f64)>, start: usize, m: f64| {
        for r in &mut res[start..] {
            r.1 *= m;
        }
    };
    for caps in ATTENTION.captures_iter(text) {
        let m = caps.get(0).map_or("", |m| m.as_str());
        let weight = caps.get(1).and_then(|w| w.as_str().parse::<f64>().ok());
        if let Some(literal) = m.strip_prefix('\\') {
            res.push((literal.to_owned(), 1.0));
        } else if m == "(" {
            round.push(res.len());
        } else if m == "[" {
            square.push(res.len());
        } else if let Some(w) = weight.filter(|_| !round.is_empty()) {
            let start = round.pop().expect("non-empty");
            multiply_range(&mut res, start, w);
        } else if m == ")" && !round.is_empty() {
            let start = round.pop().expect("non-empty");
            multiply_range(&mut res, start, ROUND);
        } else if m == "]" && !square.is_empty() {
            let start = square.pop().expect("non-empty");
            multiply_range(&mut res, start, SQUARE);
        } else {
            for (i, part) in BREAK.split(m).enumerate() {
                if i > 0 {
                    res.push(("BREAK".to_owned(), -1.0));
                }
                res.push((part.to_owned(), 1.0));
            }
        }
    }
    for start in round {
        multiply_range(&mut res, start, ROUND);
    }
    for start in square {
        multiply_range(&mut res, start, SQUARE);
    }
    if res.is_empty() {
        res.push((String::new(), 1.0));
    }
    // Merge runs of identical weights (a BREAK's -1 merges with a neighbouring BREAK, as in A1111).
    let mut i = 0;
    while i + 1 < res.len() {
        if res[i].1 == res[i + 1].1 {
            let next = res.remove(i + 1);
            res[i].0.push_str(&next.0);
        } else {
            i += 1;
        }
    }
    res.into_iter().map(|(t, w)| if t == "BREAK" && w == -1.0 { Piece::Break } else { Piece::Text(t, w) }).collect()
}

/// Whether `text` uses any of the syntax [`parse_prompt_attention`] reads (brackets, escapes,
/// `BREAK`): such a prompt means something else to diffusers, which reads the brackets as text.
pub fn has_attention_syntax(text: &str) -> bool {
    text.contains(['(', ')', '[', ']', '\\']) || BREAK.is_match(text)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(s: &str, w: f64) -> Piece {
        Piece::Text(s.to_owned(), w)
    }

    /// The examples of `parse_prompt_attention`'s docstring (modules/prompt_parser.py), with its
    /// exact floats.
    #[test]
    fn docstring_examples() {
        assert_eq!(parse_prompt_attention("normal text"), [t("normal text", 1.0)]);
        assert_eq!(
            parse_prompt_attention("an (important) word"),
            [t("an ", 1.0), t("important", 1.1), t(" word", 1.0)]
        );
        assert_eq!(parse_prompt_attention("(unbalanced"), [t("unbalanced", 1.1)]);
        assert_eq!(parse_prompt_attention(r"\(literal\]"), [t("(literal]", 1.0)]);
        assert_eq!(parse_prompt_attention("(unnecessary)(parens)"), [t("unnecessaryparens", 1.1)]);
        assert_eq!(
            parse_prompt_attention("a (((house:1.3)) [on] a (hill:0.5), sun, (((sky)))."),
            [
                t("a ", 1.0),
                t("house", 1.5730000000000004),
                t(" ", 1.1),
                t("on", 1.0),
                t(" a ", 1.1),
                t("hill", 0.55),
                t(", sun, ", 1.1),
                t("sky", 1.4641000000000006),
                t(".", 1.1),
            ]
        );
    }

    #[test]
    fn square_brackets_break_and_escapes() {
        assert_eq!(parse_prompt_attention("[unbalanced"), [t("unbalanced", 0.9090909090909091)]);
        assert_eq!(parse_prompt_attention("a cat BREAK a dog"), [t("a cat", 1.0), Piece::Break, t("a dog", 1.0)]);
        // Only a whole upper-case word breaks.
        assert_eq!(parse_prompt_attention("BREAKfast break"), [t("BREAKfast break", 1.0)]);
        assert_eq!(parse_prompt_attention(r"a \\ b"), [t(r"a \ b", 1.0)]);
        assert_eq!(parse_prompt_attention("(x: 0.5 )"), [t("x", 0.5)]);
        assert_eq!(parse_prompt_attention("time: noon"), [t("time: noon", 1.0)]);
        assert_eq!(parse_prompt_attention(""), [t("", 1.0)]);
        assert!(has_attention_syntax("a (cat)") && has_attention_syntax("a BREAK b"));
        assert!(!has_attention_syntax("a cat, breakfast"));
    }
}
