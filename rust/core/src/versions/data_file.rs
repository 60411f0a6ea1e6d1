//! Checks of an LMDB `data.mdb` made before it is mapped.
//!
//! LMDB trusts its file: a page it was told exists but that the file does not
//! hold is a SIGBUS when touched, a damaged meta page sends it to read
//! anywhere. What can be checked without walking the tree is checked here:
//! the file is not empty, both meta pages (pages 0 and 1) carry LMDB's magic
//! and format and name themselves, the database roots lie inside the last
//! page the meta records, and the file is long enough to hold that page.
//! Damage inside the tree (a flipped bit in a branch page) is not visible
//! without reading every page; `keylane inspect --check` does that in a
//! child process, so a crash there is a verdict, not the caller's death.
//!
//! The layout is LMDB 0.9's (`mdb.c`, `MDB_meta` after a 16-byte page
//! header), the format of the `lmdb-master-sys` that heed builds.

use std::fs::File;
use std::io::Read;
use std::path::Path;

use crate::{Error, Result};

const MAGIC: u32 = 0xBEEF_C0DE;
const DATA_VERSION: u32 = 1;
const P_META: u16 = 0x08;
const P_INVALID: u64 = u64::MAX;
/// Offsets inside a meta page.
const PAGE_HEADER: usize = 16;
const MM_MAGIC: usize = PAGE_HEADER;
const MM_VERSION: usize = PAGE_HEADER + 4;
const MM_MAPSIZE: usize = PAGE_HEADER + 16;
const MM_DBS: usize = PAGE_HEADER + 24;
const DB_SIZE: usize = 48;
const DB_ROOT: usize = 40;
const MM_LAST_PG: usize = MM_DBS + 2 * DB_SIZE;
const MM_TXNID: usize = MM_LAST_PG + 8;
const META_LEN: usize = MM_TXNID + 8;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct MetaPage {
    page_size: u64,
    last_page: u64,
    map_size: u64,
}

fn u16_at(b: &[u8], at: usize) -> u16 {
    u16::from_le_bytes([b[at], b[at + 1]])
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().unwrap_or([0; 4]))
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().unwrap_or([0; 8]))
}

/// Meta page `index` read from `page` (at least `META_LEN` bytes), or what
/// is wrong with it.
fn meta(page: &[u8], index: u64) -> std::result::Result<MetaPage, String> {
    if u32_at(page, MM_MAGIC) != MAGIC {
        return Err("no LMDB magic number".into());
    }
    let version = u32_at(page, MM_VERSION);
    if version != DATA_VERSION {
        return Err(format!("LMDB data format {version}, expected {DATA_VERSION}"));
    }
    if u64_at(page, 0) != index || u16_at(page, 10) & P_META == 0 {
        return Err("page header does not describe a meta page".into());
    }
    // The free database's md_pad holds the page size (LMDB's convention).
    let page_size = u64::from(u32_at(page, MM_DBS));
    if !page_size.is_power_of_two() || !(512..=65536).contains(&page_size) {
        return Err(format!("page size {page_size} is not a power of two in 512..=65536"));
    }
    let last_page = u64_at(page, MM_LAST_PG);
    for db in 0..2 {
        let root = u64_at(page, MM_DBS + db * DB_SIZE + DB_ROOT);
        if root != P_INVALID && (root < 2 || root > last_page) {
            return Err(format!("database {db} has root page {root}, outside 2..={last_page}"));
        }
    }
    Ok(MetaPage { page_size, last_page, map_size: u64_at(page, MM_MAPSIZE) })
}

fn damaged(path: &Path, what: impl std::fmt::Display) -> Error {
    Error::StoreFormat(format!(
        "{} is damaged: {what}. LMDB cannot open it safely; restore it from a backup or \
         move it away (a new table starts empty, so versions already applied would be \
         applied again)",
        path.display()
    ))
}

/// Checks `data.mdb` at `path` as far as it can be checked without mapping
/// it; returns the map size the table was last opened with (the larger of
/// the two meta pages').
pub(crate) fn check(path: &Path) -> Result<u64> {
    let mut file = File::open(path).map_err(|e| Error::Store(format!("{}: {e}", path.display())))?;
    let mut head = Vec::with_capacity(2 * 4096);
    (&mut file)
        .take(65536 * 2)
        .read_to_end(&mut head)
        .map_err(|e| Error::Store(format!("{}: {e}", path.display())))?;
    if head.is_empty() {
        return Err(damaged(path, "the file is empty (0 bytes)"));
    }
    if head.len() < META_LEN {
        return Err(damaged(path, format!("the file is {} bytes, shorter than a meta page", head.len())));
    }
    let magic_at = |at: usize| head.len() >= at + 4 && u32_at(&head, at) == MAGIC;
    if !magic_at(MM_MAGIC) && !magic_at(4096 + MM_MAGIC) {
        return Err(Error::StoreFormat(format!(
            "{} is not an LMDB data file (no LMDB magic number in either meta page)",
            path.display()
        )));
    }
    let first = meta(&head, 0).map_err(|e| damaged(path, format!("meta page 0: {e}")))?;
    let size = first.page_size as usize;
    if head.len() < size + META_LEN {
        return Err(damaged(path, format!("the file is {} bytes, shorter than two pages", head.len())));
    }
    let second = meta(&head[size..], 1).map_err(|e| damaged(path, format!("meta page 1: {e}")))?;
    if second.page_size != first.page_size {
        return Err(damaged(path, "the two meta pages disagree on the page size"));
    }
    let last_page = first.last_page.max(second.last_page);
    // Stat after reading the metas: a writer extends the file before it
    // writes the meta that points into the new pages.
    let len = file.metadata().map_err(|e| Error::Store(format!("{}: {e}", path.display())))?.len();
    let needed = last_page.saturating_add(1).saturating_mul(first.page_size);
    if len < needed {
        return Err(damaged(
            path,
            format!(
                "the file is {len} bytes but its meta pages use pages up to {last_page} \
                 ({needed} bytes): it was truncated"
            ),
        ));
    }
    Ok(first.map_size.max(second.map_size))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn page(index: u64, last: u64, txn: u64) -> Vec<u8> {
        let mut p = vec![0u8; 4096];
        p[0..8].copy_from_slice(&index.to_le_bytes());
        p[10..12].copy_from_slice(&P_META.to_le_bytes());
        p[MM_MAGIC..MM_MAGIC + 4].copy_from_slice(&MAGIC.to_le_bytes());
        p[MM_VERSION..MM_VERSION + 4].copy_from_slice(&DATA_VERSION.to_le_bytes());
        p[MM_DBS..MM_DBS + 4].copy_from_slice(&4096u32.to_le_bytes());
        for db in 0..2 {
            let at = MM_DBS + db * DB_SIZE + DB_ROOT;
            p[at..at + 8].copy_from_slice(&P_INVALID.to_le_bytes());
        }
        p[MM_LAST_PG..MM_LAST_PG + 8].copy_from_slice(&last.to_le_bytes());
        p[MM_TXNID..MM_TXNID + 8].copy_from_slice(&txn.to_le_bytes());
        p[MM_MAPSIZE..MM_MAPSIZE + 8].copy_from_slice(&(3u64 << 30).to_le_bytes());
        p
    }

    #[test]
    fn a_valid_meta_page_reads_back() {
        let read = meta(&page(1, 9, 4), 1);
        assert_eq!(read, Ok(MetaPage { page_size: 4096, last_page: 9, map_size: 3 << 30 }));
    }

    #[test]
    fn damaged_meta_pages_are_named() {
        let mut p = page(0, 9, 4);
        p[MM_MAGIC] ^= 1;
        assert!(meta(&p, 0).unwrap_err().contains("magic"));
        assert!(meta(&page(0, 9, 4), 1).unwrap_err().contains("meta page"));
        let mut p = page(0, 9, 4);
        p[MM_DBS + DB_ROOT..MM_DBS + DB_ROOT + 8].copy_from_slice(&20u64.to_le_bytes());
        assert!(meta(&p, 0).unwrap_err().contains("root page 20"));
        let mut p = page(0, 9, 4);
        p[MM_DBS..MM_DBS + 4].copy_from_slice(&3000u32.to_le_bytes());
        assert!(meta(&p, 0).unwrap_err().contains("page size"));
    }
}
