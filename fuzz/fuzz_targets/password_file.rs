//! Fuzz the password-file parser (`[auth] password_file`): any text parses or fails with an
//! error naming a line, never panics; a file that parses parses the same again.
#![no_main]

use ferrymq_server::password_file::parse_password_file;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let first = parse_password_file(text).is_ok();
    assert_eq!(first, parse_password_file(text).is_ok());
});
