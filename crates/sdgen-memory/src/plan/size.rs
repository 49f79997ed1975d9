//! `--max-memory` values: `8GB`, `8GiB`, `7.5G`, `512MB`, `8` (GB).
//!
//! Units are binary throughout: KB = KiB = 1024 bytes, MB = MiB, GB = GiB, TB = TiB. The console
//! prints GiB and calls them "GB" (as the seed did, and as Apple sells its "36GB" machines), so
//! `--max-memory 16GB` means the same 16GB the memory lines show; the IEC spellings are accepted
//! for those who prefer to be explicit. A bare number is GB.

/// A `--max-memory` value that could not be read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParseSizeError {
    /// The value given.
    pub input: String,
    /// What is wrong with it.
    pub reason: String,
}

impl std::fmt::Display for ParseSizeError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "--max-memory `{}`: {}", self.input, self.reason)
    }
}

impl std::error::Error for ParseSizeError {}

/// Largest bare number taken as GB: anything bigger was surely meant as bytes or MB.
const MAX_BARE_GB: f64 = 16384.0;

/// Parses a memory size into bytes (binary units, see the module docs): a positive number, an
/// optional space, and an optional unit among B, K/KB/KiB, M/MB/MiB, G/GB/GiB, T/TB/TiB (any
/// case). Without a unit the number is GB.
pub fn parse_memory_size(input: &str) -> Result<u64, ParseSizeError> {
    let err = |reason: String| ParseSizeError { input: input.to_string(), reason };
    let s = input.trim();
    if s.is_empty() {
        return Err(err("empty: give a size such as 8GB or 512MB".into()));
    }
    let split = s.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(s.len());
    let (number, unit) = (&s[..split], s[split..].trim());
    if number.is_empty() {
        let what = if s.starts_with('-') { "is negative" } else { "does not start with a number" };
        return Err(err(format!("{what}: give a size such as 8GB or 512MB")));
    }
    let value: f64 = number.parse().map_err(|_| err(format!("`{number}` is not a number")))?;
    let shift = match unit.to_ascii_lowercase().as_str() {
        "" => {
            if value > MAX_BARE_GB {
                return Err(err(format!(
                    "a number without a unit is GB, and {number}GB is surely not meant: write the unit, e.g. 8GB or \
                     512MB"
                )));
            }
            30
        }
        "b" => 0,
        "k" | "kb" | "kib" => 10,
        "m" | "mb" | "mib" => 20,
        "g" | "gb" | "gib" => 30,
        "t" | "tb" | "tib" => 40,
        other => {
            return Err(err(format!("unknown unit `{other}`: use B, KB, MB, GB or TB (binary: 1GB = 1024MB)")));
        }
    };
    let bytes = (value * (1u64 << shift) as f64).round();
    if bytes < 1.0 {
        return Err(err("must be more than 0 bytes".into()));
    }
    if bytes >= u64::MAX as f64 {
        return Err(err("is too large".into()));
    }
    Ok(bytes as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    const GIB: u64 = 1 << 30;

    #[test]
    fn units_are_binary_and_bare_numbers_are_gb() {
        assert_eq!(parse_memory_size("8GB"), Ok(8 * GIB));
        assert_eq!(parse_memory_size("8GiB"), Ok(8 * GIB));
        assert_eq!(parse_memory_size("8gb"), Ok(8 * GIB));
        assert_eq!(parse_memory_size("8 G"), Ok(8 * GIB));
        assert_eq!(parse_memory_size(" 8 "), Ok(8 * GIB));
        assert_eq!(parse_memory_size("7.5GB"), Ok(7 * GIB + GIB / 2));
        assert_eq!(parse_memory_size("512MB"), Ok(512 << 20));
        assert_eq!(parse_memory_size("512MiB"), Ok(512 << 20));
        assert_eq!(parse_memory_size("64k"), Ok(64 << 10));
        assert_eq!(parse_memory_size("1TB"), Ok(1 << 40));
        assert_eq!(parse_memory_size("4096B"), Ok(4096));
        assert_eq!(parse_memory_size(".5GB"), Ok(GIB / 2));
    }

    #[test]
    fn bad_values_are_refused_naming_the_value() {
        for (input, says) in [
            ("", "empty"),
            ("GB", "does not start with a number"),
            ("-8GB", "negative"),
            ("8XB", "unknown unit `xb`"),
            ("8 GB extra", "unknown unit"),
            ("1.2.3GB", "`1.2.3` is not a number"),
            ("0", "more than 0"),
            ("0.1B", "more than 0"),
            ("8589934592", "without a unit is GB"),
            ("99999999999TB", "too large"),
        ] {
            let e = parse_memory_size(input).expect_err(input);
            let msg = e.to_string();
            assert!(msg.contains(says), "{input}: {msg}");
            assert!(msg.starts_with(&format!("--max-memory `{input}`")), "{msg}");
        }
    }
}
