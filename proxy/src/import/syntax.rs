//! The nginx configuration grammar: a directive is a name, arguments, then `;` or a `{ }`
//! block of directives. Pure: it takes text and the file name to remember, reads nothing
//! (`include` is followed by [`super::load`]).

use std::path::{Path, PathBuf};

use super::lexer::{tokenize, LexError, Token, TokenKind};

/// One directive, where it was written.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Directive {
    /// The name (`proxy_pass`).
    pub name: String,
    /// The arguments, quotes removed.
    pub args: Vec<String>,
    /// The directives of its `{ }` block; `None` for a directive ending in `;`.
    pub block: Option<Vec<Directive>>,
    /// The file it is written in.
    pub file: PathBuf,
    /// Its 1-based line (of its name).
    pub line: usize,
}

impl Directive {
    /// The name and arguments as written (`listen 443 ssl`), for messages.
    pub fn text(&self) -> String {
        let mut text = self.name.clone();
        for arg in &self.args {
            text.push(' ');
            if arg.is_empty() || arg.contains(|c: char| c.is_whitespace() || c == ';') {
                text.push_str(&format!("{arg:?}"));
            } else {
                text.push_str(arg);
            }
        }
        text
    }

    /// The directives of its block (none for a simple directive).
    pub fn children(&self) -> &[Directive] {
        self.block.as_deref().unwrap_or_default()
    }
}

/// Text that does not follow the nginx grammar.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("line {line}: {message}")]
pub struct SyntaxError {
    /// 1-based line of the problem.
    pub line: usize,
    /// What is wrong.
    pub message: String,
}

impl From<LexError> for SyntaxError {
    fn from(error: LexError) -> SyntaxError {
        SyntaxError {
            line: error.line,
            message: error.message,
        }
    }
}

/// Parses the text of `file` into its top-level directives.
pub fn parse(text: &str, file: &Path) -> Result<Vec<Directive>, SyntaxError> {
    let tokens = tokenize(text)?;
    let mut tokens = tokens.into_iter().peekable();
    let directives = block(&mut tokens, file, None)?;
    Ok(directives)
}

/// Directives until `}` (when `opened` says on which line the block began) or the end.
fn block(
    tokens: &mut std::iter::Peekable<std::vec::IntoIter<Token>>,
    file: &Path,
    opened: Option<usize>,
) -> Result<Vec<Directive>, SyntaxError> {
    let mut directives = Vec::new();
    loop {
        let Some(token) = tokens.next() else {
            return match opened {
                Some(line) => Err(SyntaxError {
                    line,
                    message: "this block's `{` has no matching `}`".into(),
                }),
                None => Ok(directives),
            };
        };
        let name = match token.kind {
            TokenKind::Word(name) => name,
            TokenKind::Close if opened.is_some() => return Ok(directives),
            TokenKind::Close => {
                return Err(SyntaxError {
                    line: token.line,
                    message: "unexpected `}`".into(),
                })
            }
            TokenKind::Semicolon => {
                return Err(SyntaxError {
                    line: token.line,
                    message: "unexpected `;` (a directive has no name)".into(),
                })
            }
            TokenKind::Open => {
                return Err(SyntaxError {
                    line: token.line,
                    message: "unexpected `{` (a block has no directive name)".into(),
                })
            }
        };
        let line = token.line;
        let mut args = Vec::new();
        let block_directives = loop {
            let Some(token) = tokens.next() else {
                return Err(SyntaxError {
                    line,
                    message: format!("directive `{name}` does not end with `;` or `{{`"),
                });
            };
            match token.kind {
                TokenKind::Word(word) => args.push(word),
                TokenKind::Semicolon => break None,
                TokenKind::Open => break Some(block(tokens, file, Some(token.line))?),
                TokenKind::Close => {
                    return Err(SyntaxError {
                        line,
                        message: format!("directive `{name}` does not end with `;` or `{{`"),
                    })
                }
            }
        };
        directives.push(Directive {
            name,
            args,
            block: block_directives,
            file: file.to_owned(),
            line,
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nested_blocks_keep_lines() {
        let tree = parse(
            "http {\n  server {\n    listen 80;\n  }\n}\nworker_processes 2;\n",
            Path::new("n.conf"),
        )
        .unwrap();
        assert_eq!(tree.len(), 2);
        let server = &tree[0].children()[0];
        assert_eq!(server.name, "server");
        assert_eq!(server.line, 2);
        assert_eq!(server.children()[0].text(), "listen 80");
        assert_eq!(server.children()[0].line, 3);
        assert_eq!(tree[1].args, ["2"]);
        assert_eq!(tree[1].line, 6);
    }

    #[test]
    fn errors_name_the_line() {
        let unclosed = parse("http {\n server {\n", Path::new("n.conf")).unwrap_err();
        assert_eq!(unclosed.line, 2);
        let extra = parse("a;\n}\n", Path::new("n.conf")).unwrap_err();
        assert_eq!(extra.line, 2);
        let unended = parse("a b\n", Path::new("n.conf")).unwrap_err();
        assert_eq!(unended.line, 1);
        assert!(unended.message.contains("`a`"), "{unended}");
    }
}
