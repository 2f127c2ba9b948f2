//! `zerosend serve`'s IPv6 flags: what they mean for the stack, and the line that tells a
//! user (and the guest tests) where the server answers over IPv6.

use anyhow::{bail, Context, Result};
use netstack::{Ipv6Address, Ipv6Cidr, Ipv6Config, MAX_STATIC_IPV6};

/// The stack's IPv6 configuration from `--ipv6 ADDR/PREFIX` (repeatable), `--ipv6-gateway`
/// and `--ipv6-slaac`. IPv6 is always on: the link-local address (from the MAC) answers
/// whatever is given.
pub fn config(
    addresses: &[String],
    gateway: Option<Ipv6Address>,
    slaac: bool,
) -> Result<Ipv6Config> {
    if addresses.len() > MAX_STATIC_IPV6 {
        bail!(
            "{} --ipv6 addresses given, at most {MAX_STATIC_IPV6} are supported",
            addresses.len()
        );
    }
    let cidrs = addresses
        .iter()
        .map(|text| parse_cidr(text))
        .collect::<Result<Vec<_>>>()?;
    let mut config = Ipv6Config::with_addresses(&cidrs)?;
    config.gateway = gateway;
    config.slaac = slaac;
    Ok(config)
}

fn parse_cidr(text: &str) -> Result<Ipv6Cidr> {
    let (addr, prefix) = text
        .split_once('/')
        .with_context(|| format!("--ipv6 {text:?}: expected ADDR/PREFIX such as fd00::2/64"))?;
    let prefix: u8 = prefix
        .parse()
        .ok()
        .filter(|p| *p <= 128)
        .with_context(|| format!("--ipv6 {text:?}: bad prefix length (0..=128)"))?;
    let addr: Ipv6Address = addr
        .parse()
        .with_context(|| format!("--ipv6 {text:?}: bad IPv6 address"))?;
    if addr.is_unspecified() || addr.is_multicast() || addr.is_loopback() {
        bail!("--ipv6 {text:?}: not a unicast address for an interface");
    }
    Ok(Ipv6Cidr::new(addr, prefix))
}

/// `zerosend: IPv6 on [fe80::...]:80 [fd00::2]:80`: every IPv6 address of the interface
/// with each port (HTTPS marked), in the form `curl -g 'http://[ADDR]:PORT/'` takes.
pub fn announce(addresses: &[Ipv6Cidr], ports: &[(u16, bool)]) -> String {
    let mut on = Vec::new();
    for address in addresses {
        for &(port, https) in ports {
            let mark = if https { " (https)" } else { "" };
            on.push(format!("[{}]:{port}{mark}", address.address()));
        }
    }
    format!("zerosend: IPv6 on {}", on.join(" "))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v6(text: &str) -> Ipv6Address {
        text.parse().unwrap()
    }

    #[test]
    fn flags_become_the_stack_configuration() {
        let c = config(
            &["fd00::2/64".into()],
            Some("fd00::1".parse().unwrap()),
            true,
        )
        .unwrap();
        assert!(c.enabled && c.slaac);
        assert_eq!(c.addresses[0], Some(Ipv6Cidr::new(v6("fd00::2"), 64)));
        assert_eq!(c.gateway, Some(v6("fd00::1")));
        let link_local_only = config(&[], None, false).unwrap();
        assert!(link_local_only.enabled);
        assert_eq!(link_local_only.addresses, [None; MAX_STATIC_IPV6]);
    }

    #[test]
    fn bad_flags_are_refused_with_the_reason() {
        for (text, why) in [
            ("fd00::2", "ADDR/PREFIX"),
            ("fd00::2/129", "prefix"),
            ("10.0.0.1/24", "bad IPv6 address"),
            ("ff02::1/64", "unicast"),
            ("::/0", "unicast"),
        ] {
            let e = config(&[text.into()], None, false).unwrap_err();
            assert!(format!("{e:#}").contains(why), "{text}: {e:#}");
        }
        let five: Vec<String> = (1..=5).map(|i| format!("fd00::{i}/64")).collect();
        assert!(config(&five, None, false).is_err());
    }

    #[test]
    fn the_announcement_names_every_address_and_port() {
        let addresses = [
            Ipv6Cidr::new(v6("fe80::1"), 64),
            Ipv6Cidr::new(v6("fd00::2"), 64),
        ];
        assert_eq!(
            announce(&addresses, &[(80, false), (443, true)]),
            "zerosend: IPv6 on [fe80::1]:80 [fe80::1]:443 (https) [fd00::2]:80 [fd00::2]:443 (https)"
        );
    }
}
