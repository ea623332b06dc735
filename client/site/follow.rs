//! Follows a file that scanner software appends to, like `tail -F`: reads it from the start (in
//! badge mode a re-read line is "already checked in", so a restart re-reading the file is
//! harmless), then polls for growth every `poll` (a bounded poll, no busy loop); when the file is
//! replaced (rotation: another file at the path) or truncated, it finishes the old one and reads
//! the new one from its start. A file that does not exist yet is waited for.

use std::{
    io::{Read, Seek, SeekFrom},
    path::PathBuf,
    time::Duration,
};

use tokio::sync::mpsc;

/// Identity of the file at a path: a different value means it was replaced.
fn identity(m: &std::fs::Metadata) -> u64 {
    #[cfg(unix)]
    {
        use std::os::unix::fs::MetadataExt;
        m.ino()
    }
    #[cfg(not(unix))]
    {
        // No inode: a replaced file is noticed when it is shorter than what was read.
        m.created().ok().and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok()).map_or(0, |d| d.as_nanos() as u64)
    }
}

/// Longest line kept, bytes; the rest of a longer line is dropped (the line is then refused as
/// too long by the badge rules, being longer than any badge).
const MAX_LINE: usize = 4096;

/// Sends every complete line of the file at `path` (without its `\n`) to `lines`, forever or
/// until the receiver is gone. Errors reading the file are logged and retried at the next poll.
pub async fn follow(path: PathBuf, poll: Duration, lines: mpsc::Sender<Vec<u8>>) {
    let mut file: Option<(std::fs::File, u64)> = None;
    let mut pos = 0u64;
    let mut partial: Vec<u8> = Vec::new();
    let mut warned = false;
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        // Replaced or truncated? Finish what the old handle holds, then switch.
        let at_path = std::fs::metadata(&path).ok();
        let replaced = match (&file, &at_path) {
            (Some((_, id)), Some(m)) => identity(m) != *id || m.len() < pos,
            (None, Some(_)) => true,
            _ => false,
        };
        if let Some((f, _)) = &mut file {
            loop {
                match f.read(&mut buf) {
                    Ok(0) => break,
                    Ok(n) => {
                        pos += n as u64;
                        for chunk in buf[..n].split_inclusive(|b| *b == b'\n') {
                            if partial.len() < MAX_LINE {
                                let room = MAX_LINE - partial.len();
                                partial.extend_from_slice(&chunk[..chunk.len().min(room)]);
                            }
                            if chunk.ends_with(b"\n") {
                                let mut line = std::mem::take(&mut partial);
                                line.pop();
                                if lines.send(line).await.is_err() {
                                    return;
                                }
                            }
                        }
                    }
                    Err(e) => {
                        tracing::warn!(path = %path.display(), error = %e, "cannot read the followed file; retrying");
                        break;
                    }
                }
            }
        }
        if replaced {
            match std::fs::File::open(&path).and_then(|mut f| {
                f.seek(SeekFrom::Start(0))?;
                let id = identity(&f.metadata()?);
                Ok((f, id))
            }) {
                Ok(opened) => {
                    if file.is_some() && !partial.is_empty() {
                        // The old file ended without a newline: its last line is complete.
                        if lines.send(std::mem::take(&mut partial)).await.is_err() {
                            return;
                        }
                    }
                    tracing::info!(path = %path.display(), "following");
                    file = Some(opened);
                    pos = 0;
                    warned = false;
                    continue;
                }
                Err(e) if !warned => {
                    tracing::warn!(path = %path.display(), error = %e, "cannot open the followed file; waiting for it");
                    warned = true;
                }
                Err(_) => {}
            }
        } else if file.is_none() && !warned {
            tracing::warn!(path = %path.display(), "the followed file does not exist yet; waiting for it");
            warned = true;
        }
        if lines.is_closed() {
            return;
        }
        tokio::time::sleep(poll).await;
    }
}
