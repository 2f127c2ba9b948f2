//! Descriptor formats and the translation of a [`TxOffload`] request into a TCP/IP context
//! descriptor. Pure functions: no device access, unit-tested below.
//!
//! Every descriptor is 16 bytes: a 64-bit buffer address followed by a 64-bit word whose
//! layout depends on the type. The driver writes both words with volatile stores and reads
//! the second one back to find the Descriptor Done (DD) bit.

use crate::error::{DriverError, Result};
use crate::queue::{L4Protocol, TxOffload};

/// Size of every receive and transmit descriptor (SDM 3.2.3, 3.3.3).
pub const DESC_LEN: usize = 16;

/// Largest buffer one transmit descriptor may describe: 16288 bytes (SDM 3.3.3, table 3-9,
/// "Length"). The driver additionally splits at 4 KiB IOVA boundaries, see
/// [`split_points`].
pub const MAX_DESC_LEN: u64 = 16288;

/// The driver never lets one data descriptor cross a page of the memory it points into: a
/// 4 KiB IOVA page, or a 2 MiB one inside a region backed by 2 MiB pages
/// ([`crate::dma::LargePageRanges`]). Any split is legal for the device (a frame may span any
/// number of descriptors, SDM 3.3.3), and it keeps every descriptor inside one IOMMU page,
/// which emulated devices that map guest memory descriptor by descriptor (QEMU's e1000e maps
/// each descriptor's buffer with one `pci_dma_map`, one IOMMU translation) require.
pub const SPLIT_BOUNDARY: u64 = 4096;

// --- Legacy transmit descriptor (SDM 3.3.3, table 3-8) -----------------------------------
// word 1: Length 15:0 | CSO 23:16 | CMD 31:24 | STA 35:32 | RSV 39:36 | CSS 47:40 | Special

/// TDESC.CMD / DCMD bit 0, End Of Packet (SDM 3.3.3.1, 3.3.7.1).
pub const CMD_EOP: u8 = 1 << 0;
/// TDESC.CMD / DCMD bit 1, Insert FCS (SDM 3.3.3.1, 3.3.7.1).
pub const CMD_IFCS: u8 = 1 << 1;
/// DCMD bit 2 (data descriptors only), TCP Segmentation Enable (SDM 3.3.7.1). In a legacy
/// descriptor bit 2 is IC (insert checksum), which this driver never uses.
pub const DCMD_TSE: u8 = 1 << 2;
/// TDESC.CMD / DCMD bit 3, Report Status: write back DD when done (SDM 3.3.3.1).
pub const CMD_RS: u8 = 1 << 3;
/// TDESC.CMD / DCMD / TUCMD bit 5, descriptor extension: 0 = legacy (SDM 3.3.3, 3.3.6).
pub const CMD_DEXT: u8 = 1 << 5;

/// TDESC.STA bit 0, Descriptor Done (SDM 3.3.3.2, 3.3.7.2), at bit 32 of word 1.
pub const TX_STA_DD: u64 = 1 << 32;

// --- TCP/IP context descriptor (SDM 3.3.6, table 3-13) -----------------------------------
// word 0: IPCSS 7:0 | IPCSO 15:8 | IPCSE 31:16 | TUCSS 39:32 | TUCSO 47:40 | TUCSE 63:48
// word 1: PAYLEN 19:0 | DTYP 23:20 (0000b) | TUCMD 31:24 | STA 35:32 | HDRLEN 47:40 | MSS

/// TUCMD bit 0: TCP (1) or UDP (0) (SDM 3.3.6.1).
pub const TUCMD_TCP: u8 = 1 << 0;
/// TUCMD bit 1: IPv4 (1) or IPv6 (0) (SDM 3.3.6.1).
pub const TUCMD_IP: u8 = 1 << 1;
/// TUCMD bit 2: this context is the TCP segmentation context (SDM 3.3.6.1).
pub const TUCMD_TSE: u8 = 1 << 2;

// --- TCP/IP data descriptor (SDM 3.3.7, table 3-17) --------------------------------------
// word 1: DTALEN 19:0 | DTYP 23:20 (0001b) | DCMD 31:24 | STA 35:32 | POPTS 47:40 | Special

/// DTYP of a data descriptor (SDM 3.3.7).
pub const DTYP_DATA: u64 = 0b0001 << 20;
/// POPTS bit 0, insert IP checksum (SDM 3.3.7.3).
pub const POPTS_IXSM: u8 = 1 << 0;
/// POPTS bit 1, insert TCP/UDP checksum (SDM 3.3.7.3).
pub const POPTS_TXSM: u8 = 1 << 1;

// --- Legacy receive descriptor (SDM 3.2.3) ------------------------------------
// word 1: Length 15:0 | Packet Checksum 31:16 | Status 39:32 | Errors 47:40 | Special

/// RDESC.STATUS bit 0, Descriptor Done (SDM 3.2.3.1).
pub const RX_STA_DD: u64 = 1 << 32;
/// RDESC.STATUS bit 1, End Of Packet (SDM 3.2.3.1).
pub const RX_STA_EOP: u64 = 1 << 33;
/// RDESC.ERRORS that mean the frame itself is bad: CE (bit 0, CRC/alignment), SE (bit 1,
/// symbol), SEQ (bit 2, sequence), CXE (bit 4, carrier extension), RXE (bit 7, RX data
/// error) (SDM 3.2.3.2). IPE/TCPE (bits 6, 5) only report checksum results and are left
/// to the stack.
pub const RX_ERR_FRAME: u64 = (0b1001_0111u64) << 40;

// --- Extended receive descriptor, one buffer (82574 DS 7.1.4, "Extended Rx Descriptor") --
// Selected by RFCTL.EXTEN = 1 with RCTL.DTYP = 00b. Read format (software writes): word 0
// buffer address, word 1 zero (its bit 0 is DD). Write-back format (the device writes):
// word 0: MRQ 31:0 (RSS type 3:0) | RSS hash 63:32 (with RXCSUM.PCSD = 1);
// word 1: extended status 19:0 | extended errors 31:20 | length 47:32 | VLAN 63:48.
// The device overwrites the buffer address, so every descriptor is rewritten when posted.

/// Extended status bit 0, Descriptor Done, and bit 1, End Of Packet (82574 DS 7.1.4).
pub const RXE_STA_DD: u64 = 1 << 0;
pub const RXE_STA_EOP: u64 = 1 << 1;
/// Extended errors that mean the frame itself is bad: CE (bit 24), SE (25), SEQ (26), CXE
/// (28), RXE (31) (82574 DS 7.1.4); TCPE/IPE (29, 30) are checksum results only.
pub const RXE_ERR_FRAME: u64 = (1 << 24) | (1 << 25) | (1 << 26) | (1 << 28) | (1 << 31);
/// MRQ.RSS Type (bits 3:0 of word 0): 0 = no hash computed (82574 DS 7.1.4, 7.1.2).
pub const RSS_TYPE_NONE: u8 = 0;
pub const RSS_TYPE_TCP_IPV4: u8 = 1;
pub const RSS_TYPE_IPV4: u8 = 2;
pub const RSS_TYPE_TCP_IPV6: u8 = 3;

/// Which receive descriptor layout a ring uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RxFormat {
    /// The 8254x legacy descriptor (SDM 3.2.3): the single-queue driver on every model.
    Legacy,
    /// The 82574's extended descriptor with the RSS hash: the multi-queue driver.
    Extended,
}

/// What a receive descriptor's write-back says about its frame.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RxWriteback {
    /// DD: the device has written this descriptor back.
    pub done: bool,
    /// EOP: the frame ends in this buffer.
    pub eop: bool,
    /// An error that makes the frame unusable (CRC, symbol, sequence, carrier, data).
    pub frame_error: bool,
    /// Bytes written to the buffer.
    pub len: u32,
}

/// Decode word 1 of a written-back receive descriptor.
pub fn rx_writeback(format: RxFormat, word1: u64) -> RxWriteback {
    match format {
        RxFormat::Legacy => RxWriteback {
            done: word1 & RX_STA_DD != 0,
            eop: word1 & RX_STA_EOP != 0,
            frame_error: word1 & RX_ERR_FRAME != 0,
            len: rx_len(word1),
        },
        RxFormat::Extended => RxWriteback {
            done: word1 & RXE_STA_DD != 0,
            eop: word1 & RXE_STA_EOP != 0,
            frame_error: word1 & RXE_ERR_FRAME != 0,
            len: ((word1 >> 32) & 0xffff) as u32,
        },
    }
}

/// The RSS type and hash of an extended write-back's word 0 (type 0: no hash, the frame
/// went to queue 0).
pub fn rx_rss(word0: u64) -> (u8, u32) {
    ((word0 & 0xf) as u8, (word0 >> 32) as u32)
}

/// Word 1 of a legacy transmit descriptor.
pub fn legacy_tx(len: u16, cmd: u8) -> u64 {
    len as u64 | (cmd as u64) << 24
}

/// Word 1 of a TCP/IP data descriptor.
pub fn data_tx(len: u32, dcmd: u8, popts: u8) -> u64 {
    debug_assert!(len < 1 << 20);
    len as u64 | DTYP_DATA | ((dcmd | CMD_DEXT) as u64) << 24 | (popts as u64) << 40
}

/// Length, status and errors of a receive descriptor's word 1.
pub fn rx_len(word1: u64) -> u32 {
    (word1 & 0xffff) as u32
}

/// Parameters of one TCP/IP context descriptor. Equal values mean the device's context
/// can be reused without writing a new context descriptor.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Context {
    pub ipcss: u8,
    pub ipcso: u8,
    pub ipcse: u16,
    pub tucss: u8,
    pub tucso: u8,
    pub tucse: u16,
    pub tucmd: u8,
    pub paylen: u32,
    pub hdrlen: u8,
    pub mss: u16,
}

impl Context {
    /// The two words of the context descriptor.
    pub fn words(&self) -> [u64; 2] {
        let w0 = self.ipcss as u64
            | (self.ipcso as u64) << 8
            | (self.ipcse as u64) << 16
            | (self.tucss as u64) << 32
            | (self.tucso as u64) << 40
            | (self.tucse as u64) << 48;
        let w1 = (self.paylen as u64 & 0xf_ffff)
            | ((self.tucmd | CMD_DEXT) as u64) << 24
            | (self.hdrlen as u64) << 40
            | (self.mss as u64) << 48;
        [w0, w1]
    }

    pub fn is_tso(&self) -> bool {
        self.tucmd & TUCMD_TSE != 0
    }
}

/// What a frame's offload request turns into: the context to load and the POPTS bits for its
/// data descriptors. `None` when nothing is offloaded (legacy descriptors are used).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct OffloadPlan {
    pub context: Context,
    pub popts: u8,
}

fn byte_offset(value: u16, what: &str) -> Result<u8> {
    u8::try_from(value).map_err(|_| {
        DriverError::BadFrame(format!(
            "{what} at offset {value}: the context descriptor field is 8 bits"
        ))
    })
}

/// Translate an offload request for a frame of `frame_len` bytes (SDM 3.3.6, 3.5).
///
/// - IPv4 header checksum: IPCSS = header offset, IPCSO = offset + 10, IPCSE = last byte of
///   the header. The header ends where the L4 header starts when an L4 request is present;
///   otherwise a 20-byte header (no options) is assumed. The checksum field must be zero.
/// - L4 checksum: TUCSS = `start`, TUCSO = `field`, TUCSE = 0 (to the end of the frame).
/// - TSO: TUCMD.TSE, HDRLEN, MSS and PAYLEN = `frame_len - header_len`. An IPv4 frame needs
///   the IPv4 request (TUCMD.IP = 1). An IPv6 frame ([`TxOffload::ipv6_header`]) has
///   TUCMD.IP = 0 and IPCSS = the IPv6 header's offset, IPCSO = IPCSE = 0 and no POPTS.IXSM:
///   the device writes each segment's "Payload Length = MSS + HDRLEN - IPCSS" there (8254x
///   SDM sections 3.3.6.1 and 3.5.9; 82574 DS section 7.3.6: IPCSS "is used ... for the IPv6
///   payload length" of TSO packets, IPCSO is ignored for IPv6).
pub fn plan_offload(
    offload: &TxOffload,
    frame_len: u32,
    mtu: usize,
) -> Result<Option<OffloadPlan>> {
    if offload.ipv4_header.is_some() && offload.ipv6_header.is_some() {
        return Err(DriverError::BadFrame(
            "both an IPv4 and an IPv6 header requested".into(),
        ));
    }
    if offload.ipv4_header.is_none() && offload.l4_checksum.is_none() && offload.tso.is_none() {
        return Ok(None);
    }
    let mut ctx = Context {
        ipcss: 0,
        ipcso: 0,
        ipcse: 0,
        tucss: 0,
        tucso: 0,
        tucse: 0,
        tucmd: 0,
        paylen: 0,
        hdrlen: 0,
        mss: 0,
    };
    let mut popts = 0;
    if let Some(ip) = offload.ipv4_header {
        let end = match offload.l4_checksum {
            Some(l4) if l4.start > ip => l4.start,
            Some(_) => {
                return Err(DriverError::BadFrame(
                    "L4 header starts before the IPv4 header".into(),
                ))
            }
            None => ip + 20,
        };
        ctx.ipcss = byte_offset(ip, "IPv4 header")?;
        ctx.ipcso = byte_offset(ip + 10, "IPv4 checksum field")?;
        ctx.ipcse = end - 1;
        ctx.tucmd |= TUCMD_IP;
        popts |= POPTS_IXSM;
    }
    if let Some(l4) = offload.l4_checksum {
        if l4.field < l4.start || l4.field as u32 + 2 > frame_len {
            return Err(DriverError::BadFrame(format!(
                "L4 checksum field at {} outside the L4 data ({}..{frame_len})",
                l4.field, l4.start
            )));
        }
        ctx.tucss = byte_offset(l4.start, "L4 header")?;
        ctx.tucso = byte_offset(l4.field, "L4 checksum field")?;
        ctx.tucse = 0;
        if l4.protocol == L4Protocol::Tcp {
            ctx.tucmd |= TUCMD_TCP;
        }
        popts |= POPTS_TXSM;
    }
    if let Some(tso) = offload.tso {
        let tcp = matches!(offload.l4_checksum, Some(l4) if l4.protocol == L4Protocol::Tcp);
        if (offload.ipv4_header.is_none() && offload.ipv6_header.is_none()) || !tcp {
            return Err(DriverError::BadFrame(
                "TSO needs an IPv4 header checksum or an IPv6 header, and a TCP checksum request"
                    .into(),
            ));
        }
        if let Some(ip) = offload.ipv6_header {
            // TUCMD.IP stays 0 (IPv6); IPCSS tells the device where Payload Length is.
            ctx.ipcss = byte_offset(ip, "IPv6 header")?;
        }
        if tso.mss == 0 || tso.header_len as u32 >= frame_len {
            return Err(DriverError::BadFrame(format!(
                "TSO with MSS {} and header length {} for a {frame_len}-byte frame",
                tso.mss, tso.header_len
            )));
        }
        // Every emitted segment must be a legal Ethernet frame.
        if tso.header_len as usize + tso.mss as usize > mtu + 14 {
            return Err(DriverError::BadFrame(format!(
                "TSO segments of {} header + {} MSS bytes exceed the {}-byte MTU",
                tso.header_len, tso.mss, mtu
            )));
        }
        ctx.hdrlen = byte_offset(tso.header_len, "TSO header length")?;
        ctx.mss = tso.mss;
        ctx.paylen = frame_len - tso.header_len as u32;
        ctx.tucmd |= TUCMD_TSE;
    }
    Ok(Some(OffloadPlan {
        context: ctx,
        popts,
    }))
}

/// Pieces `(iova, len)` of a segment, split so that no piece crosses a boundary of the page
/// holding it (`page_size_at(iova)`: a power of two, at least [`SPLIT_BOUNDARY`]) or
/// exceeds [`MAX_DESC_LEN`]. Calls `f` for each.
pub fn split_points(
    iova: u64,
    len: u64,
    page_size_at: impl Fn(u64) -> u64,
    mut f: impl FnMut(u64, u64),
) {
    let mut at = iova;
    let end = iova + len;
    while at < end {
        let page = page_size_at(at).max(SPLIT_BOUNDARY);
        let boundary = (at / page + 1) * page;
        let piece_end = end.min(boundary).min(at + MAX_DESC_LEN);
        f(at, piece_end - at);
        at = piece_end;
    }
}

/// How many descriptors [`split_points`] produces.
pub fn split_count(iova: u64, len: u64, page_size_at: impl Fn(u64) -> u64) -> usize {
    let mut n = 0;
    split_points(iova, len, page_size_at, |_, _| n += 1);
    n
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::queue::{L4Checksum, Tso};

    #[test]
    fn legacy_and_data_words() {
        assert_eq!(
            legacy_tx(60, CMD_EOP | CMD_IFCS | CMD_RS),
            60 | (0x0b << 24)
        );
        let w = data_tx(1000, CMD_EOP | DCMD_TSE, POPTS_IXSM | POPTS_TXSM);
        assert_eq!(w & 0xf_ffff, 1000);
        assert_eq!((w >> 20) & 0xf, 1, "DTYP data");
        assert_eq!((w >> 24) & 0xff, 0x25, "DEXT|TSE|EOP");
        assert_eq!((w >> 40) & 0xff, 3);
    }

    #[test]
    fn tcp_tso_context() {
        let off = TxOffload {
            ipv6_header: None,
            ipv4_header: Some(14),
            l4_checksum: Some(L4Checksum {
                protocol: L4Protocol::Tcp,
                start: 34,
                field: 50,
            }),
            tso: Some(Tso {
                mss: 1460,
                header_len: 54,
            }),
        };
        let plan = plan_offload(&off, 54 + 61440, 1500).unwrap().unwrap();
        let c = plan.context;
        assert_eq!((c.ipcss, c.ipcso, c.ipcse), (14, 24, 33));
        assert_eq!((c.tucss, c.tucso, c.tucse), (34, 50, 0));
        assert_eq!(c.paylen, 61440);
        assert_eq!(c.tucmd, TUCMD_TCP | TUCMD_IP | TUCMD_TSE);
        let [w0, w1] = c.words();
        assert_eq!(w0, 14 | 24 << 8 | 33 << 16 | 34 << 32 | 50 << 40);
        assert_eq!(w1 & 0xf_ffff, 61440);
        assert_eq!((w1 >> 20) & 0xf, 0, "DTYP context");
        assert_eq!((w1 >> 24) & 0xff, 0x27);
        assert_eq!((w1 >> 40) & 0xff, 54);
        assert_eq!(w1 >> 48, 1460);
        assert_eq!(plan.popts, POPTS_IXSM | POPTS_TXSM);
    }

    #[test]
    fn ipv6_tso_context_has_tucmd_ip_clear_and_ipcss_at_the_ipv6_header() {
        let off = TxOffload {
            ipv4_header: None,
            ipv6_header: Some(14),
            l4_checksum: Some(L4Checksum {
                protocol: L4Protocol::Tcp,
                start: 54,
                field: 70,
            }),
            tso: Some(Tso {
                mss: 1440,
                header_len: 74,
            }),
        };
        let plan = plan_offload(&off, 74 + 57600, 1500).unwrap().unwrap();
        let c = plan.context;
        assert_eq!((c.ipcss, c.ipcso, c.ipcse), (14, 0, 0));
        assert_eq!((c.tucss, c.tucso, c.tucse), (54, 70, 0));
        assert_eq!(c.tucmd, TUCMD_TCP | TUCMD_TSE, "TUCMD.IP = 0: IPv6");
        assert_eq!((c.paylen, c.hdrlen, c.mss), (57600, 74, 1440));
        assert_eq!(plan.popts, POPTS_TXSM, "no IPv4 checksum insertion");
        let both = TxOffload {
            ipv4_header: Some(14),
            ..off
        };
        assert!(plan_offload(&both, 74 + 57600, 1500).is_err());
        // Without TSO an IPv6 frame needs only the L4 checksum context.
        let csum_only = TxOffload { tso: None, ..off };
        let plan = plan_offload(&csum_only, 1000, 1500).unwrap().unwrap();
        assert_eq!(plan.context.tucmd, TUCMD_TCP);
        assert_eq!(plan.popts, POPTS_TXSM);
    }

    #[test]
    fn udp_checksum_only_and_rejections() {
        let off = TxOffload {
            ipv6_header: None,
            ipv4_header: None,
            l4_checksum: Some(L4Checksum {
                protocol: L4Protocol::Udp,
                start: 34,
                field: 40,
            }),
            tso: None,
        };
        let plan = plan_offload(&off, 100, 1500).unwrap().unwrap();
        assert_eq!(plan.context.tucmd, 0);
        assert_eq!(plan.popts, POPTS_TXSM);
        assert!(plan_offload(&TxOffload::default(), 100, 1500)
            .unwrap()
            .is_none());
        let bad_tso = TxOffload {
            tso: Some(Tso {
                mss: 1460,
                header_len: 54,
            }),
            ..off
        };
        assert!(
            plan_offload(&bad_tso, 20000, 1500).is_err(),
            "TSO needs IPv4 + TCP"
        );
        let far = TxOffload {
            ipv6_header: None,
            ipv4_header: None,
            l4_checksum: Some(L4Checksum {
                protocol: L4Protocol::Udp,
                start: 300,
                field: 306,
            }),
            tso: None,
        };
        assert!(plan_offload(&far, 400, 1500).is_err(), "TUCSS is 8 bits");
    }

    #[test]
    fn receive_writebacks_decode_per_format() {
        // Legacy: length 60, status DD|EOP, errors none.
        let legacy = 60 | RX_STA_DD | RX_STA_EOP;
        let w = rx_writeback(RxFormat::Legacy, legacy);
        assert_eq!(
            (w.done, w.eop, w.frame_error, w.len),
            (true, true, false, 60)
        );
        assert!(
            rx_writeback(RxFormat::Legacy, legacy | 1 << 40).frame_error,
            "CE"
        );
        assert!(
            !rx_writeback(RxFormat::Legacy, legacy | 1 << 45).frame_error,
            "TCPE only"
        );
        // Extended: status DD|EOP in bits 1:0, length in 47:32.
        let ext = RXE_STA_DD | RXE_STA_EOP | 1514 << 32 | 0x0abc_u64 << 48;
        let w = rx_writeback(RxFormat::Extended, ext);
        assert_eq!(
            (w.done, w.eop, w.frame_error, w.len),
            (true, true, false, 1514)
        );
        assert!(
            rx_writeback(RxFormat::Extended, ext | 1 << 24).frame_error,
            "CE"
        );
        assert!(
            rx_writeback(RxFormat::Extended, ext | 1 << 31).frame_error,
            "RXE"
        );
        assert!(
            !rx_writeback(RxFormat::Extended, ext | 1 << 29).frame_error,
            "TCPE"
        );
        assert!(!rx_writeback(RxFormat::Extended, 1514 << 32).done);
        // The same word read as legacy would be wrong: the formats really differ.
        assert!(!rx_writeback(RxFormat::Legacy, ext).done);
        assert_eq!(
            rx_rss(0x51cc_c178_0000_0001),
            (RSS_TYPE_TCP_IPV4, 0x51cc_c178)
        );
    }

    #[test]
    fn splits_at_pages() {
        let small = |_| 4096;
        let mut v = Vec::new();
        split_points(0x1f00, 0x300, small, |a, l| v.push((a, l)));
        assert_eq!(v, vec![(0x1f00, 0x100), (0x2000, 0x200)]);
        assert_eq!(split_count(0x1f00, 0x300, small), 2);
        assert_eq!(split_count(0x2000, 0x1000, small), 1);
        assert_eq!(split_count(0x2000, 0, small), 0);
        v.clear();
        split_points(0x10000, 0x10000, small, |a, l| v.push((a, l)));
        assert_eq!(v.len(), 16);
        assert_eq!(split_count(0x10000, 0x10000, small), 16);
        // A page size below 4 KiB is never honoured: 4 KiB is the floor.
        assert_eq!(split_count(0x10000, 0x10000, |_| 512), 16);
    }

    #[test]
    fn splits_at_large_pages_and_descriptor_length() {
        let huge = |_| 2 << 20;
        let mut v = Vec::new();
        // 64 KiB inside one 2 MiB page: cut only at MAX_DESC_LEN.
        split_points(0x20_0000, 0x10000, huge, |a, l| v.push((a, l)));
        let lens: Vec<u64> = v.iter().map(|p| p.1).collect();
        assert_eq!(lens, vec![16288, 16288, 16288, 16288, 384]);
        assert_eq!(v[1].0, 0x20_0000 + 16288);
        assert_eq!(split_count(0x20_0000, 0x10000, huge), 5);
        // Across a 2 MiB boundary: cut there too.
        v.clear();
        split_points(0x3f_f000, 0x2000, huge, |a, l| v.push((a, l)));
        assert_eq!(v, vec![(0x3f_f000, 0x1000), (0x40_0000, 0x1000)]);
        // From a 2 MiB region into 4 KiB pages behind it: 4 KiB cuts resume there.
        let mixed = |iova: u64| if iova < 0x40_0000 { 2 << 20 } else { 4096 };
        v.clear();
        split_points(0x3f_e000, 0x4000, mixed, |a, l| v.push((a, l)));
        assert_eq!(
            v,
            vec![
                (0x3f_e000, 0x2000),
                (0x40_0000, 0x1000),
                (0x40_1000, 0x1000)
            ]
        );
    }
}
