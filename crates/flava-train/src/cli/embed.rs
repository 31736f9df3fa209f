//! `flava embed`: image and text features and their contrastive logits (and ITM probabilities);
//! with `--data SOURCE --out DIR`, a whole data source in clip-retrieval's layout.

use std::path::PathBuf;

use flava_train::bulk_embed::{self, BulkEmbedConfig, Dtype, FeatureKind};
use flava_train::{embed, pick_device};

/// Image and text features, and their contrastive logits, from an HF-format FLAVA directory.
#[derive(clap::Args)]
pub struct EmbedArgs {
    /// Model directory: config.json, model.safetensors or pytorch_model.bin, tokenizer.json
    /// (or vocab.txt), preprocessor_config.json; or a Hugging Face Hub id (`facebook/flava-full`,
    /// `org/name@revision`), taken from the HF cache or downloaded into it.
    #[arg(long)]
    model: PathBuf,
    /// An image file (repeatable).
    #[arg(long = "image")]
    images: Vec<PathBuf>,
    /// A text (repeatable).
    #[arg(long = "text")]
    texts: Vec<String>,
    /// Print one JSON object instead of a table.
    #[arg(long)]
    json: bool,
    /// Compute device: flex (CPU), cuda or wgpu (GPU features must be compiled in).
    #[arg(long, default_value = "flex")]
    device: String,
    /// Text length in tokens, `[CLS]` and `[SEP]` included.
    #[arg(long, default_value_t = flava_text::DEFAULT_MAX_LENGTH)]
    max_length: usize,
    /// Also print the ITM head's match probability for every (image, text) pair (needs a
    /// FlavaForPreTraining checkpoint).
    #[arg(long)]
    itm: bool,
    /// Embed a whole data source instead (shards, CSV/TSV, coco:ANN.json:DIR, ImageFolder,
    /// .txt/.jsonl, synthetic): batched, resumable, written to --out as
    /// img_emb/img_emb_N.npy, text_emb/text_emb_N.npy and metadata/metadata_N.parquet.
    #[arg(long, requires = "out", conflicts_with_all = ["images", "texts", "itm", "json"])]
    data: Option<String>,
    /// Output directory of --data.
    #[arg(long, requires = "data")]
    out: Option<PathBuf>,
    /// With --data: what each sample gives: pairs (image and text embeddings), images or text.
    #[arg(long, default_value = "pairs")]
    task: flava_data::task::Task,
    /// With --data: projected (the contrastive features) or cls (the tower's CLS state).
    #[arg(long, value_enum, default_value = "projected")]
    features: FeatureKind,
    /// With --data: L2-normalise every row.
    #[arg(long)]
    normalize: bool,
    /// With --data: element type of the arrays.
    #[arg(long, value_enum, default_value = "f16")]
    dtype: Dtype,
    /// With --data: samples per part file.
    #[arg(long, default_value_t = 10_000)]
    part_size: usize,
    /// With --data: samples per model call.
    #[arg(long, default_value_t = 32)]
    batch_size: usize,
    /// With --data: stop after this many samples.
    #[arg(long)]
    max_samples: Option<usize>,
    /// With --data: continue the run in --out after its last complete part.
    #[arg(long, conflicts_with = "force")]
    resume: bool,
    /// With --data: delete the embeddings in --out and start over.
    #[arg(long)]
    force: bool,
}

/// Runs the command.
pub fn run(a: EmbedArgs) -> anyhow::Result<()> {
    let device = pick_device(&a.device)?;
    if let (Some(data), Some(out)) = (&a.data, &a.out) {
        let cfg = BulkEmbedConfig {
            task: a.task,
            features: a.features,
            normalize: a.normalize,
            dtype: a.dtype,
            part_size: a.part_size,
            max_length: a.max_length,
            batch_size: a.batch_size,
            max_samples: a.max_samples,
            ..BulkEmbedConfig::new(&a.model, data.as_str())
        };
        let start = std::time::Instant::now();
        let s = bulk_embed::run(&cfg, out, a.resume, a.force, None, &device)?;
        eprintln!(
            "{} samples in {} parts ({} skipped), {}-wide {:?} rows in {} ({:.1} s this run)",
            s.samples,
            s.parts,
            s.skipped,
            s.dim,
            cfg.dtype,
            out.display(),
            start.elapsed().as_secs_f64()
        );
        return Ok(());
    }
    let out = embed::run(&a.model, &a.images, &a.texts, a.max_length, a.itm, &device)?;
    if a.json {
        println!("{}", serde_json::to_string(&out)?);
    } else {
        print!("{}", embed::render(&out, &a.images, &a.texts));
    }
    Ok(())
}
