//! Opening a table: one environment per path per process, the checks of
//! what is on disk, and the databases of a new table.

use super::*;

/// Open environments by canonical path; entries die with their last table.
static OPEN: Mutex<Option<HashMap<PathBuf, Weak<Shared>>>> = Mutex::new(None);

impl VersionTable {
    /// Opens (creating if needed) the table in directory `path`. Opening a
    /// path already open in this process shares that environment; its
    /// `durable` setting must then match.
    pub fn open(path: &Path, options: Options) -> Result<Self> {
        let mut open = OPEN.lock();
        let open = open.get_or_insert_with(HashMap::new);
        if let Ok(canonical) = path.canonicalize()
            && let Some(shared) = open.get(&canonical).and_then(Weak::upgrade)
        {
            // One environment per path per process (LMDB's rule), so its
            // settings cannot differ between handles; say so rather than
            // silently keep the first handle's.
            let differs = [
                ("durable", shared.durable.to_string(), options.durable.to_string()),
                ("map_size", shared.map_size.to_string(), options.map_size.to_string()),
                ("cache_keys", shared.cache_keys.to_string(), options.cache_keys.to_string()),
                (
                    "journal_entries",
                    shared.journal_entries.to_string(),
                    options.journal_entries.max(1).to_string(),
                ),
            ];
            if let Some((name, open_with, asked)) = differs.into_iter().find(|(_, a, b)| a != b) {
                return Err(Error::Store(format!(
                    "{} is already open in this process with {name}={open_with} (asked for \
                     {asked}); open it with the same settings, or close every VersionTable on \
                     it first",
                    path.display()
                )));
            }
            return Ok(VersionTable { shared });
        }
        let shared = Arc::new(Self::open_new(path, options)?);
        let canonical = path.canonicalize().map_err(|e| Error::Store(format!("{}: {e}", path.display())))?;
        open.retain(|_, w| w.strong_count() > 0);
        open.insert(canonical, Arc::downgrade(&shared));
        Ok(VersionTable { shared })
    }

    fn open_new(path: &Path, options: Options) -> Result<Shared> {
        if path.exists() && !path.is_dir() {
            return Err(Error::StoreFormat(format!(
                "{} is a file; a keylane version table is a directory (LMDB environment)",
                path.display()
            )));
        }
        if !options.create && !path.join("data.mdb").is_file() {
            return Err(Error::StoreFormat(format!("no keylane version table at {}", path.display())));
        }
        std::fs::create_dir_all(path)
            .map_err(|e| Error::Store(format!("cannot create {}: {e}", path.display())))?;
        let data = path.join("data.mdb");
        // An existing table keeps the map it was given: opened with a
        // smaller one (the default, say), LMDB would shrink it, and writes
        // that fitted before would fail as full.
        let stored = if data.exists() { data_file::check(&data)? } else { 0 };
        let map_size = options.map_size.max(usize::try_from(stored).unwrap_or(usize::MAX));
        let mut builder = EnvOpenOptions::new().read_txn_without_tls();
        builder.map_size(map_size).max_dbs(8);
        if !options.durable {
            // SAFETY: MDB_NOSYNC only drops the flush at commit; LMDB stays
            // consistent (see docs/design.md for the exact guarantee).
            #[allow(unsafe_code)]
            unsafe {
                builder.flags(EnvFlags::NO_SYNC);
            }
        }
        // SAFETY: heed's precondition is that the files are not modified
        // behind LMDB's back; keylane only touches them through LMDB, and
        // heed itself handles a second open of one path in this process.
        #[allow(unsafe_code)]
        let env = unsafe { builder.open(path) }.map_err(|e| open_error(path, e))?;
        let dbs = Self::prepare(&env, path, options.create)?;
        Ok(Shared {
            env,
            dbs,
            durable: options.durable,
            journal_entries: options.journal_entries.max(1),
            map_size: options.map_size,
            cache_keys: options.cache_keys,
            wrote: AtomicBool::new(false),
            index: Mutex::new(Index::new(options.cache_keys)),
        })
    }

    /// Creates the databases of a new table, or checks an existing one.
    fn prepare(env: &Env<WithoutTls>, path: &Path, create: bool) -> Result<Dbs> {
        let fail = |e: heed::Error| Error::Store(format!("cannot open {}: {e}", path.display()));
        let mut wtxn = env.write_txn().map_err(fail)?;
        let meta: Option<Database<Str, Bytes>> = env.open_database(&wtxn, Some("meta")).map_err(fail)?;
        let mut upgrade = None;
        match meta.map(|m| m.get(&wtxn, "keylane")).transpose().map_err(fail)?.flatten() {
            Some(raw) => {
                let meta: Meta = rmp_serde::from_slice(raw).map_err(|e| {
                    Error::StoreFormat(format!("{} has unreadable keylane metadata: {e}", path.display()))
                })?;
                if meta.format == FORMAT_NO_JOURNAL {
                    upgrade = Some(meta.created_by);
                } else if meta.format != FORMAT {
                    return Err(Error::StoreFormat(format!(
                        "{} is a keylane table in format {} (written by {}); this keylane reads format {FORMAT}",
                        path.display(),
                        meta.format,
                        meta.created_by
                    )));
                }
            }
            None if !create => {
                return Err(Error::StoreFormat(format!("no keylane version table at {}", path.display())));
            }
            None => {
                // A new table is an empty environment: anything else is
                // someone else's data, which we must not write into.
                let main: Option<Database<Bytes, Bytes>> = env.open_database(&wtxn, None).map_err(fail)?;
                if let Some(main) = main
                    && !main.is_empty(&wtxn).map_err(fail)?
                {
                    return Err(Error::StoreFormat(format!(
                        "{} holds an LMDB environment that is not a keylane table; refusing to write into it",
                        path.display()
                    )));
                }
                upgrade = Some(format!("keylane {}", env!("CARGO_PKG_VERSION")));
            }
        }
        let dbs = Dbs {
            meta: env.create_database(&mut wtxn, Some("meta")).map_err(fail)?,
            journal: env.create_database(&mut wtxn, Some("journal")).map_err(fail)?,
            versions: env.create_database(&mut wtxn, Some("versions")).map_err(fail)?,
            values: env.create_database(&mut wtxn, Some("values")).map_err(fail)?,
            seen: env.create_database(&mut wtxn, Some("seen")).map_err(fail)?,
            expiry: env.create_database(&mut wtxn, Some("expiry")).map_err(fail)?,
        };
        if let Some(created_by) = upgrade {
            // A new table, or a format 1 one: its versions are all in the
            // B-tree and its journal is empty.
            let count = dbs.versions.len(&wtxn).map_err(fail)?;
            let raw = rmp_serde::to_vec_named(&Meta { format: FORMAT, created_by })
                .map_err(|e| Error::Store(e.to_string()))?;
            dbs.meta.put(&mut wtxn, "keylane", &raw).map_err(fail)?;
            dbs.meta.put(&mut wtxn, FOLDED, &FIRST_RECORD.to_be_bytes()).map_err(fail)?;
            dbs.meta.put(&mut wtxn, COUNT, &count.to_be_bytes()).map_err(fail)?;
        }
        wtxn.commit().map_err(fail)?;
        Ok(dbs)
    }
}

fn open_error(path: &Path, e: heed::Error) -> Error {
    let p = path.display();
    match e {
        heed::Error::Mdb(MdbError::Invalid) => Error::StoreFormat(format!(
            "{p} is not an LMDB environment (its data.mdb is not LMDB, or is damaged)"
        )),
        heed::Error::Mdb(MdbError::VersionMismatch) => Error::StoreFormat(format!(
            "{p} is locked by an incompatible LMDB (py-lmdb's lock format differs from keylane's): \
             close the other program, then open it again"
        )),
        heed::Error::EnvAlreadyOpened => Error::Store(format!(
            "{p} is already open in this process with other options (map_size/durable); \
             reuse that VersionTable or close it first"
        )),
        e => Error::Store(format!("cannot open version table {p}: {e}")),
    }
}
