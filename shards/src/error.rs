//! The one error type of the data crate: every variant names the file, sample or field it is about.

use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    // The cause is part of the message, not a `source` (a reporter that prints the chain would print it
    // twice): hence `cause`, a field name thiserror does not treat as the source.
    #[error("{}: {cause}", file.display())]
    Io { file: PathBuf, cause: std::io::Error },
    #[error("{}: {detail}", file.display())]
    Format { file: PathBuf, detail: String },
    #[error("{}: parquet: {cause}", file.display())]
    Parquet { file: PathBuf, cause: parquet::errors::ParquetError },
    #[error("tokenizer not available: {0}. Run `bash scripts/setup.sh` (it extracts qwen.tiktoken from dashscope==2.0.2 into .deps/), or set IDAVLM_TOKENIZER")]
    TokenizerMissing(String),
    #[error("sample {id}: {detail}")]
    Sample { id: String, detail: String },
    #[error("image {what}: {detail}")]
    Image { what: String, detail: String },
    #[error("{0}")]
    Invalid(String),
}

impl Error {
    pub fn io(file: &Path, cause: std::io::Error) -> Self {
        Error::Io { file: file.to_path_buf(), cause }
    }
    pub fn format(file: &Path, detail: impl Into<String>) -> Self {
        Error::Format { file: file.to_path_buf(), detail: detail.into() }
    }
    pub fn sample(id: &str, detail: impl Into<String>) -> Self {
        Error::Sample { id: id.to_string(), detail: detail.into() }
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
