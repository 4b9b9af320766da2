//! The dataset format: Parquet shards plus a manifest (`index.json`).
//!
//! Schema (one row per sample): `id` utf8, `source` utf8, `conversations` list<struct<from, value>>,
//! `images` list<struct<bytes binary, path utf8>> in order of appearance (the Hugging Face image
//! struct), `num_tokens` int32. Row groups are the unit of shuffling and of reading.

use std::fs::File;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use arrow::array::{
    Array, ArrayRef, BinaryArray, BinaryBuilder, Int32Array, Int32Builder, ListArray, ListBuilder, RecordBatch, StringArray,
    StringBuilder, StructArray, StructBuilder,
};
use arrow::datatypes::{DataType, Field, Fields, Schema, SchemaRef};
use parquet::arrow::arrow_reader::{ArrowReaderMetadata, ParquetRecordBatchReaderBuilder};
use parquet::arrow::{ArrowWriter, ParquetRecordBatchStreamBuilder};
use parquet::file::properties::WriterProperties;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::chat::Turn;
use crate::error::{Error, Result};

pub const SCHEMA_VERSION: u32 = 1;
pub const MANIFEST: &str = "index.json";

/// One image of a sample: its encoded bytes and the path written in the text.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ImageBlob {
    pub bytes: Vec<u8>,
    pub path: String,
}

/// One training sample as stored.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Sample {
    pub id: String,
    pub source: String,
    pub conversations: Vec<Turn>,
    pub images: Vec<ImageBlob>,
    pub num_tokens: i32,
}

fn turn_fields() -> Fields {
    Fields::from(vec![Field::new("from", DataType::Utf8, false), Field::new("value", DataType::Utf8, false)])
}
fn image_fields() -> Fields {
    Fields::from(vec![Field::new("bytes", DataType::Binary, false), Field::new("path", DataType::Utf8, false)])
}

pub fn schema() -> SchemaRef {
    Arc::new(Schema::new(vec![
        Field::new("id", DataType::Utf8, false),
        Field::new("source", DataType::Utf8, false),
        Field::new("conversations", DataType::List(Arc::new(Field::new("item", DataType::Struct(turn_fields()), true))), false),
        Field::new("images", DataType::List(Arc::new(Field::new("item", DataType::Struct(image_fields()), true))), false),
        Field::new("num_tokens", DataType::Int32, false),
    ]))
}

/// Samples -> one Arrow record batch of [`schema`].
pub fn to_record_batch(samples: &[Sample]) -> RecordBatch {
    let mut id = StringBuilder::new();
    let mut source = StringBuilder::new();
    let mut conv = ListBuilder::new(StructBuilder::from_fields(turn_fields(), 0)).with_field(Arc::new(Field::new(
        "item",
        DataType::Struct(turn_fields()),
        true,
    )));
    let mut imgs = ListBuilder::new(StructBuilder::from_fields(image_fields(), 0)).with_field(Arc::new(Field::new(
        "item",
        DataType::Struct(image_fields()),
        true,
    )));
    let mut ntok = Int32Builder::new();
    for s in samples {
        id.append_value(&s.id);
        source.append_value(&s.source);
        let sb = conv.values();
        for t in &s.conversations {
            sb.field_builder::<StringBuilder>(0).expect("from").append_value(&t.from);
            sb.field_builder::<StringBuilder>(1).expect("value").append_value(&t.value);
            sb.append(true);
        }
        conv.append(true);
        let ib = imgs.values();
        for im in &s.images {
            ib.field_builder::<BinaryBuilder>(0).expect("bytes").append_value(&im.bytes);
            ib.field_builder::<StringBuilder>(1).expect("path").append_value(&im.path);
            ib.append(true);
        }
        imgs.append(true);
        ntok.append_value(s.num_tokens);
    }
    let cols: Vec<ArrayRef> = vec![
        Arc::new(id.finish()),
        Arc::new(source.finish()),
        Arc::new(conv.finish()),
        Arc::new(imgs.finish()),
        Arc::new(ntok.finish()),
    ];
    RecordBatch::try_new(schema(), cols).expect("batch matches schema")
}

fn column<'a, T: 'static>(batch: &'a RecordBatch, name: &str, file: &Path) -> Result<&'a T> {
    batch
        .column_by_name(name)
        .and_then(|c| c.as_any().downcast_ref::<T>())
        .ok_or_else(|| Error::format(file, format!("column {name:?} missing or of the wrong type")))
}

/// An Arrow record batch of [`schema`] -> samples.
pub fn from_record_batch(batch: &RecordBatch, file: &Path) -> Result<Vec<Sample>> {
    let id = column::<StringArray>(batch, "id", file)?;
    let source = column::<StringArray>(batch, "source", file)?;
    let conv = column::<ListArray>(batch, "conversations", file)?;
    let imgs = column::<ListArray>(batch, "images", file)?;
    let ntok = column::<Int32Array>(batch, "num_tokens", file)?;
    let mut out = Vec::with_capacity(batch.num_rows());
    for r in 0..batch.num_rows() {
        let c = conv.value(r);
        let c =
            c.as_any().downcast_ref::<StructArray>().ok_or_else(|| Error::format(file, "conversations items are not structs"))?;
        let from = c.column(0).as_any().downcast_ref::<StringArray>().ok_or_else(|| Error::format(file, "conversations.from"))?;
        let value =
            c.column(1).as_any().downcast_ref::<StringArray>().ok_or_else(|| Error::format(file, "conversations.value"))?;
        let turns = (0..c.len()).map(|i| Turn { from: from.value(i).to_string(), value: value.value(i).to_string() }).collect();
        let im = imgs.value(r);
        let im = im.as_any().downcast_ref::<StructArray>().ok_or_else(|| Error::format(file, "images items are not structs"))?;
        let bytes = im.column(0).as_any().downcast_ref::<BinaryArray>().ok_or_else(|| Error::format(file, "images.bytes"))?;
        let path = im.column(1).as_any().downcast_ref::<StringArray>().ok_or_else(|| Error::format(file, "images.path"))?;
        let images =
            (0..im.len()).map(|i| ImageBlob { bytes: bytes.value(i).to_vec(), path: path.value(i).to_string() }).collect();
        out.push(Sample {
            id: id.value(r).to_string(),
            source: source.value(r).to_string(),
            conversations: turns,
            images,
            num_tokens: ntok.value(r),
        });
    }
    Ok(out)
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ShardInfo {
    pub file: String,
    pub rows: u64,
    pub row_groups: u64,
    pub bytes: u64,
    pub sha256: String,
}

/// `index.json` of a dataset folder.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    pub schema_version: u32,
    pub source: String,
    /// The chat template the samples were tokenised for (`num_tokens`, image spans): a model of another
    /// template refuses the dataset. Datasets written before the field were all Qwen-VL's.
    #[serde(default = "legacy_template")]
    pub template: String,
    pub total_samples: u64,
    pub shards: Vec<ShardInfo>,
}

fn legacy_template() -> String {
    crate::chat::TEMPLATE.to_string()
}

impl Manifest {
    pub fn load(dir: &Path) -> Result<Self> {
        let p = dir.join(MANIFEST);
        let text = std::fs::read_to_string(&p).map_err(|e| Error::io(&p, e))?;
        let m: Manifest = serde_json::from_str(&text).map_err(|e| Error::format(&p, format!("invalid manifest: {e}")))?;
        if m.schema_version != SCHEMA_VERSION {
            return Err(Error::format(&p, format!("schema_version {} (this build reads {SCHEMA_VERSION})", m.schema_version)));
        }
        Ok(m)
    }
}

pub fn sha256_file(path: &Path) -> Result<String> {
    let mut f = File::open(path).map_err(|e| Error::io(path, e))?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf).map_err(|e| Error::io(path, e))?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(hex::encode(h.finalize()))
}

/// Writes samples into shards of about `target_shard_bytes`, each row group `row_group_rows` samples.
/// A shard is written as `NAME.tmp` and renamed when closed; the manifest is written last, so a folder
/// with a manifest is complete.
pub struct DatasetWriter {
    dir: PathBuf,
    source: String,
    target_shard_bytes: u64,
    row_group_rows: usize,
    pending: Vec<Sample>,
    writer: Option<(ArrowWriter<File>, PathBuf, PathBuf, u64)>,
    shards: Vec<ShardInfo>,
    total: u64,
}

impl DatasetWriter {
    pub fn create(dir: &Path, source: &str, target_shard_bytes: u64, row_group_rows: usize) -> Result<Self> {
        std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
        let m = dir.join(MANIFEST);
        if m.exists() {
            return Err(Error::format(&m, "the output folder already holds a dataset; choose an empty folder"));
        }
        Ok(Self {
            dir: dir.to_path_buf(),
            source: source.to_string(),
            target_shard_bytes,
            row_group_rows: row_group_rows.max(1),
            pending: Vec::new(),
            writer: None,
            shards: Vec::new(),
            total: 0,
        })
    }

    pub fn push(&mut self, s: Sample) -> Result<()> {
        self.pending.push(s);
        if self.pending.len() >= self.row_group_rows {
            self.flush_row_group()?;
        }
        Ok(())
    }

    fn flush_row_group(&mut self) -> Result<()> {
        if self.pending.is_empty() {
            return Ok(());
        }
        if self.writer.is_none() {
            let name = format!("shard-{:05}.parquet", self.shards.len());
            let fin = self.dir.join(&name);
            let tmp = self.dir.join(format!("{name}.tmp"));
            let f = File::create(&tmp).map_err(|e| Error::io(&tmp, e))?;
            let props = WriterProperties::builder()
                .set_max_row_group_row_count(Some(self.row_group_rows))
                .set_compression(parquet::basic::Compression::SNAPPY)
                .build();
            let w = ArrowWriter::try_new(f, schema(), Some(props)).map_err(|e| Error::Parquet { file: tmp.clone(), cause: e })?;
            self.writer = Some((w, tmp, fin, 0));
        }
        let batch = to_record_batch(&self.pending);
        let n = self.pending.len() as u64;
        self.pending.clear();
        let (w, tmp, _, rows) = self.writer.as_mut().expect("writer open");
        w.write(&batch).map_err(|e| Error::Parquet { file: tmp.clone(), cause: e })?;
        w.flush().map_err(|e| Error::Parquet { file: tmp.clone(), cause: e })?;
        *rows += n;
        self.total += n;
        if w.bytes_written() as u64 >= self.target_shard_bytes {
            self.close_shard()?;
        }
        Ok(())
    }

    fn close_shard(&mut self) -> Result<()> {
        let Some((w, tmp, fin, rows)) = self.writer.take() else { return Ok(()) };
        let meta = w.close().map_err(|e| Error::Parquet { file: tmp.clone(), cause: e })?;
        std::fs::rename(&tmp, &fin).map_err(|e| Error::io(&tmp, e))?;
        let bytes = std::fs::metadata(&fin).map_err(|e| Error::io(&fin, e))?.len();
        self.shards.push(ShardInfo {
            file: fin.file_name().expect("file name").to_string_lossy().into_owned(),
            rows,
            row_groups: meta.num_row_groups() as u64,
            bytes,
            sha256: sha256_file(&fin)?,
        });
        Ok(())
    }

    /// Flushes, closes the last shard and writes the manifest.
    pub fn finish(mut self) -> Result<Manifest> {
        self.flush_row_group()?;
        self.close_shard()?;
        let m = Manifest {
            schema_version: SCHEMA_VERSION,
            source: self.source.clone(),
            template: crate::chat::TEMPLATE.to_string(),
            total_samples: self.total,
            shards: self.shards.clone(),
        };
        let p = self.dir.join(MANIFEST);
        let tmp = self.dir.join(format!("{MANIFEST}.tmp"));
        std::fs::write(&tmp, serde_json::to_vec_pretty(&m).expect("json")).map_err(|e| Error::io(&tmp, e))?;
        std::fs::rename(&tmp, &p).map_err(|e| Error::io(&p, e))?;
        Ok(m)
    }
}

/// Reads row group `rg` of a shard file.
pub fn read_row_group(file: &Path, rg: usize) -> Result<Vec<Sample>> {
    let meta = load_footer(file)?;
    read_row_group_with(file, &meta, rg)
}

/// A shard's parsed footer, read once and reused for every row group of the shard.
pub type Footer = ArrowReaderMetadata;

/// Opens a shard and parses its footer; a truncated or non-Parquet file, or one whose schema is not
/// [`schema`], is an error naming it.
pub fn load_footer(file: &Path) -> Result<Footer> {
    let mut f = File::open(file).map_err(|e| Error::io(file, e))?;
    check_magic(&mut f, file)?;
    let meta = ArrowReaderMetadata::load(&f, Default::default())
        .map_err(|e| Error::format(file, format!("unreadable Parquet footer (truncated or not Parquet): {e}")))?;
    check_schema(meta.schema(), file)?;
    Ok(meta)
}

/// Parquet's magic `PAR1` at both ends of the file.
fn check_magic(f: &mut File, file: &Path) -> Result<()> {
    use std::io::{Seek, SeekFrom};
    let len = f.metadata().map_err(|e| Error::io(file, e))?.len();
    if len < 12 {
        return Err(Error::format(file, format!("{len} bytes: too short for a Parquet file")));
    }
    let mut head = [0u8; 4];
    let mut tail = [0u8; 4];
    f.read_exact(&mut head).map_err(|e| Error::io(file, e))?;
    f.seek(SeekFrom::End(-4)).map_err(|e| Error::io(file, e))?;
    f.read_exact(&mut tail).map_err(|e| Error::io(file, e))?;
    f.seek(SeekFrom::Start(0)).map_err(|e| Error::io(file, e))?;
    if &head != b"PAR1" || &tail != b"PAR1" {
        return Err(Error::format(
            file,
            format!("not a Parquet file: magic bytes {:?} / {:?}, expected \"PAR1\" at both ends", head, tail),
        ));
    }
    Ok(())
}

/// The shard's Arrow schema must be the dataset schema (names, types, nesting; nullability of list
/// items aside, which writers differ on).
pub fn check_schema(found: &SchemaRef, file: &Path) -> Result<()> {
    let want = schema();
    let describe =
        |s: &Schema| s.fields().iter().map(|f| format!("{}: {}", f.name(), f.data_type())).collect::<Vec<_>>().join(", ");
    let same = found.fields().len() == want.fields().len()
        && found
            .fields()
            .iter()
            .zip(want.fields())
            .all(|(a, b)| a.name() == b.name() && a.data_type().equals_datatype(b.data_type()));
    if !same {
        return Err(Error::format(
            file,
            format!(
                "schema differs from the dataset schema (version {SCHEMA_VERSION}):\n  found:    {}\n  expected: {}",
                describe(found),
                describe(&want)
            ),
        ));
    }
    Ok(())
}

fn check_row_group(file: &Path, meta: &Footer, rg: usize) -> Result<()> {
    let n = meta.metadata().num_row_groups();
    if rg >= n {
        return Err(Error::format(file, format!("row group {rg} requested, the file has {n}")));
    }
    Ok(())
}

/// Row group `rg`'s record batches (blocking I/O), all columns or those of `mask`, each handed to `each`.
fn read_batches(
    file: &Path,
    meta: &Footer,
    rg: usize,
    mask: Option<parquet::arrow::ProjectionMask>,
    mut each: impl FnMut(&RecordBatch) -> Result<()>,
) -> Result<()> {
    check_row_group(file, meta, rg)?;
    let f = File::open(file).map_err(|e| Error::io(file, e))?;
    let mut builder = ParquetRecordBatchReaderBuilder::new_with_metadata(f, meta.clone()).with_row_groups(vec![rg]);
    if let Some(mask) = mask {
        builder = builder.with_projection(mask);
    }
    let reader = builder.with_batch_size(1 << 16).build().map_err(|e| Error::Parquet { file: file.to_path_buf(), cause: e })?;
    for batch in reader {
        each(&batch.map_err(|e| Error::format(file, format!("row group {rg}: {e}")))?)?;
    }
    Ok(())
}

/// Reads row group `rg` with a footer already parsed (blocking I/O).
pub fn read_row_group_with(file: &Path, meta: &Footer, rg: usize) -> Result<Vec<Sample>> {
    let mut out = Vec::new();
    read_batches(file, meta, rg, None, |b| {
        out.extend(from_record_batch(b, file)?);
        Ok(())
    })?;
    Ok(out)
}

/// The `num_tokens` column of row group `rg` alone (the other columns, images included, are not read):
/// what packing needs to plan micro-batches.
pub fn read_num_tokens(file: &Path, meta: &Footer, rg: usize) -> Result<Vec<i32>> {
    let col = meta.schema().index_of("num_tokens").map_err(|_| Error::format(file, "column \"num_tokens\" missing"))?;
    let mask = parquet::arrow::ProjectionMask::roots(meta.metadata().file_metadata().schema_descr(), [col]);
    let mut out = Vec::new();
    read_batches(file, meta, rg, Some(mask), |b| {
        out.extend(column::<Int32Array>(b, "num_tokens", file)?.values().iter().copied());
        Ok(())
    })?;
    Ok(out)
}

/// Reads row group `rg` with asynchronous file I/O (tokio): only the row group's column chunks are
/// read, and the task yields while the bytes arrive.
pub async fn read_row_group_async(file: &Path, meta: &Footer, rg: usize) -> Result<Vec<Sample>> {
    use futures::TryStreamExt;
    check_row_group(file, meta, rg)?;
    let f = tokio::fs::File::open(file).await.map_err(|e| Error::io(file, e))?;
    let stream = ParquetRecordBatchStreamBuilder::new_with_metadata(f, meta.clone())
        .with_row_groups(vec![rg])
        .with_batch_size(1 << 16)
        .build()
        .map_err(|e| Error::Parquet { file: file.to_path_buf(), cause: e })?;
    let batches: Vec<RecordBatch> =
        stream.try_collect().await.map_err(|e| Error::format(file, format!("row group {rg}: {e}")))?;
    let mut out = Vec::new();
    for batch in &batches {
        out.extend(from_record_batch(batch, file)?);
    }
    Ok(out)
}

/// Rows per row group of a shard, from its footer.
pub fn row_group_sizes(file: &Path) -> Result<Vec<usize>> {
    Ok(load_footer(file)?.metadata().row_groups().iter().map(|g| g.num_rows() as usize).collect())
}
