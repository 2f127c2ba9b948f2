//! Intel 8254x (82540EM, 82545EM) and 82574L driver.
//!
//! References: "PCI/PCI-X Family of Gigabit Ethernet Controllers Software Developer's Manual"
//! (8254x SDM, 317453006EN) and the "82574 GbE Controller Datasheet" (82574 DS).

pub mod regs;

use crate::mmio::Mmio;
use crate::queue::MacAddress;

/// The station address from Receive Address 0 (RAL0/RAH0), which the controller loads from
/// the EEPROM at reset (8254x SDM section 13.4.22; 82574 DS section 10.2.5.13).
pub fn read_mac_from_receive_address(bar0: &Mmio) -> Option<MacAddress> {
    let low = bar0.read32(regs::RAL0);
    let high = bar0.read32(regs::RAH0);
    if high & regs::RAH_AV == 0 {
        return None;
    }
    let l = low.to_le_bytes();
    let h = high.to_le_bytes();
    Some(MacAddress([l[0], l[1], l[2], l[3], h[0], h[1]]))
}
