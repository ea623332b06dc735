//! Snapshots: `snapshot-<gen>.snap`, written to `snapshot-<gen>.tmp`, synced, given its name
//! (never replacing a file), directory synced. Two generations are kept: after snapshot `g` is
//! durable, only files older than the *previous* snapshot `p` are deleted, so snapshot `p` and the
//! journals `p..` remain — moving a corrupt snapshot `g` aside really leaves a complete state.

use std::path::{Path, PathBuf};

use super::{
    failpoints::crash_point,
    fs::Io,
    record::{Header, Record},
    store::{SNAPSHOT_MAGIC, StoreError, io, list, snapshot_path},
};

/// Size of the chunks a snapshot is written in, bytes.
const CHUNK: usize = 1 << 20;

/// Writes `snapshot-<generation>.snap` atomically from `records`, then deletes the files that
/// the previous snapshot makes obsolete. On error the temporary file is removed and no older
/// file was touched.
pub fn write_snapshot(
    io_: &dyn Io,
    dir: &Path,
    generation: u64,
    records: impl Iterator<Item = Record>,
) -> Result<PathBuf, StoreError> {
    let path = snapshot_path(dir, generation);
    let tmp = path.with_extension("tmp");
    // A leftover of an interrupted attempt at this generation is never trusted.
    let _ = io_.remove(&tmp);
    let written = (|| {
        let mut f = io_.create_new(&tmp).map_err(io(&tmp))?;
        let mut buf = Header { generation, prev_committed: 0 }.encode(SNAPSHOT_MAGIC);
        f.write_all_at(&buf, 0).map_err(io(&tmp))?;
        let mut offset = buf.len() as u64;
        buf.clear();
        crash_point("snapshot-mid-write");
        let mut n = 0u64;
        for rec in records {
            rec.encode(&mut buf);
            n += 1;
            if buf.len() >= CHUNK {
                f.write_all_at(&buf, offset).map_err(io(&tmp))?;
                offset += buf.len() as u64;
                buf.clear();
            }
        }
        Record::End { records: n }.encode(&mut buf);
        f.write_all_at(&buf, offset).map_err(io(&tmp))?;
        f.sync_all().map_err(io(&tmp))?;
        crash_point("snapshot-before-rename");
        io_.rename_new(&tmp, &path).map_err(io(&path))
    })();
    if let Err(e) = written {
        let _ = io_.remove(&tmp);
        return Err(e);
    }
    crash_point("snapshot-after-rename");
    io_.sync_dir(dir).map_err(io(dir))?;
    retire(io_, dir, generation)?;
    Ok(path)
}

/// Deletes snapshots and journals older than the snapshot before `generation`.
fn retire(io_: &dyn Io, dir: &Path, generation: u64) -> Result<(), StoreError> {
    let (journals, snapshots, _) = list(dir)?;
    let Some(&(previous, _)) = snapshots.iter().rev().find(|(g, _)| *g < generation) else { return Ok(()) };
    for (g, p) in journals.into_iter().chain(snapshots) {
        if g < previous
            && let Err(e) = io_.remove(&p)
        {
            tracing::warn!(path = %p.display(), error = %e, "cannot delete an obsolete file");
        }
    }
    Ok(())
}
