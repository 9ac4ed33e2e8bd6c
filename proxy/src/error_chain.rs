//! Errors as one line: the error and its causes, for logs and the command line.

/// `error` and its sources joined by ": ", skipping a cause whose message the error before it
/// already includes (many errors say "what failed: {source}" and also report that source), e.g.
/// "failed to create map `PEER`: Operation not permitted (os error 1)".
pub fn describe(error: &(dyn std::error::Error + 'static)) -> String {
    let mut text = error.to_string();
    let mut previous = text.clone();
    let mut source = error.source();
    while let Some(cause) = source {
        let message = cause.to_string();
        if !previous.contains(&message) {
            text.push_str(": ");
            text.push_str(&message);
        }
        previous = message;
        source = cause.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, thiserror::Error)]
    #[error("loading failed: {0}")]
    struct Repeats(#[source] std::io::Error);

    #[derive(Debug, thiserror::Error)]
    #[error("loading failed")]
    struct Wraps(#[source] std::io::Error);

    #[test]
    fn causes_are_joined_once() {
        let denied = || std::io::Error::from_raw_os_error(libc::EPERM);
        assert_eq!(
            describe(&Repeats(denied())),
            "loading failed: Operation not permitted (os error 1)"
        );
        assert_eq!(
            describe(&Wraps(denied())),
            "loading failed: Operation not permitted (os error 1)"
        );
    }
}
