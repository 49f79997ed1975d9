//! File names for saved images: `<YYYYMMDD-HHMMSS>_<seed>_<slug>`, with the time in UTC.
//!
//! The date is computed here from `SystemTime` (Howard Hinnant's `civil_from_days`,
//! <https://howardhinnant.github.io/date_algorithms.html#civil_from_days>) rather than pulling in a
//! date crate for one conversion.

use std::time::{SystemTime, UNIX_EPOCH};

/// The longest prompt slug, in bytes (ASCII, so also characters).
pub(crate) const MAX_SLUG_LEN: usize = 40;

/// The slug used when a prompt has no ASCII letter or digit at all (e.g. a prompt in Japanese).
const EMPTY_SLUG: &str = "image";

/// The stem (file name without extension and without a collision suffix) for an image made at
/// `now` with `seed` from `prompt`.
pub(crate) fn base_stem(now: SystemTime, seed: u64, prompt: &str) -> String {
    format!("{}_{}_{}", utc_timestamp(now), seed, slug(prompt))
}

/// `YYYYMMDD-HHMMSS` in UTC. Times before 1970 (a badly set clock) are written as the epoch.
pub(crate) fn utc_timestamp(now: SystemTime) -> String {
    let secs = now.duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
    let days = (secs / 86_400) as i64;
    let secs_of_day = secs % 86_400;
    let (year, month, day) = civil_from_days(days);
    format!("{year:04}{month:02}{day:02}-{:02}{:02}{:02}", secs_of_day / 3600, secs_of_day / 60 % 60, secs_of_day % 60)
}

/// The proleptic Gregorian (year, month 1..=12, day 1..=31) of `days` since 1970-01-01.
pub(crate) fn civil_from_days(days: i64) -> (i64, u32, u32) {
    // Shift the epoch to 0000-03-01 so the leap day is the last day of the (March-based) year.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let day_of_era = z.rem_euclid(146_097); // [0, 146096]
                                            // [0, 399]; the corrections skip the leap days of 4-, 100- and 400-year cycles.
    let year_of_era = (day_of_era - day_of_era / 1460 + day_of_era / 36_524 - day_of_era / 146_096) / 365;
    // [0, 365]
    let day_of_year = day_of_era - (365 * year_of_era + year_of_era / 4 - year_of_era / 100);
    let month_from_march = (5 * day_of_year + 2) / 153; // [0, 11]
    let day = (day_of_year - (153 * month_from_march + 2) / 5 + 1) as u32;
    let month = if month_from_march < 10 { month_from_march + 3 } else { month_from_march - 9 } as u32;
    let year = year_of_era + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

/// A file-name-safe summary of `prompt`: ASCII lowercase letters and digits, runs of anything else
/// turned into one `-`, at most [`MAX_SLUG_LEN`] bytes, never empty.
pub(crate) fn slug(prompt: &str) -> String {
    let mut out = String::with_capacity(MAX_SLUG_LEN + 2);
    let mut separator_pending = false;
    let mut folded = String::with_capacity(2);
    for c in prompt.chars() {
        folded.clear();
        fold_to_ascii(c, &mut folded);
        if folded.is_empty() {
            separator_pending = true;
            continue;
        }
        if separator_pending && !out.is_empty() {
            out.push('-');
        }
        separator_pending = false;
        out.push_str(&folded);
        if out.len() >= MAX_SLUG_LEN {
            break;
        }
    }
    out.truncate(MAX_SLUG_LEN);
    let trimmed = out.trim_end_matches('-');
    if trimmed.is_empty() {
        EMPTY_SLUG.to_string()
    } else {
        trimmed.to_string()
    }
}

/// Appends the lowercase ASCII letters/digits that `c` stands for: itself, or the base letter of a
/// Latin-1 accented letter (so "café" gives "cafe", not "caf"); nothing for anything else.
fn fold_to_ascii(c: char, out: &mut String) {
    if c.is_ascii_alphanumeric() {
        out.push(c.to_ascii_lowercase());
        return;
    }
    let lower = c.to_lowercase().next().unwrap_or(c);
    let folded = match lower {
        'à'..='å' => "a",
        'æ' => "ae",
        'ç' => "c",
        'è'..='ë' => "e",
        'ì'..='ï' => "i",
        'ð' => "d",
        'ñ' => "n",
        'ò'..='ö' | 'ø' => "o",
        'ù'..='ü' => "u",
        'ý' | 'ÿ' => "y",
        'þ' => "th",
        'ß' => "ss",
        'œ' => "oe",
        _ => "",
    };
    out.push_str(folded);
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn civil_dates_match_known_days() {
        assert_eq!(civil_from_days(0), (1970, 1, 1));
        assert_eq!(civil_from_days(-1), (1969, 12, 31));
        assert_eq!(civil_from_days(11_016), (2000, 2, 29));
        assert_eq!(civil_from_days(11_017), (2000, 3, 1));
        assert_eq!(civil_from_days(19_782), (2024, 2, 29));
        assert_eq!(civil_from_days(19_783), (2024, 3, 1));
        assert_eq!(civil_from_days(47_540), (2100, 2, 28));
        assert_eq!(civil_from_days(47_541), (2100, 3, 1)); // 2100 is not a leap year
    }

    #[test]
    fn civil_dates_agree_with_a_day_by_day_walk() {
        // Walk forward from 1970-01-01 with the month-length rules and compare every day to 2400.
        let (mut year, mut month, mut day) = (1970i64, 1u32, 1u32);
        for days in 0..157_000i64 {
            assert_eq!(civil_from_days(days), (year, month, day), "day {days}");
            let leap = (year % 4 == 0 && year % 100 != 0) || year % 400 == 0;
            let month_len = match month {
                2 if leap => 29,
                2 => 28,
                4 | 6 | 9 | 11 => 30,
                _ => 31,
            };
            day += 1;
            if day > month_len {
                day = 1;
                month += 1;
                if month > 12 {
                    month = 1;
                    year += 1;
                }
            }
        }
    }

    #[test]
    fn timestamps_are_utc() {
        // python: datetime.fromtimestamp(1700000000, timezone.utc) == 2023-11-14 22:13:20
        let t = UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        assert_eq!(utc_timestamp(t), "20231114-221320");
        assert_eq!(utc_timestamp(UNIX_EPOCH), "19700101-000000");
        assert_eq!(utc_timestamp(UNIX_EPOCH - Duration::from_secs(5)), "19700101-000000");
        assert_eq!(base_stem(t, 42, "A cat"), "20231114-221320_42_a-cat");
    }

    #[test]
    fn slugs_are_short_lowercase_ascii() {
        assert_eq!(slug("Epic fantasy landscape"), "epic-fantasy-landscape");
        assert_eq!(slug("  (masterpiece:1.2), best   quality!! "), "masterpiece-1-2-best-quality");
        assert_eq!(slug("café 東京"), "cafe");
        assert_eq!(slug("東京"), "image");
        assert_eq!(slug(""), "image");
        assert_eq!(slug("Straße Æon"), "strasse-aeon");
        let long = slug(&"word ".repeat(30));
        assert!(long.len() <= MAX_SLUG_LEN, "{long}");
        assert!(!long.ends_with('-'), "{long}");
        assert_eq!(slug(&"x".repeat(100)), "x".repeat(MAX_SLUG_LEN));
        // A cut landing right after a separator must not leave a trailing dash.
        let cut = format!("{} b", "a".repeat(MAX_SLUG_LEN - 1));
        assert_eq!(slug(&cut), "a".repeat(MAX_SLUG_LEN - 1));
    }
}
