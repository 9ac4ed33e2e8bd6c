//! `wsplice import`: an nginx configuration (untrusted-ish text, often copied from the web)
//! through `import::syntax::parse` and `import::mapping::map`, as the command runs them on
//! each file (includes aside: they read files).
//!
//! Properties: any text is a directive tree or a syntax error with a line inside the text;
//! every warning names a line of the text; the TOML produced is valid TOML whatever the names,
//! paths and comments it copies from the nginx file (a quote or a line break in them must not
//! end a string or a comment early), and a configuration `wsplice check` accepts unless it
//! names certificate files (which do not exist here) or host names to resolve (a `# TODO`).

#![no_main]

use std::path::Path;

use libfuzzer_sys::fuzz_target;
use wsplice::config::Config;
use wsplice::import::{mapping, syntax};

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let file = Path::new("/fuzz/nginx.conf");
    let lines = text.split('\n').count();
    let tree = match syntax::parse(text, file) {
        Ok(tree) => tree,
        Err(error) => {
            assert!(error.line <= lines + 1, "{error:?} past {lines} lines");
            return;
        }
    };
    let mapped = mapping::map(&tree, file, Path::new("/fuzz"));
    for warning in &mapped.warnings {
        assert!(warning.line >= 1 && warning.line <= lines, "{warning}");
    }
    let Some(toml) = mapped.toml else {
        return;
    };
    if let Err(error) = toml::from_str::<toml::Table>(&toml) {
        panic!("the import is not TOML: {error}\n{toml}");
    }
    // What the import leaves to the user: certificate files to put in place, host names to
    // resolve (a `# TODO` line).
    if let Err(error) = Config::parse(&toml) {
        assert!(
            toml.contains("cert = ") || toml.contains("\n# TODO"),
            "the import does not pass `wsplice check`: {error}\n{toml}"
        );
    }
});
