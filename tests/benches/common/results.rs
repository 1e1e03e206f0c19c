//! The results: figures as the tables show them, and the files written,
//! `results.json` and `results.md` in the output directory and the results
//! section of BENCHMARKS.md.

use std::path::Path;
use std::time::Duration;

use crate::Error;

#[allow(clippy::cast_precision_loss, clippy::cast_sign_loss, reason = "sample counts are small and p is in 0..=1")]
pub fn percentile(values: &[f64], p: f64) -> f64 {
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

pub fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// Writes `results.json` and `results.md` into `out`.
pub fn write(out: &Path, md: &str, json: &serde_json::Map<String, serde_json::Value>) -> Result<(), Error> {
    std::fs::write(out.join("results.json"), serde_json::to_string_pretty(json)?)?;
    std::fs::write(out.join("results.md"), md)?;
    Ok(())
}

/// Replaces the results section of BENCHMARKS.md with `md`, if the file
/// is there with its markers; only a whole run should.
pub fn publish(md: &str, quick: bool) -> Result<(), Error> {
    let doc = Path::new(env!("CARGO_MANIFEST_DIR")).join("../BENCHMARKS.md");
    if let Ok(text) = std::fs::read_to_string(&doc)
        && let (Some(start), Some(end)) = (text.find("<!-- results:start -->"), text.find("<!-- results:end -->"))
    {
        let head = &text[..start + "<!-- results:start -->".len()];
        let mode = if quick { "`--quick` run" } else { "full run" };
        std::fs::write(&doc, format!("{head}\n\n_Latest {mode}._\n\n{md}\n{}", &text[end..]))?;
    }
    Ok(())
}
