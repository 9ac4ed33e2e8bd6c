//! Types and constants shared by the eBPF programs (`ebpf/`) and the proxy (`proxy/`).
#![no_std]
