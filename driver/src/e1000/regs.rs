//! BAR0 register offsets and bit fields.
//!
//! Citations: "SDM" is the *PCI/PCI-X Family of Gigabit Ethernet Controllers Software
//! Developer's Manual* (317453006EN, rev. 4.0): register map in table 13-2, general and
//! receive/transmit registers in section 13.4, filter registers in 13.5, statistics in 13.7.
//! "82574 DS" is the *Intel 82574 GbE Controller Datasheet* (317694): registers in chapter 10
//! (section 10.2), initialisation in section 4.6. The 82574 keeps
//! the 8254x offsets for every register used here; where it adds or changes bits, the
//! constant says so.

// ---------------------------------------------------------------------------------------
// General registers
// ---------------------------------------------------------------------------------------

/// Device Control (SDM 13.4.1; 82574 DS 10.2).
pub const CTRL: usize = 0x0000;
/// CTRL.FD: full duplex (SDM table 13-3, bit 0).
pub const CTRL_FD: u32 = 1 << 0;
/// CTRL.LRST: link reset (SDM table 13-3, bit 3); must be 0 for the link to come up.
pub const CTRL_LRST: u32 = 1 << 3;
/// CTRL.ASDE: auto-speed detection enable (SDM table 13-3, bit 5).
pub const CTRL_ASDE: u32 = 1 << 5;
/// CTRL.SLU: set link up (SDM table 13-3, bit 6).
pub const CTRL_SLU: u32 = 1 << 6;
/// CTRL.ILOS: invert loss-of-signal (SDM table 13-3, bit 7); must be 0 for copper.
pub const CTRL_ILOS: u32 = 1 << 7;
/// CTRL.FRCSPD / CTRL.FRCDPLX: force speed / duplex (SDM table 13-3, bits 11 and 12).
pub const CTRL_FRCSPD: u32 = 1 << 11;
pub const CTRL_FRCDPLX: u32 = 1 << 12;
/// CTRL.RST: global device reset, self-clearing (SDM table 13-3, bit 26; 82574 DS 10.2).
pub const CTRL_RST: u32 = 1 << 26;
/// CTRL.VME: VLAN mode enable (SDM table 13-3, bit 30); we leave VLAN tags alone.
pub const CTRL_VME: u32 = 1 << 30;
/// CTRL.PHY_RST: PHY reset (SDM table 13-3, bit 31).
pub const CTRL_PHY_RST: u32 = 1 << 31;
/// 82574 only: CTRL bit 29 is cleared during initialisation (a reserved bit in 82574 DS
/// 10.2; Linux e1000e's `e1000_initialize_hw_bits_82571` clears it for the 82574).
pub const CTRL_82574_RESERVED_29: u32 = 1 << 29;

/// Device Status (SDM 13.4.2; 82574 DS 10.2).
pub const STATUS: usize = 0x0008;
/// STATUS.LU: link up (SDM 13.4.2, bit 1).
pub const STATUS_LU: u32 = 1 << 1;

/// EEPROM Read (SDM 13.4.4; 82574 DS 10.2).
pub const EERD: usize = 0x0014;
/// 8254x EERD: START bit 0, DONE bit 4, ADDR bits 15:8, DATA bits 31:16 (SDM 13.4.4).
pub const EERD_START: u32 = 1 << 0;
pub const EERD_8254X_DONE: u32 = 1 << 4;
pub const EERD_8254X_ADDR_SHIFT: u32 = 8;
/// 82574 EERD: DONE bit 1, ADDR bits 15:2 (82574 DS 10.2).
pub const EERD_82574_DONE: u32 = 1 << 1;
pub const EERD_82574_ADDR_SHIFT: u32 = 2;
pub const EERD_DATA_SHIFT: u32 = 16;

/// Extended Device Control (SDM 13.4.6; 82574 DS 10.2).
pub const CTRL_EXT: usize = 0x0018;
/// 82574: CTRL_EXT bit 22 set and bit 23 cleared during initialisation, as Linux e1000e's
/// `e1000_initialize_hw_bits_82571` does for the 82574 (bits documented in 82574 DS 10.2).
pub const CTRL_EXT_82574_SET_22: u32 = 1 << 22;
pub const CTRL_EXT_82574_CLEAR_23: u32 = 1 << 23;

// ---------------------------------------------------------------------------------------
// Interrupts: masked while the loop polls, enabled (IMS) only to wake an idle loop.
// ---------------------------------------------------------------------------------------

/// Interrupt Cause Read, clear-on-read (SDM 13.4.17; 82574 DS 10.2.4.1: there it clears on
/// read only while IMS is 0 or INT_ASSERTED with IAME, and writing 1s clears bits).
pub const ICR: usize = 0x00C0;
/// Interrupt Mask Set/Read: writing 1s enables those causes (SDM 13.4.20; 82574 DS 10.2.4.4).
pub const IMS: usize = 0x00D0;
/// Interrupt Mask Clear: writing 1s masks those causes (SDM 13.4.21; 82574 DS 10.2.4.5).
pub const IMC: usize = 0x00D8;
/// Every interrupt cause bit.
pub const IMC_ALL: u32 = 0xFFFF_FFFF;
/// Interrupt causes (SDM table 13-68; 82574 DS 10.2.4.1): TXDW transmit descriptor written
/// back (bit 0), LSC link status change (bit 2), RXDMT0 receive descriptors below the
/// threshold (bit 4), RXO receiver overrun (bit 6), RXT0 receive timer (bit 7: a frame was
/// written back, at once as RDTR is 0).
pub const ICR_TXDW: u32 = 1 << 0;
pub const ICR_LSC: u32 = 1 << 2;
pub const ICR_RXDMT0: u32 = 1 << 4;
pub const ICR_RXO: u32 = 1 << 6;
pub const ICR_RXT0: u32 = 1 << 7;
/// 82574 only, MSI-X mode (82574 DS 10.2.4.1, 7.4.2): RxQ0 (bit 20), TxQ0 (bit 22) and
/// Other (bit 24, for LSC and RXO) are the causes routed to vectors by IVAR.
pub const ICR_RXQ0: u32 = 1 << 20;
pub const ICR_TXQ0: u32 = 1 << 22;
pub const ICR_OTHER: u32 = 1 << 24;
/// 82574 only, MSI-X mode: RxQ1 (bit 21) and TxQ1 (bit 23), queue 1's causes (82574 DS
/// 10.2.4.1, 7.4.2). In MSI-X mode a received frame sets RxQn of its queue and a transmit
/// write-back TxQn, which IVAR routes to a vector; IMS masks each (82574 DS 10.2.4.4).
pub const ICR_RXQ1: u32 = 1 << 21;
pub const ICR_TXQ1: u32 = 1 << 23;
/// The causes that wake the loop: a received frame, a transmit completion (pins to
/// release), a link change.
pub const IMS_WAKE: u32 = ICR_RXT0 | ICR_RXDMT0 | ICR_RXO | ICR_TXDW | ICR_LSC;
/// 82574 MSI-X: the same plus the per-queue causes IVAR routes.
pub const IMS_WAKE_MSIX: u32 = IMS_WAKE | ICR_RXQ0 | ICR_TXQ0 | ICR_OTHER;
/// 82574: Extended Interrupt Auto Clear (82574 DS 10.2.4.6): left 0, so no cause clears
/// itself when its vector fires; the driver clears ICR when it wakes.
pub const EIAC: usize = 0x00DC;
/// 82574: Interrupt Vector Allocation Registers (82574 DS 10.2.4.9): 3-bit vector and a
/// valid bit per cause: RxQ0 bits 2:0/3, RxQ1 6:4/7, TxQ0 10:8/11, TxQ1 14:12/15, Other
/// 18:16/19.
pub const IVAR: usize = 0x00E4;
/// RxQ0, TxQ0 and Other all on MSI-X vector 0, each entry valid.
pub const IVAR_ALL_TO_VECTOR_0: u32 = (1 << 3) | (1 << 11) | (1 << 19);
/// IVAR field positions (82574 DS 10.2.4.9): each a 3-bit vector number with its valid bit
/// (bit 3 of the 4-bit field).
pub const IVAR_RXQ0_SHIFT: u32 = 0;
pub const IVAR_RXQ1_SHIFT: u32 = 4;
pub const IVAR_TXQ0_SHIFT: u32 = 8;
pub const IVAR_TXQ1_SHIFT: u32 = 12;
pub const IVAR_OTHER_SHIFT: u32 = 16;
pub const IVAR_VALID: u32 = 1 << 3;
/// 82574: CTRL_EXT.PBA_support (bit 31, 82574 DS 10.2.2.3): set when MSI-X is used, so the
/// MSI-X pending bits are handled by the device.
pub const CTRL_EXT_PBA_SUPPORT: u32 = 1 << 31;

// ---------------------------------------------------------------------------------------
// Receive
// ---------------------------------------------------------------------------------------

/// Receive Control (SDM 13.4.22; 82574 DS 10.2).
pub const RCTL: usize = 0x0100;
/// RCTL.EN: receiver enable (SDM 13.4.22, bit 1).
pub const RCTL_EN: u32 = 1 << 1;
/// RCTL.SBP: store bad packets (bit 2) — left 0, bad frames are dropped by the device.
pub const RCTL_SBP: u32 = 1 << 2;
/// RCTL.UPE / MPE: unicast / multicast promiscuous (bits 3, 4): UPE left 0, MPE set (IPv6
/// neighbour discovery, see `rctl_value`).
pub const RCTL_UPE: u32 = 1 << 3;
pub const RCTL_MPE: u32 = 1 << 4;
/// RCTL.LPE: long packet enable (bit 5) — left 0: frames over 1522 bytes are dropped.
pub const RCTL_LPE: u32 = 1 << 5;
/// RCTL.BAM: accept broadcast (bit 15).
pub const RCTL_BAM: u32 = 1 << 15;
/// RCTL.BSIZE (bits 17:16) with RCTL.BSEX (bit 25): receive buffer size
/// (SDM 13.4.22): BSEX=0: 00=2048; BSEX=1: 11=4096, 10=8192, 01=16384.
pub const RCTL_BSIZE_SHIFT: u32 = 16;
pub const RCTL_BSEX: u32 = 1 << 25;
/// RCTL.SECRC: strip the Ethernet CRC from received frames (bit 26).
pub const RCTL_SECRC: u32 = 1 << 26;

/// Receive Descriptor Base Address Low/High (SDM 13.4.25, 13.4.26; 82574 DS 10.2).
pub const RDBAL: usize = 0x2800;
pub const RDBAH: usize = 0x2804;
/// Receive Descriptor Length in bytes, a multiple of 128 (SDM 13.4.27).
pub const RDLEN: usize = 0x2808;
/// Receive Descriptor Head (SDM 13.4.28) and Tail (SDM 13.4.29).
pub const RDH: usize = 0x2810;
pub const RDT: usize = 0x2818;
/// Receive Delay Timer (SDM 13.4.30): 0 = write back descriptors at once.
pub const RDTR: usize = 0x2820;
/// Receive Interrupt Absolute Delay Timer (SDM 13.4.31).
pub const RADV: usize = 0x282C;

/// 82574: the registers of receive and transmit queue n (RDBALn..RDTn, TDBALn..TDTn,
/// TXDCTLn, TARCn) sit at the queue-0 offset plus n * 0x100 (82574 DS 10.2 register
/// summary: RDBAL1 0x2900, TDBAL1 0x3900, TXDCTL1 0x3928, TARC1 0x3940).
pub const QUEUE_STRIDE: usize = 0x100;

/// The offset of queue `queue`'s copy of the per-queue register `reg` (given at its queue-0
/// offset).
pub const fn queue_reg(reg: usize, queue: usize) -> usize {
    reg + queue * QUEUE_STRIDE
}

/// 82574 Receive Checksum Control (82574 DS 10.2.5.x, RXCSUM). PCSD (bit 13), Packet
/// Checksum Disable: the descriptor's word 0 carries the RSS hash instead of the packet
/// checksum and IP identification; RSS requires it (82574 DS 7.1.2: the hash is reported in
/// the extended descriptor only with PCSD set).
pub const RXCSUM: usize = 0x5000;
pub const RXCSUM_PCSD: u32 = 1 << 13;
/// 82574 Receive Filter Control (RFCTL). EXTEN (bit 15): extended receive descriptors
/// (82574 DS 7.1.4; with RCTL.DTYP = 00b the one-buffer extended format).
pub const RFCTL: usize = 0x5008;
pub const RFCTL_EXTEN: u32 = 1 << 15;
/// 82574 Multiple Receive Queues Command (MRQC, 82574 DS 7.1.2 and the register in 10.2):
/// bits 1:0 Multiple Receive Queues Enable (01b: RSS over the two queues); bits 31:16 the
/// hash functions: TcpIPv4 (16), IPv4 (17), TcpIPv6 (18), IPv6Ex (19), IPv6 (20).
pub const MRQC: usize = 0x5818;
pub const MRQC_RSS_ENABLE: u32 = 0b01;
pub const MRQC_HASH_TCP_IPV4: u32 = 1 << 16;
pub const MRQC_HASH_IPV4: u32 = 1 << 17;
pub const MRQC_HASH_TCP_IPV6: u32 = 1 << 18;
pub const MRQC_HASH_IPV6: u32 = 1 << 20;
/// 82574 RSS Random Key (RSSRK0..9, 82574 DS 7.1.2): the 40-byte Toeplitz key, key byte
/// 4i + j in bits 8j+7:8j of RSSRK\[i\] (byte 0 of the key in the low byte of RSSRK0).
pub const RSSRK: usize = 0x5C80;
pub const RSSRK_WORDS: usize = 10;
/// 82574 Redirection Table (RETA0..31, 82574 DS 7.1.2): 128 one-byte entries, entry i in
/// byte i % 4 of RETA[i / 4]; the low 7 bits of the hash index it, and bit 7 of the entry
/// is the receive queue (the 82574 has two).
pub const RETA: usize = 0x5C00;
pub const RETA_WORDS: usize = 32;
pub const RETA_ENTRIES: usize = 128;
pub const RETA_QUEUE_SHIFT: u32 = 7;

// ---------------------------------------------------------------------------------------
// Transmit
// ---------------------------------------------------------------------------------------

/// Transmit Control (SDM 13.4.33; 82574 DS 10.2).
pub const TCTL: usize = 0x0400;
/// TCTL.EN: transmit enable (SDM table 13-76, bit 1).
pub const TCTL_EN: u32 = 1 << 1;
/// TCTL.PSP: pad short packets to 64 bytes (bit 3).
pub const TCTL_PSP: u32 = 1 << 3;
/// TCTL.CT: collision threshold, bits 11:4; recommended 0Fh (SDM table 13-76).
pub const TCTL_CT_SHIFT: u32 = 4;
pub const TCTL_CT_RECOMMENDED: u32 = 0x0F;
/// TCTL.COLD: collision distance, bits 21:12; 40h for full duplex (SDM table 13-76).
pub const TCTL_COLD_SHIFT: u32 = 12;
pub const TCTL_COLD_FULL_DUPLEX: u32 = 0x40;
/// TCTL.RTLC: re-transmit on late collision (bit 24).
pub const TCTL_RTLC: u32 = 1 << 24;

/// Transmit Inter-Packet Gap (SDM 13.4.34; 82574 DS 10.2): IPGT bits 9:0, IPGR1 bits
/// 19:10, IPGR2 bits 29:20. Values recommended for IEEE 802.3 copper (SDM 13.4.34).
pub const TIPG: usize = 0x0410;
pub const TIPG_COPPER: u32 = 10 | (8 << 10) | (6 << 20);

/// Transmit Descriptor Base Address Low/High (SDM 13.4.36, 13.4.37).
pub const TDBAL: usize = 0x3800;
pub const TDBAH: usize = 0x3804;
/// Transmit Descriptor Length in bytes, a multiple of 128 (SDM 13.4.38).
pub const TDLEN: usize = 0x3808;
/// Transmit Descriptor Head (SDM 13.4.39): written by software only while TCTL.EN is 0.
pub const TDH: usize = 0x3810;
/// Transmit Descriptor Tail (SDM 13.4.40): the doorbell.
pub const TDT: usize = 0x3818;
/// Transmit Interrupt Delay Value (SDM 13.4.41).
pub const TIDV: usize = 0x3820;
/// Transmit Descriptor Control (SDM 13.4.43; 82574 DS 10.2).
pub const TXDCTL: usize = 0x3828;
/// 82574 TXDCTL: WTHRESH (bits 21:16) = 1 and GRAN (bit 24) = 1, the write-back policy the
/// transmit initialisation suggests (82574 DS 4.6), plus bit 22 (descriptor counting), which
/// Linux e1000e also sets for the 82574.
pub const TXDCTL_82574_INIT: u32 = (1 << 16) | (1 << 22) | (1 << 24);
/// Transmit Interrupt Absolute Delay Value (SDM 13.4.44).
pub const TADV: usize = 0x382C;
/// 82574 Transmit Arbitration Count 0: bit 26 set during initialisation (82574 DS 10.2;
/// Linux e1000e does the same).
pub const TARC0: usize = 0x3840;
pub const TARC0_82574_SET_26: u32 = 1 << 26;
/// 82574 TARCn.ENABLE (bit 10): the transmit queue takes part in arbitration (82574 DS
/// 10.2.6.9; set at reset, set again here for queue 1).
pub const TARC_ENABLE: u32 = 1 << 10;
/// 82574 with two transmit queues: TARCn bit 7 (compensation mode) and bits 23-25 set in
/// both TARC0 and TARC1, with bit 26 as for one queue: the multi-queue settings of the 82574
/// specification update's transmit-arbitration erratum (also what FreeBSD's em driver
/// programs for two queues, citing 82574 DS 10.2.6.9).
pub const TARC_82574_MQ: u32 = (1 << 7) | (1 << 23) | (1 << 24) | (1 << 25) | (1 << 26);

// ---------------------------------------------------------------------------------------
// Filters
// ---------------------------------------------------------------------------------------

/// Multicast Table Array, 128 32-bit words (SDM 13.5.1; 82574 DS 10.2).
pub const MTA: usize = 0x5200;
pub const MTA_WORDS: usize = 128;
/// Receive Address Low/High, entry n at +8n (SDM 13.5.2, 13.5.3; 82574 DS 10.2).
pub const RAL0: usize = 0x5400;
pub const RAH0: usize = 0x5404;
/// Number of receive address entries (16 on the 8254x, SDM 13.5.2).
pub const RA_ENTRIES: usize = 16;
/// RAH.AV: address valid (SDM 13.5.3, bit 31).
pub const RAH_AV: u32 = 1 << 31;

// ---------------------------------------------------------------------------------------
// PCIe (82574 only)
// ---------------------------------------------------------------------------------------

/// 3GIO/PCIe Control (82574 DS 10.2, GCR): bit 22 set during initialisation (Linux e1000e
/// does the same for the 82574).
pub const GCR: usize = 0x5B00;
pub const GCR_82574_SET_22: u32 = 1 << 22;
/// 3GIO/PCIe Control 2 (GCR2): bit 0 set works around the unreliable-completion erratum
/// (82574 specification update; Linux e1000e does the same).
pub const GCR2: usize = 0x5B64;
pub const GCR2_82574_SET_0: u32 = 1 << 0;

// ---------------------------------------------------------------------------------------
// Statistics (SDM 13.7; 82574 DS 10.2): all clear on read.
// ---------------------------------------------------------------------------------------

/// CRC Error Count (SDM 13.7.1).
pub const CRCERRS: usize = 0x4000;
/// RX Error Count (SDM 13.7.4).
pub const RXERRC: usize = 0x400C;
/// Missed Packets Count: dropped for lack of FIFO or buffer space (SDM 13.7.5).
pub const MPC: usize = 0x4010;
/// Excessive Collisions Count: frames abandoned after 16 attempts (SDM 13.7.7).
pub const ECOL: usize = 0x4018;
/// Late Collisions Count (SDM 13.7.9).
pub const LATECOL: usize = 0x4020;
/// Good Packets Received Count (SDM 13.7.27).
pub const GPRC: usize = 0x4074;
/// Good Packets Transmitted Count (SDM 13.7.30).
pub const GPTC: usize = 0x4080;
/// Good Octets Received Count, low/high; reading the high word clears both (SDM 13.7.31).
pub const GORCL: usize = 0x4088;
pub const GORCH: usize = 0x408C;
/// Good Octets Transmitted Count, low/high (SDM 13.7.32).
pub const GOTCL: usize = 0x4090;
pub const GOTCH: usize = 0x4094;
/// Receive No Buffers Count (SDM 13.7.33).
pub const RNBC: usize = 0x40A0;
/// TCP Segmentation Context Transmit Fail Count (SDM 13.7).
pub const TSCTFC: usize = 0x40FC;

/// Length of the Ethernet FCS, which the octet counters include.
pub const FCS_LEN: u64 = 4;
