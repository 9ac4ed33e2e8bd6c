//! `wsplice import nginx.conf`: an nginx configuration turned into a wsplice one.
//!
//! The steps, one per file: [`lexer`] (tokens, quotes, comments, lines), [`syntax`] (directives
//! and blocks), this module's [`load`] (the one place that reads files: the main file and the
//! files its `include`s name, globs included, each relative to the including file's folder),
//! [`mapping`] (the directive tree → wsplice's TOML, pure) and [`values`] (durations, sizes,
//! cipher names, addresses).
//!
//! Nothing is dropped silently: every directive that does not map becomes a [`Warning`] that
//! names its file and line. A short list of directives is left out without a warning because
//! they change nothing a proxy does ([`mapping::SILENT`]: `events`, `pid`, `sendfile`, MIME
//! types, hash table sizes…).

use std::path::{Path, PathBuf};

pub mod lexer;
pub mod mapping;
pub mod syntax;
pub mod values;

use syntax::Directive;

/// How deep `include`s may nest (a file including itself stops here).
const MAX_INCLUDE_DEPTH: usize = 16;

/// The result of an import: wsplice TOML and what did not carry over.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Imported {
    /// The wsplice configuration.
    pub toml: String,
    /// One per directive (or part of one) that was not imported, in file order.
    pub warnings: Vec<Warning>,
}

/// A directive (or part of one) that was not imported, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Warning {
    /// The file it is written in.
    pub file: PathBuf,
    /// Its 1-based line.
    pub line: usize,
    /// The directive as written (`ip_hash`, `root /var/www`).
    pub directive: String,
    /// Whether the rest of the directive was imported.
    pub partly: bool,
    /// Why.
    pub reason: String,
}

impl Warning {
    /// `directive` was not imported at all.
    pub fn dropped(directive: &Directive, reason: impl Into<String>) -> Warning {
        Warning {
            file: directive.file.clone(),
            line: directive.line,
            directive: directive.text(),
            partly: false,
            reason: reason.into(),
        }
    }

    /// `directive` was imported but for what `reason` says.
    pub fn partly(directive: &Directive, reason: impl Into<String>) -> Warning {
        Warning {
            partly: true,
            ..Warning::dropped(directive, reason)
        }
    }
}

impl std::fmt::Display for Warning {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let how = if self.partly {
            "partly imported"
        } else {
            "not imported"
        };
        write!(
            f,
            "{}:{}: directive `{}` {how}: {}",
            self.file.display(),
            self.line,
            self.directive,
            self.reason
        )
    }
}

/// Why no configuration was produced.
#[derive(Debug, thiserror::Error)]
pub enum ImportError {
    /// A file could not be read.
    #[error("{}: cannot read the file: {source}", path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// The reason.
        source: std::io::Error,
    },
    /// A file is not an nginx configuration.
    #[error("{}:{line}: {message}", path.display())]
    Syntax {
        /// The file.
        path: PathBuf,
        /// 1-based line.
        line: usize,
        /// What is wrong.
        message: String,
    },
    /// `include`s nested too deep (a file including itself).
    #[error("{}:{line}: includes nest deeper than {MAX_INCLUDE_DEPTH} files (does a file include itself?)", path.display())]
    IncludeDepth {
        /// The file with the `include`.
        path: PathBuf,
        /// Its line.
        line: usize,
    },
    /// Nothing is proxied: wsplice needs at least one route and one listener.
    #[error("{}: nothing to import: no `server` with a `listen` wsplice can bind and a `location` with a `proxy_pass` it can take", path.display())]
    NothingProxied {
        /// The main file.
        path: PathBuf,
        /// What was not imported (the reasons nothing was).
        warnings: Vec<Warning>,
    },
}

/// Reads `path` (and its includes) and turns it into a wsplice configuration.
pub fn import(path: &Path) -> Result<Imported, ImportError> {
    let mut warnings = Vec::new();
    let root = path.parent().unwrap_or(Path::new("."));
    let tree = load(path, root, 0, &mut warnings)?;
    // nginx takes relative paths (certificates) from the main file's folder.
    let folder = path.parent().unwrap_or(Path::new("."));
    let folder = std::path::absolute(folder).unwrap_or_else(|_| folder.to_owned());
    let mapped = mapping::map(&tree, path, &folder);
    warnings.extend(mapped.warnings);
    warnings.sort_by(|a, b| (&a.file, a.line).cmp(&(&b.file, b.line)));
    match mapped.toml {
        Some(toml) => Ok(Imported { toml, warnings }),
        None => Err(ImportError::NothingProxied {
            path: path.to_owned(),
            warnings,
        }),
    }
}

/// Reads and parses `path`, replacing each `include` by the directives of the files it names
/// (except `mime.types`, left for the mapping to pass over). A relative include is looked for
/// in the including file's folder, then in `root` (the main file's folder, where nginx looks).
/// An include naming a missing file is a warning; a glob matching nothing is fine (as in
/// nginx).
pub fn load(
    path: &Path,
    root: &Path,
    depth: usize,
    warnings: &mut Vec<Warning>,
) -> Result<Vec<Directive>, ImportError> {
    let text = std::fs::read_to_string(path).map_err(|source| ImportError::Read {
        path: path.to_owned(),
        source,
    })?;
    let tree = syntax::parse(&text, path).map_err(|e| ImportError::Syntax {
        path: path.to_owned(),
        line: e.line,
        message: e.message,
    })?;
    let folder = path.parent().unwrap_or(Path::new("."));
    expand(tree, folder, root, depth, warnings)
}

fn expand(
    tree: Vec<Directive>,
    folder: &Path,
    root: &Path,
    depth: usize,
    warnings: &mut Vec<Warning>,
) -> Result<Vec<Directive>, ImportError> {
    let mut out = Vec::with_capacity(tree.len());
    for mut directive in tree {
        if let Some(block) = directive.block.take() {
            directive.block = Some(expand(block, folder, root, depth, warnings)?);
        }
        let [pattern] = directive.args.as_slice() else {
            out.push(directive);
            continue;
        };
        if directive.name != "include" || directive.block.is_some() || is_mime_types(pattern) {
            out.push(directive);
            continue;
        }
        if depth >= MAX_INCLUDE_DEPTH {
            return Err(ImportError::IncludeDepth {
                path: directive.file.clone(),
                line: directive.line,
            });
        }
        let mut files = glob(&folder.join(pattern));
        if matches!(&files, Ok(found) if found.iter().all(|f| !f.exists())) && folder != root {
            files = glob(&root.join(pattern));
        }
        let files = match files {
            Ok(files) => files,
            Err(reason) => {
                warnings.push(Warning::dropped(&directive, reason));
                continue;
            }
        };
        for file in files {
            match load(&file, root, depth + 1, warnings) {
                Err(ImportError::Read { path, source }) => warnings.push(Warning::dropped(
                    &directive,
                    format!("cannot read {}: {source}", path.display()),
                )),
                other => out.extend(other?),
            }
        }
    }
    Ok(out)
}

/// `include mime.types` (any folder): types for serving files, of no use to a proxy.
fn is_mime_types(pattern: &str) -> bool {
    Path::new(pattern)
        .file_name()
        .is_some_and(|name| name == "mime.types")
}

/// The files `pattern` names: itself, or with `*`/`?` in its last part, the matching files of
/// its folder in name order.
fn glob(pattern: &Path) -> Result<Vec<PathBuf>, String> {
    let name = pattern
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let wild = |s: &str| s.contains(['*', '?', '[']);
    if let Some(parent) = pattern.parent() {
        if wild(&parent.to_string_lossy()) {
            return Err("wildcards are followed in the file name only, not in folders".into());
        }
    }
    if !wild(&name) {
        return Ok(vec![pattern.to_owned()]);
    }
    let folder = pattern.parent().unwrap_or(Path::new("."));
    let entries = match std::fs::read_dir(folder) {
        Ok(entries) => entries,
        // nginx accepts a glob that matches nothing.
        Err(_) => return Ok(Vec::new()),
    };
    let mut files: Vec<PathBuf> = entries
        .filter_map(Result::ok)
        .filter(|e| e.file_type().is_ok_and(|t| !t.is_dir()))
        .filter(|e| wildcard_match(&name, &e.file_name().to_string_lossy()))
        .map(|e| e.path())
        .collect();
    files.sort();
    Ok(files)
}

/// Shell-style match of `*` (any run) and `?` (one character); no hidden-file rule.
fn wildcard_match(pattern: &str, name: &str) -> bool {
    let pattern: Vec<char> = pattern.chars().collect();
    let name: Vec<char> = name.chars().collect();
    let (mut p, mut n) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while n < name.len() {
        if p < pattern.len() && (pattern[p] == '?' || pattern[p] == name[n]) {
            p += 1;
            n += 1;
        } else if p < pattern.len() && pattern[p] == '*' {
            star = Some((p, n));
            p += 1;
        } else if let Some((sp, sn)) = star {
            p = sp + 1;
            n = sn + 1;
            star = Some((sp, sn + 1));
        } else {
            return false;
        }
    }
    pattern[p..].iter().all(|&c| c == '*')
}

#[cfg(test)]
mod tests;
