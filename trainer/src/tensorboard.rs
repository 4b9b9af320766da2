//! TensorBoard event files (`logging.tensorboard: DIR`): the scalars the run logs, written as TensorBoard's
//! own reader expects them: TFRecord framing (length, masked CRC-32C of the length, the record, masked
//! CRC-32C of the record) around `Event` protocol buffers (`wall_time`, `step`, `summary.value[].{tag,
//! simple_value}`), the first record carrying `file_version: "brain.Event:2"`. Written by rank 0 and
//! flushed after every step, so a run that dies leaves readable events up to its last step.

use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};

use crate::error::{Error, Result};

/// CRC-32C (Castagnoli), reflected, as TFRecord uses.
fn crc32c(data: &[u8]) -> u32 {
    static TABLE: std::sync::OnceLock<[u32; 256]> = std::sync::OnceLock::new();
    let t = TABLE.get_or_init(|| {
        let mut t = [0u32; 256];
        for (i, e) in t.iter_mut().enumerate() {
            let mut c = i as u32;
            for _ in 0..8 {
                c = if c & 1 != 0 { 0x82F6_3B78 ^ (c >> 1) } else { c >> 1 };
            }
            *e = c;
        }
        t
    });
    !data.iter().fold(!0u32, |c, &b| t[((c ^ b as u32) & 0xff) as usize] ^ (c >> 8))
}

fn masked(crc: u32) -> u32 {
    crc.rotate_right(15).wrapping_add(0xa282_ead8)
}

fn varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

/// A length-delimited field (wire type 2).
fn bytes_field(out: &mut Vec<u8>, field: u32, data: &[u8]) {
    varint(out, ((field << 3) | 2) as u64);
    varint(out, data.len() as u64);
    out.extend_from_slice(data);
}

/// An `Event` with its wall time, step, and either a file version or scalar values.
fn event(wall_time: f64, step: i64, file_version: Option<&str>, scalars: &[(&str, f32)]) -> Vec<u8> {
    let mut e = Vec::new();
    varint(&mut e, (1 << 3) | 1); // wall_time: double
    e.extend_from_slice(&wall_time.to_le_bytes());
    varint(&mut e, 2 << 3); // step: int64 (varint)
    varint(&mut e, step as u64);
    if let Some(v) = file_version {
        bytes_field(&mut e, 3, v.as_bytes());
    }
    if !scalars.is_empty() {
        let mut summary = Vec::new();
        for (tag, v) in scalars {
            let mut value = Vec::new();
            bytes_field(&mut value, 1, tag.as_bytes()); // tag
            varint(&mut value, (2 << 3) | 5); // simple_value: float
            value.extend_from_slice(&v.to_le_bytes());
            bytes_field(&mut summary, 1, &value);
        }
        bytes_field(&mut e, 5, &summary);
    }
    e
}

/// TFRecord framing of one record.
fn record(data: &[u8]) -> Vec<u8> {
    let len = (data.len() as u64).to_le_bytes();
    let mut out = Vec::with_capacity(data.len() + 16);
    out.extend_from_slice(&len);
    out.extend_from_slice(&masked(crc32c(&len)).to_le_bytes());
    out.extend_from_slice(data);
    out.extend_from_slice(&masked(crc32c(data)).to_le_bytes());
    out
}

fn now() -> f64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs_f64()).unwrap_or(0.0)
}

/// An open event file.
pub struct EventWriter {
    file: File,
    path: PathBuf,
}

impl EventWriter {
    /// Creates `DIR/events.out.tfevents.{unix time}.{host}` (the name TensorBoard looks for).
    pub fn create(dir: &Path) -> Result<Self> {
        std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
        let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_else(|_| "localhost".into());
        let path = dir.join(format!("events.out.tfevents.{}.{}.{}", now() as u64, host.trim(), std::process::id()));
        let mut file = File::create(&path).map_err(|e| Error::io(&path, e))?;
        file.write_all(&record(&event(now(), 0, Some("brain.Event:2"), &[]))).map_err(|e| Error::io(&path, e))?;
        Ok(Self { file, path })
    }

    /// Writes the scalars of a step (tags like `loss`, `eval/loss`) and flushes.
    pub fn scalars(&mut self, step: u64, values: &[(&str, f64)]) -> Result<()> {
        let finite: Vec<(&str, f32)> = values.iter().filter(|(_, v)| v.is_finite()).map(|(t, v)| (*t, *v as f32)).collect();
        if finite.is_empty() {
            return Ok(());
        }
        self.file.write_all(&record(&event(now(), step as i64, None, &finite))).map_err(|e| Error::io(&self.path, e))?;
        self.file.flush().map_err(|e| Error::io(&self.path, e))
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crc32c_and_its_mask_match_the_reference_values() {
        // RFC 3720's CRC-32C check value, and TensorFlow's masked form of it.
        assert_eq!(crc32c(b"123456789"), 0xE306_9283);
        assert_eq!(crc32c(&[0u8; 32]), 0x8A91_36AA);
        assert_eq!(masked(0), 0xa282_ead8);
    }
}
