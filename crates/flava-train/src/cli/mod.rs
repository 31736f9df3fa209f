//! One file per command: its options, the call into the library, the rendering.

pub mod codebook;
pub mod convert;
pub mod data;
pub mod dvae;
pub mod embed;
pub mod eval;
pub mod finetune;
pub mod masks;
pub mod pretrain;
pub mod report;

/// The default limits with `NAME=VALUE` overrides applied.
pub fn parse_limits(
    base: flava_vit::limits::Limits,
    overrides: &[String],
) -> anyhow::Result<flava_vit::limits::Limits> {
    if overrides.is_empty() {
        return Ok(base);
    }
    let mut table = toml::Table::try_from(base)?;
    for o in overrides {
        let (k, v) = o
            .split_once('=')
            .ok_or_else(|| anyhow::anyhow!("--reader-limit {o}: expected NAME=VALUE"))?;
        let v: u64 = v
            .trim()
            .replace('_', "")
            .parse()
            .map_err(|_| anyhow::anyhow!("--reader-limit {o}: the value must be a whole number"))?;
        if !table.contains_key(k.trim()) {
            anyhow::bail!(
                "--reader-limit {o}: unknown limit `{k}` (one of {})",
                table.keys().cloned().collect::<Vec<_>>().join(", ")
            );
        }
        table.insert(
            k.trim().to_string(),
            toml::Value::Integer(v.min(i64::MAX as u64) as i64),
        );
    }
    let limits: flava_vit::limits::Limits = table.try_into()?;
    limits.validate()?;
    Ok(limits)
}
