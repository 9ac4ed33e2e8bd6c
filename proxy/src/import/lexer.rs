//! nginx configuration tokens: words (bare or quoted, escapes resolved), `;`, `{`, `}`, each with
//! its line; `#` starts a comment to the end of the line. Pure: it takes text, not files.

/// What a token is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TokenKind {
    /// A word: a directive name or an argument (quotes removed, escapes resolved).
    Word(String),
    /// `;`, the end of a simple directive.
    Semicolon,
    /// `{`, the start of a block.
    Open,
    /// `}`, the end of a block.
    Close,
}

/// One token and the line it starts on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Token {
    /// What it is.
    pub kind: TokenKind,
    /// 1-based line.
    pub line: usize,
}

/// Text that is not a sequence of nginx tokens.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("line {line}: {message}")]
pub struct LexError {
    /// 1-based line of the problem.
    pub line: usize,
    /// What is wrong.
    pub message: String,
}

/// Splits `text` into tokens.
pub fn tokenize(text: &str) -> Result<Vec<Token>, LexError> {
    let mut tokens = Vec::new();
    let mut chars = text.chars().peekable();
    let mut line = 1;
    while let Some(&c) = chars.peek() {
        match c {
            '\n' => {
                line += 1;
                chars.next();
            }
            c if c.is_whitespace() => {
                chars.next();
            }
            '#' => {
                while chars.peek().is_some_and(|&c| c != '\n') {
                    chars.next();
                }
            }
            ';' | '{' | '}' => {
                chars.next();
                let kind = match c {
                    ';' => TokenKind::Semicolon,
                    '{' => TokenKind::Open,
                    _ => TokenKind::Close,
                };
                tokens.push(Token { kind, line });
            }
            '"' | '\'' => {
                let start = line;
                chars.next();
                let mut word = String::new();
                loop {
                    match chars.next() {
                        None => {
                            return Err(LexError {
                                line: start,
                                message: format!("unterminated {c}quoted{c} string"),
                            })
                        }
                        Some(q) if q == c => break,
                        Some('\\') => match chars.next() {
                            Some('n') => word.push('\n'),
                            Some('r') => word.push('\r'),
                            Some('t') => word.push('\t'),
                            Some(e) if e == c || e == '\\' => word.push(e),
                            Some(e) => {
                                // nginx keeps other escapes as written.
                                if e == '\n' {
                                    line += 1;
                                }
                                word.push('\\');
                                word.push(e);
                            }
                            None => {
                                return Err(LexError {
                                    line: start,
                                    message: format!("unterminated {c}quoted{c} string"),
                                })
                            }
                        },
                        Some(other) => {
                            if other == '\n' {
                                line += 1;
                            }
                            word.push(other);
                        }
                    }
                }
                tokens.push(Token {
                    kind: TokenKind::Word(word),
                    line: start,
                });
                // nginx wants a separator after a closing quote.
                if let Some(&next) = chars.peek() {
                    if !(next.is_whitespace() || matches!(next, ';' | '{' | '}')) {
                        return Err(LexError {
                            line,
                            message: format!("unexpected {next:?} after a quoted string"),
                        });
                    }
                }
            }
            _ => {
                let mut word = String::new();
                while let Some(&c) = chars.peek() {
                    if c.is_whitespace() || c == ';' || c == '}' || c == '"' || c == '\'' {
                        break;
                    }
                    if c == '{' {
                        // `${name}` is a variable, not a block.
                        if !word.ends_with('$') {
                            break;
                        }
                        for c in chars.by_ref() {
                            word.push(c);
                            if c == '}' {
                                break;
                            }
                        }
                        continue;
                    }
                    chars.next();
                    if c == '\\' {
                        // nginx resolves these escapes and keeps the others (`\.` in a regex).
                        match chars.next() {
                            Some(e @ ('"' | '\'' | '\\')) => word.push(e),
                            Some('n') => word.push('\n'),
                            Some('r') => word.push('\r'),
                            Some('t') => word.push('\t'),
                            Some(e) => {
                                if e == '\n' {
                                    line += 1;
                                }
                                word.push('\\');
                                word.push(e);
                            }
                            None => word.push('\\'),
                        }
                        continue;
                    }
                    word.push(c);
                }
                if word.is_empty() {
                    // A quote inside a word: nginx refuses it too.
                    return Err(LexError {
                        line,
                        message: format!("unexpected {c:?}"),
                    });
                }
                tokens.push(Token {
                    kind: TokenKind::Word(word),
                    line,
                });
            }
        }
    }
    Ok(tokens)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn words(text: &str) -> Vec<(String, usize)> {
        tokenize(text)
            .unwrap()
            .into_iter()
            .map(|t| match t.kind {
                TokenKind::Word(w) => (w, t.line),
                TokenKind::Semicolon => (";".into(), t.line),
                TokenKind::Open => ("{".into(), t.line),
                TokenKind::Close => ("}".into(), t.line),
            })
            .collect()
    }

    #[test]
    fn words_quotes_comments_and_lines() {
        let tokens =
            words("a b;# comment ; {\nc \"d e\" 'f\\'g' \"h\\\"i\" {\n}\nx ${var}y \\.php$;");
        let expected: Vec<(&str, usize)> = vec![
            ("a", 1),
            ("b", 1),
            (";", 1),
            ("c", 2),
            ("d e", 2),
            ("f'g", 2),
            ("h\"i", 2),
            ("{", 2),
            ("}", 3),
            ("x", 4),
            ("${var}y", 4),
            ("\\.php$", 4),
            (";", 4),
        ];
        let expected: Vec<(String, usize)> = expected
            .into_iter()
            .map(|(w, l)| (w.to_owned(), l))
            .collect();
        assert_eq!(tokens, expected);
    }

    #[test]
    fn a_quoted_string_keeps_its_first_line() {
        let tokens = words("a \"b\nc\" d;");
        assert_eq!(tokens[1], ("b\nc".to_owned(), 1));
        assert_eq!(tokens[2], ("d".to_owned(), 2));
    }

    #[test]
    fn unterminated_quotes_name_their_line() {
        let error = tokenize("a;\nb \"c;\n").unwrap_err();
        assert_eq!(error.line, 2);
        assert!(error.message.contains("unterminated"), "{error}");
    }
}
