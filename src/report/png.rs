//! Thumbnails as inline `data:` URIs: a minimal PNG writer (stored, uncompressed
//! deflate blocks; CRC-32 and Adler-32) and base64. Thumbnails are a few dozen 28x28
//! images, so compression would save little; writing it here keeps the root package
//! free of an image dependency.

/// A PNG of `width x height` pixels with 1 (grey) or 3 (RGB) channels, row-major u8.
/// `None` when the sizes do not match the pixels.
pub fn encode(width: usize, height: usize, channels: usize, pixels: &[u8]) -> Option<Vec<u8>> {
    let colour = match channels {
        1 => 0u8,
        3 => 2u8,
        _ => return None,
    };
    let row = width.checked_mul(channels)?;
    if width == 0 || height == 0 || row.checked_mul(height)? != pixels.len() || width > u32::MAX as usize || height > u32::MAX as usize {
        return None;
    }
    // Raw scanlines, each with filter byte 0.
    let mut raw = Vec::with_capacity((row + 1) * height);
    for r in pixels.chunks(row) {
        raw.push(0);
        raw.extend_from_slice(r);
    }
    let mut z = vec![0x78, 0x01];
    let blocks: Vec<&[u8]> = raw.chunks(65535).collect();
    for (i, b) in blocks.iter().enumerate() {
        z.push(u8::from(i + 1 == blocks.len()));
        let len = b.len() as u16;
        z.extend_from_slice(&len.to_le_bytes());
        z.extend_from_slice(&(!len).to_le_bytes());
        z.extend_from_slice(b);
    }
    z.extend_from_slice(&adler32(&raw).to_be_bytes());
    let mut png = b"\x89PNG\r\n\x1a\n".to_vec();
    let mut ihdr = Vec::with_capacity(13);
    ihdr.extend_from_slice(&(width as u32).to_be_bytes());
    ihdr.extend_from_slice(&(height as u32).to_be_bytes());
    ihdr.extend_from_slice(&[8, colour, 0, 0, 0]);
    chunk(&mut png, b"IHDR", &ihdr);
    chunk(&mut png, b"IDAT", &z);
    chunk(&mut png, b"IEND", &[]);
    Some(png)
}

fn chunk(out: &mut Vec<u8>, kind: &[u8; 4], data: &[u8]) {
    out.extend_from_slice(&(data.len() as u32).to_be_bytes());
    let start = out.len();
    out.extend_from_slice(kind);
    out.extend_from_slice(data);
    let crc = crc32(&out[start..]);
    out.extend_from_slice(&crc.to_be_bytes());
}

fn crc32(bytes: &[u8]) -> u32 {
    let mut c = 0xffff_ffffu32;
    for &b in bytes {
        c ^= u32::from(b);
        for _ in 0..8 {
            c = if c & 1 != 0 { 0xedb8_8320 ^ (c >> 1) } else { c >> 1 };
        }
    }
    !c
}

fn adler32(bytes: &[u8]) -> u32 {
    let (mut a, mut b) = (1u32, 0u32);
    for &x in bytes {
        a = (a + u32::from(x)) % 65521;
        b = (b + a) % 65521;
    }
    (b << 16) | a
}

pub fn base64(bytes: &[u8]) -> String {
    const T: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut s = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for c in bytes.chunks(3) {
        let n = (u32::from(c[0]) << 16) | (u32::from(*c.get(1).unwrap_or(&0)) << 8) | u32::from(*c.get(2).unwrap_or(&0));
        s.push(T[(n >> 18) as usize & 63] as char);
        s.push(T[(n >> 12) as usize & 63] as char);
        s.push(if c.len() > 1 { T[(n >> 6) as usize & 63] as char } else { '=' });
        s.push(if c.len() > 2 { T[n as usize & 63] as char } else { '=' });
    }
    s
}

/// `data:image/png;base64,...` for an image, or `None`.
pub fn data_uri(width: usize, height: usize, channels: usize, pixels: &[u8]) -> Option<String> {
    encode(width, height, channels, pixels).map(|p| format!("data:image/png;base64,{}", base64(&p)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn known_checksums_and_base64() {
        assert_eq!(crc32(b"123456789"), 0xcbf4_3926);
        assert_eq!(adler32(b"Wikipedia"), 0x11e6_0398);
        assert_eq!(base64(b"Man"), "TWFu");
        assert_eq!(base64(b"Ma"), "TWE=");
        assert_eq!(base64(b"M"), "TQ==");
    }

    #[test]
    fn png_has_its_signature_and_rejects_bad_sizes() {
        let p = encode(2, 2, 1, &[0, 255, 255, 0]).unwrap();
        assert!(p.starts_with(b"\x89PNG\r\n\x1a\n") && p.ends_with(&[0xae, 0x42, 0x60, 0x82]));
        assert!(encode(2, 2, 1, &[0; 3]).is_none());
        assert!(encode(2, 2, 4, &[0; 16]).is_none());
        assert!(encode(0, 0, 1, &[]).is_none());
    }
}
