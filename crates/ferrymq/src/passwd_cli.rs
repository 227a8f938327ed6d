//! `ferrymq passwd FILE USER`: adds or updates a user of a password file (`[auth]
//! password_file`), or deletes one with `-D`, as `mosquitto_passwd` does. The file's format
//! and hashing live in `ferrymq_server::password_file`; this only prompts and writes.

use std::io::{BufRead, Write};
use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use ferrymq_server::password_file::{
    hash_password, parse_password_file, remove_user, set_user, valid_user_name,
};

#[derive(clap::Args)]
pub struct PasswdArgs {
    /// The password file; created (mode 0600) if missing.
    file: PathBuf,
    /// The user name.
    user: String,
    /// Delete the user instead of setting a password.
    #[arg(short = 'D', long = "delete")]
    delete: bool,
    /// Read the password from the first line of standard input instead of prompting.
    #[arg(long, conflicts_with = "delete")]
    password_stdin: bool,
}

pub fn passwd(args: PasswdArgs) -> anyhow::Result<()> {
    if !valid_user_name(&args.user) {
        bail!(
            "invalid user name {:?}: it must be non-empty, without ':' or line breaks, not start with '#' or have spaces at its ends",
            args.user
        );
    }
    let text = match std::fs::read_to_string(&args.file) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound && !args.delete => String::new(),
        Err(e) => return Err(e).with_context(|| format!("cannot read {}", args.file.display())),
    };
    // Refuse to rewrite a file the broker would refuse to read.
    parse_password_file(&text).with_context(|| format!("{}", args.file.display()))?;
    let (new, edit) = if args.delete {
        remove_user(&text, &args.user)
    } else {
        let password = read_password(args.password_stdin)?;
        if password.is_empty() {
            bail!("empty password");
        }
        let hash = hash_password(password.as_bytes())?;
        set_user(&text, &args.user, &hash)
    };
    if edit == ferrymq_server::password_file::Edit::NotFound {
        bail!("user {:?} is not in {}", args.user, args.file.display());
    }
    write_atomically(&args.file, &new)?;
    let _ = writeln!(
        std::io::stderr(),
        "{}: {edit} {:?}",
        args.file.display(),
        args.user
    );
    Ok(())
}

fn read_password(from_stdin: bool) -> anyhow::Result<String> {
    if from_stdin {
        let mut line = String::new();
        std::io::stdin()
            .lock()
            .read_line(&mut line)
            .context("reading the password from standard input")?;
        return Ok(line.trim_end_matches(['\r', '\n']).to_string());
    }
    let first = rpassword::prompt_password("Password: ").context("reading the password")?;
    let again = rpassword::prompt_password("Reenter password: ").context("reading the password")?;
    if first != again {
        bail!("the passwords do not match");
    }
    Ok(first)
}

/// Writes a sibling temporary file (mode 0600: it holds hashes) and renames it over `path`,
/// so a reader never sees half a file.
fn write_atomically(path: &Path, text: &str) -> anyhow::Result<()> {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "passwd".into());
    let tmp = path.with_file_name(format!(".{name}.tmp"));
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create(true).truncate(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut opts, 0o600);
    let mut f = opts
        .open(&tmp)
        .with_context(|| format!("cannot write {}", tmp.display()))?;
    f.write_all(text.as_bytes())
        .and_then(|()| f.sync_all())
        .with_context(|| format!("cannot write {}", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("cannot replace {}", path.display()))?;
    Ok(())
}
