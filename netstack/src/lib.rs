//! smoltcp-based IPv4/TCP with zero-copy file send (see docs/architecture.md).
