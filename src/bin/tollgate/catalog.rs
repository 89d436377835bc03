//! Loading a catalog (JSON or TOML) and checking it with every error found.

use std::path::Path;

use tollgate::{Catalog, CatalogConfig, Error};

/// One thing wrong with a catalog file: where, and what.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    /// The field path (`plans[plan_free].limits[0].max`), or `(file)` for
    /// the file as a whole.
    pub field: String,
    /// What is wrong.
    pub reason: String,
}

impl Problem {
    fn new(field: impl Into<String>, reason: impl Into<String>) -> Self {
        let field = field.into();
        Self {
            field: if field.is_empty() || field == "." {
                "(file)".to_owned()
            } else {
                field
            },
            reason: reason.into(),
        }
    }
}

/// A catalog file is TOML when it ends in `.toml`, JSON when it ends in
/// `.json`, and otherwise JSON when its first non-blank character is `{`.
fn is_toml(path: &Path, text: &str) -> bool {
    match path.extension().and_then(|e| e.to_str()) {
        Some(e) if e.eq_ignore_ascii_case("toml") => true,
        Some(e) if e.eq_ignore_ascii_case("json") => false,
        _ => !text.trim_start().starts_with('{'),
    }
}

/// Read and parse `path` into a configuration. A syntax or type error is
/// one problem, named by its field path.
pub fn parse(path: &Path) -> Result<CatalogConfig, Problem> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| Problem::new("(file)", format!("cannot read {}: {e}", path.display())))?;
    if is_toml(path, &text) {
        let de = toml::Deserializer::new(&text);
        serde_path_to_error::deserialize(de)
            .map_err(|e| Problem::new(e.path().to_string(), one_line(&e.inner().to_string())))
    } else {
        let de = &mut serde_json::Deserializer::from_str(&text);
        serde_path_to_error::deserialize(de)
            .map_err(|e| Problem::new(e.path().to_string(), e.inner().to_string()))
    }
}

/// A multi-line parser message (TOML's quotes the source) on one line.
fn one_line(message: &str) -> String {
    message
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect::<Vec<_>>()
        .join(" ")
}

/// Every validation problem of `config`, not only the first: each meter,
/// plan and pool is checked against those before it that passed, so one bad
/// entry does not hide the next.
pub fn problems(config: &CatalogConfig) -> Vec<Problem> {
    let mut found = Vec::new();
    let mut base = CatalogConfig::default();
    for (i, meter) in config.meters.iter().enumerate() {
        let mut trial = base.clone();
        trial.meters.push(meter.clone());
        // The trial's index of this meter is `base.meters.len()`: renamed
        // to its index in the file.
        let at = base.meters.len();
        match trial.build() {
            Ok(_) => base.meters.push(meter.clone()),
            Err(e) => found.push(renumbered(
                e,
                &format!("meters[{at}]"),
                &format!("meters[{i}]"),
            )),
        }
    }
    let mut seen = std::collections::HashSet::new();
    for plan in &config.plans {
        if !seen.insert(plan.id.as_str()) {
            let reason = format!("duplicate plan id `{}`", plan.id);
            found.push(Problem::new(format!("plans[{}].id", plan.id), reason));
            continue;
        }
        let mut trial = base.clone();
        trial.plans.push(plan.clone());
        match trial.build() {
            Ok(_) => base.plans.push(plan.clone()),
            Err(e) => found.push(renumbered(e, "", "")),
        }
    }
    let mut seen = std::collections::HashSet::new();
    for pool in &config.pools {
        if !seen.insert(pool.id.as_str()) {
            let reason = format!("duplicate pool id `{}`", pool.id);
            found.push(Problem::new(format!("pools[{}].id", pool.id), reason));
            continue;
        }
        let mut trial = base.clone();
        trial.pools.push(pool.clone());
        match trial.build() {
            Ok(_) => base.pools.push(pool.clone()),
            Err(e) => found.push(renumbered(e, "", "")),
        }
    }
    found
}

fn renumbered(e: Error, from: &str, to: &str) -> Problem {
    match e {
        Error::InvalidConfig { field, reason } => {
            let field = match field.strip_prefix(from) {
                Some(rest) if !from.is_empty() => format!("{to}{rest}"),
                _ => field,
            };
            Problem::new(field, reason)
        }
        other => Problem::new("(file)", other.to_string()),
    }
}

/// Parse and validate `path`: the catalog, or every problem found.
pub fn load(path: &Path) -> Result<Catalog, Vec<Problem>> {
    let config = parse(path).map_err(|p| vec![p])?;
    let found = problems(&config);
    if !found.is_empty() {
        return Err(found);
    }
    config.build().map_err(|e| vec![renumbered(e, "", "")])
}

/// Print `problems` of `path` on stderr, one a line.
pub fn report(path: &Path, problems: &[Problem]) {
    for p in problems {
        eprintln!(
            "{}: {}: {}",
            path.display(),
            visible(&p.field),
            visible(&p.reason)
        );
    }
    let n = problems.len();
    eprintln!(
        "{}: {n} error{}",
        path.display(),
        if n == 1 { "" } else { "s" }
    );
}

/// `s` with each control character written as `\u{..}`, so a terminal
/// shows every character an id holds.
pub fn visible(s: &str) -> String {
    s.chars()
        .map(|c| {
            if c.is_control() {
                c.escape_unicode().to_string()
            } else {
                c.to_string()
            }
        })
        .collect()
}

#[cfg(test)]
mod visible_tests {
    #[test]
    fn control_characters_are_written_out() {
        assert_eq!(super::visible("to\u{1f}kens `x`"), "to\\u{1f}kens `x`");
        assert_eq!(super::visible("plain"), "plain");
    }
}
