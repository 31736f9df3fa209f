//! `flava report RUN_DIR`: the run's self-contained HTML page.

use std::path::PathBuf;

/// Write a run's report: one self-contained HTML page (configuration, curves, evaluation,
/// confusion matrix, retrieval examples, MIM targets, reconstructions, masks).
#[derive(clap::Args)]
pub struct ReportArgs {
    /// The run directory (`--out` of `flava pretrain`, `flava finetune` or `flava dvae train`).
    run: PathBuf,
    /// Where to write the page (default: RUN/report.html).
    #[arg(long)]
    out: Option<PathBuf>,
}

/// Runs the command.
pub fn run(a: ReportArgs) -> anyhow::Result<()> {
    let out = a.out.unwrap_or_else(|| a.run.join(flava_train::report::REPORT_FILE));
    let p = flava_train::report::write_to(&a.run, &out)?;
    println!("{}", p.display());
    Ok(())
}
