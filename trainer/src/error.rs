//! The trainer library's error type: each variant says which file, key or rank it is about.

use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    // Causes are part of each message, never a `source` (anyhow's `{:#}` would print them twice).
    #[error("{}: {cause}", file.display())]
    Io { file: PathBuf, cause: std::io::Error },
    #[error("model config: {0}")]
    Config(String),
    #[error("{0}")]
    Recipe(String),
    #[error("weights {}: {detail}", file.display())]
    Weights { file: PathBuf, detail: String },
    #[error("checkpoint {}: {detail}", dir.display())]
    Checkpoint { dir: PathBuf, detail: String },
    #[error("communicator: {0}")]
    Comm(String),
    #[error("{0}")]
    Data(idavlm_shards::Error),
    #[error("torch: {0}")]
    Torch(tch::TchError),
    #[error("{0}")]
    Other(String),
}

impl Error {
    pub fn io(file: &Path, cause: std::io::Error) -> Self {
        Error::Io { file: file.to_path_buf(), cause }
    }
    pub fn weights(file: &Path, detail: impl Into<String>) -> Self {
        Error::Weights { file: file.to_path_buf(), detail: detail.into() }
    }
    pub fn checkpoint(dir: &Path, detail: impl Into<String>) -> Self {
        Error::Checkpoint { dir: dir.to_path_buf(), detail: detail.into() }
    }
}

impl From<idavlm_shards::Error> for Error {
    fn from(e: idavlm_shards::Error) -> Self {
        Error::Data(e)
    }
}

impl From<tch::TchError> for Error {
    fn from(e: tch::TchError) -> Self {
        Error::Torch(e)
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
