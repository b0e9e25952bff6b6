//! Pre-copy by content: CRIU's page images, what changed between two dumps,
//! and the rebuild of complete page images from what the destination holds
//! plus a delta. Pure logic on bytes (no CRIU, no network), unit-tested.
//!
//! CRIU's memory images come in pairs (docs/migration-protocol.md, "Pre-copy"):
//!
//! * `pagemap-<id>.img` (one per process, `pagemap-shmem-<ino>.img` per shared
//!   mapping): the magics `IMG_COMMON_MAGIC`, `PAGEMAP_MAGIC` (little-endian
//!   u32 each), then records of a little-endian u32 length and a protobuf
//!   message: first `pagemap_head { pages_id = 1 }`, then one
//!   `pagemap_entry { vaddr = 1, compat_nr_pages = 2, in_parent = 3,
//!   flags = 4, nr_pages = 5 }` per run of pages;
//! * `pages-<pages_id>.img`: raw page contents, no header, the pages of the
//!   entries flagged `PE_PRESENT`, in pagemap order.
//!
//! The source keeps a digest per page of what the destination holds, keyed
//! by pagemap file name and virtual address ([`Held`]). A later dump's pages
//! whose digest differs, or whose address the destination does not hold (a
//! mapping that appeared or moved), go into a delta; the destination builds
//! the new `pages-<id>.img` from the new pagemap, the delta, and its previous
//! images ([`rebuild`]). A combined digest of every page of the new image
//! ([`Combined`]) checks the rebuild end to end.

use std::collections::HashMap;
use std::io::{Read, Write};

pub const PAGE: usize = 4096;
const IMG_COMMON_MAGIC: u32 = 0x5456_4319;
const PAGEMAP_MAGIC: u32 = 0x5608_4025;
const PE_PARENT: u64 = 1 << 0;
const PE_PRESENT: u64 = 1 << 2;
/// The first bytes of a delta file.
pub const DELTA_MAGIC: &[u8; 8] = b"UMSPGD01";
/// Most bytes copied at once by a rebuild.
const COPY_MAX: usize = 1 << 20;

#[derive(Debug, thiserror::Error)]
pub enum DeltaError {
    #[error("pagemap: {0}")]
    Pagemap(String),
    #[error("delta: {0}")]
    Delta(String),
    #[error("page at {vaddr:#x} is neither in the delta nor held from the previous round")]
    NotHeld { vaddr: u64 },
    #[error("pages image shorter than its pagemap ({got} of {want} bytes)")]
    Short { got: u64, want: u64 },
    #[error(transparent)]
    Io(#[from] std::io::Error),
}

/// A run of pages of a pagemap.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Run {
    pub vaddr: u64,
    pub nr_pages: u64,
    /// Its contents are in the pages image (`PE_PRESENT`).
    pub present: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pagemap {
    pub pages_id: u32,
    pub runs: Vec<Run>,
}

impl Pagemap {
    /// The name of the pages image this pagemap describes.
    pub fn pages_file(&self) -> String {
        format!("pages-{}.img", self.pages_id)
    }

    /// Pages with contents in the pages image.
    pub fn present_pages(&self) -> u64 {
        self.runs.iter().filter(|r| r.present).map(|r| r.nr_pages).sum()
    }

    /// The address of every page of the pages image, in file order.
    pub fn present_vaddrs(&self) -> impl Iterator<Item = u64> + '_ {
        self.runs.iter().filter(|r| r.present).flat_map(|r| (0..r.nr_pages).map(move |i| r.vaddr + i * PAGE as u64))
    }
}

/// Is this file name a CRIU pagemap image?
pub fn is_pagemap(name: &str) -> bool {
    name.starts_with("pagemap-") && name.ends_with(".img")
}

fn varint(b: &[u8], at: &mut usize) -> Result<u64, DeltaError> {
    let mut v = 0u64;
    for shift in (0..64).step_by(7) {
        let byte = *b.get(*at).ok_or_else(|| DeltaError::Pagemap("truncated varint".into()))?;
        *at += 1;
        v |= u64::from(byte & 0x7f) << shift;
        if byte & 0x80 == 0 {
            return Ok(v);
        }
    }
    Err(DeltaError::Pagemap("varint longer than 64 bits".into()))
}

/// The fields of one protobuf message as (number, value); only varint
/// fields carry values, the others are skipped.
fn fields(msg: &[u8]) -> Result<Vec<(u64, u64)>, DeltaError> {
    let mut out = Vec::new();
    let mut at = 0;
    while at < msg.len() {
        let key = varint(msg, &mut at)?;
        let skip = match key & 7 {
            0 => {
                out.push((key >> 3, varint(msg, &mut at)?));
                0
            }
            1 => 8,
            2 => varint(msg, &mut at)? as usize,
            5 => 4,
            t => return Err(DeltaError::Pagemap(format!("protobuf wire type {t}"))),
        };
        at = at
            .checked_add(skip)
            .filter(|&a| a <= msg.len())
            .ok_or_else(|| DeltaError::Pagemap("truncated field".into()))?;
    }
    Ok(out)
}

fn u32_le(b: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_le_bytes(b.get(at..at + 4)?.try_into().ok()?))
}

/// Parse a pagemap image. Entries whose pages are in a parent image
/// (pre-dump chains, not used here) are refused.
pub fn parse_pagemap(b: &[u8]) -> Result<Pagemap, DeltaError> {
    if u32_le(b, 0) != Some(IMG_COMMON_MAGIC) || u32_le(b, 4) != Some(PAGEMAP_MAGIC) {
        return Err(DeltaError::Pagemap("not a pagemap image (magic)".into()));
    }
    let mut at = 8;
    let mut head = None;
    let mut runs = Vec::new();
    while at < b.len() {
        let len = u32_le(b, at).ok_or_else(|| DeltaError::Pagemap("truncated record length".into()))? as usize;
        let msg = b.get(at + 4..at + 4 + len).ok_or_else(|| DeltaError::Pagemap("truncated record".into()))?;
        at += 4 + len;
        let f = fields(msg)?;
        let get = |n: u64| f.iter().rev().find(|(k, _)| *k == n).map(|(_, v)| *v);
        if head.is_none() {
            head = Some(get(1).ok_or_else(|| DeltaError::Pagemap("head without pages_id".into()))? as u32);
            continue;
        }
        let vaddr = get(1).ok_or_else(|| DeltaError::Pagemap("entry without vaddr".into()))?;
        let nr_pages = get(5).or(get(2)).ok_or_else(|| DeltaError::Pagemap("entry without nr_pages".into()))?;
        let in_parent = get(3).unwrap_or(0) != 0;
        let present = match get(4) {
            Some(flags) => {
                if flags & PE_PARENT != 0 || in_parent {
                    return Err(DeltaError::Pagemap(format!("entry at {vaddr:#x} is in a parent image")));
                }
                flags & PE_PRESENT != 0
            }
            None if in_parent => return Err(DeltaError::Pagemap(format!("entry at {vaddr:#x} is in a parent image"))),
            None => true,
        };
        if vaddr % PAGE as u64 != 0 {
            return Err(DeltaError::Pagemap(format!("entry at {vaddr:#x} is not page aligned")));
        }
        runs.push(Run { vaddr, nr_pages, present });
    }
    let pages_id = head.ok_or_else(|| DeltaError::Pagemap("no head".into()))?;
    Ok(Pagemap { pages_id, runs })
}

/// The digest of one page.
pub fn page_digest(page: &[u8]) -> u128 {
    xxhash_rust::xxh3::xxh3_128(page)
}

/// Digest of a whole pages image: of the page digests, in file order.
#[derive(Default)]
pub struct Combined(xxhash_rust::xxh3::Xxh3);

impl Combined {
    pub fn new() -> Self {
        Combined(xxhash_rust::xxh3::Xxh3::new())
    }
    pub fn page(&mut self, d: u128) {
        self.0.update(&d.to_le_bytes());
    }
    pub fn hex(&self) -> String {
        format!("{:032x}", self.0.digest128())
    }
}

/// What the destination holds of one pagemap: the digest of each page, by address.
pub type Held = HashMap<u64, u128>;

/// What a pass over a pages image found.
#[derive(Debug, Default, Clone)]
pub struct Scan {
    /// Pages in the image.
    pub pages: u64,
    /// Pages the destination does not hold with this content (all, without
    /// a previous round).
    pub changed: u64,
    /// Bytes written to the delta.
    pub delta_bytes: u64,
    /// [`Combined`] of the image.
    pub digest: String,
}

/// Read every page of `pages` (the image of `pm`) and write the delta against
/// `held` to `out`: the magic, then records of the little-endian u64 address
/// and u64 page count of a run of changed pages, followed by their bytes.
/// Returns what it found and the digests of the new image (what the
/// destination holds once it has rebuilt it). With `out` `None` nothing is
/// written (the image goes whole).
pub fn scan(
    pm: &Pagemap,
    pages: &mut impl Read,
    held: Option<&Held>,
    mut out: Option<&mut dyn Write>,
) -> Result<(Scan, Held), DeltaError> {
    let want = pm.present_pages();
    let mut s = Scan { pages: want, ..Scan::default() };
    let mut now = Held::with_capacity(want as usize);
    let mut all = Combined::new();
    // A run of changed pages waiting to be written: its start and its bytes.
    let mut pending: Option<(u64, Vec<u8>)> = None;
    if let Some(o) = out.as_deref_mut() {
        o.write_all(DELTA_MAGIC)?;
        s.delta_bytes += DELTA_MAGIC.len() as u64;
    }
    let flush = |p: &mut Option<(u64, Vec<u8>)>, o: &mut Option<&mut dyn Write>, s: &mut Scan| -> std::io::Result<()> {
        if let (Some((va, bytes)), Some(o)) = (p.take(), o.as_deref_mut()) {
            o.write_all(&va.to_le_bytes())?;
            o.write_all(&((bytes.len() / PAGE) as u64).to_le_bytes())?;
            o.write_all(&bytes)?;
            s.delta_bytes += 16 + bytes.len() as u64;
        }
        Ok(())
    };
    let mut page = vec![0u8; PAGE];
    for (got, va) in pm.present_vaddrs().enumerate() {
        if let Err(e) = pages.read_exact(&mut page) {
            return Err(match e.kind() {
                std::io::ErrorKind::UnexpectedEof => {
                    DeltaError::Short { got: (got * PAGE) as u64, want: want * PAGE as u64 }
                }
                _ => e.into(),
            });
        }
        let d = page_digest(&page);
        all.page(d);
        now.insert(va, d);
        let same = held.and_then(|h| h.get(&va)) == Some(&d);
        if same {
            flush(&mut pending, &mut out, &mut s)?;
            continue;
        }
        s.changed += 1;
        if out.is_none() {
            continue;
        }
        match &mut pending {
            Some((start, bytes)) if *start + bytes.len() as u64 == va && bytes.len() < COPY_MAX => {
                bytes.extend_from_slice(&page)
            }
            _ => {
                flush(&mut pending, &mut out, &mut s)?;
                pending = Some((va, page.clone()));
            }
        }
    }
    flush(&mut pending, &mut out, &mut s)?;
    s.digest = all.hex();
    Ok((s, now))
}

/// Random access to bytes (a file, or a slice in tests).
#[allow(clippy::len_without_is_empty)]
pub trait ReadAt {
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<()>;
    fn len(&self) -> std::io::Result<u64>;
}

impl ReadAt for std::fs::File {
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
        std::os::unix::fs::FileExt::read_exact_at(self, buf, offset)
    }
    fn len(&self) -> std::io::Result<u64> {
        Ok(self.metadata()?.len())
    }
}

impl ReadAt for [u8] {
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
        let start = usize::try_from(offset).map_err(|_| std::io::ErrorKind::UnexpectedEof)?;
        let src = self.get(start..start + buf.len()).ok_or(std::io::ErrorKind::UnexpectedEof)?;
        buf.copy_from_slice(src);
        Ok(())
    }
    fn len(&self) -> std::io::Result<u64> {
        Ok(<[u8]>::len(self) as u64)
    }
}

impl ReadAt for Vec<u8> {
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
        self.as_slice().read_exact_at(buf, offset)
    }
    fn len(&self) -> std::io::Result<u64> {
        Ok(self.as_slice().len() as u64)
    }
}

/// Where each page of a delta is: address to offset in the delta file.
pub fn delta_index(delta: &(impl ReadAt + ?Sized)) -> Result<HashMap<u64, u64>, DeltaError> {
    let len = delta.len()?;
    let mut magic = [0u8; 8];
    delta.read_exact_at(&mut magic, 0).map_err(|_| DeltaError::Delta("shorter than its magic".into()))?;
    if &magic != DELTA_MAGIC {
        return Err(DeltaError::Delta("bad magic".into()));
    }
    let mut idx = HashMap::new();
    let mut at = 8u64;
    while at < len {
        let mut h = [0u8; 16];
        delta.read_exact_at(&mut h, at).map_err(|_| DeltaError::Delta(format!("truncated record at {at}")))?;
        let va = u64::from_le_bytes(h[..8].try_into().expect("8 bytes"));
        let n = u64::from_le_bytes(h[8..].try_into().expect("8 bytes"));
        let data = at + 16;
        let end = n.checked_mul(PAGE as u64).and_then(|b| b.checked_add(data)).filter(|&e| e <= len);
        let end = end.ok_or_else(|| DeltaError::Delta(format!("record at {at} runs past the end")))?;
        if va % PAGE as u64 != 0 || n == 0 {
            return Err(DeltaError::Delta(format!("bad record at {at}: {va:#x} x {n}")));
        }
        for i in 0..n {
            if idx.insert(va + i * PAGE as u64, data + i * PAGE as u64).is_some() {
                return Err(DeltaError::Delta(format!("page {:#x} twice", va + i * PAGE as u64)));
            }
        }
        at = end;
    }
    Ok(idx)
}

/// Where each page of a pages image is: address to offset.
pub fn image_index(pm: &Pagemap) -> HashMap<u64, u64> {
    pm.present_vaddrs().enumerate().map(|(i, va)| (va, (i * PAGE) as u64)).collect()
}

/// One copy of a rebuild: `len` bytes at `offset` of the delta or of the old image.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Copy {
    pub from_delta: bool,
    pub offset: u64,
    pub len: u64,
}

/// The copies that make the new pages image of `pm`, in order: each page
/// from the delta when it is there, else from the old image; neighbours
/// merged into one copy.
pub fn plan(pm: &Pagemap, delta: &HashMap<u64, u64>, old: &HashMap<u64, u64>) -> Result<Vec<Copy>, DeltaError> {
    let mut out: Vec<Copy> = Vec::new();
    for va in pm.present_vaddrs() {
        let (from_delta, offset) = match (delta.get(&va), old.get(&va)) {
            (Some(o), _) => (true, *o),
            (None, Some(o)) => (false, *o),
            (None, None) => return Err(DeltaError::NotHeld { vaddr: va }),
        };
        match out.last_mut() {
            Some(c) if c.from_delta == from_delta && c.offset + c.len == offset && c.len < COPY_MAX as u64 => {
                c.len += PAGE as u64
            }
            _ => out.push(Copy { from_delta, offset, len: PAGE as u64 }),
        }
    }
    Ok(out)
}

/// The digest of every page of a pages image, in file order.
pub fn page_digests(pm: &Pagemap, pages: &mut impl Read) -> Result<Vec<u128>, DeltaError> {
    let mut out = Vec::with_capacity(pm.present_pages() as usize);
    let mut page = vec![0u8; PAGE];
    for _ in 0..pm.present_pages() {
        pages.read_exact(&mut page).map_err(|_| DeltaError::Short {
            got: (out.len() * PAGE) as u64,
            want: pm.present_pages() * PAGE as u64,
        })?;
        out.push(page_digest(&page));
    }
    Ok(out)
}

/// [`Combined`] of page digests.
pub fn combined(digests: &[u128]) -> String {
    let mut c = Combined::new();
    for d in digests {
        c.page(*d);
    }
    c.hex()
}

/// Does the plan take every old page from where it already is in the new
/// image (the mappings did not move, none appeared before it)? Then the old
/// image can become the new one by writing only the delta's pages.
pub fn in_place(copies: &[Copy]) -> bool {
    let mut at = 0;
    for c in copies {
        if !c.from_delta && c.offset != at {
            return false;
        }
        at += c.len;
    }
    true
}

/// Turn `file`, the old pages image, into the new one of `pm` by writing
/// the delta's pages where the plan says (it must be [`in_place`]); the
/// digests of the old pages are `old_digests` (by old page index). Returns
/// the digests of the new image's pages.
pub fn rebuild_in_place(
    copies: &[Copy],
    delta: &(impl ReadAt + ?Sized),
    old_digests: &[u128],
    file: &std::fs::File,
) -> Result<Vec<u128>, DeltaError> {
    let mut buf = vec![0u8; COPY_MAX];
    let mut digests = Vec::new();
    let mut at = 0u64;
    for c in copies {
        if c.from_delta {
            let b = &mut buf[..c.len as usize];
            delta.read_exact_at(b, c.offset)?;
            digests.extend(b.chunks(PAGE).map(page_digest));
            std::os::unix::fs::FileExt::write_all_at(file, b, at)?;
        } else {
            let first = (c.offset / PAGE as u64) as usize;
            let n = (c.len / PAGE as u64) as usize;
            let d = old_digests
                .get(first..first + n)
                .ok_or(DeltaError::Short { got: (old_digests.len() * PAGE) as u64, want: c.offset + c.len })?;
            digests.extend_from_slice(d);
        }
        at += c.len;
    }
    file.set_len(at)?;
    Ok(digests)
}

/// Write the new pages image of `pm` to `out` from the delta and the old
/// image; returns the digests of its pages, whose [`combined`] digest is
/// compared with the source's.
pub fn rebuild(
    pm: &Pagemap,
    delta: &(impl ReadAt + ?Sized),
    old: Option<(&Pagemap, &dyn ReadAt)>,
    out: &mut impl Write,
) -> Result<Vec<u128>, DeltaError> {
    let didx = delta_index(delta)?;
    let oidx = old.map(|(p, _)| image_index(p)).unwrap_or_default();
    let copies = plan(pm, &didx, &oidx)?;
    let mut buf = vec![0u8; COPY_MAX];
    let mut all = Vec::with_capacity(pm.present_pages() as usize);
    for c in copies {
        let b = &mut buf[..c.len as usize];
        match (c.from_delta, old) {
            (true, _) => delta.read_exact_at(b, c.offset)?,
            (false, Some((_, o))) => o
                .read_exact_at(b, c.offset)
                .map_err(|_| DeltaError::Short { got: o.len().unwrap_or(0), want: c.offset + c.len })?,
            (false, None) => unreachable!("the plan takes old pages only from an old image"),
        }
        all.extend(b.chunks(PAGE).map(page_digest));
        out.write_all(b)?;
    }
    Ok(all)
}

/// DumpStatsEntry.frozen_time (µs) of CRIU's `stats-dump`: how long the
/// tasks were frozen by the dump. `None` if the file says nothing of it.
pub fn frozen_time_us(stats: &[u8]) -> Option<u64> {
    // IMG_SERVICE_MAGIC, STATS_MAGIC, then one record: stats_entry { dump = 1 }.
    let len = u32_le(stats, 8)? as usize;
    let msg = stats.get(12..12 + len)?;
    let mut at = 0;
    while at < msg.len() {
        let key = varint(msg, &mut at).ok()?;
        match key & 7 {
            0 => {
                varint(msg, &mut at).ok()?;
            }
            2 => {
                let l = varint(msg, &mut at).ok()? as usize;
                let inner = msg.get(at..at + l)?;
                at += l;
                if key >> 3 == 1 {
                    return fields(inner).ok()?.into_iter().find(|(k, _)| *k == 2).map(|(_, v)| v);
                }
            }
            1 => at += 8,
            5 => at += 4,
            _ => return None,
        }
    }
    None
}

#[cfg(test)]
pub mod tests {
    use super::*;

    fn put_varint(out: &mut Vec<u8>, mut v: u64) {
        while v >= 0x80 {
            out.push((v as u8) | 0x80);
            v >>= 7;
        }
        out.push(v as u8);
    }

    fn record(out: &mut Vec<u8>, fields: &[(u64, u64)]) {
        let mut m = Vec::new();
        for (k, v) in fields {
            put_varint(&mut m, k << 3);
            put_varint(&mut m, *v);
        }
        out.extend((m.len() as u32).to_le_bytes());
        out.extend(m);
    }

    /// A pagemap image as CRIU 4.2 writes it (both page counts).
    pub fn encode(pm: &Pagemap) -> Vec<u8> {
        let mut b = Vec::new();
        b.extend(IMG_COMMON_MAGIC.to_le_bytes());
        b.extend(PAGEMAP_MAGIC.to_le_bytes());
        record(&mut b, &[(1, pm.pages_id as u64)]);
        for r in &pm.runs {
            let flags = if r.present { PE_PRESENT } else { 2 };
            record(&mut b, &[(1, r.vaddr), (2, r.nr_pages), (4, flags), (5, r.nr_pages)]);
        }
        b
    }

    /// Memory as a map from address to page contents.
    type Mem = std::collections::BTreeMap<u64, Vec<u8>>;

    fn dump(mem: &Mem, id: u32) -> (Pagemap, Vec<u8>) {
        let mut runs: Vec<Run> = Vec::new();
        let mut pages = Vec::new();
        for (va, p) in mem {
            match runs.last_mut() {
                Some(r) if r.vaddr + r.nr_pages * PAGE as u64 == *va => r.nr_pages += 1,
                _ => runs.push(Run { vaddr: *va, nr_pages: 1, present: true }),
            }
            pages.extend_from_slice(p);
        }
        (Pagemap { pages_id: id, runs }, pages)
    }

    fn page(seed: u64) -> Vec<u8> {
        let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
        (0..PAGE / 8)
            .flat_map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x.to_le_bytes()
            })
            .collect()
    }

    #[test]
    fn pagemaps_round_trip_and_odd_ones_are_refused() {
        let pm = Pagemap {
            pages_id: 7,
            runs: vec![
                Run { vaddr: 0x40_0000, nr_pages: 3, present: true },
                Run { vaddr: 0x7f00_0000_0000, nr_pages: 1 << 20, present: false },
                Run { vaddr: 0x7f00_1000_0000, nr_pages: 2, present: true },
            ],
        };
        let got = parse_pagemap(&encode(&pm)).unwrap();
        assert_eq!(got, pm);
        assert_eq!(got.present_pages(), 5);
        assert_eq!(got.pages_file(), "pages-7.img");
        let v: Vec<u64> = got.present_vaddrs().collect();
        assert_eq!(v, [0x40_0000, 0x40_1000, 0x40_2000, 0x7f00_1000_0000, 0x7f00_1000_1000]);
        // Older CRIU: only the 32-bit count.
        let mut b = Vec::new();
        b.extend(IMG_COMMON_MAGIC.to_le_bytes());
        b.extend(PAGEMAP_MAGIC.to_le_bytes());
        record(&mut b, &[(1, 1)]);
        record(&mut b, &[(1, 0x1000), (2, 4), (4, PE_PRESENT)]);
        assert_eq!(parse_pagemap(&b).unwrap().runs, [Run { vaddr: 0x1000, nr_pages: 4, present: true }]);
        // A parent image (a pre-dump chain) is not ours.
        let mut p = b[..8].to_vec();
        record(&mut p, &[(1, 1)]);
        record(&mut p, &[(1, 0x1000), (2, 1), (4, PE_PARENT | PE_PRESENT)]);
        assert!(parse_pagemap(&p).is_err());
        assert!(parse_pagemap(b"garbage!").is_err());
        assert!(parse_pagemap(&b[..b.len() - 1]).is_err());
        assert!(is_pagemap("pagemap-1.img") && is_pagemap("pagemap-shmem-93.img") && !is_pagemap("pages-1.img"));
    }

    /// Two dumps of changing memory: the delta holds exactly the changed and
    /// new pages, and the rebuild from the old image plus the delta is the
    /// new image, byte for byte, with the source's digest.
    #[test]
    fn a_delta_rebuilds_the_new_image() {
        let mut mem: Mem = (0..64u64).map(|i| (0x10_0000 + i * PAGE as u64, page(i))).collect();
        mem.extend((0..8u64).map(|i| (0x90_0000 + i * PAGE as u64, page(100 + i))));
        let (pm1, img1) = dump(&mem, 1);
        let (s1, held) = scan(&pm1, &mut &img1[..], None, None).unwrap();
        assert_eq!((s1.pages, s1.changed), (72, 72));
        // Round 2: two pages rewritten, one mapping gone, one appeared, one page moved.
        mem.insert(0x10_0000 + 5 * PAGE as u64, page(1005));
        mem.insert(0x10_0000 + 6 * PAGE as u64, page(1006));
        for i in 0..8u64 {
            mem.remove(&(0x90_0000 + i * PAGE as u64));
        }
        mem.extend((0..3u64).map(|i| (0xa0_0000 + i * PAGE as u64, page(200 + i))));
        let moved = mem.remove(&(0x10_0000 + 63 * PAGE as u64)).unwrap();
        mem.insert(0xb0_0000, moved);
        let (pm2, img2) = dump(&mem, 4);
        let mut delta = Vec::new();
        let (s2, held2) = scan(&pm2, &mut &img2[..], Some(&held), Some(&mut delta)).unwrap();
        assert_eq!(s2.pages, 63 + 3 + 1);
        assert_eq!(s2.changed, 2 + 3 + 1, "rewritten, appeared, moved");
        assert_eq!(s2.delta_bytes, delta.len() as u64);
        assert!(delta.len() < 7 * PAGE + 8 + 4 * 16, "{}", delta.len());
        let mut out = Vec::new();
        let digests = rebuild(&pm2, &delta[..], Some((&pm1, &img1 as &dyn ReadAt)), &mut out).unwrap();
        assert!(out == img2, "the rebuilt image differs");
        assert_eq!(combined(&digests), s2.digest);
        assert_eq!(digests, page_digests(&pm2, &mut &img2[..]).unwrap());
        // Round 3, nothing changed: an empty delta.
        let mut delta3 = Vec::new();
        let (s3, _) = scan(&pm2, &mut &img2[..], Some(&held2), Some(&mut delta3)).unwrap();
        assert_eq!((s3.changed, delta3.len()), (0, 8));
        let mut out3 = Vec::new();
        rebuild(&pm2, &delta3[..], Some((&pm2, &out as &dyn ReadAt)), &mut out3).unwrap();
        assert!(out3 == img2);
    }

    /// Memory that kept its layout: the old image becomes the new one by
    /// writing the changed pages only; a moved mapping cannot.
    #[test]
    fn an_unmoved_layout_is_rebuilt_in_place() {
        let mut mem: Mem = (0..40u64).map(|i| (0x20_0000 + i * PAGE as u64, page(i))).collect();
        let (pm1, img1) = dump(&mem, 1);
        let (_, held) = scan(&pm1, &mut &img1[..], None, None).unwrap();
        let old_digests = page_digests(&pm1, &mut &img1[..]).unwrap();
        mem.insert(0x20_0000 + 3 * PAGE as u64, page(503));
        mem.insert(0x20_0000 + 39 * PAGE as u64, page(539));
        mem.remove(&(0x20_0000 + 20 * PAGE as u64)).unwrap(); // the tail shifts: a copy
        let (pm2, img2) = dump(&mem, 2);
        let mut delta = Vec::new();
        let (s2, _) = scan(&pm2, &mut &img2[..], Some(&held), Some(&mut delta)).unwrap();
        let copies = plan(&pm2, &delta_index(&delta[..]).unwrap(), &image_index(&pm1)).unwrap();
        assert!(!in_place(&copies), "pages after a hole moved in the image");
        // Only rewritten pages, and the image shrank at its end.
        let mut mem: Mem = (0..40u64).map(|i| (0x20_0000 + i * PAGE as u64, page(i))).collect();
        mem.insert(0x20_0000 + 3 * PAGE as u64, page(503));
        mem.remove(&(0x20_0000 + 39 * PAGE as u64));
        let (pm2, img2) = dump(&mem, 2);
        let mut delta = Vec::new();
        let (s2b, _) = scan(&pm2, &mut &img2[..], Some(&held), Some(&mut delta)).unwrap();
        let copies = plan(&pm2, &delta_index(&delta[..]).unwrap(), &image_index(&pm1)).unwrap();
        assert!(in_place(&copies));
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("pages-1.img");
        std::fs::write(&path, &img1).unwrap();
        let f = std::fs::OpenOptions::new().read(true).write(true).open(&path).unwrap();
        let digests = rebuild_in_place(&copies, &delta[..], &old_digests, &f).unwrap();
        assert!(std::fs::read(&path).unwrap() == img2);
        assert_eq!(combined(&digests), s2b.digest);
        assert_ne!(s2.digest, s2b.digest);
    }

    #[test]
    fn a_page_held_nowhere_or_a_bad_delta_is_an_error() {
        let mem: Mem = (0..4u64).map(|i| (0x1000 * (i + 1), page(i))).collect();
        let (pm, img) = dump(&mem, 1);
        // Without an old image, the delta must hold everything.
        let mut d = Vec::new();
        let held: Held = [(0x1000u64, page_digest(&page(0)))].into();
        scan(&pm, &mut &img[..], Some(&held), Some(&mut d)).unwrap();
        let e = rebuild(&pm, &d[..], None, &mut Vec::new()).unwrap_err();
        assert!(matches!(e, DeltaError::NotHeld { vaddr: 0x1000 }), "{e}");
        // Truncated, or with a record running past the end.
        assert!(rebuild(&pm, &d[..d.len() - 1], None, &mut Vec::new()).is_err());
        assert!(delta_index(&b"UMSPGD0X"[..]).is_err());
        let mut bad = DELTA_MAGIC.to_vec();
        bad.extend(0x1000u64.to_le_bytes());
        bad.extend(u64::MAX.to_le_bytes());
        assert!(delta_index(&bad[..]).is_err());
        // A pages image shorter than its pagemap.
        assert!(matches!(scan(&pm, &mut &img[..PAGE], None, None), Err(DeltaError::Short { .. })));
    }

    #[test]
    fn copies_are_merged() {
        let pm = Pagemap { pages_id: 1, runs: vec![Run { vaddr: 0, nr_pages: 4, present: true }] };
        let delta: HashMap<u64, u64> = [(0x2000, 8), (0x3000, 8 + PAGE as u64)].into();
        let old: HashMap<u64, u64> = (0..4u64).map(|i| (i * PAGE as u64, i * PAGE as u64)).collect();
        let p = plan(&pm, &delta, &old).unwrap();
        assert_eq!(
            p,
            [
                Copy { from_delta: false, offset: 0, len: 2 * PAGE as u64 },
                Copy { from_delta: true, offset: 8, len: 2 * PAGE as u64 }
            ]
        );
    }

    #[test]
    fn frozen_time_from_stats() {
        let mut inner = Vec::new();
        for (k, v) in [(1u64, 300u64), (2, 123_456), (3, 10), (4, 20), (5, 1 << 33)] {
            put_varint(&mut inner, k << 3);
            put_varint(&mut inner, v);
        }
        let mut msg = Vec::new();
        put_varint(&mut msg, (1 << 3) | 2);
        put_varint(&mut msg, inner.len() as u64);
        msg.extend(&inner);
        let mut f = 0x5510_5940u32.to_le_bytes().to_vec();
        f.extend(0x5705_0114u32.to_le_bytes());
        f.extend((msg.len() as u32).to_le_bytes());
        f.extend(&msg);
        assert_eq!(frozen_time_us(&f), Some(123_456));
        assert_eq!(frozen_time_us(&f[..10]), None);
    }
}
