//! A minimal reader of kernel BTF: enough to find the byte offset and size of a
//! struct member by a dotted path such as `sock_common.skc_net.net`, and the
//! values of an enum's names (drop reasons are numbered differently per kernel).
//!
//! Anonymous struct/union members are searched through, as C field access does.
//! Format: Documentation/bpf/btf.rst (header, type section, string section).

use std::collections::HashMap;

const BTF_MAGIC: u16 = 0xeb9f;
const MAX_RESOLVE_DEPTH: usize = 32;
/// Members one lookup may visit; kernel structs, anonymous parts included, have a few hundred.
const MAX_MEMBERS_VISITED: u32 = 100_000;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum BtfError {
    #[error("not BTF data: {reason}")]
    Malformed { reason: String },
    #[error("BTF has no struct named `{name}`")]
    NoSuchStruct { name: String },
    #[error("`{path}`: `{parent}` has no member `{member}`")]
    NoSuchMember {
        path: String,
        parent: String,
        member: String,
    },
    #[error("`{path}`: `{member}` is not a struct or union, cannot descend into it")]
    NotAggregate { path: String, member: String },
    #[error("`{path}` is a bitfield; the probes read whole bytes")]
    Bitfield { path: String },
    #[error("BTF has no enum named `{name}`")]
    NoSuchEnum { name: String },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Int,
    Ptr,
    Array,
    Struct,
    Union,
    Enum,
    Typedef,
    Modifier,
    Enum64,
    Other,
}

#[derive(Debug, Clone, Copy)]
struct Member {
    name_off: u32,
    type_id: u32,
    bit_offset: u32,
    bitfield_size: u32,
}

#[derive(Debug, Clone)]
struct Type {
    kind: Kind,
    name_off: u32,
    /// Size in bytes for Int/Struct/Union/Enum; the referenced type id otherwise.
    size_or_type: u32,
    members: Vec<Member>,
    /// (element type, count) for arrays.
    array: Option<(u32, u32)>,
    /// (name offset, value) for enums.
    enumerators: Vec<(u32, i64)>,
}

/// Where a member lives and how big it is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Field {
    pub offset: u32,
    pub size: u32,
}

pub struct Btf {
    types: Vec<Type>, // index = type id; 0 is void
    strings: Vec<u8>,
    structs_by_name: HashMap<String, u32>,
    enums_by_name: HashMap<String, u32>,
}

fn malformed(reason: impl Into<String>) -> BtfError {
    BtfError::Malformed {
        reason: reason.into(),
    }
}

fn name_at(strings: &[u8], off: u32) -> &str {
    let tail = strings.get(off as usize..).unwrap_or_default();
    let end = tail.iter().position(|&b| b == 0).unwrap_or(tail.len());
    std::str::from_utf8(&tail[..end]).unwrap_or("")
}

struct Cursor<'a> {
    data: &'a [u8],
    pos: usize,
}

impl Cursor<'_> {
    fn u32(&mut self) -> Result<u32, BtfError> {
        let bytes = self
            .data
            .get(self.pos..self.pos + 4)
            .ok_or_else(|| malformed("type section truncated"))?;
        self.pos += 4;
        Ok(u32::from_le_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]))
    }
    fn skip(&mut self, n: usize) -> Result<(), BtfError> {
        if self.pos + n > self.data.len() {
            return Err(malformed("type section truncated"));
        }
        self.pos += n;
        Ok(())
    }
}

impl Btf {
    /// Reads the running kernel's BTF.
    pub fn from_sys_fs() -> std::io::Result<Vec<u8>> {
        std::fs::read("/sys/kernel/btf/vmlinux")
    }

    /// Parses little-endian BTF (the only kind on the kernels Vigil targets).
    pub fn parse(data: &[u8]) -> Result<Btf, BtfError> {
        let header = |at: usize| -> Result<u32, BtfError> {
            data.get(at..at + 4)
                .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                .ok_or_else(|| malformed("header truncated"))
        };
        let magic = data.get(0..2).map(|b| u16::from_le_bytes([b[0], b[1]]));
        if magic != Some(BTF_MAGIC) {
            return Err(malformed("bad magic (big-endian or not BTF)"));
        }
        let hdr_len = header(4)? as usize;
        let (type_off, type_len) = (header(8)? as usize, header(12)? as usize);
        let (str_off, str_len) = (header(16)? as usize, header(20)? as usize);
        let section = |off: usize, len: usize, what: &str| {
            data.get(hdr_len + off..hdr_len + off + len)
                .ok_or_else(|| malformed(format!("{what} section out of bounds")))
        };
        let type_data = section(type_off, type_len, "type")?;
        let strings = section(str_off, str_len, "string")?.to_vec();

        let mut types = vec![Type {
            kind: Kind::Other,
            name_off: 0,
            size_or_type: 0,
            members: vec![],
            array: None,
            enumerators: vec![],
        }];
        let mut c = Cursor {
            data: type_data,
            pos: 0,
        };
        while c.pos < type_data.len() {
            let name_off = c.u32()?;
            let info = c.u32()?;
            let size_or_type = c.u32()?;
            let vlen = (info & 0xffff) as usize;
            let kind_flag = info >> 31 == 1;
            let mut ty = Type {
                kind: Kind::Other,
                name_off,
                size_or_type,
                members: vec![],
                array: None,
                enumerators: vec![],
            };
            match (info >> 24) & 0x1f {
                1 => {
                    ty.kind = Kind::Int;
                    c.skip(4)?;
                }
                2 => ty.kind = Kind::Ptr,
                3 => {
                    ty.kind = Kind::Array;
                    let elem = c.u32()?;
                    let _index = c.u32()?;
                    let n = c.u32()?;
                    ty.array = Some((elem, n));
                }
                k @ (4 | 5) => {
                    ty.kind = if k == 4 { Kind::Struct } else { Kind::Union };
                    for _ in 0..vlen {
                        let name_off = c.u32()?;
                        let type_id = c.u32()?;
                        let off = c.u32()?;
                        let (bit_offset, bitfield_size) = if kind_flag {
                            (off & 0x00ff_ffff, off >> 24)
                        } else {
                            (off, 0)
                        };
                        ty.members.push(Member {
                            name_off,
                            type_id,
                            bit_offset,
                            bitfield_size,
                        });
                    }
                }
                6 => {
                    ty.kind = Kind::Enum;
                    for _ in 0..vlen {
                        let name_off = c.u32()?;
                        // Signedness is in kind_flag; drop reasons and the like are small.
                        let val = c.u32()?;
                        let val = if kind_flag {
                            i64::from(val as i32)
                        } else {
                            i64::from(val)
                        };
                        ty.enumerators.push((name_off, val));
                    }
                }
                7 | 12 | 16 => {} // fwd, func, float
                8 => ty.kind = Kind::Typedef,
                9..=11 | 18 => ty.kind = Kind::Modifier, // volatile, const, restrict, type_tag
                13 => c.skip(8 * vlen)?,                 // func_proto params
                14 | 17 => c.skip(4)?,                   // var, decl_tag
                15 => c.skip(12 * vlen)?,                // datasec
                19 => {
                    ty.kind = Kind::Enum64;
                    for _ in 0..vlen {
                        let name_off = c.u32()?;
                        let lo = u64::from(c.u32()?);
                        let hi = u64::from(c.u32()?);
                        ty.enumerators.push((name_off, (hi << 32 | lo) as i64));
                    }
                }
                other => return Err(malformed(format!("unknown BTF kind {other}"))),
            }
            types.push(ty);
        }

        let mut btf = Btf {
            types,
            strings,
            structs_by_name: HashMap::new(),
            enums_by_name: HashMap::new(),
        };
        for id in 1..btf.types.len() {
            let ty = &btf.types[id];
            if ty.name_off == 0 {
                continue;
            }
            let index = match ty.kind {
                Kind::Struct => &mut btf.structs_by_name,
                Kind::Enum | Kind::Enum64 => &mut btf.enums_by_name,
                _ => continue,
            };
            let name = name_at(&btf.strings, ty.name_off).to_owned();
            // Keep the first definition; vmlinux has one per name.
            index.entry(name).or_insert(id as u32);
        }
        Ok(btf)
    }

    fn name(&self, off: u32) -> &str {
        name_at(&self.strings, off)
    }

    /// The (name, value) pairs of enum `name`, in declaration order.
    pub fn enum_values(&self, name: &str) -> Result<Vec<(String, i64)>, BtfError> {
        let ty = self
            .enums_by_name
            .get(name)
            .and_then(|&id| self.ty(id))
            .ok_or_else(|| BtfError::NoSuchEnum {
                name: name.to_owned(),
            })?;
        Ok(ty
            .enumerators
            .iter()
            .map(|&(off, val)| (self.name(off).to_owned(), val))
            .collect())
    }

    fn ty(&self, id: u32) -> Option<&Type> {
        self.types.get(id as usize)
    }

    /// Follows typedefs and const/volatile to the underlying type id.
    fn strip(&self, mut id: u32) -> u32 {
        for _ in 0..MAX_RESOLVE_DEPTH {
            match self.ty(id) {
                Some(t) if matches!(t.kind, Kind::Typedef | Kind::Modifier) => id = t.size_or_type,
                _ => break,
            }
        }
        id
    }

    fn size_of(&self, id: u32) -> u32 {
        let id = self.strip(id);
        match self.ty(id) {
            Some(t) => match t.kind {
                Kind::Int | Kind::Struct | Kind::Union | Kind::Enum | Kind::Enum64 => {
                    t.size_or_type
                }
                Kind::Ptr => 8,
                Kind::Array => t
                    .array
                    .map_or(0, |(elem, n)| self.size_of(elem).saturating_mul(n)),
                _ => 0,
            },
            None => 0,
        }
    }

    /// Finds `name` in aggregate `id`, looking inside anonymous members.
    /// Returns (bit offset from the start of `id`, member). `budget` bounds the
    /// members visited: malformed BTF can nest a type in itself many times over.
    fn find_member(
        &self,
        id: u32,
        name: &str,
        depth: usize,
        budget: &mut u32,
    ) -> Option<(u32, Member)> {
        if depth > MAX_RESOLVE_DEPTH {
            return None;
        }
        let ty = self.ty(self.strip(id))?;
        for m in &ty.members {
            *budget = budget.checked_sub(1)?;
            if m.name_off != 0 {
                if self.name(m.name_off) == name {
                    return Some((m.bit_offset, *m));
                }
            } else if let Some((inner, found)) =
                self.find_member(m.type_id, name, depth + 1, budget)
            {
                return Some((m.bit_offset.saturating_add(inner), found));
            }
        }
        None
    }

    /// Resolves `struct_name.member[.member...]` to a byte offset and size.
    pub fn field(&self, path: &str) -> Result<Field, BtfError> {
        let mut parts = path.split('.');
        let root = parts.next().unwrap_or_default();
        let mut id = *self
            .structs_by_name
            .get(root)
            .ok_or_else(|| BtfError::NoSuchStruct {
                name: root.to_owned(),
            })?;
        let mut bits = 0u32;
        let mut parent = root.to_owned();
        let mut last: Option<Member> = None;
        for member in parts {
            if let Some(prev) = last {
                let inner = self.strip(prev.type_id);
                if !matches!(
                    self.ty(inner).map(|t| t.kind),
                    Some(Kind::Struct | Kind::Union)
                ) {
                    return Err(BtfError::NotAggregate {
                        path: path.to_owned(),
                        member: parent,
                    });
                }
                id = inner;
            }
            let mut budget = MAX_MEMBERS_VISITED;
            let (off, m) = self
                .find_member(id, member, 0, &mut budget)
                .ok_or_else(|| BtfError::NoSuchMember {
                    path: path.to_owned(),
                    parent: parent.clone(),
                    member: member.to_owned(),
                })?;
            if m.bitfield_size != 0 || off % 8 != 0 {
                return Err(BtfError::Bitfield {
                    path: path.to_owned(),
                });
            }
            bits = bits.saturating_add(off);
            parent = member.to_owned();
            last = Some(m);
        }
        let m = last.ok_or_else(|| BtfError::NoSuchMember {
            path: path.to_owned(),
            parent: root.to_owned(),
            member: String::new(),
        })?;
        Ok(Field {
            offset: bits / 8,
            size: self.size_of(m.type_id),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Builds BTF bytes: `struct inner { u16 a; u16 b; }`,
    /// `struct outer { u32 x; union { u32 y; struct inner in; }; u8 bf:3; }`.
    /// Offset of `name` in a string section (0, the empty name, when absent).
    fn str_off(strings: &[u8], name: &str) -> u32 {
        let needle = format!("\0{name}\0");
        strings
            .windows(needle.len())
            .position(|w| w == needle.as_bytes())
            .map_or(0, |p| p as u32 + 1)
    }

    fn sample() -> Vec<u8> {
        let strings = b"\0u16\0u32\0inner\0a\0b\0outer\0x\0y\0in\0u8\0bf\0".to_vec();
        let s = |name: &str| str_off(&strings, name);
        let mut t: Vec<u32> = Vec::new();
        // 1: u16 int
        t.extend([s("u16"), 1 << 24, 2, 16]);
        // 2: u32 int
        t.extend([s("u32"), 1 << 24, 4, 32]);
        // 3: struct inner { a: 1 @0, b: 1 @16 }
        t.extend([s("inner"), (4 << 24) | 2, 4, s("a"), 1, 0, s("b"), 1, 16]);
        // 4: anonymous union { y: u32 @0; in: inner @0 }
        t.extend([0, (5 << 24) | 2, 4, s("y"), 2, 0, s("in"), 3, 0]);
        // 5: u8 int
        t.extend([s("u8"), 1 << 24, 1, 8]);
        // 6: struct outer (kind_flag set: bitfield encoding) { x @0, <anon union> @32, bf:3 @64 }
        t.extend([
            s("outer"),
            (1 << 31) | (4 << 24) | 3,
            12,
            s("x"),
            2,
            0,
            0,
            4,
            32,
            s("bf"),
            5,
            (3 << 24) | 64,
        ]);
        btf_bytes(&t, &strings)
    }

    /// A BTF blob: 24-byte header, the type words, then the string section.
    fn btf_bytes(type_words: &[u32], strings: &[u8]) -> Vec<u8> {
        let types: Vec<u8> = type_words.iter().flat_map(|v| v.to_le_bytes()).collect();
        let mut out = Vec::new();
        out.extend(BTF_MAGIC.to_le_bytes());
        out.extend([1u8, 0]);
        let (types_len, strings_len) = (types.len() as u32, strings.len() as u32);
        for v in [24u32, 0, types_len, types_len, strings_len] {
            out.extend(v.to_le_bytes());
        }
        out.extend(types);
        out.extend(strings);
        out
    }

    #[test]
    fn resolves_members_through_anonymous_unions() {
        let btf = Btf::parse(&sample()).expect("sample parses");
        assert_eq!(btf.field("outer.x"), Ok(Field { offset: 0, size: 4 }));
        assert_eq!(btf.field("outer.y"), Ok(Field { offset: 4, size: 4 }));
        assert_eq!(btf.field("outer.in.b"), Ok(Field { offset: 6, size: 2 }));
        assert_eq!(btf.field("inner.b"), Ok(Field { offset: 2, size: 2 }));
    }

    #[test]
    fn reports_what_is_missing() {
        let btf = Btf::parse(&sample()).expect("sample parses");
        assert!(matches!(
            btf.field("nope.x"),
            Err(BtfError::NoSuchStruct { .. })
        ));
        assert!(matches!(
            btf.field("outer.z"),
            Err(BtfError::NoSuchMember { .. })
        ));
        assert!(matches!(
            btf.field("outer.x.q"),
            Err(BtfError::NotAggregate { .. })
        ));
        assert!(matches!(
            btf.field("outer.bf"),
            Err(BtfError::Bitfield { .. })
        ));
    }

    /// Found by the kernel_btf fuzz target: a struct whose anonymous members are
    /// the struct itself made the member search exponential.
    #[test]
    fn self_nested_anonymous_members_terminate() {
        let strings = b"\0loop\0".to_vec();
        let t: Vec<u32> = vec![1, (4 << 24) | 3, 4, 0, 1, 0, 0, 1, 0, 0, 1, 0];
        let data = btf_bytes(&t, &strings);
        let btf = Btf::parse(&data).expect("parses");
        // Without the visit budget this search is 3^32 steps and never returns.
        assert!(matches!(
            btf.field("loop.x"),
            Err(BtfError::NoSuchMember { .. })
        ));
    }

    #[test]
    fn reads_enum_values_signed_and_64_bit() {
        let strings = b"\0reason\0A\0B\0wide\0W\0".to_vec();
        let s = |name: &str| str_off(&strings, name);
        let t: Vec<u32> = vec![
            // 1: signed enum reason { A = 2, B = -1 }
            s("reason"),
            (1 << 31) | (6 << 24) | 2,
            4,
            s("A"),
            2,
            s("B"),
            u32::MAX,
            // 2: enum64 wide { W = 1 << 33 }
            s("wide"),
            (19 << 24) | 1,
            8,
            s("W"),
            0,
            2,
        ];
        let btf = Btf::parse(&btf_bytes(&t, &strings)).expect("parses");
        assert_eq!(
            btf.enum_values("reason"),
            Ok(vec![("A".into(), 2), ("B".into(), -1)])
        );
        assert_eq!(btf.enum_values("wide"), Ok(vec![("W".into(), 1 << 33)]));
        assert!(matches!(
            btf.enum_values("reason2"),
            Err(BtfError::NoSuchEnum { .. })
        ));
    }

    #[test]
    fn rejects_garbage_without_panicking() {
        assert!(Btf::parse(b"").is_err());
        assert!(Btf::parse(&[0x9f, 0xeb, 1, 0, 24, 0, 0, 0]).is_err());
        let mut truncated = sample();
        truncated.truncate(60);
        assert!(Btf::parse(&truncated).is_err());
        // Every prefix of valid BTF must fail cleanly or parse, never panic.
        let full = sample();
        for n in 0..full.len() {
            let _ = Btf::parse(&full[..n]);
        }
    }
}
