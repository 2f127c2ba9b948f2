//! TLS 1.3 (see the module docs once complete).

pub mod aead;
