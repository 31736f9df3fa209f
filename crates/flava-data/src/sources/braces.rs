//! WebDataset shard patterns: shell-style brace expansion.

use super::SourceError;

/// Most paths one brace pattern may expand to.
pub const MAX_BRACE_EXPANSION: u64 = 1_000_000;

/// Expands shell-style braces as WebDataset does: `data/{000..099}.tar` (numeric ranges, zero
/// padded to the width of the first bound, ascending or descending), `{a..e}` (letter ranges) and
/// `{a,b}` (alternatives); several groups multiply. Nested or unbalanced braces, empty bounds and
/// expansions past [`MAX_BRACE_EXPANSION`] paths are errors (checked before anything is built).
pub fn expand_braces(pattern: &str) -> Result<Vec<String>, SourceError> {
    let err = |message: String| SourceError::Pattern {
        pattern: pattern.into(),
        message,
    };
    // Parse into literal pieces and groups of alternatives, without recursion.
    enum Part<'a> {
        Lit(&'a str),
        Range { start: u64, end: u64, width: usize },
        Letters(u8, u8),
        Alts(Vec<&'a str>),
    }
    let mut parts = Vec::new();
    let mut rest = pattern;
    while let Some(open) = rest.find(['{', '}']) {
        if rest.as_bytes()[open] == b'}' {
            return Err(err("`}` without `{`".into()));
        }
        parts.push(Part::Lit(&rest[..open]));
        let after = &rest[open + 1..];
        let close = after.find(['{', '}']).ok_or_else(|| err("`{` without `}`".into()))?;
        if after.as_bytes()[close] == b'{' {
            return Err(err("nested braces are not supported".into()));
        }
        let body = &after[..close];
        rest = &after[close + 1..];
        if let Some((a, b)) = body.split_once("..") {
            if a.is_empty() || b.is_empty() {
                return Err(err(format!("range `{{{body}}}` needs both bounds")));
            }
            match (a.parse::<u64>(), b.parse::<u64>()) {
                (Ok(start), Ok(end)) => parts.push(Part::Range {
                    start,
                    end,
                    width: a.len(),
                }),
                _ if a.len() == 1
                    && b.len() == 1
                    && a.as_bytes()[0].is_ascii_alphabetic()
                    && b.as_bytes()[0].is_ascii_alphabetic() =>
                {
                    parts.push(Part::Letters(a.as_bytes()[0], b.as_bytes()[0]))
                }
                _ => {
                    return Err(err(format!(
                        "range `{{{body}}}`: bounds must be numbers (or single letters)"
                    )))
                }
            }
        } else {
            parts.push(Part::Alts(body.split(',').collect()));
        }
    }
    parts.push(Part::Lit(rest));
    let count = parts.iter().try_fold(1u64, |n, p| {
        let k = match p {
            Part::Lit(_) => 1,
            Part::Range { start, end, .. } => start.abs_diff(*end) + 1,
            Part::Letters(a, b) => a.abs_diff(*b) as u64 + 1,
            Part::Alts(v) => v.len() as u64,
        };
        n.checked_mul(k).filter(|&n| n <= MAX_BRACE_EXPANSION)
    });
    if count.is_none() {
        return Err(err(format!("expands to more than {MAX_BRACE_EXPANSION} paths")));
    }
    let mut out = vec![String::new()];
    for p in &parts {
        let items: Vec<String> = match p {
            Part::Lit(l) => vec![l.to_string()],
            Part::Range { start, end, width } => {
                let step = |v: u64| format!("{v:0width$}", width = *width);
                if start <= end {
                    (*start..=*end).map(step).collect()
                } else {
                    (*end..=*start).rev().map(step).collect()
                }
            }
            Part::Letters(a, b) => {
                if a <= b {
                    (*a..=*b).map(|c| (c as char).to_string()).collect()
                } else {
                    (*b..=*a).rev().map(|c| (c as char).to_string()).collect()
                }
            }
            Part::Alts(v) => v.iter().map(|s| s.to_string()).collect(),
        };
        out = out
            .iter()
            .flat_map(|prefix| items.iter().map(move |i| format!("{prefix}{i}")))
            .collect();
    }
    Ok(out)
}
