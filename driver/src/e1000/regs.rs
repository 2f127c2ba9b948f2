//! Register offsets in BAR0 (8254x SDM table 13-2; 82574 DS section 10.2).

/// Device Control (8254x SDM 13.4.1).
pub const CTRL: usize = 0x0000;
/// Device Status (8254x SDM 13.4.2).
pub const STATUS: usize = 0x0008;
/// EEPROM Read (8254x SDM 13.4.6).
pub const EERD: usize = 0x0014;
/// Receive Address Low/High, entry 0 (8254x SDM 13.4.22).
pub const RAL0: usize = 0x5400;
pub const RAH0: usize = 0x5404;
/// RAH "address valid" bit.
pub const RAH_AV: u32 = 1 << 31;
