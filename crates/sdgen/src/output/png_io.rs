//! PNG encoding with text chunks, and reading those chunks back.
//!
//! Text is stored the way Pillow's `PngInfo.add_text` (which AUTOMATIC1111 uses) stores it: a
//! `tEXt` chunk when the text is Latin-1, otherwise an uncompressed `iTXt` chunk (UTF-8), so
//! every tool that reads A1111 images finds the same thing in ours.

use std::fs::File;
use std::io::BufReader;
use std::path::Path;

use crate::{Error, Result};

/// Encodes 8-bit RGB pixels (row-major, `width * height * 3` bytes) as a PNG in memory, with one
/// text chunk per `(keyword, text)` pair placed before the image data.
///
/// Compression is zlib level 6, as Pillow's default, so files are about the size other tools make.
pub fn encode_png(rgb: &[u8], width: u32, height: u32, text: &[(&str, &str)]) -> Result<Vec<u8>> {
    let expected_len = (width as usize)
        .checked_mul(height as usize)
        .and_then(|n| n.checked_mul(3))
        .ok_or_else(|| Error::InvalidInput(format!("image size {width}x{height} is too large")))?;
    if width == 0 || height == 0 {
        return Err(Error::InvalidInput(format!("image size {width}x{height} is empty")));
    }
    if rgb.len() != expected_len {
        return Err(Error::InvalidInput(format!(
            "a {width}x{height} RGB image needs {expected_len} bytes of pixels, got {}",
            rgb.len()
        )));
    }
    for (keyword, _) in text {
        let latin1 = keyword.chars().all(|c| (c as u32) < 0x100);
        // PNG spec 11.3.4: keywords are 1-79 Latin-1 bytes without NUL.
        if keyword.is_empty() || keyword.chars().count() > 79 || !latin1 || keyword.contains('\0') {
            return Err(Error::InvalidInput(format!(
                "PNG text keyword `{keyword}` must be 1-79 Latin-1 characters without NUL"
            )));
        }
    }

    let mut bytes = Vec::with_capacity(expected_len / 2 + 1024);
    let encode_error = |e: png::EncodingError| Error::InvalidInput(format!("encoding a {width}x{height} PNG: {e}"));
    {
        let mut encoder = png::Encoder::new(&mut bytes, width, height);
        encoder.set_color(png::ColorType::Rgb);
        encoder.set_depth(png::BitDepth::Eight);
        encoder.set_compression(png::Compression::Balanced);
        for (keyword, value) in text {
            if is_latin1(value) {
                encoder.add_text_chunk(keyword.to_string(), value.to_string())
            } else {
                encoder.add_itxt_chunk(keyword.to_string(), value.to_string())
            }
            .map_err(encode_error)?;
        }
        let mut writer = encoder.write_header().map_err(encode_error)?;
        writer.write_image_data(rgb).map_err(encode_error)?;
        writer.finish().map_err(encode_error)?;
    }
    Ok(bytes)
}

/// Whether `text` fits a `tEXt` chunk, whose text is Latin-1 (Pillow's test: `encode("latin-1")`).
fn is_latin1(text: &str) -> bool {
    text.chars().all(|c| (c as u32) < 0x100)
}

/// Reads every `tEXt`, `zTXt` and `iTXt` chunk of the PNG at `path` as `(keyword, text)`, in that
/// order of chunk kinds, including chunks after the image data; the pixels are skipped, not
/// decoded into memory.
pub fn read_png_text(path: &Path) -> Result<Vec<(String, String)>> {
    let file = File::open(path).map_err(|e| Error::io(path, e))?;
    let not_png = |e: png::DecodingError| Error::InvalidInput(format!("{} is not a readable PNG: {e}", path.display()));
    let mut reader = png::Decoder::new(BufReader::new(file)).read_info().map_err(not_png)?;
    // Text after IDAT is only seen once the rest of the file is read.
    reader.finish().map_err(not_png)?;
    let info = reader.info();
    let mut out = Vec::new();
    for chunk in &info.uncompressed_latin1_text {
        out.push((chunk.keyword.clone(), chunk.text.clone()));
    }
    for chunk in &info.compressed_latin1_text {
        out.push((chunk.keyword.clone(), chunk.get_text().map_err(not_png)?));
    }
    for chunk in &info.utf8_text {
        out.push((chunk.keyword.clone(), chunk.get_text().map_err(not_png)?));
    }
    Ok(out)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// Decodes a PNG written by [`encode_png`] back to (width, height, RGB bytes).
    pub(crate) fn decode_rgb(bytes: &[u8]) -> (u32, u32, Vec<u8>) {
        let mut reader = png::Decoder::new(std::io::Cursor::new(bytes)).read_info().unwrap();
        let mut buf = vec![0; reader.output_buffer_size().unwrap()];
        let frame = reader.next_frame(&mut buf).unwrap();
        assert_eq!(frame.color_type, png::ColorType::Rgb);
        assert_eq!(frame.bit_depth, png::BitDepth::Eight);
        buf.truncate(frame.buffer_size());
        (frame.width, frame.height, buf)
    }

    fn gradient(width: u32, height: u32) -> Vec<u8> {
        (0..width * height * 3).map(|i| (i * 7 % 251) as u8).collect()
    }

    #[test]
    fn pixels_and_text_round_trip() {
        let rgb = gradient(13, 5);
        let text = [("parameters", "café 東京\nSteps: 1"), ("Software", "sdgen"), ("latin", "café")];
        let bytes = encode_png(&rgb, 13, 5, &text).unwrap();
        assert_eq!(decode_rgb(&bytes), (13, 5, rgb));

        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a.png");
        std::fs::write(&path, &bytes).unwrap();
        let mut got = read_png_text(&path).unwrap();
        got.sort();
        let mut want: Vec<(String, String)> = text.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        want.sort();
        assert_eq!(got, want);

        // Latin-1 text goes in tEXt, anything else in iTXt, as Pillow does.
        let has_chunk = |kind: &[u8], keyword: &[u8]| {
            let needle = [kind, keyword].concat();
            bytes.windows(needle.len()).any(|w| w == needle)
        };
        assert!(has_chunk(b"iTXt", b"parameters"));
        assert!(has_chunk(b"tEXt", b"Software"));
        assert!(has_chunk(b"tEXt", b"latin"));
    }

    #[test]
    fn text_is_read_from_after_the_image_data_too() {
        // Build a PNG whose tEXt chunk sits after IDAT, as some tools write them.
        let rgb = gradient(4, 4);
        let plain = encode_png(&rgb, 4, 4, &[]).unwrap();
        let iend = plain.len() - 12;
        let mut chunk_data = b"Comment\0late".to_vec();
        let mut chunk = (chunk_data.len() as u32).to_be_bytes().to_vec();
        let mut crc_input = b"tEXt".to_vec();
        crc_input.append(&mut chunk_data);
        chunk.extend_from_slice(&crc_input);
        chunk.extend_from_slice(&crc32(&crc_input).to_be_bytes());
        let late = [&plain[..iend], &chunk, &plain[iend..]].concat();
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("late.png");
        std::fs::write(&path, late).unwrap();
        assert_eq!(read_png_text(&path).unwrap(), [("Comment".to_string(), "late".to_string())]);
    }

    fn crc32(data: &[u8]) -> u32 {
        let mut crc = !0u32;
        for &b in data {
            crc ^= u32::from(b);
            for _ in 0..8 {
                crc = if crc & 1 != 0 { (crc >> 1) ^ 0xEDB8_8320 } else { crc >> 1 };
            }
        }
        !crc
    }

    #[test]
    fn bad_inputs_are_rejected_with_their_sizes() {
        let err = encode_png(&[0; 10], 2, 2, &[]).unwrap_err().to_string();
        assert!(err.contains("2x2") && err.contains("12") && err.contains("10"), "{err}");
        assert!(encode_png(&[], 0, 2, &[]).is_err());
        assert!(encode_png(&[0; 12], 2, 2, &[("", "x")]).is_err());
        assert!(encode_png(&[0; 12], 2, 2, &[("東京", "x")]).is_err());
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("not.png");
        std::fs::write(&path, b"hello").unwrap();
        let err = read_png_text(&path).unwrap_err().to_string();
        assert!(err.contains("not.png"), "{err}");
    }
}
